"""``VideoClassifier``: TSM (or any clip model) training with clip-level and video-level accuracy.

A subclass of :class:`~lightning_modules.classification.ImageClassifier`, so optimizer, parameter
groups, schedule, fine-tuning (``init_checkpoint``, ``freeze_backbone``, ``backbone_lr_scale``),
EMA, the non-finite loss check and resumable RNG state are the image classifier's own code. What
changes is the data: batches from :class:`~lightning_modules.video_data.VideoDataModule`.

- Training: ``video`` (B, C, T, H, W), one TSN clip per video; ``train/top1`` is clip-level.
- Validation / test: ``video`` (B, V, C, T, H, W), V = clips x crops views per video. All views go
  through the model at once; ``{val,test}/clip_top1`` scores every view against its video's label,
  ``{val,test}/top1`` (and top5) scores the mean of the views' softmax scores (video level).
- ``skipped`` (undecodable clips with ``on_decode_error='skip'``) is logged as a running total,
  ``{train,val,test}/skipped_videos``, summed over processes.

2D ImageNet weights of the same backbone load unchanged into a TSM model (the shift has no
parameters): ``init_checkpoint=resnet50_wsbcn.safetensors`` or
``model_kwargs.pretrained_cfg_overlay.file`` with ``pretrained=True``.
"""
from typing import Any, Dict, Optional, Sequence

import torch

from .classification import ImageClassifier
from .metrics import accuracy_metrics

__all__ = ['VideoClassifier']


class VideoClassifier(ImageClassifier):
    """Video classification with a clip model taking (B, C, T, H, W), e.g. ``tsm_resnet50_wsbcn``.

    Args:
        model_name: a zoo TSM name (``tsm_resnet50_wsbcn``) or any model taking (B, C, T, H, W).
        num_segments: frames per clip T, passed to the model (set the DataModule's to the same).
        Other args: as :class:`~lightning_modules.classification.ImageClassifier` (Mixup / CutMix
        are image-only and left out).
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
            backbone_lr_scale: float = 1.0,
            label_smoothing: float = 0.0,
            optimizer: str = 'sgd',
            lr: float = 0.01,
            momentum: float = 0.9,
            nesterov: bool = False,
            weight_decay: float = 1e-4,
            betas: Sequence[float] = (0.9, 0.999),
            schedule: str = 'cosine',
            warmup_epochs: float = 0.0,
            warmup_lr: float = 1e-5,
            min_lr: float = 0.0,
            decay_epochs: float = 30.0,
            milestones: Sequence[float] = (20.0, 40.0),
            decay_rate: float = 0.1,
            ema_decay: Optional[float] = None,
            bcn_batch_stage: Optional[str] = None,
    ):
        super().__init__(
            model_name=model_name, num_classes=num_classes, pretrained=pretrained,
            model_kwargs=dict(model_kwargs or {}, num_segments=num_segments), init_checkpoint=init_checkpoint,
            freeze_backbone=freeze_backbone, backbone_lr_scale=backbone_lr_scale, virtual_devices=1,
            label_smoothing=label_smoothing, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, betas=betas, schedule=schedule, warmup_epochs=warmup_epochs,
            warmup_lr=warmup_lr, min_lr=min_lr, decay_epochs=decay_epochs, milestones=milestones,
            decay_rate=decay_rate, ema_decay=ema_decay, bcn_batch_stage=bcn_batch_stage)
        self.num_segments = num_segments
        self.val_clip_metrics = accuracy_metrics(num_classes, 'val/clip_')
        self.test_clip_metrics = accuracy_metrics(num_classes, 'test/clip_')

    def _log_skipped(self, batch: Dict[str, torch.Tensor], prefix: str) -> None:
        self.log(f'{prefix}skipped_videos', batch['skipped'].sum().float(), reduce_fx='sum', on_step=False,
                 on_epoch=True, sync_dist=True, batch_size=1)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        self._log_skipped(batch, 'train/')
        if batch['label'].numel() == 0:
            return None  # every clip of this batch was undecodable (on_decode_error='skip'): no update
        return super().training_step((batch['video'], batch['label']), batch_idx)

    def video_scores(self, video: torch.Tensor) -> torch.Tensor:
        """(B, V, C, T, H, W) views -> per-view logits (B, V, K)."""
        if video.ndim != 6:
            raise ValueError(f'evaluation batches are (B, V, C, T, H, W) views, got shape {tuple(video.shape)}')
        b, v = video.shape[:2]
        return self._eval_model()(video.flatten(0, 1)).view(b, v, -1)

    def _eval_step(self, batch: Dict[str, torch.Tensor], video_metrics, clip_metrics, prefix: str) -> None:
        self._log_skipped(batch, prefix)
        y = batch['label']
        if y.numel() == 0:
            return
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
        """Video-level class probabilities (mean softmax over views)."""
        video = batch['video'] if isinstance(batch, dict) else batch
        if video.ndim == 5:
            video = video.unsqueeze(1)
        return self.video_scores(video).softmax(-1).mean(1)
