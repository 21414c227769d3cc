"""Publishing detectors and video models offline, as segmenters and classifiers: a real ``DetectionModule`` /
``VideoClassifier`` checkpoint (written with zoo-train's digest) -> ``hub_upload.py --dry-run`` -> a folder ->
``zoo.load_model`` giving the checkpoint's outputs bit for bit; tampered weights, edited configs, unknown tasks
and architectures refused, naming the file; a card that states the task and the run's metric."""
import copy
import csv
import json
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import hub_upload  # the entry point at the repo root; code in zoo.hub.publish
import zoo
from lightning_modules.core.checkpointing import DigestCheckpointIO
from lightning_modules.detection import CocoDetectionDataModule, DetectionModule
from lightning_modules.video import VideoClassifier
from test_detection_data import make_coco
from test_detection_module import SMALL  # few anchors and regions, and every scored box kept (box_score_thresh=0)
from test_hub_segmenter import _copy
from zoo.hub import WeightsError, load_weights, state_dict_sha256
from zoo.hub.folders import record_model_config_digest
from zoo.hub.publish import RunInfo, check_round_trip, eval_results
from zoo.hub.task_models import task_build_kwargs

DETECTOR = 'maskrcnn_resnet18_fpn_wsbcn'
VIDEO = 'tsm_resnet18_wsbcn'
TV_MEAN, TV_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's GeneralizedRCNNTransform defaults
MEAN, STD = [0.45, 0.45, 0.45], [0.225, 0.225, 0.225]  # the video run's DataModule
IMAGES = [torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(7))]
CLIPS = torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(7))  # (B, C, T, H, W), T = 2


def _trainer():
    """One optimizer step, saved through zoo-train's checkpoint I/O (the zoo_sha256 digest)."""
    return L.Trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator='cpu', devices=1,
                     plugins=[DigestCheckpointIO()])


def _write_run_logs(run: Path, config: dict, metrics: dict) -> None:
    """config.yaml and a CSVLogger metrics.csv where zoo-train leaves them, next to checkpoints/."""
    (run / 'config.yaml').write_text(yaml.safe_dump(config))
    with open(run / 'metrics.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['epoch', 'step', *metrics])
        w.writeheader()
        w.writerow(dict(epoch=0, step=1, **metrics))


def _export(ckpt: Path, out: Path, *extra) -> Path:
    assert hub_upload.main([str(ckpt), '--repo-id', f'wsbcn-zoo/{out.name}', '--dry-run', '--out', str(out),
                            '--dataset', 'tiny', *extra]) == 0
    return out


def _edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / 'config.json').read_text())
    cfg.update(fields)
    (folder / 'config.json').write_text(json.dumps(cfg))


def _verified(ckpt: Path) -> bool:
    """The checkpoint carries zoo-train's digest and matches it."""
    return zoo.hub.read_lightning_checkpoint(ckpt).verified


def _detections(model):
    with torch.no_grad():
        return model.eval()(IMAGES)


def _assert_same_detections(a, b):
    assert len(a) == len(b) == len(IMAGES)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {'boxes', 'labels', 'scores', 'masks'}
        assert len(x['boxes']) > 0  # something to compare: every scored box is kept (box_score_thresh=0)
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _clip_logits(model):
    with torch.no_grad():
        return model.eval()(CLIPS)


# ----------------------------------------------------------------------------------- runs

@pytest.fixture(scope='module')
def detection_run(tmp_path_factory):
    """One step of the real DetectionModule (Mask R-CNN R-18 WS+BCN) on three 60x40 COCO images, min_size 64 from
    the DataModule (so only the checkpoint's detector_input_size records it), and its run logs."""
    root = tmp_path_factory.mktemp('det_run')
    make_coco(root)
    data_args = dict(root=str(root), train_images='images', train_annotations='instances.json', val_images='images',
                     val_annotations='instances.json', min_size=64, max_size=96, batch_size=1, num_workers=0)
    model_args = dict(model_name=DETECTOR, num_classes=3, model_kwargs=dict(SMALL, checkpoint_heads=True),
                      optim=dict(lr=0.01, warmup_steps=0, milestones=[1.0]))
    torch.manual_seed(0)
    module = DetectionModule(**model_args)
    trainer = _trainer()
    trainer.fit(module, CocoDetectionDataModule(**data_args))
    run = root / 'run'
    ckpt = run / 'checkpoints' / 'last.ckpt'
    trainer.save_checkpoint(ckpt)
    _write_run_logs(run, {'seed_everything': 0, 'model': {'class_path': 'lightning_modules.detection.DetectionModule',
                                                          'init_args': model_args},
                          'data': {'class_path': 'lightning_modules.detection.CocoDetectionDataModule',
                                   'init_args': data_args}},
                    {'val/bbox_map': 0.25, 'val/segm_map': 0.2, 'test/bbox_map': 0.1234, 'test/segm_map': 0.0567})
    return module.model.eval(), ckpt


@pytest.fixture(scope='module')
def video_run(tmp_path_factory):
    """One step of the real VideoClassifier (TSM R-18 WS+BCN, T = 2 frames of 32x32) and its run logs."""
    run = tmp_path_factory.mktemp('video_run')
    model_args = dict(model_name=VIDEO, num_classes=3, num_segments=2,
                      optim=dict(optimizer='sgd', lr=0.01, schedule='constant'))
    g = torch.Generator().manual_seed(0)
    clips = [{'video': torch.randn(3, 2, 32, 32, generator=g), 'label': i % 3, 'skipped': 0} for i in range(2)]
    torch.manual_seed(0)
    module = VideoClassifier(**model_args)
    trainer = _trainer()
    trainer.fit(module, torch.utils.data.DataLoader(clips, batch_size=2))
    ckpt = run / 'checkpoints' / 'last.ckpt'
    trainer.save_checkpoint(ckpt)
    _write_run_logs(run, {'seed_everything': 0, 'model': {'class_path': 'lightning_modules.video.VideoClassifier',
                                                          'init_args': model_args},
                          'data': {'class_path': 'lightning_modules.video.VideoDataModule',
                                   'init_args': {'train': 'train.csv', 'num_segments': 2, 'crop_size': 32,
                                                 'mean': MEAN, 'std': STD, 'batch_size': 2}}},
                    {'val/top1': 0.5, 'test/top1': 0.6667, 'test/clip_top1': 0.5})
    return module.model.eval(), ckpt


@pytest.fixture(scope='module')
def detector_folder(detection_run, tmp_path_factory):
    return _export(detection_run[1], tmp_path_factory.mktemp('export') / f'{DETECTOR}.tiny')


@pytest.fixture(scope='module')
def video_folder(video_run, tmp_path_factory):
    return _export(video_run[1], tmp_path_factory.mktemp('export') / f'{VIDEO}.tiny')


# ----------------------------------------------------------------------------------- detectors

def test_detector_folder_records_task_build_kwargs_labels_preprocessing_and_digests(detection_run, detector_folder):
    assert _verified(detection_run[1])
    assert {p.name for p in detector_folder.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    cfg = json.loads((detector_folder / 'config.json').read_text())
    assert cfg['task'] == 'detection' and cfg['architecture'] == DETECTOR and cfg['num_classes'] == 3
    assert cfg['model_args'] == dict(SMALL, num_classes=3, min_size=64, max_size=96)  # no training-only switch
    assert cfg['label_names'] == ['__background__', 'person', 'airplane']  # the run's COCO categories, by label
    pc = cfg['pretrained_cfg']
    assert (pc['mean'], pc['std'], pc['eval_size'], pc['max_size']) == (TV_MEAN, TV_STD, 64, 96)
    assert cfg['zoo']['state_dict_sha256'] == state_dict_sha256(load_file(detector_folder / 'model.safetensors'))



def test_detector_loads_back_with_identical_detections(detection_run, detector_folder):
    model, ckpt = detection_run
    expected = _detections(model)
    for loaded in (zoo.load_model(detector_folder), zoo.load_model(ckpt)):
        assert type(loaded).__name__ == 'MaskRCNN' and loaded.transform.min_size == (64,)
        _assert_same_detections(_detections(loaded), expected)
    assert zoo.load_model(detector_folder).pretrained_cfg['label_names'][1:] == ['person', 'airplane']


def test_detector_card_states_the_task_and_the_runs_box_and_mask_map(detector_folder):
    card = ModelCard.load(detector_folder / 'README.md')
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results.keys() == {'box mAP', 'mask mAP'}
    box = results['box mAP']
    assert (box.task_type, box.dataset_type, box.dataset_split, box.metric_value) == (
        'object-detection', 'tiny', 'test', 12.34)
    assert results['mask mAP'].metric_value == 5.67
    text = (detector_folder / 'README.md').read_text()
    for needle in ('pipeline_tag: object-detection', 'Mask R-CNN with FPN and a resnet18_wsbcn backbone',
                   '`zoo.create_detector`', '**Task:** instance segmentation', '| test/bbox_map | 0.1234 |',
                   '**Classes:** 3 including the background, label 0 (__background__, person, airplane)',
                   'shorter side 64, longer side at most 96', 'arXiv:1703.06870', 'arXiv:1612.03144',
                   "zoo.load_model('wsbcn-zoo/maskrcnn_resnet18_fpn_wsbcn.tiny')", '**Images per device:** 1'):
        assert needle in text, needle


def test_the_reload_check_compares_detections_even_where_the_detector_finds_nothing(detection_run, detector_folder):
    model = copy.deepcopy(detection_run[0])
    model.roi_heads.score_thresh = 1.0  # no box scores above it: empty outputs would always be equal
    check_round_trip(model, detector_folder)  # the published weights: the same detections
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] += 1e-3
    with pytest.raises(RuntimeError, match='does not reproduce the source model'):
        check_round_trip(model, detector_folder)
    assert model.roi_heads.score_thresh == 1.0  # restored after the check


def test_data_flags_are_refused_for_a_detector(detection_run, tmp_path, capsys):
    assert hub_upload.main([str(detection_run[1]), '--repo-id', 'org/x', '--dry-run', '--out', str(tmp_path / 'x'),
                            '--mean', '0.5', '0.5', '0.5']) == 2
    assert 'mean do not apply to a detector' in capsys.readouterr().err and not (tmp_path / 'x').exists()


@pytest.mark.parametrize('name, backbone', [('fasterrcnn_resnet18_fpn', 'resnet18'),
                                            ('fasterrcnn_resnet50_fpn_wsbcn', 'resnet50_wsbcn')])
def test_a_pretrained_backbone_run_is_rebuilt_without_its_download(tmp_path, name, backbone):
    """The BN baseline froze its BN, the BCN+WS backbone took its tag's ws_formula='bcn': the recorded kwargs rebuild
    both without the ImageNet file (here a local one, the run's pretrained_backbone=PATH)."""
    weights = tmp_path / f'{backbone}.safetensors'
    save_file(timm.create_model(backbone).state_dict(), str(weights))
    model_kwargs = dict(min_size=64, max_size=96, box_score_thresh=0.0, box_detections_per_img=5,
                        backbone_kwargs=dict(checkpoint_stages=True))
    torch.manual_seed(0)
    trained = zoo.create_detector(name, num_classes=3, pretrained_backbone=str(weights), **model_kwargs).eval()
    kwargs = task_build_kwargs(name, dict(num_classes=3, pretrained_backbone=str(weights), model_kwargs=model_kwargs))
    assert 'checkpoint_stages' not in kwargs.get('backbone_kwargs', {})
    assert kwargs.get('frozen_bn') is (True if backbone == 'resnet18' else None)
    assert kwargs.get('backbone_kwargs', {}).get('ws_formula') == (None if backbone == 'resnet18' else 'bcn')
    rebuilt = load_weights(zoo.create_detector(name, **kwargs).eval(), trained.state_dict())  # same keys, strictly
    norms = [[type(m) for m in d.modules() if 'Norm' in type(m).__name__] for d in (trained, rebuilt)]
    assert norms[0] == norms[1]  # the BN baseline's FrozenBatchNorm2d too (its eval outputs equal BatchNorm2d's)
    with torch.no_grad():
        a, b = trained(IMAGES), rebuilt(IMAGES)
    assert len(a[0]['boxes']) > 0 and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# ----------------------------------------------------------------------------------- video models

def test_video_folder_records_num_segments_task_and_frame_size(video_run, video_folder):
    assert _verified(video_run[1])
    cfg = json.loads((video_folder / 'config.json').read_text())
    assert cfg['task'] == 'video-classification' and cfg['architecture'] == VIDEO and cfg['num_classes'] == 3
    assert cfg['model_args']['num_segments'] == 2
    pc = cfg['pretrained_cfg']
    assert pc['input_size'] == [3, 32, 32] and pc['mean'] == MEAN and pc['std'] == STD  # the run's crop_size, mean, std
    assert cfg['zoo']['state_dict_sha256'] == state_dict_sha256(load_file(video_folder / 'model.safetensors'))


def test_video_model_loads_back_with_identical_logits(video_run, video_folder):
    model, ckpt = video_run
    expected = _clip_logits(model)
    for loaded in (zoo.load_model(video_folder), zoo.load_model(ckpt),
                   timm.create_model(f'local-dir:{video_folder}', pretrained=True)):
        assert loaded.num_segments == 2
        assert torch.equal(_clip_logits(loaded), expected)


def test_video_card_states_a_video_model_of_t_frames_and_the_runs_accuracy(video_folder):
    card = ModelCard.load(video_folder / 'README.md')
    top1 = {r.metric_name: r for r in card.data.eval_results}['top-1 accuracy']
    assert (top1.task_type, top1.dataset_split, top1.metric_value) == ('video-classification', 'test', 66.67)
    text = (video_folder / 'README.md').read_text()
    for needle in ('pipeline_tag: video-classification', 'a video model taking T = 2 frames',
                   'clips x of shape (N, 3, 2, 32, 32)', '"num_segments": 2', 'arXiv:1811.08383',
                   'clip = torch.randn(1, 3, 2, 32, 32)', '| test/top1 | 0.6667 |'):
        assert needle in text, needle


# ----------------------------------------------------------------------------------- both

@pytest.mark.parametrize('folder', ['detector_folder', 'video_folder'])
def test_re_exporting_a_folder_keeps_it(folder, request, tmp_path):
    first = request.getfixturevalue(folder)
    again = _export(first, tmp_path / first.name)
    a, b = (json.loads((d / 'config.json').read_text()) for d in (first, again))
    assert b['zoo'] == a['zoo'] and b['model_args'] == a['model_args'] and b['task'] == a['task']
    assert b.get('label_names') == a.get('label_names')
    assert b['pretrained_cfg']['input_size'] == a['pretrained_cfg']['input_size']
    assert ({r.metric_name for r in ModelCard.load(again / 'README.md').data.eval_results}
            == {r.metric_name for r in ModelCard.load(first / 'README.md').data.eval_results})


@pytest.mark.parametrize('folder, key', [('detector_folder', 'roi_heads.box_predictor.cls_score.bias'),
                                         ('video_folder', 'fc.bias')])
def test_tampered_weights_are_refused_naming_the_file(folder, key, request, tmp_path):
    bad = _copy(request.getfixturevalue(folder), tmp_path / 'bad')
    sd = load_file(bad / 'model.safetensors')
    sd[key] = sd[key] + 0.5
    save_file(sd, bad / 'model.safetensors')
    with pytest.raises(WeightsError, match=r'bad/model\.safetensors do not match the digest'):
        zoo.load_model(bad)


@pytest.mark.parametrize('folder, field, value', [
    ('detector_folder', 'model_args', dict(SMALL, num_classes=3, min_size=32, max_size=96)),
    ('detector_folder', 'task', 'segmentation'),
    ('detector_folder', 'architecture', 'maskrcnn_resnet18_fpn_wsgn'),
    ('video_folder', 'model_args', {'num_segments': 4, 'num_classes': 3, 'in_chans': 3, 'global_pool': 'avg'}),
    ('video_folder', 'task', None)])
def test_edited_config_is_refused(folder, field, value, request, tmp_path):
    bad = _copy(request.getfixturevalue(folder), tmp_path / 'edited')
    _edit_config(bad, **{field: value})
    with pytest.raises(WeightsError, match='modified after publishing'):
        zoo.load_model(bad)


@pytest.mark.parametrize('folder, field, value, error, message', [
    ('detector_folder', 'task', 'keypoints', WeightsError, r"other/config\.json: unknown task 'keypoints'"),
    ('video_folder', 'task', 'keypoints', WeightsError, r"other/config\.json: unknown task 'keypoints'"),
    ('detector_folder', 'architecture', 'maskrcnn_resnet18_fpn_wsbcm', zoo.UnknownModelError,
     rf"other/config\.json: Unknown detector 'maskrcnn_resnet18_fpn_wsbcm'.*Close matches: {DETECTOR}"),
    ('video_folder', 'architecture', 'tsm_resnet18_wsbcm', WeightsError,
     r"other/config\.json names architecture 'tsm_resnet18_wsbcm'")])
def test_unknown_task_or_architecture_is_an_error_naming_the_config(folder, field, value, error, message, request,
                                                                    tmp_path):
    """Folders recording what this zoo does not have (digests re-recorded: not edits, say a newer zoo's folders)."""
    other = _copy(request.getfixturevalue(folder), tmp_path / 'other')
    _edit_config(other, **{field: value})
    record_model_config_digest(other)
    with pytest.raises(error, match=message):
        zoo.load_model(other)


# ----------------------------------------------------------------------------------- cards of runs without a test

def test_a_run_without_test_metrics_reports_its_validation_ones():
    info = RunInfo(source='run.ckpt', dataset='coco', metrics={'val/bbox_map': 0.25, 'val/segm_map': 0.2})
    results = eval_results('org/x', info, 'detection')
    assert [(r.metric_name, r.dataset_split, r.metric_value) for r in results] == [
        ('box mAP', 'validation', 25.0), ('mask mAP', 'validation', 20.0)]
    info.metrics['test/bbox_map'] = 0.125
    assert [(r.metric_name, r.dataset_split) for r in eval_results('org/x', info, 'detection')] == [('box mAP', 'test')]
