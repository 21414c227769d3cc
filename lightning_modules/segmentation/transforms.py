"""Mask-aware transforms for semantic segmentation (``torchvision.transforms.v2``).

The image is a ``tv_tensors.Image`` and the class-index mask a ``tv_tensors.Mask``, so every
geometric transform moves both together, resizes the mask with nearest-neighbour interpolation
and pads it with its own fill value. Training follows torchvision's segmentation references:
random resize of the shorter side in ``[0.5, 2.0] x base_size``, horizontal flip, then a random
``crop_size`` crop. The crop pads images smaller than the crop *after* normalization, so padded
image pixels are 0 (the dataset mean) and padded mask pixels are the ignore index.

Evaluation keeps the mask at its original size (metrics are computed at full resolution) and
optionally resizes the image only (``eval_size``: shorter side); the module upsamples its logits
to the mask's size.
"""
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ['train_transform', 'eval_image_transform', 'pad_collate', 'IGNORE_INDEX']

IGNORE_INDEX = 255


def _to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> List[Callable]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(
        crop_size: int = 512,
        base_size: int = 520,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int = IGNORE_INDEX,
) -> v2.Compose:
    """Joint (image, mask) training transform: random scale, flip, normalize, padded random crop."""
    lo, hi = (int(round(s * base_size)) for s in scale_range)
    return v2.Compose([
        v2.RandomResize(lo, max(hi, lo + 1)),
        v2.RandomHorizontalFlip(hflip),
        *_to_normalized_float(mean, std),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0., tv_tensors.Mask: ignore_index}),
    ])


def eval_image_transform(
        eval_size: Optional[int] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Image-only eval transform: optional resize of the shorter side to ``eval_size``, normalize."""
    resize = [v2.Resize(eval_size)] if eval_size else []
    return v2.Compose([*resize, *_to_normalized_float(mean, std)])


def pad_collate(items: List[Dict]) -> Dict:
    """Batch images of different sizes: pad bottom / right with 0 (the mean) into one tensor.

    ``size`` holds each image's own (H, W) so the module crops its logits back; masks stay a list at
    their original sizes (full-resolution metrics). Other keys are stacked or listed.
    """
    h = max(it['image'].shape[-2] for it in items)
    w = max(it['image'].shape[-1] for it in items)
    batch = {
        'image': torch.stack([F.pad(it['image'], (0, w - it['image'].shape[-1], 0, h - it['image'].shape[-2]))
                              for it in items]),
        'size': torch.tensor([list(it['image'].shape[-2:]) for it in items]),
    }
    for key in items[0]:
        if key in batch:
            continue
        values = [it[key] for it in items]
        batch[key] = values if key == 'mask' else torch.as_tensor(values)
    return batch
