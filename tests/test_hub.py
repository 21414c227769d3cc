"""Publishing and loading without the internet: Lightning checkpoint -> Hub folder -> timm / zoo loaders.

The Hub itself cannot be reached here; downloads are tested through the Hugging Face cache layout
with ``HF_HUB_OFFLINE=1`` (in a subprocess, as a user would run it) and through ``local-dir:``.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import hub_upload  # the entry point at the repo root (conftest puts the root on the path); code in zoo.hub.publish
import zoo  # noqa: E402
from zoo.hub import WeightsError, state_dict_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = 'hf_THIS_TOKEN_MUST_NEVER_BE_PRINTED'
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


class TinyModule(L.LightningModule):
    """Stands in for the zoo's LightningModule: hyper-parameters name the timm model."""

    def __init__(self, model_name='resnet20_wsbcn', num_classes=10, batch_size=2, dataset='cifar10', lr=0.05):
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, num_classes=num_classes)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log('val_acc', (self.model(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real Lightning run (a few steps of micro-batch training) with a CSV logger and a checkpoint."""
    root = tmp_path_factory.mktemp('run')
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=2, logger=L.pytorch.loggers.CSVLogger(root),
                        enable_progress_bar=False, enable_model_summary=False, accelerator='cpu', devices=1)
    module = TinyModule()
    trainer.fit(module, loader, loader)
    ckpt = Path(trainer.checkpoint_callback.best_model_path)
    assert ckpt.is_file()
    return module.model.eval(), ckpt


def _export(ckpt, out, *extra):
    env_token = os.environ.get('HF_TOKEN')
    os.environ['HF_TOKEN'] = SECRET
    try:
        return hub_upload.main([str(ckpt), '--repo-id', 'wsbcn-zoo/resnet20_wsbcn.test', '--dry-run', '--out', str(out), *extra])
    finally:
        if env_token is None:
            os.environ.pop('HF_TOKEN')
        else:
            os.environ['HF_TOKEN'] = env_token


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    labels = tmp_path_factory.mktemp('labels') / 'labels.txt'
    labels.write_text('\n'.join(CLASSES))
    out = tmp_path_factory.mktemp('export') / 'resnet20_wsbcn.test'
    assert _export(trained[1], out, '--label-names', str(labels)) == 0
    return out


class NotAWeight:
    """An arbitrary pickled object: weights_only loading must refuse it."""


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model.eval()(X)


def test_dry_run_writes_timm_config_and_model_card(trained, exported, capsys):
    assert {p.name for p in exported.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    cfg = json.loads((exported / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet20_wsbcn' and cfg['num_classes'] == 10
    assert cfg['label_names'] == CLASSES
    pc = cfg['pretrained_cfg']
    assert pc['input_size'] == [3, 32, 32] and pc['mean'] == [0.4914, 0.4822, 0.4465] and pc['std'] == [0.247, 0.2435, 0.2616]
    assert cfg['zoo']['state_dict_sha256'] == state_dict_sha256(load_file(exported / 'model.safetensors'))
    card = (exported / 'README.md').read_text()
    for needle in ('library_name: timm', 'license: apache-2.0', '- cifar10', 'resnet20_wsbcn', 'Batch-Channel Normalization',
                   '**Images per device:** 2', '| val_acc |', 'arXiv:1903.10520', '@article{qiao2019micro', 'lr: 0.05',
                   "hf-hub:wsbcn-zoo/resnet20_wsbcn.test"):
        assert needle in card, needle


def test_card_reports_the_logged_metric_value(trained, exported):
    rows = [r for r in (trained[1].parents[1] / 'metrics.csv').read_text().splitlines()[1:] if r]
    header = (trained[1].parents[1] / 'metrics.csv').read_text().splitlines()[0].split(',')
    col = header.index('val_acc')
    last = [float(r.split(',')[col]) for r in rows if r.split(',')[col]][-1]
    assert f'| val_acc | {last:.4g} |' in (exported / 'README.md').read_text()
    card = (exported / 'README.md').read_text()
    assert '| epochs | 2 |' in card and '| optimizer steps | 4 |' in card  # max_epochs=2 of 2 batches, saved at the end


def test_card_model_index_holds_the_test_accuracy(trained, tmp_path):
    """Test accuracies go into the card's model-index (what the Hub parses), in %, for the given dataset."""
    from huggingface_hub import ModelCard
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({'test/top1': 0.8712, 'test/top5': 0.9934}))
    out = tmp_path / 'export'
    assert _export(trained[1], out, '--metrics', str(metrics)) == 0
    results = {r.metric_name: r for r in ModelCard.load(out / 'README.md').data.eval_results}
    assert results['top-1 accuracy'].metric_value == 87.12 and results['top-5 accuracy'].metric_value == 99.34
    assert results['top-1 accuracy'].dataset_type == 'cifar10' and results['top-1 accuracy'].dataset_split == 'test'


def test_re_exporting_a_folder_keeps_the_run_record_of_its_card(exported, tmp_path):
    """A folder exported earlier is a valid source: its card's metrics, training config, images per device and
    source carry over to the new card, and flags still override them."""
    from zoo.hub.publish import read_card_run_info
    first = read_card_run_info(exported / 'README.md')
    assert first.metrics['val_acc'] > 0 and first.metrics['epochs'] == 2 and first.images_per_device == 2
    assert first.train_config['lr'] == 0.05 and first.dataset == 'cifar10' and first.source.endswith('.ckpt')
    again = tmp_path / 'again'
    assert _export(exported, again) == 0
    assert read_card_run_info(again / 'README.md') == first
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({'test/top1': 0.5}))
    assert _export(exported, tmp_path / 'flagged', '--metrics', str(metrics), '--images-per-device', '4') == 0
    flagged = read_card_run_info(tmp_path / 'flagged' / 'README.md')
    assert flagged.metrics == dict(first.metrics, **{'test/top1': 0.5}) and flagged.images_per_device == 4


def test_a_card_without_a_run_record_reads_back_empty(tmp_path):
    """Weights with no run behind them (a model name): "(none recorded)" is not read back as a metric."""
    from zoo.hub.publish import read_card_run_info
    out = tmp_path / 'bare'
    assert hub_upload.main(['resnet20_wsbcn', '--repo-id', 'org/bare', '--dry-run', '--out', str(out)]) == 0
    info = read_card_run_info(out / 'README.md')
    assert info.metrics == {} and info.train_config is None and info.images_per_device is None


def test_token_is_never_printed(trained, tmp_path, capsys, caplog):
    assert _export(trained[1], tmp_path / 'again') == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert SECRET not in ''.join(p.read_text() for p in (tmp_path / 'again').glob('*.json')) + (tmp_path / 'again' / 'README.md').read_text()


def test_round_trips_give_identical_logits(trained, exported):
    model, ckpt = trained
    expected = _logits(model)
    assert torch.equal(_logits(zoo.load_lightning_checkpoint(ckpt)), expected)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{exported}', pretrained=True)), expected)
    assert torch.equal(_logits(zoo.load_model(exported)), expected)
    again = zoo.load_model(f'local-dir:{exported}', num_classes=4)  # fine-tune head: classifier re-initialised
    assert again.fc.out_features == 4 and torch.equal(again.conv1.weight, model.conv1.weight)


def _populate_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = '0123456789abcdef' * 2 + '01234567') -> None:
    """The layout ``hf_hub_download`` leaves: content-addressed blobs, snapshot symlinks, refs/main."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / 'snapshots' / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


OFFLINE_SCRIPT = r'''
import sys, torch, timm, zoo
x = torch.load(sys.argv[1])
expected = torch.load(sys.argv[2])
m = timm.create_model('hf-hub:wsbcn-zoo/resnet20_wsbcn.test', pretrained=True).eval()
with torch.no_grad():
    assert torch.equal(m(x), expected), 'timm hf-hub logits differ'
m = zoo.load_model('wsbcn-zoo/resnet20_wsbcn.test').eval()
with torch.no_grad():
    assert torch.equal(m(x), expected), 'zoo.load_model logits differ'
assert m.pretrained_cfg['label_names'] == tuple(sys.argv[3].split(',')) or list(m.pretrained_cfg['label_names']) == sys.argv[3].split(',')
try:
    zoo.load_model('wsbcn-zoo/not-downloaded')
except zoo.WeightsError as e:
    print('MISSING:', e)
'''


def test_offline_hf_cache_loads_through_timm_and_zoo(trained, exported, tmp_path):
    cache = tmp_path / 'hf_cache'
    _populate_hf_cache(cache, 'wsbcn-zoo/resnet20_wsbcn.test', exported)
    torch.save(X, tmp_path / 'x.pt')
    torch.save(_logits(trained[0]), tmp_path / 'expected.pt')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_TOKEN=SECRET, PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run([sys.executable, '-c', OFFLINE_SCRIPT, str(tmp_path / 'x.pt'), str(tmp_path / 'expected.pt'), ','.join(CLASSES)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    missing = r.stdout.split('MISSING:', 1)[1]
    assert 'not in the Hugging Face cache' in missing and 'HF_HUB_OFFLINE=1' in missing and 'hf download wsbcn-zoo/not-downloaded' in missing
    assert SECRET not in r.stdout + r.stderr


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_file_gives_clear_error(exported, tmp_path):
    bad = _copy(exported, tmp_path / 'bad')
    data = (bad / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match='truncated'):
        zoo.load_model(bad)


def test_tampered_file_gives_clear_error(exported, tmp_path):
    bad = _copy(exported, tmp_path / 'bad')
    sd = load_file(bad / 'model.safetensors')
    sd['fc.bias'] = sd['fc.bias'] + 0.5  # a valid file with other values, as a swapped or edited upload
    save_file(sd, bad / 'model.safetensors')
    with pytest.raises(WeightsError, match='do not match the digest'):
        zoo.load_model(bad)
    flipped = _copy(exported, tmp_path / 'flipped')
    data = bytearray((flipped / 'model.safetensors').read_bytes())
    data[-5] ^= 0xFF  # one corrupted byte in the tensor data
    (flipped / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(WeightsError, match='digest'):
        zoo.load_model(flipped)


def test_timm_path_checks_zoo_entrypoint_weights(tmp_path):
    """ImageNet-family entrypoints check the digest and readability inside timm.create_model itself."""
    model = timm.create_model('resnet18_wsgn', num_classes=3).eval()
    folder = zoo.save_hub_folder(model, tmp_path / 'ok')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert torch.equal(loaded.fc.weight, model.fc.weight) and loaded.conv1.ws_formula == model.conv1.ws_formula
    sd = load_file(folder / 'model.safetensors')
    sd['fc.bias'] += 1
    save_file(sd, folder / 'model.safetensors')
    with pytest.raises(WeightsError, match='digest'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:100])
    with pytest.raises(WeightsError, match='truncated or corrupted'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match='has no config.json'):
        zoo.load_model(tmp_path)
    with pytest.raises(WeightsError, match='neither an existing folder nor a Hub repo id'):
        zoo.load_model('no such thing')
    torch.save({'state_dict': {}, 'hyper_parameters': {'obj': NotAWeight()}}, tmp_path / 'evil.ckpt')
    with pytest.raises(WeightsError, match='weights_only'):
        zoo.load_model(tmp_path / 'evil.ckpt')
    torch.save({'state_dict': {'model.fc.weight': torch.zeros(10, 64)}, 'hyper_parameters': {}}, tmp_path / 'anon.ckpt')
    with pytest.raises(WeightsError, match='does not name its model'):
        zoo.load_model(tmp_path / 'anon.ckpt')


def test_lightning_checkpoint_with_wrong_shapes_leaves_no_model(trained, tmp_path):
    ckpt = torch.load(trained[1], weights_only=True)
    ckpt['hyper_parameters']['model_name'] = 'resnet32_wsbcn'  # deeper net: missing keys
    torch.save(ckpt, tmp_path / 'wrong.ckpt')
    with pytest.raises(WeightsError, match='missing keys'):
        zoo.load_lightning_checkpoint(tmp_path / 'wrong.ckpt')


class RecordingHfApi:
    """Records the HfApi calls push_folder makes (no Hub-compatible server with uploads runs here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(('create_repo', repo_id, private, exist_ok))
        from huggingface_hub import RepoUrl
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(('create_branch', repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(('upload_folder', repo_id, files, revision, commit_message))
        return 'commit'


def test_push_folder_creates_repo_branch_and_one_commit(exported):
    api = RecordingHfApi()
    hub_upload.push_folder(exported, 'wsbcn-zoo/r20', private=True, revision='v1', commit_message='CIFAR-10 run', api=api)
    assert api.calls == [
        ('create_repo', 'wsbcn-zoo/r20', True, True),
        ('create_branch', 'wsbcn-zoo/r20', 'v1', True),
        ('upload_folder', 'wsbcn-zoo/r20', ['README.md', 'config.json', 'model.safetensors'], 'v1', 'CIFAR-10 run'),
    ]
    api = RecordingHfApi()
    hub_upload.push_folder(exported, 'wsbcn-zoo/r20', api=api)
    assert [c[0] for c in api.calls] == ['create_repo', 'upload_folder']


def test_lightning_checkpoint_prefers_ema_weights(trained, tmp_path):
    """A module keeping an EMA (``ema.module.*``) validated with it: that copy is the one loaded."""
    ckpt = torch.load(trained[1], weights_only=True)
    raw = {k: v for k, v in ckpt['state_dict'].items() if k.startswith('model.')}
    ckpt['state_dict'].update({f'ema.module.{k[len("model."):]}': v + 1 if v.is_floating_point() else v for k, v in raw.items()})
    torch.save(ckpt, tmp_path / 'ema.ckpt')
    ema = zoo.load_lightning_checkpoint(tmp_path / 'ema.ckpt')
    assert torch.equal(ema.fc.bias, raw['model.fc.bias'] + 1)
    plain = zoo.load_lightning_checkpoint(tmp_path / 'ema.ckpt', use_ema=False)
    assert torch.equal(plain.fc.bias, raw['model.fc.bias'])
