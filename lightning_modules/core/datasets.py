"""The data contract every task shares: bad inputs, skipped items, predict inputs and batches.

**Bad inputs.** A file that cannot be decoded raises an :class:`UnreadableInputError` naming the
file and the reason (:class:`CorruptImageError` for images and masks, the video task's
``VideoDecodeError`` for clips). With skipping on (``skip_corrupt`` for images, ``on_decode_error:
skip`` for clips) the input is instead skipped, logged with its path and reason, and counted, in
every split and in predict:

- training: the next readable input takes its place, so batches keep their size (and emulated
  devices their share); the number replaced travels with the batch (classification: the third
  element; detection: each target's ``skipped``; video and segmentation: the ``skipped`` key).
- evaluation: the item is a :class:`SkippedInput`, which the collate drops from its batch and
  counts (:class:`CollateSkipping`), so no input is scored twice or in another's place. A batch of
  only unreadable inputs is an empty batch carrying its count (see :func:`batch_is_empty`,
  :func:`skipped_in_batch`): evaluation steps log the count and return.
- predict: inputs come from :class:`PredictInputs` (items :class:`PredictItem`) and are collated by
  :class:`CollatePredict` into a :class:`PredictBatch`: the readable inputs, their metadata (path,
  index, ...) and the unreadable ones with their reason, which the prediction writer
  (:mod:`lightning_modules.core.writer`) writes as rows with an ``error``. A batch of only
  unreadable inputs has ``inputs=None``; ``predict_step`` returns ``[]`` for it.

:class:`ImageFolderDataset` is torchvision's ``ImageFolder`` (same class discovery and sample
list) with these rules, and with seeded augmentation: keys ``(index, epoch)`` (from
:class:`~lightning_modules.core.samplers.VirtualDeviceSampler`) seed the augmentation of that image
for that epoch, without touching the process's own RNG, so random crops and flips are identical in
a resumed run, with any number of workers.
"""
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder

__all__ = ['UnreadableInputError', 'CorruptImageError', 'ImageFolderDataset', 'SkippedInput', 'SkippedImage',
           'CollateSkipping', 'collate_skipping', 'skipped_in_batch', 'batch_is_empty', 'PredictItem',
           'PredictBatch', 'PredictInputs', 'CollatePredict', 'ImageLoader', 'load_rgb', 'log_skip',
           'seeded', 'sample_seed']

_logger = logging.getLogger(__name__)

# Consecutive unreadable inputs after which a skipping training set gives up: the tree is broken.
MAX_CONSECUTIVE_SKIPS = 16


class UnreadableInputError(Exception):
    """An input file that cannot be decoded; ``path`` and ``reason`` say which and why."""
    path: str = ''
    reason: str = ''


class CorruptImageError(UnreadableInputError, OSError):
    """An image (or mask) file that cannot be decoded (the message names it)."""

    def __init__(self, message: str, path: Union[str, Path, None] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.path = str(path) if path is not None else ''
        self.reason = reason if reason is not None else message


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode the whole file now (PIL is lazy) so truncated files fail here, naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        reason = 'empty file (0 bytes)' if empty else f'{type(e).__name__}: {e}'
        raise CorruptImageError(f'Cannot read image {path}: {reason}', path, reason) from e


def log_skip(error: UnreadableInputError, what: str = 'input', counted_in: str = 'skipped') -> None:
    """The warning of every skipped input (every time: a warnings-module warning would show once)."""
    _logger.warning('Skipping unreadable %s %s (counted in %s): %s', what, error.path, counted_in, error.reason)


class SkippedInput(NamedTuple):
    """Stands for an unreadable evaluation or predict input; collates drop it and count it."""
    path: str
    reason: str


SkippedImage = SkippedInput  # the name it had for images


class CollateSkipping:
    """Collate the readable items with ``collate``, drop and count the :class:`SkippedInput` ones.

    The count is appended to a tuple batch (``(images, targets, skipped)``) or set as the
    ``skipped`` key of a dict batch. A batch of unreadable items only is ``empty()`` (the task's
    empty batch) with its count.
    """

    def __init__(self, collate: Callable = default_collate, empty: Optional[Callable[[], Any]] = None):
        self.collate = collate
        self.empty = empty

    def __call__(self, items: Sequence) -> Any:
        kept = [it for it in items if not isinstance(it, SkippedInput)]
        skipped = torch.tensor(len(items) - len(kept))
        if kept:
            batch = self.collate(kept)
        elif self.empty is not None:
            batch = self.empty()
        else:
            batch = (torch.empty(0), torch.empty(0, dtype=torch.long))
        if isinstance(batch, dict):
            return {**batch, 'skipped': skipped}
        return (*batch, skipped)


collate_skipping = CollateSkipping()
collate_skipping.__doc__ = """``(images, targets, skipped)``: readable items collated, :class:`SkippedInput` ones counted.

A batch of unreadable images only gives empty ``images`` and ``targets``.
"""


def skipped_in_batch(batch: Any) -> int:
    """Unreadable inputs dropped from an evaluation batch (0 when the batch does not say)."""
    if isinstance(batch, dict):
        value = batch.get('skipped', 0)
    elif isinstance(batch, (tuple, list)) and len(batch) > 2:
        value = batch[-1]
    else:
        return 0
    return int(value.sum()) if isinstance(value, torch.Tensor) else int(value)


def batch_is_empty(batch: Any) -> bool:
    """True for an evaluation batch whose inputs were all unreadable (or a predict batch without inputs)."""
    if isinstance(batch, PredictBatch):
        return batch.inputs is None
    if isinstance(batch, dict):
        for key in ('label', 'mask', 'image', 'video'):
            if key in batch:
                return len(batch[key]) == 0
        return False
    if isinstance(batch, (tuple, list)) and batch:
        return len(batch[0]) == 0
    return False


# -- predict ----------------------------------------------------------------------------------------

class PredictItem(NamedTuple):
    """One predict input: ``meta`` (``index``, ``path`` and task extras such as ``image_id``) and its
    decoded ``sample``, or a :class:`SkippedInput`."""
    meta: Dict[str, Any]
    sample: Any


class PredictBatch(NamedTuple):
    """A predict batch: the readable inputs collated by the task (None when there are none), their
    metadata in the same order (what the predictions line up with), and the unreadable inputs'
    metadata with their ``error``."""
    inputs: Any
    meta: List[Dict[str, Any]]
    skipped: List[Dict[str, Any]]


class CollatePredict:
    """:class:`PredictItem` s -> :class:`PredictBatch`, the readable samples collated by ``collate``."""

    def __init__(self, collate: Callable = default_collate):
        self.collate = collate

    def __call__(self, items: Sequence[PredictItem]) -> PredictBatch:
        kept = [it for it in items if not isinstance(it.sample, SkippedInput)]
        skipped = [dict(it.meta, error=it.sample.reason) for it in items if isinstance(it.sample, SkippedInput)]
        inputs = self.collate([it.sample for it in kept]) if kept else None
        return PredictBatch(inputs, [it.meta for it in kept], skipped)


class ImageLoader:
    """``path -> transform(RGB image)`` (a picklable loader for :class:`PredictInputs`)."""

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform

    def __call__(self, path: Path) -> Any:
        img = load_rgb(path)
        return self.transform(img) if self.transform is not None else img


class PredictInputs(Dataset):
    """Unlabeled inputs for predict; item ``i`` is a :class:`PredictItem` of ``paths[i]``.

    Args:
        paths: the input files, in the order rows are written.
        load: ``path -> sample`` (raises :class:`UnreadableInputError` for a bad file).
        skip: skip (log, and write the row with its reason) unreadable inputs instead of raising.
        meta: extra metadata per input, ``(position, path) -> dict`` (e.g. detection's ``image_id``).
        what: the word for an input in messages (``image``, ``clip``).
    """

    def __init__(self, paths: Sequence[Union[str, Path]], load: Callable[[Path], Any], skip: bool = False,
                 meta: Optional[Callable[[int, Path], Dict[str, Any]]] = None, what: str = 'input'):
        self.paths = [Path(p) for p in paths]
        self.load = load
        self.skip = skip
        self.meta = meta
        self.what = what
        self.excluded = 0

    def __len__(self) -> int:
        return len(self.paths)

    def exclude(self, done: Iterable[str]) -> int:
        """Drop the inputs whose path is in ``done`` (a resumed predict); returns how many were dropped."""
        done = set(done)
        before = len(self.paths)
        self.paths = [p for p in self.paths if str(p) not in done]
        self.excluded += before - len(self.paths)
        return before - len(self.paths)

    def __getitem__(self, index: int) -> PredictItem:
        path = self.paths[index]
        meta = {'index': index, 'path': str(path)}
        if self.meta is not None:
            meta.update(self.meta(index, path))
        try:
            return PredictItem(meta, self.load(path))
        except UnreadableInputError as e:
            if not self.skip:
                raise
            log_skip(e, self.what, 'the predictions\' error column')
            return PredictItem(meta, SkippedInput(str(path), e.reason or str(e)))


def seeded(fn: Callable, seed: Optional[int], *args):
    """``fn(*args)`` with torch and python RNGs seeded by ``seed``, leaving the process's RNGs untouched."""
    if seed is None:
        return fn(*args)
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return fn(*args)
        finally:
            random.setstate(py_state)


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
        return seeded(self.transform, seed, img)

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
                log_skip(e, 'image', 'the skipped_images metric')
                if not self.replace_corrupt:
                    return SkippedInput(str(path), e.reason)
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
