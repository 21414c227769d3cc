"""Image datasets for training: ImageFolder trees, bad images, reproducible augmentation.

:class:`ImageFolderDataset` is torchvision's ``ImageFolder`` (same class discovery and sample
list) with two additions a long run needs:

- A corrupt or unreadable image raises :class:`CorruptImageError` naming the file, or, with
  ``skip_corrupt=True``, is skipped, logged with its path and counted. Nothing is dropped silently:
  - training (``replace_corrupt=True``): the next readable image takes its place, so batches keep
    their size; items are ``(image, target, skipped)`` and the Lightning module sums ``skipped``
    into the ``train/skipped_images`` metric.
  - evaluation (``replace_corrupt=False``): the item is a :class:`SkippedImage`, which
    :func:`collate_skipping` drops from its batch and counts, so no image is scored twice or in
    another's place; batches are ``(images, targets, skipped)`` and the Lightning module logs
    ``{val,test}/skipped_images`` next to ``{val,test}/images``, the number of images scored.
- Keys ``(index, epoch)`` (from :class:`~lightning_modules.samplers.VirtualDeviceSampler`) seed
  the augmentation of that image for that epoch, without touching the process's own RNG: random
  crops and flips are then identical in a resumed run, with any number of workers.
"""
import logging
import random
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

__all__ = ['CorruptImageError', 'ImageFolderDataset', 'SkippedImage', 'collate_skipping', 'load_rgb']

_logger = logging.getLogger(__name__)

# Consecutive unreadable images after which a skipping dataset gives up: the tree is broken.
MAX_CONSECUTIVE_SKIPS = 16


class CorruptImageError(OSError):
    """An image file that cannot be decoded (the message names it)."""


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode the whole file now (PIL is lazy) so truncated files fail here, naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f'Cannot read image {path}: {type(e).__name__}: {e}') from e


class SkippedImage(NamedTuple):
    """Stands for an unreadable evaluation image (``replace_corrupt=False``); :func:`collate_skipping` drops it."""
    path: str
    reason: str


def collate_skipping(items: Sequence) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, targets, skipped)``: the readable items collated, the :class:`SkippedImage` ones counted.

    A batch of unreadable images only gives empty ``images`` and ``targets``.
    """
    kept = [it for it in items if not isinstance(it, SkippedImage)]
    skipped = torch.tensor(len(items) - len(kept))
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([base_seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageFolderDataset(ImageFolder):
    """``ImageFolder`` with clear errors (or counted skips) for bad images and seeded augmentation."""

    def __init__(
            self,
            root: Union[str, Path],
            transform: Optional[Callable] = None,
            skip_corrupt: bool = False,
            seed: int = 0,
            per_class: Optional[int] = None,
            replace_corrupt: bool = True,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'Image folder {root} does not exist')
        super().__init__(str(root), transform=transform, loader=load_rgb)
        self.skip_corrupt = skip_corrupt
        self.replace_corrupt = replace_corrupt
        self.seed = seed
        if per_class is not None:
            self.keep_per_class(per_class)

    def keep_per_class(self, n: int) -> None:
        """Keep the first ``n`` images (in sorted file order) of each class: a balanced, fixed subset."""
        counts = {}
        kept = []
        for path, target in self.samples:
            if counts.get(target, 0) < n:
                counts[target] = counts.get(target, 0) + 1
                kept.append((path, target))
        self.samples = self.imgs = kept
        self.targets = [t for _, t in kept]

    def _transform(self, img: Image.Image, seed: Optional[int]) -> Any:
        if self.transform is None:
            return img
        if seed is None:
            return self.transform(img)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(img)
            finally:
                random.setstate(py_state)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        skipped = 0
        while True:
            path, target = self.samples[index]
            try:
                img = self.loader(path)
                break
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                _logger.warning('Skipping unreadable image (counted in the skipped_images metric): %s', e)
                if not self.replace_corrupt:
                    return SkippedImage(str(path), str(e))
                skipped += 1
                if skipped >= min(MAX_CONSECUTIVE_SKIPS, len(self.samples)):
                    raise CorruptImageError(f'{skipped} consecutive unreadable images up to {path}; '
                                            f'is {self.root} intact?') from e
                index = (index + 1) % len(self.samples)
        seed = None if epoch is None else sample_seed(self.seed, epoch, index)
        img = self._transform(img, seed)
        if self.target_transform is not None:
            target = self.target_transform(target)
        if self.skip_corrupt and self.replace_corrupt:
            return img, target, skipped
        return img, target
