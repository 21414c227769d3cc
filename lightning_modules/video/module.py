"""``VideoClassifier``: TSM (or any clip model) training with clip-level and video-level accuracy.

A subclass of :class:`~lightning_modules.classification.ImageClassifier`, so fine-tuning
(``init_checkpoint``, ``freeze_backbone``, ``optim.backbone_lr_scale``) is the image classifier's
code, and optimizer, schedule, EMA, emulated devices, the non-finite loss check and exact resume
are the shared :class:`~lightning_modules.core.task.TaskModule`'s. What changes is the data:
batches from :class:`~lightning_modules.video.VideoDataModule`.

- Training: ``video`` (B, C, T, H, W), one TSN clip per video; ``train/top1`` is clip-level.
- Validation / test: ``video`` (B, V, C, T, H, W), V = clips x crops views per video. All views go
  through the model at once; ``{val,test}/clip_top1`` scores every view against its video's label,
  ``{val,test}/top1`` (and top5) scores the mean of the views' softmax scores (video level).
- ``skipped`` (undecodable clips with ``on_decode_error='skip'``) is logged as a running total,
  ``{train,val,test}/skipped_videos``, summed over processes; ``{val,test}/videos`` counts the scored ones.

2D ImageNet weights of the same backbone load unchanged into a TSM model (the shift has no
parameters): ``init_checkpoint=resnet50_wsbcn.safetensors`` or
``model_kwargs.pretrained_cfg_overlay.file`` with ``pretrained=True``.
"""
from typing import Any, Dict, Optional

import torch

from ..classification.metrics import accuracy_metrics
from ..classification.module import ImageClassifier
from ..core.optim import OptimConfig
from ..core.task import as_optim_config

# TSM's recipe (Lin et al.): SGD lr 0.01 for 64 clips, weight decay 1e-4, step decay at epochs 20 and 40.
VIDEO_OPTIM = OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-4, schedule='cosine', milestones=(20., 40.))

__all__ = ['VideoClassifier']


class VideoClassifier(ImageClassifier):
    """Video classification with a clip model taking (B, C, T, H, W), e.g. ``tsm_resnet50_wsbcn``.

    Args:
        model_name: a zoo TSM name (``tsm_resnet50_wsbcn``) or any model taking (B, C, T, H, W).
        num_segments: frames per clip T, passed to the model (set the DataModule's to the same).
        optim: optimizer and schedule; default :data:`VIDEO_OPTIM`.
        Other args: as :class:`~lightning_modules.classification.ImageClassifier` (Mixup / CutMix
        are image-only and left out); ``images_per_device`` counts clips.
    """

    def __init__(
            self,
            model_name: str = 'tsm_resnet50_wsbcn',
            num_classes: int = 400,
            num_segments: int = 8,
            pretrained: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            init_checkpoint: Optional[str] = None,
            freeze_backbone: bool = False,
            label_smoothing: float = 0.0,
            optim: OptimConfig = VIDEO_OPTIM,
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
            virtual_devices: Optional[int] = None,
            images_per_device: Optional[int] = None,
    ):
        super().__init__(
            model_name=model_name, num_classes=num_classes, pretrained=pretrained,
            model_kwargs=dict(model_kwargs or {}, num_segments=num_segments), init_checkpoint=init_checkpoint,
            freeze_backbone=freeze_backbone, label_smoothing=label_smoothing,
            optim=as_optim_config(optim, VIDEO_OPTIM), ema_decay=ema_decay, bcn_batch_stage=bcn_batch_stage,
            virtual_devices=virtual_devices, images_per_device=images_per_device)
        self.save_task_hyperparameters()
        self.num_segments = num_segments
        self.val_clip_metrics = accuracy_metrics(num_classes, 'val/clip_')
        self.test_clip_metrics = accuracy_metrics(num_classes, 'test/clip_')

    input_unit = 'videos'  # {train,val,test}/skipped_videos, {val,test}/videos

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        self.log_skipped('train/', batch['skipped'])
        if batch['label'].numel() == 0:
            return None  # every clip of this batch was undecodable (on_decode_error='skip'): no update
        return super().training_step((batch['video'], batch['label']), batch_idx)

    def video_scores(self, video: torch.Tensor) -> torch.Tensor:
        """(B, V, C, T, H, W) views -> per-view logits (B, V, K)."""
        if video.ndim != 6:
            raise ValueError(f'evaluation batches are (B, V, C, T, H, W) views, got shape {tuple(video.shape)}')
        b, v = video.shape[:2]
        return self.eval_model()(video.flatten(0, 1)).view(b, v, -1)

    def _eval_step(self, batch: Dict[str, torch.Tensor], video_metrics, clip_metrics, prefix: str) -> None:
        y = batch['label']
        if not self.log_scored(prefix, y.numel(), batch['skipped']):
            return  # every clip of this batch was undecodable (on_decode_error='skip')
        logits = self.video_scores(batch['video'])
        b, v, k = logits.shape
        clip_y = y.repeat_interleave(v)
        self.log(f'{prefix}loss', self.eval_loss(logits.reshape(b * v, k), clip_y), sync_dist=True, batch_size=b * v)
        clip_metrics.update(logits.reshape(b * v, k), clip_y)
        video_metrics.update(logits.softmax(-1).mean(1), y)
        self.log_dict(clip_metrics, batch_size=b * v)
        self.log_dict(video_metrics, prog_bar=prefix == 'val/', batch_size=b)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_clip_metrics, 'val/')

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_clip_metrics, 'test/')

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Video-level class probabilities (mean softmax over views) of the decodable clips of a batch
        (``[]`` when it has none: the writer writes the undecodable ones' rows)."""
        from ..core.datasets import PredictBatch
        if isinstance(batch, PredictBatch):
            if batch.inputs is None:
                return []
            batch = batch.inputs
        video = batch['video'] if isinstance(batch, dict) else batch
        if video.numel() == 0:
            return []
        if video.ndim == 5:
            video = video.unsqueeze(1)
        return self.video_scores(video).softmax(-1).mean(1)
