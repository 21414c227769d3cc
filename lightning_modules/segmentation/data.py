"""Semantic segmentation data: image folders paired with class-index PNG masks.

Layouts (the folder names and suffixes are arguments):

- COCO-stuff / coco-mini: ``train2017/<id>.jpg`` with ``annotations/semantic_train2017/<id>.png``.
- PASCAL VOC: ``JPEGImages/<id>.jpg`` with ``SegmentationClass/<id>.png`` (palette PNGs whose
  indices are the classes) and split lists ``ImageSets/Segmentation/{train,val}.txt``.

A mask is a single-channel PNG (mode ``L`` or ``P``) of class indices, ``ignore_index`` (255)
for unlabelled pixels. A missing mask, a mask whose size differs from its image, an RGB mask, or
labels outside ``0 .. num_classes - 1`` (other than the ignore index) raise :class:`MaskError`
naming the file. Training batches are ``batch_size`` crops per (virtual) device, drawn in the
resumable per-device order of :mod:`lightning_modules.samplers`; augmentation is seeded from
``(seed, epoch, index)`` as for classification, so a resumed run sees the same crops.

An image or mask file that cannot be decoded (truncated, empty, not an image) raises
:class:`~lightning_modules.core.datasets.CorruptImageError` / :class:`UnreadableMaskError` naming
it, or with ``skip_corrupt=True`` is skipped, logged and counted as in every task
(:mod:`lightning_modules.core.datasets`): training takes the next readable pair instead (items and
batches then carry ``skipped``), evaluation drops it from its batch (batches carry ``skipped``;
an all-bad batch has no images), predict writes its row with the reason.

Class names: ``class_names`` (a list, or a file: one name per line, or a JSON list of names or of
``{"name": ...}`` entries such as coco-mini's ``semantic_categories.json``).
"""
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..core.data import ImageDataModule, resolve_path
from ..core.datasets import (MAX_CONSECUTIVE_SKIPS, CorruptImageError, PredictInputs, SkippedInput,
                             UnreadableInputError, load_rgb, log_skip, sample_seed, seeded)
from ..core.predict import IMAGE_EXTENSIONS, list_inputs
from .transforms import IGNORE_INDEX, eval_image_transform, pad_collate, train_transform

__all__ = ['MaskError', 'UnreadableMaskError', 'load_mask', 'read_class_names', 'SegmentationFolderDataset',
           'SegmentationDataModule']

MASK_MODES = ('L', 'P')


class MaskError(ValueError):
    """A segmentation mask that does not fit its image or the classes (the message names the file)."""


class UnreadableMaskError(MaskError, UnreadableInputError):
    """A mask file that cannot be decoded (skipped like an unreadable image with ``skip_corrupt``)."""

    def __init__(self, message: str, path: Union[str, Path], reason: str):
        super().__init__(message)
        self.path, self.reason = str(path), reason


def load_mask(path: Union[str, Path], image_size: Tuple[int, int], num_classes: int,
              ignore_index: int = IGNORE_INDEX, image_path: Union[str, Path, None] = None) -> np.ndarray:
    """The (H, W) uint8 class-index array of ``path``, checked against its image's (W, H) size and the classes."""
    try:
        with Image.open(path) as m:
            mode, size = m.mode, m.size
            if mode not in MASK_MODES:
                raise MaskError(f'Mask {path} is a {mode} image; expected a single-channel class-index PNG '
                                f'(mode L or P), one class index per pixel and {ignore_index} for unlabelled pixels')
            arr = np.asarray(m)
    except MaskError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        reason = f'{type(e).__name__}: {e}'
        raise UnreadableMaskError(f'Cannot read mask {path}: {reason}', path, f'mask {Path(path).name}: {reason}') from e
    if size != tuple(image_size):
        raise MaskError(f'Mask {path} is {size[0]}x{size[1]} (WxH) but its image {image_path or ""} is '
                        f'{image_size[0]}x{image_size[1]}: a mask must have its image\'s size')
    bad = (arr >= num_classes) & (arr != ignore_index)
    if bad.any():
        labels = np.unique(arr[bad])
        raise MaskError(f'Mask {path} has labels {labels[:10].tolist()}{" ..." if labels.size > 10 else ""} outside '
                        f'0..{num_classes - 1} (num_classes={num_classes}) that are not the ignore index '
                        f'{ignore_index}')
    return arr


_seeded = seeded  # the name it had


def read_class_names(source: Union[str, Path, Sequence[str], None], root: Optional[Path] = None) -> Optional[List[str]]:
    """Class names from a list, or a file (relative to ``root``): one name per line (``.txt``), or a JSON
    list of names or of ``{"name": ...}`` entries (ordered by their ``index`` when they have one)."""
    if source is None:
        return None
    if not isinstance(source, (str, Path)):
        return [str(n) for n in source]
    path = Path(source)
    if not path.is_absolute() and root is not None:
        path = root / path
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f'class_names file {path} does not exist')
    if path.suffix.lower() == '.json':
        entries = json.loads(path.read_text())
        if entries and isinstance(entries[0], dict):
            entries = [e['name'] for e in sorted(entries, key=lambda e: e.get('index', 0))]
        return [str(n) for n in entries]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class SegmentationImageLoader:
    """``path -> {'image': eval_transform(image), 'orig_size': (H, W)}``, a predict sample (picklable)."""

    def __init__(self, image_transform: Optional[Callable] = None):
        self.image_transform = image_transform

    def __call__(self, path: Path) -> Dict[str, Any]:
        img = load_rgb(path)
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        if self.image_transform is not None:
            image = self.image_transform(image)
        return {'image': image.as_subclass(torch.Tensor), 'orig_size': (img.size[1], img.size[0])}


def empty_segmentation_batch() -> Dict[str, Any]:
    """The evaluation batch of a loader whose images were all unreadable."""
    return {'image': torch.empty(0, 3, 0, 0), 'size': torch.empty(0, 2, dtype=torch.long), 'mask': [],
            'index': torch.empty(0, dtype=torch.long), 'orig_size': torch.empty(0, 2, dtype=torch.long)}


class SegmentationFolderDataset(Dataset):
    """Images of ``image_dir`` paired by file stem with masks of ``mask_dir``.

    Items are dicts. Training (``transform``, a joint image + mask transform): ``image`` (3, h, w)
    float and ``mask`` (h, w) long crops. Eval (``image_transform``): the transformed ``image``, the
    ``mask`` at the original size, ``index`` and ``orig_size`` (H, W). Without ``mask_dir`` (prediction): no ``mask``.
    ``ids``: the stems to use (a VOC split list), default every image with ``image_suffix``.
    Keys ``(index, epoch)`` seed the training augmentation (see :class:`VirtualDeviceSampler`).
    ``skip_corrupt``: an unreadable image or mask is logged and replaced by the next readable pair
    (``replace_corrupt``, the default in training; items then carry ``skipped``), or returned as a
    :class:`~lightning_modules.core.datasets.SkippedInput` (evaluation), instead of raising.
    """

    def __init__(
            self,
            image_dir: Union[str, Path],
            mask_dir: Union[str, Path, None],
            num_classes: int,
            image_suffix: str = '.jpg',
            mask_suffix: str = '.png',
            ignore_index: int = IGNORE_INDEX,
            transform: Optional[Callable] = None,
            image_transform: Optional[Callable] = None,
            ids: Optional[Sequence[str]] = None,
            limit: Optional[int] = None,
            seed: int = 0,
            skip_corrupt: bool = False,
            replace_corrupt: Optional[bool] = None,
    ):
        self.image_dir = Path(image_dir)
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f'Image folder {self.image_dir} does not exist')
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise FileNotFoundError(f'Mask folder {self.mask_dir} does not exist')
        if ids is None:
            ids = sorted(p.name[:-len(image_suffix)] for p in self.image_dir.iterdir() if p.name.endswith(image_suffix))
        ids = list(ids)[:limit] if limit is not None else list(ids)
        if not ids:
            raise FileNotFoundError(f'No *{image_suffix} images in {self.image_dir}')
        self.images = [self.image_dir / f'{i}{image_suffix}' for i in ids]
        missing = [str(p) for p in self.images if not p.is_file()]
        self.masks: List[Optional[Path]] = [None] * len(ids)
        if self.mask_dir is not None:
            self.masks = [self.mask_dir / f'{i}{mask_suffix}' for i in ids]
            missing += [str(p) for p in self.masks if not p.is_file()]
        if missing:
            raise FileNotFoundError(f'{len(missing)} listed image / mask files do not exist, e.g. {missing[:3]}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.image_transform = image_transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.replace_corrupt = transform is not None if replace_corrupt is None else replace_corrupt

    def __len__(self) -> int:
        return len(self.images)

    def _load_pair(self, index: int):
        img = load_rgb(self.images[index])
        mask = None
        if self.masks[index] is not None:
            arr = load_mask(self.masks[index], img.size, self.num_classes, self.ignore_index, self.images[index])
            mask = tv_tensors.Mask(torch.from_numpy(arr.copy()))
        return img, mask

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        skipped = 0
        while True:
            try:
                img, mask = self._load_pair(index)
                break
            except (CorruptImageError, UnreadableMaskError) as e:
                if not self.skip_corrupt:
                    raise
                log_skip(e, 'image', 'skipped_images')
                if not self.replace_corrupt:
                    return SkippedInput(str(self.images[index]), e.reason)
                skipped += 1
                if skipped >= min(MAX_CONSECUTIVE_SKIPS, len(self)):
                    raise CorruptImageError(f'{skipped} consecutive unreadable images or masks up to '
                                            f'{self.images[index]}; is {self.image_dir} intact?') from e
                index = (index + 1) % len(self)
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        if self.transform is not None:  # training: joint transform of image and mask
            if mask is None:
                raise ValueError(f'A training set needs masks (no mask folder given for {self.image_dir})')
            seed = None if epoch is None else sample_seed(self.seed, epoch, index)
            image, mask = seeded(self.transform, seed, image, mask)
            item = {'image': image.as_subclass(torch.Tensor), 'mask': mask.as_subclass(torch.Tensor).long()}
        else:
            if self.image_transform is not None:
                image = self.image_transform(image)
            item = {'image': image.as_subclass(torch.Tensor), 'index': index, 'orig_size': (img.size[1], img.size[0])}
            if mask is not None:
                item['mask'] = mask.as_subclass(torch.Tensor).long()
        if self.skip_corrupt and self.replace_corrupt:
            item['skipped'] = skipped
        return item


def _read_ids(path: Optional[Path]) -> Optional[List[str]]:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f'Split list {path} does not exist')
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class SegmentationDataModule(ImageDataModule):
    """Image folders + class-index PNG masks (VOC / COCO-stuff layout), resumable, per-device batches.

    Args:
        root: dataset root; the folders below are relative to it.
        num_classes: classes of the masks (labels must be < num_classes or the ignore index).
        train_images, train_masks, val_images, val_masks: image and mask folders of each split.
        train_list, val_list: optional split lists (one image id per line, e.g. VOC's
            ``ImageSets/Segmentation/train.txt``); default: every image in the folder.
        test_images, test_masks: test split (default: the validation split).
        predict_images: images for ``predict``: a folder (relative to ``root``), or a list file or a
            CSV with a ``path`` column (default: the validation images).
        image_suffix, mask_suffix: file endings pairing ``<id><image_suffix>`` with ``<id><mask_suffix>``.
        crop_size, base_size, scale_range, hflip: training augmentation (see :mod:`.transforms`).
        eval_size: resize the shorter side of eval / predict images (masks keep their size); None: full size.
        train_limit, val_limit: use only the first n images (quick runs).
        batch_size: crops per device; eval_batch_size: images per eval batch (padded together).
        skip_corrupt: skip (log, count) unreadable images and masks in every split and in predict
            instead of stopping (see the module doc).
        class_names: the classes' names, a list or a file relative to ``root`` (see :func:`read_class_names`).
        Others: see :class:`lightning_modules.ImageDataModule`.
    """

    def __init__(
            self,
            root: str,
            num_classes: int,
            train_images: str = 'train2017',
            train_masks: str = 'annotations/semantic_train2017',
            val_images: str = 'val2017',
            val_masks: str = 'annotations/semantic_val2017',
            train_list: Optional[str] = None,
            val_list: Optional[str] = None,
            test_images: Optional[str] = None,
            test_masks: Optional[str] = None,
            predict_images: Optional[str] = None,
            image_suffix: str = '.jpg',
            mask_suffix: str = '.png',
            ignore_index: int = IGNORE_INDEX,
            crop_size: int = 512,
            base_size: int = 520,
            scale_range: Sequence[float] = (0.5, 2.0),
            hflip: float = 0.5,
            eval_size: Optional[int] = None,
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
            train_limit: Optional[int] = None,
            val_limit: Optional[int] = None,
            batch_size: int = 2,
            virtual_devices: int = 1,
            eval_batch_size: int = 1,
            num_workers: int = 2,
            seed: Optional[int] = None,
            pin_memory: bool = False,
            skip_corrupt: bool = False,
            class_names: Optional[Union[str, List[str]]] = None,
    ):
        super().__init__(batch_size=batch_size, virtual_devices=virtual_devices, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, skip_corrupt=skip_corrupt, pin_memory=pin_memory)
        self.root = root
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dirs = dict(train=(train_images, train_masks, train_list), val=(val_images, val_masks, val_list),
                         test=(test_images or val_images, test_masks or val_masks, None if test_images else val_list))
        self.predict_images = predict_images
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.train_limit, self.val_limit = train_limit, val_limit
        self.train_transform = train_transform(crop_size, base_size, scale_range, hflip, mean, std, ignore_index)
        self.eval_transform = eval_image_transform(eval_size, mean, std)
        self.predict_set = None
        self._class_names_source = class_names
        self._class_names: Optional[List[str]] = None

    collate_fn = staticmethod(pad_collate)  # eval and predict: images of different sizes, padded
    empty_batch = staticmethod(empty_segmentation_batch)

    @property
    def class_names(self) -> Optional[List[str]]:
        """``class_names`` as given (read from its file), None when not given; checked against ``num_classes``."""
        if self._class_names is None and self._class_names_source is not None:
            names = read_class_names(self._class_names_source, resolve_path(self.root))
            if len(names) != self.num_classes:
                raise ValueError(f'class_names has {len(names)} names but num_classes={self.num_classes}')
            self._class_names = names
        return self._class_names

    def _dataset(self, split: str, training: bool = False, limit: Optional[int] = None) -> SegmentationFolderDataset:
        root = resolve_path(self.root)
        images, masks, ids = self.dirs[split]
        return SegmentationFolderDataset(
            root / images, root / masks, self.num_classes, self.image_suffix, self.mask_suffix, self.ignore_index,
            transform=self.train_transform if training else None,
            image_transform=None if training else self.eval_transform,
            ids=_read_ids(root / ids if ids else None), limit=limit, skip_corrupt=self.skip_corrupt)

    def build_datasets(self, stage: str):
        train = self._dataset('train', training=True, limit=self.train_limit) if stage == 'fit' else None
        val = self._dataset('val', limit=self.val_limit)
        test = val if self.dirs['test'] == self.dirs['val'] else self._dataset('test')
        return train, val, test

    def build_predict_set(self) -> PredictInputs:
        """``predict_images`` (a folder relative to ``root``: its ``*<image_suffix>`` files; or a list / CSV
        of paths), else the validation images (the first ``val_limit``)."""
        root = resolve_path(self.root)
        images, _, ids = self.dirs['val']
        ids = _read_ids(root / ids if ids else None)
        limit = self.val_limit
        source = root / images
        if self.predict_images:
            source = root / self.predict_images
            source = source if source.exists() else resolve_path(self.predict_images)
            ids, limit = None, None
        if source.is_dir():
            paths = SegmentationFolderDataset(source, None, self.num_classes, self.image_suffix, ids=ids,
                                              limit=limit).images
        else:
            paths = list_inputs(source, IMAGE_EXTENSIONS)
        return PredictInputs(paths, SegmentationImageLoader(self.eval_transform), skip=self.skip_corrupt, what='image')

    def default_prediction_writer(self, output: str, top_k: int = 5, resume: bool = False):
        return None  # masks and overlays: name a SegmentationWriter (and its output_dir) in the config

    def setup(self, stage: str) -> None:
        if stage == 'predict':
            self.predict_set = self.build_predict_set()
            return
        super().setup(stage)
