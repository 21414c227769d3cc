"""Faults: SIGKILL mid-epoch then resume == an uninterrupted run; a non-finite loss stops cleanly."""
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules import ImageClassifier, NonFiniteLossError
from resume_helpers import (assert_same_training_state, load_checkpoint as _load, zoo_env, zoo_train,
                            zoo_train_command)
from test_data import make_image_folder

MAX_STEPS = 16  # 6 batches per epoch: crosses two epoch boundaries


class SlowDown(pl.Callback):
    """Gives the test time to kill the run between checkpoints (no effect on the results)."""

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(0.15)


def _config(tmp: Path, data: Path, ckpt_dir: Path) -> Path:
    cfg = tmp / f'{ckpt_dir.name}.yaml'
    cfg.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {MAX_STEPS}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, save_last: true, every_n_train_steps: 2}}
    - class_path: test_resume.SlowDown
model:
  class_path: lightning_modules.classification.ImageClassifier
  init_args: {{model_name: resnet20_wsbcn, num_classes: 3, label_smoothing: 0.1, ema_decay: 0.9,
               optim: {{lr: 0.2, warmup_epochs: 0.5, weight_decay: 1.0e-3}}}}
data:
  class_path: lightning_modules.classification.ImageFolderDataModule
  init_args: {{root: {data}, input_size: 16, scale: [0.3, 1.0], batch_size: 2, virtual_devices: 2, num_workers: 1}}
""")
    return cfg


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=8)  # 24 images, 4 per step: 6 steps per epoch
    ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
    ref_cfg, run_cfg = _config(tmp_path, data, ref_dir), _config(tmp_path, data, run_dir)

    # The interrupted run: SIGKILL as soon as its last checkpoint is mid-epoch, after the first epoch.
    proc = subprocess.Popen(zoo_train_command('-c', run_cfg), cwd=tmp_path, env=zoo_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed_at = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            last = run_dir / 'last.ckpt'
            if last.is_file():
                step = _load(last)['global_step']
                if step >= 8 and step % 6:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed_at is not None, f'run ended before it could be killed: {proc.stderr.read()[-2000:]}'
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < MAX_STEPS

    # Restart: the same command plus --ckpt_path last; then the uninterrupted reference.
    for cfg, resume in ((run_cfg, True), (ref_cfg, False)):
        res = zoo_train(tmp_path, '-c', cfg, resume=resume)
        assert res.returncode == 0, res.stderr[-3000:]

    resumed, ref = _load(run_dir / 'last.ckpt'), _load(ref_dir / 'last.ckpt')
    assert resumed['global_step'] == ref['global_step'] == MAX_STEPS
    assert_same_training_state(resumed, ref)  # bit-identical
    start = ImageClassifier('resnet20_wsbcn', num_classes=3).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in ref['state_dict'].items() if k in start)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    pl.seed_everything(0)
    x = torch.randn(16, 3, 16, 16)
    x[10] = float('nan')  # batch 5 (batch size 2)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 3, (16,))), batch_size=2)
    model = ImageClassifier('resnet20_gn', num_classes=3, optim=dict(lr=0.05))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(accelerator='cpu', max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[ckpt])
    with pytest.raises(NonFiniteLossError, match=r'(?s)Non-finite training loss \(nan\) at global step 5.*last\.ckpt'):
        trainer.fit(model, loader)
    last = _load(tmp_path / 'last.ckpt')
    assert last['global_step'] == 4
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())
