"""Issue 14: loads and resumes that would silently do something else now refuse, or do the right thing.

- ``--ckpt_path`` with other model arguments than the command line is refused (names them all);
- ``--ckpt_path last`` takes the newest of last.ckpt and Lightning's SLURM hpc_ckpt_N.ckpt;
- the final checkpoint is written once; every checkpoint the zoo writes carries a digest;
- ``config.json`` edits that change the model are refused; a head is only replaced on request;
- downloads time out with a clear error, and offline mode makes no network attempt;
- ``num_classes=0`` on shipped weights, and training checkpoints with 0-dim metrics, load.
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import zoo
from lightning_modules.cli import build_cli
from test_data import make_image_folder
from zoo.hub import WeightsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'), per_class=4)  # 12 images: 6 steps per epoch


def _fit_args(root, ckpt_dir, *extra, model='resnet20_wsbcn', num_classes=3, steps=2, every=2):
    return [
        'fit', '--model', 'lightning_modules.ImageClassifier', '--model.model_name', model,
        '--model.num_classes', str(num_classes), '--data', 'lightning_modules.ImageFolderDataModule',
        '--data.root', str(root), '--data.input_size', '16', '--data.batch_size', '2', '--data.num_workers', '0',
        '--trainer.max_steps', str(steps), '--trainer.accelerator', 'cpu', '--trainer.logger', 'false',
        '--trainer.enable_progress_bar', 'false', '--trainer.enable_model_summary', 'false',
        '--trainer.limit_val_batches', '0', f'--trainer.default_root_dir={ckpt_dir.parent}',
        '--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint', f'--trainer.callbacks.dirpath={ckpt_dir}',
        '--trainer.callbacks.save_last=true', f'--trainer.callbacks.every_n_train_steps={every}',
        '--trainer.callbacks.save_top_k=-1', *extra]


@pytest.fixture(scope='module')
def run(images, tmp_path_factory):
    """A 4-step resnet20_wsbcn run, checkpoints at steps 2 and 4."""
    ckpt = tmp_path_factory.mktemp('run') / 'ckpt'
    build_cli(_fit_args(images, ckpt, steps=4))
    return ckpt


def _as(args, subcommand):
    """The same arguments for another subcommand (test/validate take no callbacks' save settings)."""
    return [subcommand] + args[1:]


# ----------------------------------------------------------------------------------- item 2

@pytest.mark.parametrize('subcommand', ['fit', 'test'])
def test_ckpt_with_other_model_arguments_is_refused(run, images, tmp_path, capsys, subcommand):
    args = _fit_args(images, tmp_path / 'ckpt', '--ckpt_path', str(run / 'last.ckpt'),
                     model='resnet20_wsgn', num_classes=5)
    with pytest.raises(SystemExit) as info:
        build_cli(_as(args, subcommand))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.model_name: command line/config 'resnet20_wsgn', checkpoint 'resnet20_wsbcn'" in err
    assert 'model.init_args.num_classes: command line/config 5, checkpoint 3' in err
    assert '--use_checkpoint_hparams true' in err
    assert not (tmp_path / 'ckpt').exists()  # nothing ran


def test_use_checkpoint_hparams_opts_in(run, images, tmp_path):
    args = _fit_args(images, tmp_path / 'ckpt', '--ckpt_path', str(run / 'last.ckpt'),
                     '--use_checkpoint_hparams', 'true',
                     model='resnet20_wsgn', num_classes=5)
    cli = build_cli(_as(args, 'test'))
    assert cli.model.hparams.model_name == 'resnet20_wsbcn' and cli.model.model.num_classes == 3


def test_last_with_other_model_arguments_is_refused(run, images, capsys):
    """``--ckpt_path last`` resolves to a file after the model is built: checked there too."""
    with pytest.raises(SystemExit):
        build_cli(_fit_args(images, run, '--ckpt_path', 'last', model='resnet20_wsgn', steps=6))
    assert "model_name: command line/config 'resnet20_wsgn', checkpoint 'resnet20_wsbcn'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- item 7

def test_last_prefers_a_newer_hpc_checkpoint(run, images, tmp_path):
    """SLURM requeue: hpc_ckpt_1.ckpt (step 4) beats a last.ckpt at step 2 even when last.ckpt's mtime is newer."""
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    shutil.copy(run / 'epoch=0-step=4.ckpt', tmp_path / 'hpc_ckpt_1.ckpt')
    shutil.copy(run / 'epoch=0-step=2.ckpt', ckpt / 'last.ckpt')
    os.utime(tmp_path / 'hpc_ckpt_1.ckpt', (time.time() - 100, time.time() - 100))
    cli = build_cli(_fit_args(images, ckpt, '--ckpt_path', 'last', steps=5, every=100))
    assert Path(cli.trainer.ckpt_path) == tmp_path / 'hpc_ckpt_1.ckpt'
    assert cli.trainer.global_step == 5


def test_newest_resume_checkpoint_compares_global_steps(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_modules.checkpointing import newest_resume_checkpoint
    checkpoint = ModelCheckpoint(dirpath=tmp_path / 'ckpt', save_last=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[checkpoint],
                         logger=False, accelerator='cpu')
    assert newest_resume_checkpoint(trainer) is None
    (tmp_path / 'ckpt').mkdir()
    files = {'ckpt/last.ckpt': 30, 'hpc_ckpt_1.ckpt': 10, 'hpc_ckpt_2.ckpt': 20}
    for i, (name, step) in enumerate(files.items()):
        torch.save({'global_step': step}, tmp_path / name)
        os.utime(tmp_path / name, (1000 - i, 1000 - i))  # mtimes in the opposite order
    assert newest_resume_checkpoint(trainer) == str(tmp_path / 'ckpt' / 'last.ckpt')
    torch.save({'global_step': 40}, tmp_path / 'hpc_ckpt_3.ckpt')
    (tmp_path / 'hpc_ckpt_4.ckpt').write_bytes(b'half written')  # skipped with a warning
    assert newest_resume_checkpoint(trainer) == str(tmp_path / 'hpc_ckpt_3.ckpt')


def test_final_checkpoint_is_written_once(images, tmp_path, monkeypatch):
    writes = []
    save = TorchCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint['global_step']))
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, 'save_checkpoint', recording)
    cli = build_cli(_fit_args(images, tmp_path / 'ckpt', steps=2, every=1))
    assert cli.trainer.global_step == 2
    assert writes.count(('last.ckpt', 2)) == 1, writes


# ----------------------------------------------------------------------------------- item 6: checkpoint digests

def _flip_tensor_byte(src: Path, dst: Path, key='model.fc.weight') -> None:
    """Flip one byte inside a tensor's data in the zip archive (the file stays a readable checkpoint)."""
    ckpt = torch.load(src, map_location='cpu', weights_only=True)
    marker = ckpt['state_dict'][key].reshape(-1)[:4].numpy().tobytes()
    data = bytearray(src.read_bytes())
    i = data.find(marker)
    assert i > 0
    data[i + 1] ^= 0x01
    dst.write_bytes(bytes(data))


def test_checkpoints_carry_a_digest_and_flipped_bytes_are_refused(run, images, tmp_path):
    from zoo.hub import CHECKPOINT_DIGEST_KEY, checkpoint_sha256
    ckpt = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    assert ckpt[CHECKPOINT_DIGEST_KEY] == checkpoint_sha256(ckpt)
    zoo.load_model(run / 'last.ckpt')
    bad = tmp_path / 'flipped.ckpt'
    _flip_tensor_byte(run / 'last.ckpt', bad)
    changed = torch.load(bad, map_location='cpu', weights_only=True)['state_dict']['model.fc.weight']
    assert not torch.equal(changed, ckpt['state_dict']['model.fc.weight'])  # loads fine with plain torch
    with pytest.raises(WeightsError, match=r'flipped\.ckpt does not match the digest'):
        zoo.load_model(bad)
    from lightning_modules.finetune import read_state_dict
    with pytest.raises(WeightsError, match=r'flipped\.ckpt does not match the digest'):  # init_checkpoint=...
        read_state_dict(bad)
    with pytest.raises(WeightsError, match=r'flipped\.ckpt does not match the digest'):
        build_cli(_as(_fit_args(images, tmp_path / 'out', '--ckpt_path', str(bad)), 'test'))


# ----------------------------------------------------------------------------------- item 3: config.json

def _edit_config(folder: Path, dst: Path, edit) -> Path:
    import json
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / 'config.json').read_text())
    edit(cfg)
    (dst / 'config.json').write_text(json.dumps(cfg, indent=2))
    return dst


def _loaders(folder):
    return {'timm local-dir': lambda: timm.create_model(f'local-dir:{folder}', pretrained=True),
            'zoo.load_model': lambda: zoo.load_model(folder)}


@pytest.fixture(scope='module')
def hub_folder(tmp_path_factory):
    model = timm.create_model('resnet20_wsbcn', num_classes=10).eval()
    return zoo.save_hub_folder(model, tmp_path_factory.mktemp('hub') / 'r20')


def _set_arch(cfg):
    cfg['architecture'] = 'resnet20_bcn'  # same keys, no WS


def _set_num_classes(cfg):
    cfg['num_classes'] = 100


def _set_ws_formula(cfg):
    cfg['model_args']['ws_formula'] = 'ws'


@pytest.mark.parametrize('edit', [_set_arch, _set_num_classes, _set_ws_formula], ids=lambda f: f.__name__[5:])
def test_config_edits_that_change_the_model_are_refused(hub_folder, tmp_path, edit):
    bad = _edit_config(hub_folder, tmp_path / 'bad', edit)
    for name, load in _loaders(bad).items():
        with pytest.raises(WeightsError, match='config.json of .* was modified after publishing'):
            load()


def test_shipped_folder_config_is_protected(tmp_path):
    shipped = zoo.models._weights.shipped_weights('resnet20_wsbcn.cifar10').parent
    bad = _edit_config(shipped, tmp_path / 'bad', _set_arch)
    with pytest.raises(WeightsError, match='modified after publishing'):
        zoo.load_model(f'local-dir:{bad}')


def test_head_is_replaced_only_on_request(hub_folder, tmp_path):
    """Without a config digest (older folders, plain timm folders) the classifier is checked against num_classes."""
    def edit(cfg):
        _set_num_classes(cfg)
        del cfg['zoo']['model_config_sha256']
    bad = _edit_config(hub_folder, tmp_path / 'bad', edit)
    for name, load in _loaders(bad).items():
        with pytest.raises(WeightsError, match=r'num_classes=100, but the classifier fc\.weight in the weights has 10 '
                                               r'outputs, the size the model'):
            load()
    assert zoo.load_model(hub_folder, num_classes=4).fc.out_features == 4  # asked for: replaced


def test_label_and_description_edits_still_load(hub_folder, tmp_path):
    def edit(cfg):
        cfg['label_names'] = [f'class {i}' for i in range(10)]
        cfg['pretrained_cfg']['description'] = 'edited'
    ok = _edit_config(hub_folder, tmp_path / 'ok', edit)
    for name, load in _loaders(ok).items():
        assert load().pretrained_cfg['label_names'][0] == 'class 0', name


# ----------------------------------------------------------------------------------- item 6: loader defects

def test_shipped_weights_load_without_classifier():
    model = timm.create_model('resnet20_wsbcn.cifar10', pretrained=True, num_classes=0).eval()
    ref = timm.create_model('resnet20_wsbcn.cifar10', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_unwrap_checkpoint_finds_state_dict_next_to_0dim_metrics():
    from zoo.converters import unwrap_checkpoint
    sd = {'conv1.weight': torch.randn(4, 3, 3, 3), 'fc.weight': torch.randn(10, 4)}
    ckpt = {'epoch': 90, 'acc': torch.tensor(76.3), 'best_acc': torch.tensor(76.5), 'state_dict': sd}
    assert unwrap_checkpoint(ckpt).keys() == sd.keys()
    assert unwrap_checkpoint(sd).keys() == sd.keys()


# ----------------------------------------------------------------------------------- item 4: downloads

class SilentServer:
    """Accepts TCP connections and never replies (a captive or broken network); counts connections."""

    def __init__(self):
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.port = self.sock.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self):
        self.sock.close()
        for c in self.connections:
            c.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def _url_weights(url):
    return timm.create_model('resnet50_wsbcn.in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # torch.hub's cache, where timm looks for URL weights
    return tmp_path / 'torch'


def test_silent_host_fails_fast_for_url_weights(silent_server, torch_home, monkeypatch):
    monkeypatch.setenv('ZOO_DOWNLOAD_TIMEOUT', '1')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    t = time.time()
    with pytest.raises(WeightsError) as info:
        _url_weights(f'http://127.0.0.1:{silent_server.port}/rn50_bcn_ws.pth')
    assert time.time() - t < 10
    message = str(info.value)
    assert message.startswith(f'No reply from 127.0.0.1:{silent_server.port} within 1 s'), message
    assert 'ZOO_DOWNLOAD_TIMEOUT' in message and 'pretrained_cfg_overlay=dict(file=PATH)' in message
    assert silent_server.connections and not list(torch_home.rglob('*.pth*'))  # no partial file where timm looks


def test_offline_url_weights_make_no_network_attempt(silent_server, torch_home, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(WeightsError) as info:
        _url_weights(f'http://127.0.0.1:{silent_server.port}/rn50_bcn_ws.pth')
    assert silent_server.connections == []
    message = str(info.value)
    assert message.startswith('Offline (HF_HUB_OFFLINE=1)') and 'no download was attempted' in message, message
    assert 'pretrained_cfg_overlay=dict(file=PATH)' in message


HUB_SCRIPT = r'''
import time, timm, zoo
for name, load in [
        ('zoo.load_model', lambda: zoo.load_model('hf-hub:wsbcn-zoo/not-cached')),
        ('hub-default-cfg', lambda: timm.create_model('resnet20_wsbcn.cifar10', pretrained=True,
                                                     pretrained_cfg_overlay=dict(file=None)))]:
    t = time.time()
    try:
        load()
        print(f'{name}|loaded')
    except zoo.WeightsError as e:
        print(f'{name}|{time.time() - t:.1f}|{e}'.replace('\n', ' '))
'''


def test_silent_hub_fails_fast_with_clear_error(silent_server, tmp_path):
    """huggingface_hub alone retries such a host for minutes per file (10 s, then up to 6 x 60 s with back-off)."""
    env = {k: v for k, v in os.environ.items() if k != 'HF_HUB_OFFLINE'}
    env.update(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_ENDPOINT=f'http://127.0.0.1:{silent_server.port}',
               ZOO_DOWNLOAD_TIMEOUT='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {line.split('|')[0]: line.split('|')[1:] for line in r.stdout.splitlines() if '|' in line}
    assert set(results) == {'zoo.load_model', 'hub-default-cfg'}, r.stdout
    for name, (seconds, message) in results.items():
        assert float(seconds) < 20, (name, seconds)
        assert message.startswith(f'No reply from 127.0.0.1:{silent_server.port} within 1 s'), message
        assert 'not in the Hugging Face cache' in message and 'ZOO_DOWNLOAD_TIMEOUT' in message, message
    assert silent_server.connections


TIMM_HF_HUB_SCRIPT = r"""
import signal, sys, time, timm, zoo
signal.alarm(int(sys.argv[1]))  # without the zoo's probe, huggingface_hub retries for minutes: fail, do not hang
t = time.time()
try:
    timm.create_model('hf-hub:wsbcn-zoo/not-cached', pretrained=True)
    print('loaded')
except zoo.WeightsError as e:
    print(f'{time.time() - t:.1f}|{e}'.replace('\n', ' '))
"""


def test_silent_hub_bounds_timm_hf_hub_names(silent_server, tmp_path):
    """``timm.create_model('hf-hub:...')`` downloads config.json before any zoo code runs: ``import zoo`` bounds it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_HUB_')}
    env.update(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_ENDPOINT=f'http://127.0.0.1:{silent_server.port}',
               ZOO_DOWNLOAD_TIMEOUT='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', TIMM_HF_HUB_SCRIPT, '15'], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, f'still waiting after 15 s (rc {r.returncode}): {r.stderr[-2000:]}'
    seconds, message = r.stdout.strip().split('|', 1)
    assert float(seconds) < 10, seconds
    assert message.startswith(f'No reply from 127.0.0.1:{silent_server.port} within 1 s'), message
    assert 'wsbcn-zoo/not-cached/config.json is not in the Hugging Face cache' in message, message
    assert silent_server.connections


def test_hub_timeout_follows_user_hf_setting(monkeypatch):
    """The zoo's wait is ZOO_DOWNLOAD_TIMEOUT, else the user's own HF_HUB_ETAG_TIMEOUT; it changes no HF_* value."""
    from huggingface_hub import constants
    from zoo._download import download_timeout
    as_set = [constants._as_int(os.environ.get(k)) or 10 for k in ('HF_HUB_ETAG_TIMEOUT', 'HF_HUB_DOWNLOAD_TIMEOUT')]
    assert [constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT] == as_set
    monkeypatch.delenv('ZOO_DOWNLOAD_TIMEOUT', raising=False)
    monkeypatch.delenv('HF_HUB_ETAG_TIMEOUT', raising=False)
    assert download_timeout() == 30
    monkeypatch.setenv('HF_HUB_ETAG_TIMEOUT', '120')
    assert download_timeout() == 120
    monkeypatch.setenv('ZOO_DOWNLOAD_TIMEOUT', '5')
    assert download_timeout() == 5
