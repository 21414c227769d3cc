"""``DetectionModule``: train, evaluate and predict with a torchvision detector (Mask / Faster R-CNN).

- Model: :func:`create_detector`, the one place a detector is built.
- Training loss: the sum of the detector's loss dict; each term is logged (``train/loss_*``).
  The detector's random draws (anchor and region sampling) come from a generator seeded by
  (seed, step, rank), so a resumed run draws exactly what the uninterrupted one drew.
- Metrics: torchmetrics ``MeanAveragePrecision`` (COCO protocol, pycocotools backend; crowd
  regions from the targets' ``iscrowd``), box and, for Mask R-CNN, mask AP:
  ``val/bbox_map``, ``val/bbox_map_50``, ... ``val/segm_map``, ... (and ``test/...``).
- Optimizer (``optim``, shared with every task: :class:`~lightning_modules.core.optim.OptimConfig`):
  by default mmdet's recipe, SGD lr 0.02 without weight decay on norms and biases, linear warm-up
  over ``warmup_steps: 500`` iterations from ``lr * warmup_factor`` (0.001), then x``decay_rate``
  at each of ``milestones`` (epochs from the start, fractional allowed: mmdet's 1x is 12 epochs
  with (8, 11), 2x is 24 with (16, 22)), stepped per iteration. Mixed precision: the Trainer's
  ``precision``. EMA, the non-finite-loss stop and exact resume come from
  :class:`~lightning_modules.core.task.TaskModule`.
- Micro-batches: ``virtual_devices`` from the DataModule, emulated by
  :func:`~lightning_modules.detection.emulation.detector_virtual_devices` (see there what is
  exact and what is not). Under real DDP nothing extra is needed.
- The COCO category mapping (contiguous label -> COCO id and name) comes from the DataModule and
  is saved in checkpoints, so ``predict`` on unlabeled images writes the original ids.
"""
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torchmetrics.detection import MeanAveragePrecision

import zoo
from ..core.datasets import sample_seed
from ..core.optim import OptimConfig
from ..core.task import ClassCountError, TaskModule, as_optim_config
from .data import CocoCategories
from .emulation import detector_virtual_devices
from .predict import coco_results

__all__ = ['create_detector', 'DETECTION_OPTIM', 'DetectionModule']

_MODEL_TARGET_KEYS = ('boxes', 'labels', 'masks')
_EVAL_TARGET_KEYS = ('boxes', 'labels', 'masks', 'iscrowd', 'area')


def create_detector(model_name: str, num_classes: int, pretrained_backbone: Union[bool, str] = False,
                    **kwargs) -> nn.Module:
    """The detector for ``model_name``: ``zoo.create_detector`` (names: ``zoo.list_detectors()``)."""
    return zoo.create_detector(model_name, num_classes=num_classes, pretrained_backbone=pretrained_backbone, **kwargs)


# mmdet / Detectron's recipe: lr 0.02 for 16 images per step, 500 warm-up iterations, step decay.
DETECTION_OPTIM = OptimConfig(lr=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=500, warmup_factor=0.001,
                              schedule='multistep', milestones=(16., 22.), decay_rate=0.1)


def _has_masks(model: nn.Module) -> bool:
    roi_heads = getattr(model, 'roi_heads', None)
    return bool(roi_heads is not None and roi_heads.has_mask())


class DetectionModule(TaskModule):
    """Detection and instance segmentation with a torchvision ``GeneralizedRCNN`` detector.

    Args:
        model_name: a detector name (``zoo.list_detectors()``), e.g. ``maskrcnn_resnet50_fpn_wsbcn``.
        num_classes: including the background (COCO: 81); checked against the DataModule's.
        pretrained_backbone: start the backbone from its ImageNet weights (True: the zoo's tag; a
            path: a local copy of them), see ``zoo.create_detector``.
        model_kwargs: more keyword arguments of the detector (torchvision's ``MaskRCNN`` ones,
            e.g. ``box_batch_size_per_image``). ``min_size`` / ``max_size`` come from the DataModule.
        optim: optimizer and schedule; default :data:`DETECTION_OPTIM` (see the module docstring).
        mask_threshold: mask probability above which a pixel belongs to a predicted instance.
        seed: of the detector's random sampling; None: ``seed_everything``'s.
        virtual_devices, images_per_device, ema_decay, bcn_batch_stage: see
            :class:`~lightning_modules.core.task.TaskModule`.
    """

    def __init__(
            self,
            model_name: str = 'maskrcnn_resnet50_fpn_wsgn',
            num_classes: int = 81,
            pretrained_backbone: Union[bool, str] = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            optim: OptimConfig = DETECTION_OPTIM,
            mask_threshold: float = 0.5,
            seed: Optional[int] = None,
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
            virtual_devices: Optional[int] = None,
            images_per_device: Optional[int] = None,
    ):
        super().__init__(as_optim_config(optim, DETECTION_OPTIM), virtual_devices, images_per_device, ema_decay,
                         bcn_batch_stage)
        self.save_task_hyperparameters()
        self.model_kwargs = dict(model_kwargs or {})
        self.num_classes = num_classes
        self.seed = seed
        self.categories: Optional[CocoCategories] = None
        self._sizes_from_data = False
        self.attach_model(create_detector(model_name, num_classes=num_classes, pretrained_backbone=pretrained_backbone,
                                          **self.model_kwargs))
        iou_type = ('bbox', 'segm') if _has_masks(self.model) else 'bbox'
        self.val_map = MeanAveragePrecision(iou_type=iou_type, backend='pycocotools')
        self.test_map = MeanAveragePrecision(iou_type=iou_type, backend='pycocotools')

    # -- setup: what the DataModule decides --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        self._apply_sizes(dm)
        categories = getattr(dm, 'categories', None)
        if categories is not None:
            self.categories = categories

    def check_classes(self, data) -> None:
        """The annotations' categories plus the background must be the model's classes."""
        categories = getattr(data, 'categories', None)
        if categories is not None and categories.num_classes != self.num_classes:
            raise ClassCountError(f'model.num_classes={self.num_classes} but the annotations have '
                                  f'{len(categories.categories)} categories (+1 background = {categories.num_classes})')

    def _apply_sizes(self, dm) -> None:
        """The detector resizes like the DataModule (so its resize of training images is the identity)."""
        min_size, max_size = getattr(dm, 'min_size', None), getattr(dm, 'max_size', None)
        if min_size is None:
            return
        for key, value in (('min_size', min_size), ('max_size', max_size)):
            if key in self.model_kwargs and self.model_kwargs[key] not in (value, (value,), [value]):
                raise ValueError(f'model.model_kwargs.{key}={self.model_kwargs[key]} but data.{key}={value}; '
                                 f'set it on the DataModule only')
        self.model.transform.min_size = (int(min_size),)
        self.model.transform.max_size = int(max_size)
        self._sizes_from_data = True

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm.resolved_seed() if hasattr(dm, 'resolved_seed') else 0

    # -- training --------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        n = len(images)
        self.log_skipped('train/', sum(int(t['skipped']) for t in targets))
        model_targets = [{k: t[k] for k in _MODEL_TARGET_KEYS if k in t} for t in targets]
        devices = [self.device.index or 0] if self.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else 'cuda'):
            torch.manual_seed(sample_seed(self._seed(), self.global_step, self.global_rank))
            with detector_virtual_devices(self.model, self.virtual_devices or 1):
                losses = self.model(images, model_targets)
        loss = sum(losses.values())
        self.check_finite(loss, batch_idx, ', '.join(f'{k}={v.item():.4g}' for k, v in losses.items()))
        self.log('train/loss', loss, prog_bar=True, batch_size=n)
        self.log_dict({f'train/{k}': v for k, v in losses.items()}, batch_size=n)
        self.log('train/lr', self.trainer.optimizers[0].param_groups[0]['lr'], batch_size=n)
        return loss

    # -- evaluation ------------------------------------------------------------------------------------
    def forward(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Detections in the images' own coordinates (``boxes``, ``labels``, ``scores``, ``masks``)."""
        return self.model(images)

    def _eval_step(self, batch, metric: MeanAveragePrecision, prefix: str) -> None:
        images, targets = batch[0], batch[1]
        if not self.log_scored(prefix, len(images), batch[2] if len(batch) > 2 else None):
            return  # every image of this batch was unreadable (skip_corrupt)
        outputs = self.eval_model()(images)
        preds = []
        for out in outputs:
            pred = {k: out[k] for k in ('boxes', 'scores', 'labels')}
            if 'masks' in out:
                pred['masks'] = out['masks'][:, 0] >= self.hparams.mask_threshold
            preds.append(pred)
        gts = [{k: (t[k].bool() if k == 'masks' else t[k]) for k in _EVAL_TARGET_KEYS if k in t} for t in targets]
        metric.update(preds, gts)

    def _log_map(self, metric: MeanAveragePrecision, prefix: str) -> None:
        results = metric.compute()  # synced across processes by torchmetrics
        metric.reset()
        scalars = {f'{prefix}{k}': v.float() for k, v in results.items()
                   if k != 'classes' and not k.endswith('_per_class') and v.numel() == 1}
        shown = {k: scalars.pop(k) for k in (f'{prefix}bbox_map', f'{prefix}segm_map') if k in scalars}
        self.log_dict(shown, prog_bar=True)
        self.log_dict(scalars)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_map, 'val/')

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, 'val/')

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_map, 'test/')

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, 'test/')

    # -- predict: COCO results per image (written by DetectionWriter) ------------------------------------
    def on_predict_start(self) -> None:
        if self.categories is None:
            read = getattr(self.trainer.datamodule, 'read_categories', None)
            self.categories = read() if callable(read) else None
        if self.categories is None:
            import warnings
            warnings.warn('No COCO category mapping (not in the checkpoint, no annotations given): predictions use '
                          'the model\'s contiguous labels as category_id')

    def predict_step(self, batch, batch_idx: int) -> List[Dict[str, Any]]:
        """COCO results of the readable images of a batch (``[]`` when it has none: the writer writes the
        unreadable ones' rows)."""
        from ..core.datasets import PredictBatch
        if isinstance(batch, PredictBatch):
            if batch.inputs is None:
                return []
            images, infos = batch.inputs, batch.meta
        else:
            images, infos = batch
        outputs = self.model(images)
        return [{'path': info['path'], 'image_id': info['image_id'],
                 'results': coco_results(out, info['image_id'], self.categories, self.hparams.mask_threshold)}
                for info, out in zip(infos, outputs)]

    # -- checkpoints: the category mapping and input size travel with the weights ----------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.categories is not None:
            checkpoint['coco_categories'] = self.categories.to_list()
        transform = self.model.transform
        checkpoint['detector_input_size'] = {'min_size': list(transform.min_size), 'max_size': transform.max_size}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get('coco_categories'):
            self.categories = CocoCategories(checkpoint['coco_categories'])
        size = checkpoint.get('detector_input_size')
        if size and not self._sizes_from_data:  # e.g. load_from_checkpoint: resize as in training
            self.model.transform.min_size = tuple(size['min_size'])
            self.model.transform.max_size = size['max_size']
