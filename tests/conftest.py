import csv
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _write_run(root: Path, name: str, model: str, batch_size: int, virtual_devices, versions,
               seed=None, model_kwargs=None, lr=0.1) -> Path:
    """A run folder as zoo-train writes it: one logs/version_i per entry of ``versions`` (a test top-1 or None).
    ``seed`` (seed_everything) and ``model_kwargs`` are logged when given."""
    for i, top1 in enumerate(versions):
        d = root / name / 'logs' / f'version_{i}'
        d.mkdir(parents=True)
        cfg = {'trainer': {'devices': 1, 'max_epochs': 20, 'default_root_dir': str(root / name),
                           'callbacks': [{'class_path': 'lightning.pytorch.callbacks.ModelCheckpoint',
                                          'init_args': {'dirpath': str(root / name / 'checkpoints')}}]},
               'model': {'init_args': {'model_name': model, 'lr': lr}},
               'data': {'init_args': {'batch_size': batch_size, 'virtual_devices': virtual_devices}}}
        if seed is not None:
            cfg['seed_everything'] = seed
        if model_kwargs is not None:
            cfg['model']['init_args']['model_kwargs'] = model_kwargs
        (d / 'config.yaml').write_text(yaml.safe_dump(cfg))
        with open(d / 'metrics.csv', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=['epoch', 'step', 'val/top1', 'test/top1'])
            w.writeheader()
            w.writerow({'epoch': 0, 'step': 390, 'val/top1': 0.5})
            if top1 is not None:
                w.writerow({'epoch': 19, 'step': 7820, 'test/top1': top1})
    return root / name


@pytest.fixture
def make_run():
    """``make_run(root, name, model, batch_size, virtual_devices, versions)``: see :func:`_write_run`."""
    return _write_run


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """Trainer(deterministic=True) sets a process-wide flag: keep it from leaking into later tests."""
    state = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
