"""``ImageClassifier``: train or fine-tune any zoo or timm model, at any number of images per device."""
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import zoo
from ..core.emulation import split_devices, virtual_devices
from ..core.finetune import describe_pretrained, freeze_backbone as _freeze_backbone, load_backbone_weights
from ..core.optim import OptimConfig
from ..core.task import NonFiniteLossError, TaskModule, as_optim_config
from .metrics import accuracy_metrics

__all__ = ['ImageClassifier', 'NonFiniteLossError']


class ImageClassifier(TaskModule):
    """Image classification with a timm / zoo model.

    Args:
        model_name: any ``timm`` or zoo name (``resnet20_wsbcn``, ``resnet50_wsgn``, ``timm/...``).
        num_classes: classes of the (new) head; checked against the classes of the data.
        pretrained: timm pretrained weights (a head of another size is re-initialised by timm).
        model_kwargs: extra ``create_model`` kwargs (``norm_kwargs``, ``drop_path_rate``, ...).
        init_checkpoint: fine-tune from a zoo / Lightning checkpoint or ``.safetensors`` file
            (the head is kept only if its shape fits).
        freeze_backbone: train the classifier only.
        label_smoothing: of the cross-entropy (applied inside Mixup's targets when mixing).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: timm ``Mixup``, applied per
            (virtual) device with the same draws on every device, as in DDP with one seed.
        optim: optimizer and schedule (:class:`lightning_modules.core.optim.OptimConfig`; default
            SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine), e.g. ``backbone_lr_scale: 0.1``.
        virtual_devices, images_per_device, ema_decay, bcn_batch_stage: see
            :class:`lightning_modules.core.task.TaskModule`.
    """

    def __init__(
            self,
            model_name: str = 'resnet20_wsbcn',
            num_classes: int = 10,
            pretrained: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            init_checkpoint: Optional[str] = None,
            freeze_backbone: bool = False,
            label_smoothing: float = 0.0,
            mixup_alpha: float = 0.0,
            cutmix_alpha: float = 0.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            optim: OptimConfig = OptimConfig(lr=0.1, schedule='cosine'),
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
            virtual_devices: Optional[int] = None,
            images_per_device: Optional[int] = None,
    ):
        super().__init__(as_optim_config(optim, OptimConfig()), virtual_devices, images_per_device, ema_decay,
                         bcn_batch_stage)
        self.save_task_hyperparameters()
        self.num_classes = num_classes
        model = zoo.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        if pretrained:
            rank_zero_info(describe_pretrained(model, num_classes))
        if init_checkpoint:
            load_backbone_weights(model, init_checkpoint)
        if freeze_backbone:
            _freeze_backbone(model)
        self.attach_model(model)

        mixing = mixup_alpha > 0 or cutmix_alpha > 0
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
            label_smoothing=label_smoothing, num_classes=num_classes) if mixing else None
        self.train_loss = SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        self.train_metrics = None if mixing else accuracy_metrics(num_classes, 'train/')
        self.val_metrics = accuracy_metrics(num_classes, 'val/')
        self.test_metrics = accuracy_metrics(num_classes, 'test/')

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

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if len(batch) > 2:  # unreadable images replaced by the next readable ones (skip_corrupt)
            self.log_skipped('train/', batch[2])
        target = y
        if self.mixup is not None:
            x, target = self._mix(x, y)
        with virtual_devices(self.model, self.virtual_devices or 1):
            logits = self.model(x)
        loss = self.train_loss(logits, target)
        self.check_finite(loss, batch_idx)
        self.log('train/loss', loss, prog_bar=True)
        self.log('train/lr', self.trainer.optimizers[0].param_groups[0]['lr'])
        if self.train_metrics is not None:
            self.train_metrics.update(logits.detach(), y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_step(self, batch, metrics, prefix: str) -> None:
        x, y = batch[0], batch[1]
        if not self.log_scored(prefix, len(y), batch[2] if len(batch) > 2 else None):
            return  # every image of this batch was unreadable (skip_corrupt)
        logits = self.eval_model()(x)
        self.log(f'{prefix}loss', self.eval_loss(logits, y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=prefix == 'val/')

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, 'val/')

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, 'test/')

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities of the readable inputs of a batch (``[]`` when it has none: the writer
        writes the unreadable ones' rows)."""
        from ..core.datasets import PredictBatch
        if isinstance(batch, PredictBatch):
            if batch.inputs is None:
                return []
            batch = batch.inputs
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.eval_model()(x).softmax(-1)
