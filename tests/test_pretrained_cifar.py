"""The CIFAR-10 weights the zoo ships: they load offline by tag and score what their model cards say.

Evaluation here is independent of the training code: test images are read straight from the
shared archive and preprocessed with timm's transform from the model's own data config.
"""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

import zoo
from zoo.hub import WeightsError
from zoo.models._weights import SHIPPED_WEIGHTS_DIR, shipped_weights
from zoo.models.cifar_resnet import CIFAR10_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
SHIPPED = sorted(p.parent.name for p in SHIPPED_WEIGHTS_DIR.glob('*/model.safetensors'))
# Scoring all 10,000 test images takes 10-30 s per weight: the headline weights in the default run, the rest slow.
HEADLINE = 'resnet20_wsbcn.cifar10'


def card_accuracy(name: str, metric: str = 'top-1 accuracy') -> float:
    results = ModelCard.load(SHIPPED_WEIGHTS_DIR / name / 'README.md').data.eval_results
    return next(r.metric_value for r in results if r.metric_name == metric and r.dataset_split == 'test')


@pytest.fixture(scope='module')
def test_split():
    """All 10,000 CIFAR-10 test images (PIL) and labels, read from the archive itself."""
    if not ARCHIVE.is_file():
        pytest.skip(f'CIFAR-10 archive not found at {ARCHIVE}')
    images, labels = [], []
    with tarfile.open(ARCHIVE, 'r:gz') as tar:
        for member in tar:
            parts = member.name.split('/')
            if member.isfile() and len(parts) == 3 and parts[0] == 'test':
                images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
                labels.append(CIFAR10_CLASSES.index(parts[1]))
    assert len(images) == 10_000
    return images, torch.tensor(labels)


def test_at_least_the_headline_weights_are_shipped():
    assert HEADLINE in SHIPPED and 'resnet20.cifar10' in SHIPPED


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_folder_is_a_small_registered_hub_folder(name):
    folder = SHIPPED_WEIGHTS_DIR / name
    assert {p.name for p in folder.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    assert name in timm.list_pretrained(name)
    assert (folder / 'model.safetensors').stat().st_size < 8 * 2 ** 20
    state_dict = load_file(folder / 'model.safetensors')
    assert all(v.dtype == torch.float32 for v in state_dict.values() if v.is_floating_point())
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name.split('.')[0] and config['label_names'] == list(CIFAR10_CLASSES)
    assert timm.create_model(name).pretrained_cfg['file'] == str(shipped_weights(name))


@pytest.mark.parametrize('name', [n if n == HEADLINE else pytest.param(n, marks=pytest.mark.slow) for n in SHIPPED])
def test_shipped_weights_load_offline_and_score_their_card_accuracy(name, test_split, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = timm.create_model(name, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    images, labels = test_split
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            x = torch.stack([transform(im) for im in images[start:start + 500]])
            correct += (model(x).argmax(1) == labels[start:start + 500]).sum().item()
    accuracy = 100 * correct / len(images)
    assert abs(accuracy - card_accuracy(name)) <= 0.1, (accuracy, card_accuracy(name))


@pytest.mark.parametrize('name', SHIPPED[:1])
def test_shipped_folder_loads_through_the_hub_loaders_too(name):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    by_tag = timm.create_model(name, pretrained=True).eval()
    by_folder = zoo.load_model(f'local-dir:{SHIPPED_WEIGHTS_DIR / name}').eval()
    with torch.no_grad():
        assert torch.equal(by_tag(x), by_folder(x))


@pytest.mark.parametrize('name', SHIPPED[:1])
def test_modified_shipped_weights_are_refused(name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(SHIPPED_WEIGHTS_DIR / name, copy)
    state_dict = load_file(copy / 'model.safetensors')
    key = next(k for k, v in state_dict.items() if v.is_floating_point())
    state_dict[key] = state_dict[key] + 1e-3
    save_file(state_dict, copy / 'model.safetensors')
    with pytest.raises(WeightsError, match='digest|modified|sha256'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(copy / 'model.safetensors')))


def test_tag_names_follow_the_registered_weights():
    from publish_cifar_weights import tag_for
    assert tag_for('resnet20', 'BN', 128) == 'resnet20.cifar10'
    assert tag_for('resnet20', 'BN', 2) == 'resnet20.cifar10_b2'
    assert tag_for('resnet20_wsbcn', 'WS+BCN', 2) == 'resnet20_wsbcn.cifar10'
    for tag in ('resnet20.cifar10_b2', 'resnet20_wsbcn.cifar10', 'resnet56_wsbcn.cifar10'):
        assert tag in timm.list_pretrained(tag)


def _tested_run(root, name: str, saved_step: int, config_head: str = ''):
    """A resnet20_wsbcn run folder whose test ran at step 10 and whose last.ckpt is from ``saved_step``."""
    run = root / name
    version = run / 'logs' / 'version_0'
    version.mkdir(parents=True)
    (version / 'config.yaml').write_text(
        config_head + 'trainer: {max_epochs: 1}\nmodel: {init_args: {model_name: resnet20_wsbcn}}\n'
        'data: {init_args: {batch_size: 2, virtual_devices: 64}}\n')
    (version / 'metrics.csv').write_text('epoch,step,test/top1\n0,10,0.5\n')
    (run / 'checkpoints').mkdir()
    torch.save({'global_step': saved_step, 'state_dict': {}}, run / 'checkpoints' / 'last.ckpt')
    return run


def test_publishing_refuses_a_checkpoint_older_than_the_test(tmp_path):
    """The published weights must be the tested ones: a stale last.ckpt is an error, not a silent mismatch."""
    from publish_cifar_weights import publish
    run = _tested_run(tmp_path, 'resnet20_wsbcn', saved_step=8)
    with pytest.raises(ValueError, match='step 8, the test ran at step 10'):
        publish(run, tmp_path / 'out')


def test_publishing_refuses_a_run_the_registry_does_not_credit(tmp_path):
    """A seed-1 run maps to the shipped tag's name: publishing it must not replace the shipped weights."""
    from publish_cifar_weights import publish
    run = _tested_run(tmp_path, 'resnet20_wsbcn_seed1', saved_step=10, config_head='seed_everything: 1\n')
    with pytest.raises(ValueError, match='not the run the registry credits for resnet20_wsbcn.cifar10'):
        publish(run, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_shipped_cards_are_up_to_date_with_the_registry(tmp_path):
    """Each card takes what the weights are (description, recipe, notes) from the registry: rebuilding the
    cards from today's registry and the cards' own run records must change nothing, weights included."""
    from publish_cifar_weights import main as publish_main
    out_root = tmp_path / 'pretrained'
    shutil.copytree(SHIPPED_WEIGHTS_DIR, out_root)
    assert publish_main(['--refresh-cards', '--out-root', str(out_root)]) == 0
    for name in SHIPPED:
        for file in ('README.md', 'config.json', 'model.safetensors'):
            assert (out_root / name / file).read_bytes() == (SHIPPED_WEIGHTS_DIR / name / file).read_bytes(), (
                f'{name}/{file} is stale: run python benchmarks/publish_cifar_weights.py --refresh-cards')


def test_re_exporting_a_shipped_folder_keeps_its_run_record(tmp_path):
    """The documented push of a shipped folder (hub_upload.py zoo/pretrained/<tag>) must keep the card's test
    accuracy (model-index), metrics, training config and seed, not replace them by "(none recorded)"."""
    from zoo.hub import publish as hub_upload
    out = tmp_path / HEADLINE
    assert hub_upload.main([str(SHIPPED_WEIGHTS_DIR / HEADLINE), '--repo-id', f'org/{HEADLINE}', '--dry-run',
                            '--out', str(out)]) == 0
    shipped = hub_upload.read_card_run_info(SHIPPED_WEIGHTS_DIR / HEADLINE / 'README.md')
    again = hub_upload.read_card_run_info(out / 'README.md')
    assert again == shipped
    assert shipped.metrics['test/top1'] == pytest.approx(card_accuracy(HEADLINE) / 100)
    assert shipped.train_config['seed_everything'] == 0 and shipped.images_per_device == 2
    assert shipped.source.endswith('last.ckpt')
    assert card_accuracy(HEADLINE) == ModelCard.load(out / 'README.md').data.eval_results[0].metric_value
