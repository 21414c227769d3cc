"""Publishing a segmenter offline: a real ``SemanticSegmenter`` Lightning checkpoint -> ``hub_upload.py --dry-run``
-> a segmenter folder (``"task": "segmentation"``) -> ``zoo.load_model`` with the same checks as classifiers."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import hub_upload  # the entry point at the repo root; code in zoo.hub.publish
import zoo
from lightning_modules.segmentation import SemanticSegmenter
from zoo.hub import WeightsError, state_dict_sha256
from zoo.hub.folders import record_model_config_digest

# the checkpoint comes from a plain Lightning Trainer (no zoo_sha256): loading it warns, as documented
pytestmark = pytest.mark.filterwarnings('ignore::zoo.hub.UnverifiedWeightsWarning')

NAME = 'deeplabv3_resnet18_wsbcn'
CLASSES = ['sky', 'road', 'car']
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
X = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(5))


class TinySegmentation(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {'image': torch.randn(3, 48, 48, generator=g), 'mask': torch.randint(0, 3, (48, 48), generator=g)}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Two steps of the real SemanticSegmenter (WS+BCN DeepLabV3, 2 images per device), a checkpoint, and the
    LightningCLI config.yaml next to it (class names as a file under the data root, mean / std / eval size)."""
    root = tmp_path_factory.mktemp('seg_run')
    (root / 'data').mkdir()
    (root / 'data' / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
    model_args = dict(model_name=NAME, num_classes=3, model_kwargs=dict(output_stride=16, aux_loss=True))
    config = {'seed_everything': 0, 'model': {'class_path': 'lightning_modules.segmentation.SemanticSegmenter',
                                              'init_args': model_args},
              'data': {'class_path': 'lightning_modules.segmentation.SegmentationDataModule',
                       'init_args': {'root': str(root / 'data'), 'num_classes': 3, 'class_names': 'classes.txt',
                                     'eval_size': 48, 'mean': MEAN, 'std': STD, 'batch_size': 2}}}
    (root / 'config.yaml').write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    module = SemanticSegmenter(**model_args)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator='cpu', devices=1)
    trainer.fit(module, torch.utils.data.DataLoader(TinySegmentation(), batch_size=2))
    ckpt = root / 'checkpoints' / 'last.ckpt'
    trainer.save_checkpoint(ckpt)
    return module.model.eval(), ckpt


METRICS = {'test/miou': 0.4321, 'test/pixel_acc': 0.8765, 'test/iou_0': 0.9, 'test/iou_1': 0.3, 'test/iou_2': 0.0963}


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
    metrics = tmp_path_factory.mktemp('metrics') / 'metrics.json'
    metrics.write_text(json.dumps(METRICS))
    out = tmp_path_factory.mktemp('export') / f'{NAME}.tiny'
    assert hub_upload.main([str(run[1]), '--repo-id', f'wsbcn-zoo/{NAME}.tiny', '--dry-run', '--out', str(out),
                            '--dataset', 'tinyseg', '--metrics', str(metrics)]) == 0
    return out


def _out(model, x=X):
    with torch.no_grad():
        return model.eval()(x)['out']


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_segmenter_folder_records_task_name_classes_preprocessing_and_digest(exported):
    assert {p.name for p in exported.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    cfg = json.loads((exported / 'config.json').read_text())
    assert cfg['task'] == 'segmentation' and cfg['architecture'] == NAME and cfg['num_classes'] == 3
    assert cfg['model_args'] == {'output_stride': 16, 'aux_loss': True, 'num_classes': 3}
    assert cfg['label_names'] == CLASSES  # from class_names: classes.txt under the config's data root
    pc = cfg['pretrained_cfg']
    assert pc['mean'] == MEAN and pc['std'] == STD and pc['eval_size'] == 48 and pc['input_size'] == [3, 48, 48]
    assert cfg['zoo']['state_dict_sha256'] == state_dict_sha256(load_file(exported / 'model.safetensors'))
    assert cfg['zoo']['model_config_sha256']


def test_segmenter_card_has_miou_model_index_class_iou_and_papers(exported):
    card = ModelCard.load(exported / 'README.md')
    results = {r.metric_name: r for r in card.data.eval_results}
    miou = results['mIoU']
    assert miou.task_type == 'image-segmentation' and miou.metric_type == 'mean_iou' and miou.metric_value == 43.21
    assert miou.dataset_type == 'tinyseg' and miou.dataset_split == 'test'
    assert results['pixel accuracy'].metric_value == 87.65
    text = (exported / 'README.md').read_text()
    for needle in ('pipeline_tag: image-segmentation', 'DeepLabV3 with a resnet18_wsbcn backbone', NAME,
                   'arXiv:1706.05587', 'arXiv:1903.10520', 'arXiv:1512.03385', '@article{chen2017rethinking',
                   '| 1 | road | 30.00 |', '| 2 | car | 9.63 |', '**Images per device:** 2', '**Classes:** 3 (sky, road, car)',
                   'eval_size: 48', 'output_stride', "zoo.load_model('wsbcn-zoo/deeplabv3_resnet18_wsbcn.tiny')"):
        assert needle in text, needle


def test_segmenter_loads_back_with_identical_logits(run, exported):
    model, ckpt = run
    expected = _out(model)
    for loaded in (zoo.load_model(exported), zoo.load_hub_model(f'local-dir:{exported}'),
                   zoo.load_lightning_checkpoint(ckpt), zoo.load_model(ckpt)):
        assert type(loaded).__name__ == 'ZooDeepLabV3' and loaded.aux_classifier is not None
        assert torch.equal(_out(loaded), expected)
    again = zoo.load_model(exported)
    assert again.pretrained_cfg['label_names'] == CLASSES and again.pretrained_cfg['task'] == 'segmentation'


def test_re_exporting_a_segmenter_folder_keeps_it(exported, tmp_path):
    out = tmp_path / 'again'
    assert hub_upload.main([str(exported), '--repo-id', f'wsbcn-zoo/{NAME}.tiny', '--dry-run', '--out', str(out)]) == 0
    first, second = (json.loads((d / 'config.json').read_text()) for d in (exported, out))
    assert second['zoo'] == first['zoo'] and second['model_args'] == first['model_args']
    assert second['label_names'] == CLASSES
    assert {r.metric_name for r in ModelCard.load(out / 'README.md').data.eval_results} == {'mIoU', 'pixel accuracy'}


def test_tampered_segmenter_weights_are_refused_naming_the_file(exported, tmp_path):
    bad = _copy(exported, tmp_path / 'bad')
    sd = load_file(bad / 'model.safetensors')
    sd['classifier.4.bias'] = sd['classifier.4.bias'] + 0.5
    save_file(sd, bad / 'model.safetensors')
    with pytest.raises(WeightsError, match=r'bad/model\.safetensors do not match the digest'):
        zoo.load_model(bad)


def test_edited_segmenter_config_is_refused(exported, tmp_path):
    for field, value in (('task', None), ('model_args', {'output_stride': 8, 'aux_loss': True, 'num_classes': 3})):
        bad = _copy(exported, tmp_path / f'edit_{field}')
        cfg = json.loads((bad / 'config.json').read_text())
        cfg[field] = value
        (bad / 'config.json').write_text(json.dumps(cfg))
        with pytest.raises(WeightsError, match='modified after publishing'):
            zoo.load_model(bad)


def test_unknown_segmenter_name_gives_close_matches(exported, tmp_path):
    """A folder recording a segmenter this zoo does not have (digests re-recorded: not an edit, say a newer zoo)."""
    other = _copy(exported, tmp_path / 'other')
    cfg = json.loads((other / 'config.json').read_text())
    cfg['architecture'] = 'deeplabv3_resnet18_wsbcm'
    (other / 'config.json').write_text(json.dumps(cfg))
    record_model_config_digest(other)
    with pytest.raises(zoo.UnknownModelError, match=f"Unknown segmenter 'deeplabv3_resnet18_wsbcm'.*Close matches: {NAME}"):
        zoo.load_model(other)
