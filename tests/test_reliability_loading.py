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
        'fit', '--model', 'lightning_modules.classification.ImageClassifier', '--model.model_name', model,
        '--model.num_classes', str(num_classes), '--data', 'lightning_modules.classification.ImageFolderDataModule',
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


def test_head_is_replaced_only_on_request(hub_folder, tmp_path, monkeypatch):
    """Without a config digest (older folders, plain timm folders; loaded on request, issue 26) the classifier
    is checked against num_classes."""
    def edit(cfg):
        _set_num_classes(cfg)
        del cfg['zoo']['model_config_sha256']
    bad = _edit_config(hub_folder, tmp_path / 'bad', edit)
    monkeypatch.setenv('ZOO_ALLOW_UNVERIFIED', '1')
    for name, load in _loaders(bad).items():
        with pytest.raises(WeightsError, match=r'num_classes=100, but the classifier fc\.weight in the weights has 10 '
                                               r'outputs, the size the model'):
            load()
    assert zoo.load_model(hub_folder, num_classes=4).fc.out_features == 4  # asked for: replaced


def test_folder_without_digests_is_refused_unless_the_caller_opts_in(hub_folder, tmp_path, monkeypatch):
    """Issue 26: deleting the "zoo" block turned every check off, so an edited architecture loaded silently
    (resnet20_bcn carrying WS weights). Unverifiable folders are now refused; on request they load, with a warning."""
    from zoo.hub import UnverifiedWeightsWarning
    monkeypatch.delenv('ZOO_ALLOW_UNVERIFIED', raising=False)

    def edit(cfg):
        del cfg['zoo']
        _set_arch(cfg)
    bad = _edit_config(hub_folder, tmp_path / 'bad', edit)
    weights_only_digest = _edit_config(hub_folder, tmp_path / 'old', lambda cfg: cfg['zoo'].pop('model_config_sha256'))
    for folder, missing in ((bad, 'state_dict_sha256 and model_config_sha256'), (weights_only_digest, 'model_config_sha256')):
        for name, load in _loaders(folder).items():
            with pytest.raises(WeightsError, match=f'cannot be verified: its config.json records no {missing} '):
                load()
    with pytest.warns(UnverifiedWeightsWarning, match='loaded UNVERIFIED, as asked'):
        model = zoo.load_model(bad, allow_unverified=True)
    assert type(model).__name__ == 'CifarResNet' and not model.norm_variant.ws  # what the edited file says
    monkeypatch.setenv('ZOO_ALLOW_UNVERIFIED', '1')  # the opt-in for timm.create_model
    with pytest.warns(UnverifiedWeightsWarning):
        timm.create_model(f'local-dir:{bad}', pretrained=True)
    with pytest.raises(WeightsError, match='cannot be verified'):
        zoo.load_model(bad, allow_unverified=False)  # an explicit False wins over the environment


def test_record_digest_makes_a_plain_timm_folder_verifiable(tmp_path, monkeypatch):
    import warnings
    from timm.models import save_for_hf
    from zoo.hub import UnverifiedWeightsWarning, main as hub_main
    monkeypatch.delenv('ZOO_ALLOW_UNVERIFIED', raising=False)
    model = timm.create_model('resnet20_wsgn', num_classes=10).eval()
    save_for_hf(model, tmp_path / 'plain', safe_serialization=True)
    with pytest.raises(WeightsError, match='record its digests with `python -m zoo.hub record-digest FOLDER`'):
        zoo.load_model(tmp_path / 'plain')
    assert hub_main(['record-digest', str(tmp_path / 'plain')]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error', UnverifiedWeightsWarning)
        loaded = zoo.load_model(tmp_path / 'plain').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


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


LOADS_SCRIPT = r'''
import signal, sys, time, timm, zoo
signal.alarm(int(sys.argv[1]))  # without the zoo's probe, huggingface_hub retries for minutes: fail, do not hang
for name, source in zip(sys.argv[2::2], sys.argv[3::2]):
    t = time.time()
    try:
        eval(source)
        print(f'{name}|loaded')
    except zoo.WeightsError as e:
        print(f'{name}|{time.time() - t:.1f}|{e}'.replace('\n', ' '))
'''


def _timed_loads(loads: dict, env: dict, cwd: Path, alarm: int = 120) -> dict:
    """Run each ``name: expression`` load in one fresh interpreter (its own env, no Hub token, no cache), killed
    after ``alarm`` seconds: ``{name: [seconds, message]}`` for the loads that raised ``WeightsError``,
    ``{name: ['loaded']}`` else."""
    argv = [item for pair in loads.items() for item in pair]
    r = subprocess.run([sys.executable, '-c', LOADS_SCRIPT, str(alarm), *argv], env=env, capture_output=True,
                       text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, f'rc {r.returncode} (-14: still waiting after {alarm} s): {r.stderr[-3000:]}'
    results = {line.split('|')[0]: line.split('|')[1:] for line in r.stdout.splitlines() if '|' in line}
    assert set(results) == set(loads), r.stdout + r.stderr[-2000:]
    return results


def test_silent_hub_fails_fast_with_clear_error(silent_server, tmp_path):
    """huggingface_hub alone retries such a host for minutes per file (10 s, then up to 6 x 60 s with back-off)."""
    env = {k: v for k, v in os.environ.items() if k != 'HF_HUB_OFFLINE'}
    env.update(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_ENDPOINT=f'http://127.0.0.1:{silent_server.port}',
               ZOO_DOWNLOAD_TIMEOUT='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    results = _timed_loads({
        'zoo.load_model': "zoo.load_model('hf-hub:wsbcn-zoo/not-cached')",
        'hub-default-cfg': "timm.create_model('resnet20_wsbcn.cifar10', pretrained=True, "
                           "pretrained_cfg_overlay=dict(file=None))"}, env, tmp_path)
    for name, (seconds, message) in results.items():
        assert float(seconds) < 20, (name, seconds)
        assert message.startswith(f'No reply from 127.0.0.1:{silent_server.port} within 1 s'), message
        assert 'not in the Hugging Face cache' in message and 'ZOO_DOWNLOAD_TIMEOUT' in message, message
    assert silent_server.connections


def test_silent_hub_bounds_timm_hf_hub_names(silent_server, tmp_path):
    """``timm.create_model('hf-hub:...')`` downloads config.json before any zoo code runs: ``import zoo`` bounds it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_HUB_')}
    env.update(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_ENDPOINT=f'http://127.0.0.1:{silent_server.port}',
               ZOO_DOWNLOAD_TIMEOUT='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    (seconds, message), = _timed_loads({'timm hf-hub': "timm.create_model('hf-hub:wsbcn-zoo/not-cached', "
                                                       "pretrained=True)"}, env, tmp_path, alarm=15).values()
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


# ----------------------------------------------------------------------------------- issue 26: errors that mislead

def _random_bytes(n=4096, seed=0):
    import random
    return random.Random(seed).randbytes(n)


def _loading_paths():
    from lightning_modules.core.deploy import main as zoo_export
    from zoo.hub import load_lightning_checkpoint, read_weights

    def export(path):
        """``zoo-export`` prints the error and returns 1: raise it, as the other loaders do."""
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = zoo_export([str(path), '--format', 'torchscript', '--out', str(path.parent / 'out.pt')])
        assert rc == 1
        raise WeightsError(err.getvalue())
    def timm_file(path):
        return timm.create_model('resnet20_wsbcn', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return {'zoo.load_model': zoo.load_model, 'read_weights': read_weights,
            'load_lightning_checkpoint': load_lightning_checkpoint, 'zoo-export': export, 'timm file=': timm_file}


@pytest.mark.parametrize('content', [
    _random_bytes(),                            # os.urandom(4096) in the issue
    b'hello, not a checkpoint\n' * 40,          # text: torch.load raised a bare KeyError
    b'PK\x03\x04' + _random_bytes(4092),        # a zip header, then garbage
    b'\x80\x02' + _random_bytes(4094),          # a pickle header, then garbage
    b''], ids=['random', 'text', 'zip-garbage', 'pickle-garbage', 'empty'])
def test_unreadable_file_is_not_called_a_pickle_of_objects(tmp_path, content):
    bad = tmp_path / 'x.ckpt'
    bad.write_bytes(content)
    for name, load in _loading_paths().items():
        with pytest.raises(WeightsError) as info:
            load(bad)
        message = str(info.value)
        assert str(bad) in message, (name, message)
        assert 'holds Python objects' not in message and 'weights_only' not in message, (name, message)
        assert 'set to `False`' not in message and 'add_safe_globals' not in message, (name, message)
        if content[:2] in (b'PK', b'\x80\x02'):
            assert 'truncated or corrupted' in message, (name, message)
        elif content:
            assert 'not a readable checkpoint: neither a torch file (zip or pickle) nor safetensors' in message, message
        else:
            assert 'is empty' in message, (name, message)
    assert not (tmp_path / 'out.pt').exists()


class _NotAWeight:
    pass


def test_pickled_objects_are_refused_without_weights_only_false_advice(tmp_path):
    evil = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'obj': _NotAWeight()}}, evil)
    for name, load in _loading_paths().items():
        with pytest.raises(WeightsError) as info:
            load(evil)
        message = str(info.value)
        assert 'holds Python objects besides tensors' in message and '_NotAWeight' in message, (name, message)
        assert 'weights_only=False' not in message and 'set to `False`' not in message, (name, message)
        assert 'add_safe_globals' not in message and 'safe_globals' not in message, (name, message)


@pytest.mark.parametrize('name', ['resnet20_wsbcn', 'resnet18_wsgn'])
def test_float64_input_names_the_dtype_the_model_expects(name):
    model = timm.create_model(name, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = r'expects a torch\.float32 image batch \(the dtype of its weights\), got torch\.float64'
    with pytest.raises(TypeError, match=expected):
        model(x)
    # FX graphs keep the other checks but not this one: graph passes (FX quantization) replace the weights
    (check,) = [n for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == 'call_function'
                and getattr(n.target, '__name__', '') == 'check_image_batch']
    assert check.args[3:] == (None,)
    with pytest.raises(torch.jit.Error, match=r'expects the dtype of its weights'):
        torch.jit.script(model)(x)
    with torch.no_grad():  # what works still works: the weights' dtype, a float64 model, lower precision under autocast
        model(x.float())
        timm.create_model(name, num_classes=4).double().eval()(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x.to(torch.bfloat16))
        with pytest.raises(TypeError, match=r'got torch\.float16'):
            model(x.half())  # no autocast: the conv would fail


# ----------------------------------------------------------------------------------- issue 26: a dripping server

class DripServer:
    """A real HTTP server on loopback that announces ``size`` bytes and sends one every ``interval`` seconds
    (for any path, so it also plays a Hub endpoint: ``HF_ENDPOINT``)."""

    def __init__(self, size=1000, interval=0.05):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        server = self

        class Drip(BaseHTTPRequestHandler):
            def _headers(self):
                self.send_response(200)
                self.send_header('Content-Length', str(size))
                self.send_header('ETag', '"0123456789abcdef"')  # what huggingface_hub needs of a Hub file
                self.send_header('X-Repo-Commit', 'a' * 40)
                self.end_headers()

            def do_HEAD(self):
                self._headers()

            def do_GET(self):
                if self.path.startswith('/api/'):  # huggingface_hub's own side requests (its agent registry)
                    self.send_error(404)
                    return
                self._headers()
                try:
                    for _ in range(size):
                        if server.stopped.is_set():
                            return
                        self.wfile.write(b'x')
                        self.wfile.flush()
                        time.sleep(interval)
                except OSError:  # the client hung up
                    pass

            def log_message(self, *args):
                pass

        self.stopped = threading.Event()
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Drip)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/rn50_bcn_ws.pth'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def drip_server():
    server = DripServer()
    yield server
    server.close()


def _no_partial_files(root):
    return [p for p in Path(root).rglob('*') if p.is_file()] == []


def test_dripping_server_hits_the_deadline_per_file(drip_server, torch_home, monkeypatch):
    """1 byte every 0.05 s: each read gets a byte well within the read timeout, so only a bound on the whole file ends it."""
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setenv('ZOO_DOWNLOAD_TIMEOUT', '5')
    monkeypatch.setenv('ZOO_DOWNLOAD_MIN_RATE', '0')  # off: the deadline alone
    monkeypatch.setenv('ZOO_DOWNLOAD_DEADLINE', '1.5')
    t = time.time()
    with pytest.raises(WeightsError) as info:
        _url_weights(drip_server.url)
    assert time.time() - t < 10
    message = str(info.value)
    assert message.startswith(f'Download of {drip_server.url} took too long: received '), message
    assert ' of 1000 bytes in 1.' in message and 'ZOO_DOWNLOAD_DEADLINE' in message, message
    assert 'pretrained_cfg_overlay=dict(file=PATH)' in message
    assert _no_partial_files(torch_home), list(torch_home.rglob('*'))


def test_dripping_server_falls_below_the_minimum_rate(drip_server, torch_home, monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setenv('ZOO_DOWNLOAD_TIMEOUT', '1')  # also the window the rate is measured over
    monkeypatch.setenv('ZOO_DOWNLOAD_MIN_RATE', '1000')  # bytes/s; the server sends about 20
    monkeypatch.delenv('ZOO_DOWNLOAD_DEADLINE', raising=False)
    t = time.time()
    with pytest.raises(WeightsError) as info:
        _url_weights(drip_server.url)
    assert time.time() - t < 10
    message = str(info.value)
    assert message.startswith(f'Download of {drip_server.url} too slow: received '), message
    assert ' of 1000 bytes' in message and 'below the minimum of 1000 bytes/s' in message, message
    assert 'ZOO_DOWNLOAD_MIN_RATE' in message, message
    assert _no_partial_files(torch_home), list(torch_home.rglob('*'))


def test_dripping_hub_hits_the_deadline_per_file(drip_server, tmp_path):
    """huggingface_hub's read timeout never ends a drip either; its temporary file is not kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_HUB_')}
    env.update(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_ENDPOINT=drip_server.url.rsplit('/', 1)[0],
               ZOO_DOWNLOAD_TIMEOUT='5', ZOO_DOWNLOAD_MIN_RATE='0', ZOO_DOWNLOAD_DEADLINE='1.5',
               PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    results = _timed_loads({'zoo.load_model': "zoo.load_model('hf-hub:wsbcn-zoo/drip')",
                            'timm hf-hub': "timm.create_model('hf-hub:wsbcn-zoo/drip', pretrained=True)"},
                           env, tmp_path)
    for name, (seconds, message) in results.items():
        assert float(seconds) < 15, (name, seconds)
        assert message.startswith('Download of ') and '/wsbcn-zoo/drip/resolve/main/config.json took too long: ' \
            'received ' in message, (name, message)
        assert 'ZOO_DOWNLOAD_DEADLINE' in message and 'hf download wsbcn-zoo/drip' in message, (name, message)
    kept = [p for p in (tmp_path / 'hf').rglob('*') if p.is_file() and ('blobs' in p.parts or 'snapshots' in p.parts
                                                                     or p.name.endswith('.incomplete'))]
    assert kept == [], kept  # no partial file, nothing that looks cached


def test_download_bounds_have_defaults_and_can_be_turned_off(monkeypatch):
    from zoo._download import download_deadline, download_min_rate
    for name in ('ZOO_DOWNLOAD_DEADLINE', 'ZOO_DOWNLOAD_MIN_RATE'):
        monkeypatch.delenv(name, raising=False)
    assert download_deadline() == 3600 and download_min_rate() == 10_000
    monkeypatch.setenv('ZOO_DOWNLOAD_DEADLINE', '0')
    monkeypatch.setenv('ZOO_DOWNLOAD_MIN_RATE', '0')
    assert download_deadline() is None and download_min_rate() is None
    monkeypatch.setenv('ZOO_DOWNLOAD_DEADLINE', 'soon')
    with pytest.raises(ValueError, match="ZOO_DOWNLOAD_DEADLINE='soon' is not a number"):
        download_deadline()
