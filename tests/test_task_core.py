"""The shared task base (``lightning_modules.core.task.TaskModule``), tested once for all four tasks:
checkpoints are checked against their digest by ``load_from_checkpoint``, never unpickled with
``weights_only=False``, the optimizer is one nested argument, and class counts are checked
against the data."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.classification import ImageClassifier
from lightning_modules.core.task import ClassCountError, TaskModule
from lightning_modules.detection import DetectionModule
from lightning_modules.segmentation import SemanticSegmenter
from lightning_modules.video import VideoClassifier
from zoo.hub import CHECKPOINT_DIGEST_KEY, WeightsError, checkpoint_sha256

REPO = Path(__file__).resolve().parents[1]

TASKS = {
    'classification': lambda: ImageClassifier('resnet20_wsbcn', num_classes=10),
    'video': lambda: VideoClassifier('tsm_resnet18_wsbcn', num_classes=2, num_segments=2),
    'detection': lambda: DetectionModule('fasterrcnn_resnet18_fpn_wsgn', num_classes=3,
                                         model_kwargs=dict(min_size=64, max_size=96)),
    'segmentation': lambda: SemanticSegmenter('deeplabv3_resnet18_wsbcn', num_classes=5,
                                              model_kwargs=dict(output_stride=16)),
}


def _write_checkpoint(module: TaskModule, path: Path, corrupt: bool = False, cli: bool = False) -> None:
    """A checkpoint as the zoo writes it (digest included); ``corrupt``: one weight changed after the digest;
    ``cli``: hyper-parameters as ``zoo-train`` records them (with the class path)."""
    hparams = dict(module.hparams, **({'_class_path': f'{type(module).__module__}.{type(module).__name__}'}
                                      if cli else {}))
    checkpoint = {'state_dict': module.state_dict(), 'hyper_parameters': hparams,
                  'pytorch-lightning_version': '2.6.0', 'global_step': 0, 'epoch': 0}
    checkpoint[CHECKPOINT_DIGEST_KEY] = checkpoint_sha256(checkpoint)
    if corrupt:  # what flipped bytes inside tensor data do: a value changes, the recorded digest does not
        name = next(k for k, v in checkpoint['state_dict'].items() if v.is_floating_point() and v.numel() > 8)
        checkpoint['state_dict'][name] = checkpoint['state_dict'][name].clone()
        checkpoint['state_dict'][name].view(-1)[3] += 1.0
    torch.save(checkpoint, path)


@pytest.mark.parametrize('task', sorted(TASKS))
def test_load_from_checkpoint_checks_the_digest_and_rebuilds_the_same_model(task, tmp_path):
    torch.manual_seed(0)
    module = TASKS[task]()
    cls = type(module)
    good, bad = tmp_path / 'good.ckpt', tmp_path / 'bad.ckpt'
    _write_checkpoint(module, good)
    _write_checkpoint(module, bad, corrupt=True)

    loaded = cls.load_from_checkpoint(good)
    assert loaded.optim == module.optim  # the nested optimizer argument survives the round trip
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(WeightsError, match=f'{bad}.*does not match the digest'):
        cls.load_from_checkpoint(bad)


class _RunsCode:
    """A pickle that creates a file when unpickled: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, 'code ran'))


def test_load_from_checkpoint_never_unpickles_code_even_when_the_environment_asks(tmp_path, monkeypatch):
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.ckpt'
    with open(path, 'wb') as f:
        torch.save({'state_dict': {}, 'payload': _RunsCode(marker)}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')  # which makes torch.load default to pickle
    with pytest.raises(Exception):
        ImageClassifier.load_from_checkpoint(path)
    with pytest.raises(ValueError, match='weights_only=True only'):
        ImageClassifier.load_from_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_resume_from_last_never_lets_lightning_open_a_refused_file(tmp_path):
    """``--ckpt_path last`` with a last.ckpt the zoo refuses: an error, and Lightning does not load it either."""
    marker, ckpt_dir = tmp_path / 'pwned', tmp_path / 'run' / 'checkpoints'
    ckpt_dir.mkdir(parents=True)
    torch.save({'global_step': 5, 'payload': _RunsCode(marker)}, ckpt_dir / 'last.ckpt')
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(REPO / 'tests'), str(REPO), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run(
        [sys.executable, '-m', 'lightning_modules', 'fit', '-c', str(REPO / 'configs/cifar10/quickstart.yaml'),
         '--trainer.default_root_dir', str(tmp_path / 'run'), '--trainer.logger', 'false',
         '--trainer.callbacks', f'[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: '
                                f'{{dirpath: {ckpt_dir}, save_last: true}}}}]',
         '--ckpt_path', 'last'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert 'no readable resume checkpoint' in res.stderr and str(ckpt_dir / 'last.ckpt') in res.stderr
    assert not marker.exists()


def test_a_model_kwargs_key_only_the_command_line_has_is_refused_on_resume(tmp_path, capsys):
    """A key on either side differs: ``{ws_formula: timm}`` against a checkpoint saved without model_kwargs."""
    from lightning_modules.core.cli import build_cli
    ckpt = tmp_path / 'plain.ckpt'
    _write_checkpoint(ImageClassifier('resnet20_wsbcn', num_classes=10, optim=dict(lr=0.05, weight_decay=5e-4,
                                                                                    warmup_epochs=0.1)), ckpt, cli=True)
    with pytest.raises(SystemExit):
        build_cli(['fit', '-c', str(REPO / 'configs/cifar10/quickstart.yaml'), '--model.init_args.model_kwargs',
                   '{ws_formula: timm}', '--ckpt_path', str(ckpt)])
    err = capsys.readouterr().err
    assert "model.init_args.model_kwargs.ws_formula: command line/config 'timm', checkpoint None" in err, err[-2000:]


class _Data:
    num_classes, class_names, virtual_devices, batch_size = 4, ['a', 'b', 'c', 'd'], 1, 2


def test_num_classes_is_checked_against_the_classes_the_data_declares():
    with pytest.raises(ClassCountError, match=r'model.num_classes=10 but the data declares 4 classes \(a, b, c, d\)'):
        ImageClassifier('resnet20_wsbcn', num_classes=10).check_classes(_Data())
    SemanticSegmenter('deeplabv3_resnet18_wsgn', num_classes=4).check_classes(_Data())  # agrees: no error


def test_optimizer_is_one_nested_argument_with_each_tasks_own_defaults():
    seg = SemanticSegmenter('deeplabv3_resnet18_wsgn', num_classes=4, optim=dict(lr=0.05))
    assert (seg.optim.lr, seg.optim.schedule, seg.optim.decay_rate) == (0.05, 'poly', 0.9)  # the rest: DeepLab's
    det = DetectionModule('fasterrcnn_resnet18_fpn_wsgn', num_classes=3)
    assert (det.optim.warmup_steps, det.optim.schedule, det.optim.milestones) == (500, 'multistep', (16., 22.))
    assert 'virtual_devices' not in det.hparams  # linked from the data by the CLI, not a model hyper-parameter
