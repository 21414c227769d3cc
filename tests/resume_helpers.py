"""Exact resume through ``zoo-train``: kill a run right after a checkpoint, resume it, compare.

Shared by the end-to-end resume tests (tests/test_resume.py, test_resume_cifar.py,
test_resume_tasks.py, test_activation_checkpointing.py). A run is ``python -m lightning_modules
fit ARGS`` in a subprocess (the program ``zoo-train`` runs), one torch thread, with tests/ on
``PYTHONPATH`` so that configs can name the callbacks below by class path:

- :class:`KillAfterCheckpoint` SIGKILLs its own process when training reaches a step whose
  checkpoint is already on disk, so a test kills mid-epoch without racing a timer;
- :class:`RecordStart` writes where a run's first training batch is (global step, epoch, batch
  index), to show that a resumed run restarted from the checkpoint and not from the start.

:func:`interrupted_run` kills a run at given steps, resuming it each time with ``--ckpt_path
last``, and lets it finish; :func:`assert_same_training_state` compares its final checkpoint with
the uninterrupted run's, bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
CKPT_DIR = 'checkpoints'  # relative to the run's working directory


class KillAfterCheckpoint(pl.Callback):
    """SIGKILLs its own process when training reaches ``step`` (whose checkpoint is already on disk)."""

    def __init__(self, step: int = -1):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStart(pl.Callback):
    """Writes ``{global_step, epoch, batch_idx}`` of the run's first training batch to ``path`` (JSON)."""

    def __init__(self, path: str = ''):
        self.path = path
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path and not self.done:
            self.done = True
            Path(self.path).write_text(json.dumps(
                {'global_step': trainer.global_step, 'epoch': trainer.current_epoch, 'batch_idx': batch_idx}))


def checkpoint_callbacks(dirpath=CKPT_DIR, every: int = 1, kill_at: int = -1, record: Optional[Path] = None) -> str:
    """``--trainer.callbacks``: a resumable ``last.ckpt`` (only) every ``every`` steps into ``dirpath``, the
    killer, and (``record``) :class:`RecordStart`. Replaces the config's callbacks. ``zoo-train`` also writes
    ``last.ckpt`` at the end of training."""
    callbacks = [
        {'class_path': 'lightning.pytorch.callbacks.ModelCheckpoint',
         'init_args': {'dirpath': str(dirpath), 'save_last': True, 'save_top_k': 0, 'every_n_train_steps': every}},
        {'class_path': 'resume_helpers.KillAfterCheckpoint', 'init_args': {'step': kill_at}},
    ]
    if record is not None:
        callbacks.append({'class_path': 'resume_helpers.RecordStart', 'init_args': {'path': str(record)}})
    return json.dumps(callbacks)


def zoo_env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join([str(REPO / 'tests'), str(REPO), os.environ.get('PYTHONPATH', '')]))


def zoo_train_command(*args: str, resume: bool = False) -> List[str]:
    """``zoo-train fit ARGS [--ckpt_path last]`` as a command line."""
    cmd = [sys.executable, '-m', 'lightning_modules', 'fit', *map(str, args)]
    return cmd + (['--ckpt_path', 'last'] if resume else [])


def zoo_train(cwd: Path, *args: str, resume: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``zoo-train fit ARGS`` in ``cwd`` (created; relative paths of the config land there)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(zoo_train_command(*args, resume=resume), cwd=cwd, env=zoo_env(), capture_output=True,
                          text=True, timeout=timeout)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def last_checkpoint(cwd: Path, dirpath=CKPT_DIR) -> dict:
    return load_checkpoint(cwd / dirpath / 'last.ckpt')


def uninterrupted_run(cwd: Path, *args: str, dirpath=CKPT_DIR, every: int = 1) -> dict:
    """The reference: ``zoo-train fit ARGS`` to the end; its final ``last.ckpt``."""
    res = zoo_train(cwd, *args, '--trainer.callbacks', checkpoint_callbacks(dirpath, every))
    assert res.returncode == 0, res.stderr[-3000:]
    return last_checkpoint(cwd, dirpath)


def interrupted_run(cwd: Path, *args: str, kills: Sequence[int], dirpath=CKPT_DIR,
                    every: int = 1) -> Tuple[dict, List[dict], List[dict]]:
    """``zoo-train fit ARGS`` killed (SIGKILL) right after its checkpoint of each step in ``kills``, restarted each
    time with ``--ckpt_path last``, then run to the end.

    Returns the final ``last.ckpt``, the checkpoint each restart resumed from, and where each restart's first
    training batch was (:class:`RecordStart`; the first run's too, which starts afresh).
    """
    resumed_from, starts = [], []
    for i, kill_at in enumerate([*kills, -1]):
        record = cwd / f'start{i}.json'
        res = zoo_train(cwd, *args, '--trainer.callbacks', checkpoint_callbacks(dirpath, every, kill_at, record),
                        resume=i > 0)
        if kill_at >= 0:
            assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
            last = last_checkpoint(cwd, dirpath)
            assert last['global_step'] == kill_at, (last['global_step'], kill_at)
            resumed_from.append(last)
        else:
            assert res.returncode == 0, res.stderr[-3000:]
        starts.append(json.loads(record.read_text()))
    return last_checkpoint(cwd, dirpath), resumed_from, starts


def assert_same_training_state(resumed: dict, ref: dict) -> None:
    """Bit-identical: weights and buffers (BCN estimates, BN running stats, num_batches_tracked, EMA copies),
    optimizer and scheduler state, and the RNG states the next step would draw from."""
    assert resumed['global_step'] == ref['global_step']
    assert resumed['state_dict'].keys() == ref['state_dict'].keys()
    for key, value in ref['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    for r_opt, o_opt in zip(resumed['optimizer_states'], ref['optimizer_states'], strict=True):
        assert r_opt['param_groups'] == o_opt['param_groups']
        assert r_opt['state'].keys() == o_opt['state'].keys()
        for i, state in o_opt['state'].items():
            assert r_opt['state'][i].keys() == state.keys(), i
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(r_opt['state'][i][name]), torch.as_tensor(value)), (i, name)
    assert resumed['lr_schedulers'] == ref['lr_schedulers']
    for name in ('torch', 'python'):  # what the next step's dropout / drop-path draws from
        r, o = resumed['rng_states'][name], ref['rng_states'][name]
        assert (torch.equal(r, o) if isinstance(o, torch.Tensor) else r == o), name
    r, o = resumed['rng_states']['numpy'], ref['rng_states']['numpy']
    assert r.keys() == o.keys() and all(
        torch.equal(r[k], v) if isinstance(v, torch.Tensor) else r[k] == v for k, v in o.items()), 'numpy'
