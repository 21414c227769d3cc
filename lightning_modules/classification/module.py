"""``ImageClassifier``: train or fine-tune any zoo or timm model, at any number of images per device."""
import math
import random
from typing import Any, Dict, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import zoo
from zoo.layers import set_bcn_batch_stage
from .emulation import split_devices, virtual_devices
from .finetune import (
    choose_bcn_batch_stage, describe_pretrained, freeze_backbone as _freeze_backbone, load_backbone_weights)
from .metrics import accuracy_metrics
from .optim import OptimConfig, create_optimizer, create_scheduler, param_ndims

__all__ = ['ImageClassifier', 'NonFiniteLossError']


def _images_per_device(datamodule) -> Optional[int]:
    """Images (or clips) per device of a zoo DataModule, None if it does not say."""
    value = getattr(datamodule, 'batch_size', None)
    if value is None:
        value = getattr(getattr(datamodule, 'hparams', None), 'batch_size', None)
    return int(value) if value is not None else None


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


class ImageClassifier(pl.LightningModule):
    """Image classification with a timm / zoo model.

    Args:
        model_name: any ``timm`` or zoo name (``resnet20_wsbcn``, ``resnet50_wsgn``, ``timm/...``).
        num_classes: classes of the (new) head.
        pretrained: timm pretrained weights (a head of another size is re-initialised by timm).
        model_kwargs: extra ``create_model`` kwargs (``norm_kwargs``, ``drop_path_rate``, ...).
        init_checkpoint: fine-tune from a zoo / Lightning checkpoint or ``.safetensors`` file
            (the head is kept only if its shape fits).
        freeze_backbone: train the classifier only.
        backbone_lr_scale: learning-rate multiplier of every non-head parameter (e.g. 0.1).
        virtual_devices: emulate K devices per process (see :mod:`lightning_modules.emulation`);
            None: take it from the DataModule (``data.virtual_devices``).
        label_smoothing: of the cross-entropy (applied inside Mixup's targets when mixing).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: timm ``Mixup``, applied per
            (virtual) device with the same draws on every device, as in DDP with one seed.
        optimizer .. decay_rate: see :class:`lightning_modules.optim.OptimConfig` (epochs may be
            fractional; the schedule is stepped per optimizer update).
        ema_decay: keep an EMA of the weights (timm ``ModelEmaV3``) and validate / test with it.
        bcn_batch_stage: BCN's batch stage for this run: ``'estimated'``, ``'batch'``, or None (the
            weights' own, except that a large-batch stage, as in the authors' BCN+WS ImageNet weights,
            becomes ``'estimated'`` when a device trains on fewer than 16 images; see
            :func:`lightning_modules.finetune.choose_bcn_batch_stage`). Any change is logged.
    """

    def __init__(
            self,
            model_name: str = 'resnet20_wsbcn',
            num_classes: int = 10,
            pretrained: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            init_checkpoint: Optional[str] = None,
            freeze_backbone: bool = False,
            backbone_lr_scale: float = 1.0,
            virtual_devices: Optional[int] = None,
            label_smoothing: float = 0.0,
            mixup_alpha: float = 0.0,
            cutmix_alpha: float = 0.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            optimizer: str = 'sgd',
            lr: float = 0.1,
            momentum: float = 0.9,
            nesterov: bool = False,
            weight_decay: float = 1e-4,
            betas: Sequence[float] = (0.9, 0.999),
            schedule: str = 'cosine',
            warmup_epochs: float = 0.0,
            warmup_lr: float = 1e-5,
            min_lr: float = 0.0,
            decay_epochs: float = 30.0,
            milestones: Sequence[float] = (30.0, 60.0, 90.0),
            decay_rate: float = 0.1,
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = OptimConfig(
            optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            betas=tuple(betas), schedule=schedule, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr,
            decay_epochs=decay_epochs, milestones=tuple(milestones), decay_rate=decay_rate)
        self.model = zoo.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        if pretrained:
            rank_zero_info(describe_pretrained(self.model, num_classes))
        self.bcn_batch_stage = bcn_batch_stage
        if bcn_batch_stage is not None:
            self._log_bcn_switch(choose_bcn_batch_stage(self.model, None, bcn_batch_stage))
        if init_checkpoint:
            load_backbone_weights(self.model, init_checkpoint)
        if freeze_backbone:
            _freeze_backbone(self.model)
        self.backbone_lr_scale = backbone_lr_scale
        self.param_ndims = param_ndims(self.model)  # before a strategy (FSDP) flattens the parameters
        self.virtual_devices = virtual_devices

        mixing = mixup_alpha > 0 or cutmix_alpha > 0
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
            label_smoothing=label_smoothing, num_classes=num_classes) if mixing else None
        self.train_loss = SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        self.train_metrics = None if mixing else accuracy_metrics(num_classes, 'train/')
        self.val_metrics = accuracy_metrics(num_classes, 'val/')
        self.test_metrics = accuracy_metrics(num_classes, 'test/')

        self.ema = None
        if ema_decay:
            self.ema = ModelEmaV3(self.model, decay=ema_decay)
            self.ema.requires_grad_(False)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data_k = getattr(self.trainer.datamodule, 'virtual_devices', None) if self._trainer is not None else None
        if self.virtual_devices is None:
            self.virtual_devices = data_k or 1
        elif data_k is not None and data_k != self.virtual_devices:
            raise ValueError(f'model.virtual_devices={self.virtual_devices} but data.virtual_devices={data_k}; '
                             f'set it on the DataModule only')
        if stage == 'fit' and self.bcn_batch_stage is None:
            self._log_bcn_switch(choose_bcn_batch_stage(self.model, _images_per_device(self.trainer.datamodule)))

    def _log_bcn_switch(self, message: Optional[str]) -> None:
        if message is None:
            return
        if getattr(self, 'ema', None) is not None:  # the EMA copy normalizes as the model does
            set_bcn_batch_stage(self.ema.module, next(
                m.batch_stage for m in self.model.modules() if isinstance(m, zoo.BatchChannelNorm2d)))
        rank_zero_info(message)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- training ------------------------------------------------------------------------------
    def _mix(self, x: torch.Tensor, y: torch.Tensor):
        """Mixup per virtual device, each with the same random draws (DDP ranks share a seed)."""
        k = self.virtual_devices or 1
        if k == 1:
            return self.mixup(x, y)
        state = np.random.get_state()
        xs, ys = [], []
        for xk, yk in zip(split_devices(x, k), split_devices(y, k)):
            np.random.set_state(state)
            xm, ym = self.mixup(xk.clone(), yk)
            xs.append(xm)
            ys.append(ym)
        return torch.cat(xs), torch.cat(ys)

    def _check_finite(self, loss: torch.Tensor, batch_idx: int, terms: str = '') -> None:
        """Stop before a non-finite update, on every device alike, naming the step and the last good checkpoint.

        ``terms``: the loss's parts (e.g. a detector's loss dict), to say which one went wrong.
        """
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if finite:
            return
        ckpt = self.trainer.checkpoint_callback
        last = (getattr(ckpt, 'last_model_path', '') or getattr(ckpt, 'best_model_path', '')) if ckpt else ''
        raise NonFiniteLossError(
            f'Non-finite training loss ({loss.item()}{": " + terms if terms else ""}) at global step '
            f'{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) on at least one device: training '
            f'stopped before this update, no checkpoint was written for it. Last good checkpoint: '
            f'{last or "none saved yet"}. Lower the learning rate, lengthen the warm-up or check the data, then '
            f'resume from that checkpoint (--ckpt_path).')

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if len(batch) > 2:
            self.log('train/skipped_images', batch[2].sum().float(), reduce_fx='sum', on_step=False, on_epoch=True,
                     sync_dist=True)
        target = y
        if self.mixup is not None:
            x, target = self._mix(x, y)
        with virtual_devices(self.model, self.virtual_devices or 1):
            logits = self.model(x)
        loss = self.train_loss(logits, target)
        self._check_finite(loss, batch_idx)
        self.log('train/loss', loss, prog_bar=True)
        self.log('train/lr', self.trainer.optimizers[0].param_groups[0]['lr'])
        if self.train_metrics is not None:
            self.train_metrics.update(logits.detach(), y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which runs after checkpoint callbacks: a checkpoint
        # saved at this step must already hold this step's EMA.
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _eval_step(self, batch, metrics, prefix: str) -> None:
        x, y = batch[0], batch[1]
        if len(batch) > 2:  # unreadable images dropped from this batch (skip_corrupt)
            self.log(f'{prefix}skipped_images', batch[2].sum().float(), reduce_fx='sum', on_step=False, on_epoch=True,
                     sync_dist=True, batch_size=1)
        self.log(f'{prefix}images', float(len(y)), reduce_fx='sum', on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=1)
        if len(y) == 0:
            return
        logits = self._eval_model()(x)
        self.log(f'{prefix}loss', self.eval_loss(logits, y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=prefix == 'val/')

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, 'val/')

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, 'test/')

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._eval_model()(x).softmax(-1)

    # -- optimization --------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = create_optimizer(self.model, self.optim_cfg, self.backbone_lr_scale, self.param_ndims)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        batches = self.trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches)) \
            if batches not in (None, float('inf')) else total_steps
        scheduler = create_scheduler(optimizer, self.optim_cfg, total_steps / steps_per_epoch, steps_per_epoch)
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # -- checkpoints: RNG states, so a resumed run draws what the uninterrupted one would --------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint['rng_states'] = {
            'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                      'cached_gaussian': float(cached)}}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        states = checkpoint.get('rng_states')
        if not states or self._trainer is None:  # only when resuming a run, not when loading weights
            return
        torch.set_rng_state(states['torch'])
        random.setstate(states['python'])
        n = states['numpy']
        np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                             n['cached_gaussian']))
