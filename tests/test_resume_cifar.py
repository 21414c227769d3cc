"""Exact resume on the README's real config: ``configs/cifar10/quickstart.yaml`` through ``zoo-train``.

The run is killed (SIGKILL, by the process itself right after a checkpoint, so the test needs no
timing) inside the first epoch and again inside the second, resumed each time with the same command
plus ``--ckpt_path last``, and must end bit-identical to an uninterrupted run: weights, buffers
(BCN estimates), EMA weights, optimizer and scheduler state, and the RNG states. A toy ImageFolder
config passed while this config failed (the data order restarted at batch 0), so this test runs the
real ``Cifar10DataModule`` with its 8 virtual devices and its loader workers, with drop-path and
dropout on: they draw from the global generator, so a resume that restored it at the wrong moment
(before the loader's own draws) replayed other draws and ended with other weights.
"""
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_modules import Cifar10DataModule, ImageClassifier
from resume_helpers import REPO, assert_same_training_state, interrupted_run, uninterrupted_run

CONFIG = REPO / 'configs' / 'cifar10' / 'quickstart.yaml'
CKPT_DIR = 'runs/quickstart/checkpoints'  # the config's
PER_CLASS = 20  # 200 images / (2 images x 8 devices) = 12 steps per epoch
MAX_STEPS = 30  # crosses two epoch boundaries
KILLS = (5, 12, 17)  # a checkpoint is written at these steps, then the run dies: in epoch 0, at its end, in epoch 1


def _args(workers: int) -> list:
    return ['-c', CONFIG, '--trainer.max_steps', str(MAX_STEPS), '--trainer.logger', 'false',
            '--trainer.enable_progress_bar', 'false', '--test_after_fit', 'false',
            '--data.init_args.train_per_class', str(PER_CLASS), '--model.init_args.ema_decay', '0.9',
            '--model.init_args.model_kwargs', '{drop_path_rate: 0.2, drop_rate: 0.2}',
            '--data.init_args.num_workers', str(workers)]


@pytest.mark.parametrize('workers', [1, 0], ids=['config-workers', 'no-workers'])
def test_quickstart_config_killed_in_two_epochs_resumes_bit_identical(tmp_path, workers):
    """With the config's loader worker, and without (each epoch's new loader iterator then draws its seed:
    from the loader's own generator, not the global one that dropout draws from)."""
    resumed, _, _ = interrupted_run(tmp_path / 'run', *_args(workers), kills=KILLS, dirpath=CKPT_DIR)
    ref = uninterrupted_run(tmp_path / 'ref', *_args(workers), dirpath=CKPT_DIR)
    assert ref['global_step'] == MAX_STEPS
    assert any(k.startswith('ema.') for k in ref['state_dict'])  # the EMA copy is compared too
    assert_same_training_state(resumed, ref)


class _RestoreAfterSetup(SingleDeviceStrategy):
    """Restores the checkpoint after ``configure_optimizers``, as Lightning's FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


class _SaveAt(pl.Callback):
    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(tmp: Path, ckpt_path=None, strategy=None, callbacks=()) -> dict:
    pl.seed_everything(0)
    model = ImageClassifier('resnet20_wsbcn', num_classes=10, ema_decay=0.9, optim=dict(lr=0.05, warmup_epochs=0.1))
    data = Cifar10DataModule(batch_size=2, virtual_devices=4, train_per_class=4, num_workers=0)  # 5 steps / epoch
    trainer = pl.Trainer(
        accelerator='cpu', max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp, enable_checkpointing=False,
        strategy=strategy or SingleDeviceStrategy(torch.device('cpu')), callbacks=list(callbacks))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model.state_dict()


def test_resume_is_exact_when_the_strategy_restores_after_setup(tmp_path):
    """Under FSDP / DeepSpeed the checkpoint is restored after the training loader was built."""
    ref = _fit(tmp_path, callbacks=[_SaveAt(7, tmp_path / 'step7.ckpt')])  # step 7: inside epoch 1
    resumed = _fit(tmp_path, ckpt_path=tmp_path / 'step7.ckpt', strategy=_RestoreAfterSetup(torch.device('cpu')))
    for key, value in ref.items():
        assert torch.equal(resumed[key], value), key
