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
"""
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..datamodules import ImageDataModule, resolve_path
from ..datasets import load_rgb, sample_seed
from .transforms import IGNORE_INDEX, eval_image_transform, pad_collate, train_transform

__all__ = ['MaskError', 'load_mask', 'SegmentationFolderDataset', 'SegmentationDataModule']

MASK_MODES = ('L', 'P')


class MaskError(ValueError):
    """A segmentation mask that does not fit its image or the classes (the message names the file)."""


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
        raise MaskError(f'Cannot read mask {path}: {type(e).__name__}: {e}') from e
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


def _seeded(fn: Callable, seed: Optional[int], *args):
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


class SegmentationFolderDataset(Dataset):
    """Images of ``image_dir`` paired by file stem with masks of ``mask_dir``.

    Items are dicts. Training (``transform``, a joint image + mask transform): ``image`` (3, h, w)
    float and ``mask`` (h, w) long crops. Eval (``image_transform``): the transformed ``image``, the
    ``mask`` at the original size, ``index`` and ``orig_size`` (H, W). Without ``mask_dir`` (prediction): no ``mask``.
    ``ids``: the stems to use (a VOC split list), default every image with ``image_suffix``.
    Keys ``(index, epoch)`` seed the training augmentation (see :class:`VirtualDeviceSampler`).
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

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img = load_rgb(self.images[index])
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        mask = None
        if self.masks[index] is not None:
            arr = load_mask(self.masks[index], img.size, self.num_classes, self.ignore_index, self.images[index])
            mask = tv_tensors.Mask(torch.from_numpy(arr.copy()))
        if self.transform is not None:  # training: joint transform of image and mask
            if mask is None:
                raise ValueError(f'A training set needs masks (no mask folder given for {self.image_dir})')
            seed = None if epoch is None else sample_seed(self.seed, epoch, index)
            image, mask = _seeded(self.transform, seed, image, mask)
            return {'image': image.as_subclass(torch.Tensor), 'mask': mask.as_subclass(torch.Tensor).long()}
        if self.image_transform is not None:
            image = self.image_transform(image)
        item = {'image': image.as_subclass(torch.Tensor), 'index': index, 'orig_size': (img.size[1], img.size[0])}
        if mask is not None:
            item['mask'] = mask.as_subclass(torch.Tensor).long()
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
        predict_images: folder of images for ``predict`` (default: the validation images).
        image_suffix, mask_suffix: file endings pairing ``<id><image_suffix>`` with ``<id><mask_suffix>``.
        crop_size, base_size, scale_range, hflip: training augmentation (see :mod:`.transforms`).
        eval_size: resize the shorter side of eval / predict images (masks keep their size); None: full size.
        train_limit, val_limit: use only the first n images (quick runs).
        batch_size: crops per device; eval_batch_size: images per eval batch (padded together).
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
    ):
        super().__init__(batch_size=batch_size, virtual_devices=virtual_devices, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, pin_memory=pin_memory)
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

    def _dataset(self, split: str, training: bool = False, limit: Optional[int] = None) -> SegmentationFolderDataset:
        root = resolve_path(self.root)
        images, masks, ids = self.dirs[split]
        return SegmentationFolderDataset(
            root / images, root / masks, self.num_classes, self.image_suffix, self.mask_suffix, self.ignore_index,
            transform=self.train_transform if training else None,
            image_transform=None if training else self.eval_transform,
            ids=_read_ids(root / ids if ids else None), limit=limit)

    def build_datasets(self, stage: str):
        train = self._dataset('train', training=True, limit=self.train_limit) if stage == 'fit' else None
        val = self._dataset('val', limit=self.val_limit)
        test = val if self.dirs['test'] == self.dirs['val'] else self._dataset('test')
        return train, val, test

    def setup(self, stage: str) -> None:
        if stage == 'predict':
            root = resolve_path(self.root)
            folder = root / (self.predict_images or self.dirs['val'][0])
            self.predict_set = SegmentationFolderDataset(
                folder, None, self.num_classes, self.image_suffix, image_transform=self.eval_transform,
                limit=None if self.predict_images else self.val_limit)
            return
        super().setup(stage)

    def _eval_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=pad_collate,
                          **self._loader_kwargs())

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)
