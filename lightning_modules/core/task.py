"""``TaskModule``: what every task's LightningModule shares, written once.

A task module (classification, video, detection, segmentation) builds its network, hands it to
:meth:`TaskModule.attach_model`, and writes its own steps. The base gives it:

- the optimizer and schedule from one nested argument, ``optim`` (:class:`~.optim.OptimConfig`),
  stepped per optimizer update; parameter groups without decay on norms and biases;
- ``virtual_devices`` (K devices emulated per process) and ``images_per_device``, which the CLI
  links from the DataModule (``link_arguments``), so a config states them once, on the data;
- BCN's batch stage for this run (``bcn_batch_stage``; a large-batch stage becomes the estimated
  one under 16 images per device), an EMA of the weights (``ema_decay``) used for evaluation, and
  a stop before a non-finite update;
- checkpoints that resume exactly (RNG states restored at the first step after a resume) and that
  are checked against the zoo's digest on every route, ``load_from_checkpoint`` included.
"""
import inspect
import math
import random
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from timm.utils import ModelEmaV3

import zoo
from zoo.hub import verify_checkpoint
from zoo.layers import set_bcn_batch_stage
from .checkpointing import in_the_zoos_words
from .finetune import choose_bcn_batch_stage
from .optim import OptimConfig, create_optimizer, create_scheduler, param_ndims

__all__ = ['TaskModule', 'NonFiniteLossError', 'ClassCountError']

_LOADING_FROM: ContextVar[str] = ContextVar('_LOADING_FROM', default='being loaded')  # for the digest error

# Arguments the CLI fills from the DataModule: not hyper-parameters of the model (a checkpoint does not pin them).
LINKED_FROM_DATA = ('virtual_devices', 'images_per_device')


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


class ClassCountError(ValueError):
    """The model's class count differs from the classes the data declares."""


def as_optim_config(optim: Union[OptimConfig, Mapping[str, Any], None], default: OptimConfig) -> OptimConfig:
    """An :class:`OptimConfig` from the argument: a dict (from Python, or a checkpoint's hyper-parameters)
    changes the task's ``default`` where it says."""
    if optim is None:
        return default
    return optim if isinstance(optim, OptimConfig) else replace(default, **dict(optim))


class TaskModule(pl.LightningModule):
    """Base of the zoo's task modules; see the module docstring for what it does.

    Args:
        optim: optimizer and schedule (:class:`~lightning_modules.core.optim.OptimConfig`).
        virtual_devices: devices emulated per process; None: the DataModule's (the CLI links it).
        images_per_device: images (clips) per device, which picks BCN's batch stage; None: the DataModule's.
        ema_decay: keep an EMA of the weights (timm ``ModelEmaV3``) and evaluate with it.
        bcn_batch_stage: ``'estimated'``, ``'batch'`` or None (see above).
    """

    def __init__(self, optim: Optional[OptimConfig] = None, virtual_devices: Optional[int] = None,
                 images_per_device: Optional[int] = None, ema_decay: Optional[float] = None,
                 bcn_batch_stage: Optional[str] = None):
        super().__init__()
        self.optim = as_optim_config(optim, OptimConfig())
        self.virtual_devices = virtual_devices
        self.images_per_device = images_per_device
        self.ema_decay = ema_decay
        self.bcn_batch_stage = bcn_batch_stage
        self.ema: Optional[ModelEmaV3] = None
        self._rng_to_restore: Optional[Dict[str, Any]] = None

    def save_task_hyperparameters(self) -> None:
        """``save_hyperparameters()`` for the subclass ``__init__`` that calls it, with ``optim`` as plain
        values and without the arguments linked from the data (a resumed run takes them from its data).
        A subclass's call replaces its parent's: the hyper-parameters are the arguments of the class built."""
        if isinstance(getattr(self, '_hparams', None), dict):
            self._hparams.clear()
        self.save_hyperparameters(ignore=list(LINKED_FROM_DATA), frame=inspect.currentframe().f_back)
        for hparams in (self._hparams, self._hparams_initial):
            if 'optim' in hparams:
                hparams['optim'] = self.optim.as_dict()

    def attach_model(self, model: nn.Module) -> None:
        """Set ``self.model`` and what depends on it: parameter shapes, the BCN stage asked for, the EMA copy."""
        self.model = model
        self.param_ndims = param_ndims(model)  # before a strategy (FSDP) flattens the parameters
        if self.bcn_batch_stage is not None:
            self._log_bcn_switch(choose_bcn_batch_stage(model, None, self.bcn_batch_stage))
        if self.ema_decay:
            self.ema = ModelEmaV3(model, decay=self.ema_decay)
            self.ema.requires_grad_(False)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self._trainer is not None else None
        data_k = getattr(data, 'virtual_devices', None)
        if self.virtual_devices is None:
            self.virtual_devices = data_k or 1
        elif data_k is not None and data_k != self.virtual_devices:
            raise ValueError(f'model.virtual_devices={self.virtual_devices} but data.virtual_devices={data_k}: '
                             f'set it on the DataModule only (zoo-train links it to the model)')
        if self.images_per_device is None:
            self.images_per_device = getattr(data, 'batch_size', None)
        self.check_classes(data)
        if stage == 'fit' and self.bcn_batch_stage is None:
            self._log_bcn_switch(choose_bcn_batch_stage(self.model, self.images_per_device))

    def check_classes(self, data) -> None:
        """Refuse a model whose ``num_classes`` differs from the classes ``data`` declares (``num_classes``)."""
        declared = getattr(data, 'num_classes', None)
        ours = getattr(self, 'num_classes', None)
        if isinstance(declared, int) and ours is not None and declared != ours:
            names = getattr(data, 'class_names', None)
            listed = f' ({", ".join(map(str, names[:10]))}{" ..." if len(names) > 10 else ""})' if names else ''
            raise ClassCountError(f'model.num_classes={ours} but the data declares {declared} classes{listed}: '
                                  f'set the model\'s num_classes to {declared} (or fix the data)')

    def _log_bcn_switch(self, message: Optional[str]) -> None:
        if message is None:
            return
        if self.ema is not None:  # the EMA copy normalizes as the model does
            set_bcn_batch_stage(self.ema.module, next(
                m.batch_stage for m in self.model.modules() if isinstance(m, zoo.BatchChannelNorm2d)))
        rank_zero_info(message)

    # -- inputs skipped by the data (skip_corrupt / on_decode_error: skip) -----------------------
    def log_skipped(self, prefix: str, skipped: Any) -> None:
        """Add this batch's skipped inputs to ``{prefix}skipped_<unit>`` (summed over the epoch and the processes)."""
        total = skipped.sum().float() if isinstance(skipped, torch.Tensor) else float(skipped)
        self.log(f'{prefix}skipped_{self.input_unit}', total, reduce_fx='sum', on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=1)

    def log_scored(self, prefix: str, count: int, skipped: Any = None) -> bool:
        """Count an eval batch's scored (and skipped) inputs; False for a batch where every input was unreadable."""
        if skipped is not None:
            self.log_skipped(prefix, skipped)
        self.log(f'{prefix}{self.input_unit}', float(count), reduce_fx='sum', on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=1)
        return count > 0

    input_unit = 'images'  # what the counts count (video: 'videos')

    # -- training ------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def check_finite(self, loss: torch.Tensor, batch_idx: int, terms: str = '') -> None:
        """Stop before a non-finite update, on every device alike, naming the step and the last good checkpoint.

        ``terms``: the loss's parts (e.g. a detector's loss dict), to say which one went wrong.
        """
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return
        ckpt = self.trainer.checkpoint_callback
        last = (getattr(ckpt, 'last_model_path', '') or getattr(ckpt, 'best_model_path', '')) if ckpt else ''
        raise NonFiniteLossError(
            f'Non-finite training loss ({loss.item()}{": " + terms if terms else ""}) at global step '
            f'{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) on at least one device: training '
            f'stopped before this update, no checkpoint was written for it. Last good checkpoint: '
            f'{last or "none saved yet"}. Lower the learning rate, lengthen the warm-up or check the data, then '
            f'resume from that checkpoint (--ckpt_path).')

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which runs after checkpoint callbacks: a checkpoint
        # saved at this step must already hold this step's EMA.
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    # -- optimization --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (for epochs in the schedule), known before the loader is built."""
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        batches = self.trainer.num_training_batches
        sampler = getattr(self.trainer.datamodule, 'train_sampler', None)
        if batches == float('inf') and callable(sampler):
            # max_steps without max_epochs: Lightning has not loaded the training data yet (and loading it
            # here would skip a resumed loader's position), so count the batches of an epoch from the sampler.
            batches = sampler().batches_per_epoch
        if batches in (None, float('inf')):
            return total_steps
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def configure_optimizers(self):
        optimizer = create_optimizer(self.model, self.optim, self.param_ndims)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = self.steps_per_epoch()
        scheduler = create_scheduler(optimizer, self.optim, total_steps / per_epoch, per_epoch)
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Record the RNG states, so a resumed run draws what the uninterrupted one would."""
        _, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint['rng_states'] = {
            'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                      'cached_gaussian': float(cached)}}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Check the digest (every route: resume, ``--ckpt_path``, ``load_from_checkpoint``); keep the RNG
        states to restore when training resumes."""
        verify_checkpoint(checkpoint, _LOADING_FROM.get())
        states = checkpoint.get('rng_states')
        if states and self._trainer is not None:  # only when resuming a run, not when loading weights
            self._rng_to_restore = states

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: Optional[bool] = None, **kwargs):
        """Lightning's ``load_from_checkpoint``, reading with ``weights_only=True`` whatever
        ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, and refusing a file whose digest does not match."""
        if weights_only is False:
            raise ValueError('The zoo reads checkpoints with weights_only=True only: a checkpoint that needs '
                             'arbitrary Python objects could run code when loaded')
        token = _LOADING_FROM.set(str(checkpoint_path))
        try:
            with in_the_zoos_words(checkpoint_path):
                return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                    hparams_file=hparams_file, strict=strict, weights_only=True,
                                                    **kwargs)
        finally:
            _LOADING_FROM.reset(token)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore a resumed run's RNG states just before its first step.

        Not in ``on_load_checkpoint``: between loading and the first step, Lightning and the loaders
        draw from the global generators (a new epoch iterator, a sanity check), which the
        uninterrupted run did not do at that point, so dropout and drop-path would replay other draws.
        """
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        torch.set_rng_state(states['torch'])
        random.setstate(states['python'])
        n = states['numpy']
        np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                             n['cached_gaussian']))
