"""``SemanticSegmenter``: train DeepLabV3 (any zoo segmenter) at any number of images per device.

- Loss: cross-entropy ignoring ``ignore_index`` (255), plus ``aux_weight`` x the auxiliary head's
  loss when the model has one (``model_kwargs: {aux_loss: true}``). Per (virtual) device, the
  mean over its labelled pixels, then the mean over devices: what DDP's gradient averaging gives.
- Metrics (torchmetrics): ``{split}/miou`` (``JaccardIndex``, macro over the classes present in
  the predictions or the targets) and ``{split}/pixel_acc``, both without the ignored pixels, at
  the masks' full resolution: logits are cropped to each image's own size (eval batches are
  padded) and upsampled to its mask.
- Eval at full size, or by sliding window (``sliding_window``: window size; ``sliding_stride``).
- Schedule (``optim``, shared with every task): by default the usual poly decay
  ``lr * (1 - t / T) ** 0.9`` per iteration (``schedule: poly``, ``decay_rate`` = the power).
- Micro-batches: ``virtual_devices`` emulates K devices in one process, as for every task; EMA, the
  non-finite-loss stop and exact resume come from :class:`~lightning_modules.core.task.TaskModule`.
"""
import contextlib
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from zoo.segmentation import create_segmenter
from ..core.emulation import split_devices, virtual_devices
from ..core.optim import OptimConfig
from ..core.task import TaskModule, as_optim_config
from .transforms import IGNORE_INDEX

__all__ = ['SemanticSegmenter', 'segmentation_metrics', 'sliding_window_logits', 'update_metrics']


def segmentation_metrics(num_classes: int, prefix: str, ignore_index: int = IGNORE_INDEX) -> MetricCollection:
    return MetricCollection({
        'miou': MulticlassJaccardIndex(num_classes, average='macro', ignore_index=ignore_index),
        'pixel_acc': MulticlassAccuracy(num_classes, average='micro', ignore_index=ignore_index),
    }, prefix=prefix)


@contextlib.contextmanager
def _native_bincount():
    """Let torchmetrics count with ``torch.bincount`` under ``deterministic=True``.

    In deterministic mode torchmetrics replaces bincount by a (pixels x classes²) comparison: 37 GB
    for one full-size COCO mask. Bincount without weights counts integers, exact and the same on
    every run (PyTorch lists only the weighted CUDA form as nondeterministic), so the flag is lifted
    for the update and restored after.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def update_metrics(metrics: MetricCollection, preds: torch.Tensor, target: torch.Tensor) -> None:
    """``metrics.update(preds, target)`` with native integer counting (see :func:`_native_bincount`)."""
    with _native_bincount():
        metrics.update(preds, target)


def sliding_window_logits(model: nn.Module, x: torch.Tensor, window: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits of ``x`` (N, 3, H, W) averaged over overlapping ``window`` x ``window`` crops.

    Images smaller than the window are padded with 0 (the mean) at the bottom / right; the result
    has ``x``'s size.
    """
    n, _, h, w = x.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    xp = F.pad(x, (0, pw, 0, ph))
    hp, wp = xp.shape[-2:]
    logits = xp.new_zeros(n, num_classes, hp, wp)
    count = xp.new_zeros(1, 1, hp, wp)
    rows = list(range(0, hp - window, stride)) + [hp - window]
    cols = list(range(0, wp - window, stride)) + [wp - window]
    for top in rows:
        for left in cols:
            crop = xp[:, :, top:top + window, left:left + window]
            logits[:, :, top:top + window, left:left + window] += model(crop)['out']
            count[:, :, top:top + window, left:left + window] += 1
    return (logits / count)[:, :, :h, :w]


# DeepLab's recipe: SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay of power 0.9 per iteration.
SEGMENTATION_OPTIM = OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-4, schedule='poly', decay_rate=0.9)


class SemanticSegmenter(TaskModule):
    """Semantic segmentation with a zoo segmenter (``zoo.list_segmenters()``).

    Args:
        model_name: e.g. ``deeplabv3_resnet101_wsbcn``, ``deeplabv3_resnet50_wsgn``, ``deeplabv3_resnet101`` (BN).
        num_classes: classes (VOC: 21 with background; COCO panoptic / coco-mini: 133; CamVid: 11);
            checked against the DataModule's.
        pretrained_backbone: ImageNet backbone weights (see :func:`zoo.segmentation.build_deeplabv3`).
        model_kwargs: other ``create_segmenter`` kwargs: ``output_stride`` (8 / 16), ``aux_loss``, ...
        ignore_index: label of unlabelled pixels (no loss, no metric).
        aux_weight: weight of the auxiliary loss (when the model has ``aux_loss``).
        sliding_window, sliding_stride: evaluate by sliding window of this size (None: whole image).
        optim: optimizer and schedule; default :data:`SEGMENTATION_OPTIM` (``backbone_lr_scale``
            there gives a pretrained backbone a lower learning rate than the heads).
        virtual_devices, images_per_device, ema_decay, bcn_batch_stage: see
            :class:`~lightning_modules.core.task.TaskModule`.
    """

    def __init__(
            self,
            model_name: str = 'deeplabv3_resnet50_wsbcn',
            num_classes: int = 21,
            pretrained_backbone: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            ignore_index: int = IGNORE_INDEX,
            aux_weight: float = 0.4,
            sliding_window: Optional[int] = None,
            sliding_stride: Optional[int] = None,
            optim: OptimConfig = SEGMENTATION_OPTIM,
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
            virtual_devices: Optional[int] = None,
            images_per_device: Optional[int] = None,
    ):
        super().__init__(as_optim_config(optim, SEGMENTATION_OPTIM), virtual_devices, images_per_device, ema_decay,
                         bcn_batch_stage)
        self.save_task_hyperparameters()
        self.attach_model(create_segmenter(model_name, num_classes=num_classes, pretrained_backbone=pretrained_backbone,
                                           **(model_kwargs or {})))
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.sliding_window = sliding_window
        self.sliding_stride = sliding_stride or (2 * sliding_window // 3 if sliding_window else None)
        self.train_metrics = segmentation_metrics(num_classes, 'train/', ignore_index)
        self.val_metrics = segmentation_metrics(num_classes, 'val/', ignore_index)
        self.test_metrics = segmentation_metrics(num_classes, 'test/', ignore_index)
        # each class's IoU on the test split, logged as test/iou_<class index> (the mean hides the rare classes)
        self.test_class_iou = MulticlassJaccardIndex(num_classes, average='none', ignore_index=ignore_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, H, W) at the input size."""
        return self.model(x)['out']

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, num_devices: int = 1) -> torch.Tensor:
        """Mean cross-entropy over each device's labelled pixels, averaged over the devices as DDP does.

        A crop with no labelled pixel gives 0 (not torch's 0 / 0 = NaN, which would stop training).
        """
        losses = []
        for lk, tk in zip(split_devices(logits, num_devices), split_devices(target, num_devices)):
            total = F.cross_entropy(lk, tk, ignore_index=self.ignore_index, reduction='sum')
            losses.append(total / (tk != self.ignore_index).sum().clamp(min=1))
        return torch.stack(losses).mean()

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if 'skipped' in batch:  # unreadable pairs replaced by the next readable ones (skip_corrupt)
            self.log_skipped('train/', batch['skipped'])
        x, y = batch['image'], batch['mask']
        k = self.virtual_devices or 1
        with virtual_devices(self.model, k):
            out = self.model(x)
        loss = main = self._loss(out['out'], y, k)
        if 'aux' in out:
            aux = self._loss(out['aux'], y, k)
            loss = main + self.aux_weight * aux
            self.log('train/aux_loss', aux)
        self.check_finite(loss, batch_idx)
        self.log('train/loss', loss, prog_bar=True)
        self.log('train/lr', self.trainer.optimizers[0].param_groups[0]['lr'])
        update_metrics(self.train_metrics, out['out'].detach().argmax(1), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    # -- evaluation ----------------------------------------------------------------------------
    def image_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval logits of a (padded) batch, whole image or by sliding window."""
        if self.sliding_window:
            return sliding_window_logits(self.eval_model(), x, self.sliding_window, self.sliding_stride,
                                         self.num_classes)
        return self.eval_model()(x)['out']

    def per_image_logits(self, batch: Dict[str, Any], sizes: Sequence) -> List[torch.Tensor]:
        """(num_classes, h, w) logits of each image, cropped to its own size and resized to ``sizes[i]``."""
        logits = self.image_logits(batch['image'])
        out = []
        for i, (h, w) in enumerate(batch['size'].tolist()):
            li = logits[i:i + 1, :, :h, :w]
            if (h, w) != tuple(sizes[i]):
                li = F.interpolate(li, size=tuple(sizes[i]), mode='bilinear', align_corners=False)
            out.append(li[0])
        return out

    def _eval_step(self, batch: Dict[str, Any], metrics: MetricCollection, prefix: str,
                   class_iou: Optional[MulticlassJaccardIndex] = None) -> None:
        masks = batch['mask']
        if not self.log_scored(prefix, len(masks), batch.get('skipped')):
            return  # every image of this batch was unreadable (skip_corrupt)
        logits = self.per_image_logits(batch, [m.shape[-2:] for m in masks])
        loss = torch.stack([self._loss(li[None], m[None]) for li, m in zip(logits, masks)]).mean()
        self.log(f'{prefix}loss', loss, sync_dist=True, batch_size=len(masks))
        for li, m in zip(logits, masks):
            update_metrics(metrics, li.argmax(0)[None], m[None])
            if class_iou is not None:
                update_metrics(class_iou, li.argmax(0)[None], m[None])
        self.log_dict(metrics, prog_bar=prefix == 'val/', batch_size=len(masks))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, 'val/')

    def on_validation_epoch_end(self) -> None:
        """Print the validation result (every rank computes: the metrics sync under DDP)."""
        if self.trainer.sanity_checking:
            return
        m = self.val_metrics.compute()
        if self.trainer.is_global_zero:
            print(f'\nVal mIoU: {100 * float(m["val/miou"]):.2f}%, pixel accuracy: {100 * float(m["val/pixel_acc"]):.2f}% '
                  f'(step {self.global_step})', flush=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, 'test/', self.test_class_iou)

    def on_test_epoch_end(self) -> None:
        """Log each class's test IoU as ``test/iou_<index>`` (synced across processes by torchmetrics)."""
        for c, iou in enumerate(self.test_class_iou.compute().tolist()):
            self.log(f'test/iou_{c}', iou)
        self.test_class_iou.reset()

    def on_predict_start(self) -> None:
        from .predict import SegmentationWriter
        if not any(isinstance(c, SegmentationWriter) for c in self.trainer.callbacks):
            raise ValueError('Segmentation predict writes masks and overlays through a SegmentationWriter: add '
                             '--trainer.callbacks+=lightning_modules.segmentation.SegmentationWriter '
                             '--trainer.callbacks.output_dir DIR')

    def predict_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """Class-index maps (uint8 / long) at each image's original size, with the dataset indices.

        The original size is the eval transform's input size: read from ``batch['orig_size']`` when
        the loader provides it, else the (cropped) input size.
        """
        from ..core.datasets import PredictBatch
        index = None
        if isinstance(batch, PredictBatch):  # readable images only; the writer writes the unreadable ones' rows
            index = torch.tensor([m['index'] for m in batch.meta], dtype=torch.long)
            if batch.inputs is None:
                return {'labels': [], 'index': index}
            batch = batch.inputs
        sizes = batch['orig_size'].tolist() if 'orig_size' in batch else batch['size'].tolist()
        labels = [li.argmax(0) for li in self.per_image_logits(batch, sizes)]
        return {'labels': labels, 'index': batch['index'] if 'index' in batch else index}

