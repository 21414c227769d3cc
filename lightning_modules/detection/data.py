"""COCO-format detection and instance segmentation data: datasets, transforms, DataModule.

Sources: an image folder plus a COCO instances JSON (read with pycocotools). COCO category ids
(1..90 with gaps) become contiguous labels 1..C in sorted id order, 0 being the background, as
torchvision's detectors expect; :class:`CocoCategories` keeps the mapping so predictions can be
written back with the original ids.

Samples go to the model as lists (images of different sizes): ``(images, targets)`` with
``targets[i]`` holding ``boxes`` (x1, y1, x2, y2), ``labels``, ``masks`` (N, H, W) and, for
evaluation, ``iscrowd`` and ``area`` (the COCO protocol's inputs to torchmetrics'
``MeanAveragePrecision``).

Transforms (``torchvision.transforms.v2`` on ``tv_tensors``, so boxes and masks follow the image):

- training: resize so the shorter side is ``min_size`` (the longer at most ``max_size``), then a
  horizontal flip. The interpolation is the detector's own (bilinear, no antialias), and the
  module gives the detector the same ``min_size`` / ``max_size``, so its internal resize is the
  identity on training images;
- evaluation and predict: images at their original size; the detector resizes them itself and
  maps its detections back to original coordinates, where COCO's annotations (and areas) are.

Bad input, each reported by file and annotation id (:class:`CocoFormatError`), never left to
fail inside torchvision:

- an image without annotations: kept, as a negative sample (empty boxes and masks);
- a box of zero (or negative) width or height, after clipping to the image: dropped from
  training and evaluation, with a warning naming the image file and annotation id, and counted
  (``dataset.dropped``);
- a crowd annotation (``iscrowd=1``): ignored in training (COCO convention, counted in the log),
  kept with ``iscrowd`` in evaluation targets, where the COCO protocol ignores detections on it;
- an annotation or image entry whose image file is missing, an annotation naming an unknown
  image or category, a segmentation that cannot be decoded, an image whose size differs from
  its JSON entry: :class:`CocoFormatError`;
- a corrupt image: :class:`~lightning_modules.datasets.CorruptImageError` naming the file, or with
  ``skip_corrupt=True`` skipped with a warning and counted, in every split, as every task does
  (:mod:`lightning_modules.core.datasets`): in training the next readable image takes its place
  (counted in the target's ``skipped``, logged by the module as ``train/skipped_images``); in
  evaluation it is dropped from its batch, and batches are ``(images, targets, skipped)``; in
  predict its row says why.

Predict: the images of a folder (or a list / CSV of paths) at their original size; each input's
``image_id`` comes from the annotation file when there is one (``predict_annotations``, or the
annotations of the split whose folder is predicted), else from a COCO-style numeric file name
(``000000000139.jpg`` -> 139), else from its position in the list.

Training order and augmentation are exactly resumable mid-epoch: the loader is the classifier's
(:class:`~lightning_modules.samplers.VirtualDeviceSampler` keys ``(index, epoch)``, the position kept
by :class:`~lightning_modules.samplers.ResumableTrainOrder`), and each image's flip is seeded from
its key as in :mod:`lightning_modules.datasets`.
"""
import contextlib
import io
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..core.data import ImageDataModule, resolve_path
from ..core.datasets import (MAX_CONSECUTIVE_SKIPS, CorruptImageError, PredictInputs, SkippedInput, load_rgb, log_skip,
                             sample_seed)
from ..core.predict import list_inputs

__all__ = [
    'CocoFormatError', 'CocoCategories', 'load_coco', 'CocoDetectionDataset', 'ImageListDataset', 'image_ids_for',
    'train_transform', 'collate_detection', 'collate_images', 'CocoDetectionDataModule', 'IMAGE_EXTENSIONS']

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
_MAX_LISTED = 20  # warnings that name each item; the rest is summarised


class CocoFormatError(ValueError):
    """A COCO JSON or image folder that does not fit together; names the file and annotation."""


def load_coco(ann_file: Union[str, Path]) -> COCO:
    """pycocotools' ``COCO`` (its prints silenced), with errors that name the file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f'COCO annotation file {ann_file} does not exist')
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f'{ann_file} is not valid JSON: {e}') from e
    except (KeyError, TypeError) as e:
        raise CocoFormatError(f'{ann_file} is not a COCO instances file ({type(e).__name__}: {e})') from e
    for key in ('images', 'categories'):
        if key not in coco.dataset:
            raise CocoFormatError(f'{ann_file} has no {key!r} list: not a COCO instances file')
    return coco


class CocoCategories:
    """COCO category ids <-> contiguous labels 1..C (0 = background), with names."""

    def __init__(self, categories: Sequence[Dict[str, Any]]):
        cats = sorted(({'id': int(c['id']), 'name': str(c.get('name', c['id']))} for c in categories),
                      key=lambda c: c['id'])
        ids = [c['id'] for c in cats]
        if len(set(ids)) != len(ids):
            raise CocoFormatError(f'duplicate category ids in {ids}')
        self.categories = cats
        self.label_of = {cid: i + 1 for i, cid in enumerate(ids)}

    @classmethod
    def from_coco(cls, coco: COCO) -> 'CocoCategories':
        return cls(coco.dataset['categories'])

    @property
    def num_classes(self) -> int:
        """Including the background."""
        return len(self.categories) + 1

    def category_id(self, label: int) -> int:
        return self.categories[int(label) - 1]['id']

    def name(self, label: int) -> str:
        return self.categories[int(label) - 1]['name']

    def to_list(self) -> List[Dict[str, Any]]:
        return [dict(c) for c in self.categories]

    def __eq__(self, other) -> bool:
        return isinstance(other, CocoCategories) and self.categories == other.categories


def _xyxy_clipped(bbox: Sequence[float], width: int, height: int) -> List[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [max(0., x), max(0., y), min(float(width), x + w), min(float(height), y + h)]


def box_problem(bbox: Sequence[float], width: int, height: int) -> Optional[str]:
    """Why a COCO ``[x, y, w, h]`` box cannot be trained on (None if it can). Checked before clipping:
    Python's ``min``/``max`` drop a NaN, so ``[NaN, 158, 53, 138]`` would clip to the whole image width."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return f'is not four numbers ({bbox!r})'
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return 'has a non-finite value'
    if w < 0 or h < 0:
        return 'has a negative width or height'
    x1, y1, x2, y2 = _xyxy_clipped(bbox, width, height)
    if x2 <= x1 or y2 <= y1:
        return 'has zero width or height (after clipping to the image)'
    return None


def train_transform(min_size: int, max_size: int, hflip: float = 0.5) -> v2.Compose:
    """Resize (shorter side ``min_size``, longer at most ``max_size``) + horizontal flip, on tv_tensors.

    Bilinear without antialias: the detector's own resize at evaluation time, so training and
    evaluation images are sampled alike.
    """
    return v2.Compose([
        v2.Resize(min_size, max_size=max_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False),
        v2.RandomHorizontalFlip(hflip),
    ])


class CocoDetectionDataset(Dataset):
    """Images and targets of a COCO instances file; keys are an index or ``(index, epoch)``.

    Args:
        image_dir: folder of the images (``file_name`` of each JSON image entry is relative to it).
        ann_file: the instances JSON.
        transform: a ``transforms.v2`` transform of ``(image, target)``; None: original size.
        train: training targets (crowd regions left out) rather than evaluation targets
            (crowd regions kept with ``iscrowd``, plus ``area``).
        masks: decode the instance masks (False for box-only detectors).
        categories: label mapping to use (the training set's); None: this file's categories.
        skip_corrupt: skip unreadable images (logged, counted) instead of raising.
        replace_corrupt: with ``skip_corrupt``, replace an unreadable image by the next readable one,
            counted in the target's ``skipped`` (default: in training), or return a
            :class:`~lightning_modules.core.datasets.SkippedInput` that the evaluation collate drops
            and counts (default: in evaluation).
        seed: base seed of the augmentation (with ``(index, epoch)`` keys).
    """

    def __init__(
            self,
            image_dir: Union[str, Path],
            ann_file: Union[str, Path],
            transform: Optional[Callable] = None,
            train: bool = True,
            masks: bool = True,
            categories: Optional[CocoCategories] = None,
            skip_corrupt: bool = False,
            seed: int = 0,
            replace_corrupt: Optional[bool] = None,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f'Image folder {self.image_dir} (of {self.ann_file}) does not exist')
        self.coco = load_coco(self.ann_file)
        self.categories = categories or CocoCategories.from_coco(self.coco)
        self.transform = transform
        self.train = train
        self.masks = masks
        self.skip_corrupt = skip_corrupt
        self.replace_corrupt = train if replace_corrupt is None else replace_corrupt
        self.seed = seed
        self.dropped: List[Tuple[str, int, str]] = []  # (file, annotation id, why) of boxes not trained on
        self.ignored_crowd = 0
        self.image_ids = sorted(self.coco.imgs)
        self.anns = self._check_and_select()

    # -- validation: every problem named before training starts --------------------------------------
    def _file_of(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]['file_name']

    def _check_and_select(self) -> Dict[int, List[dict]]:
        coco, src = self.coco, self.ann_file
        for ann in coco.dataset.get('annotations', []):
            if ann.get('image_id') not in coco.imgs:
                raise CocoFormatError(f'{src}: annotation {ann.get("id")} points at image id {ann.get("image_id")}, '
                                      f'which is not in the images list')
            if ann.get('category_id') not in self.categories.label_of:
                raise CocoFormatError(
                    f'{src}: annotation {ann.get("id")} (image {self._file_of(ann["image_id"])}) has category id '
                    f'{ann.get("category_id")}, which is not in the categories list '
                    f'{sorted(self.categories.label_of)}')
        missing = [i for i in self.image_ids if not self._file_of(i).is_file()]
        if missing:
            listed = ', '.join(f'{self._file_of(i)} (annotations {[a["id"] for a in coco.imgToAnns[i]]})'
                               for i in missing[:5])
            raise CocoFormatError(f'{src}: {len(missing)} image file(s) are missing: {listed}'
                                  + (' ...' if len(missing) > 5 else ''))
        selected = {}
        for image_id in self.image_ids:
            info = coco.imgs[image_id]
            kept = []
            for ann in coco.imgToAnns[image_id]:
                if ann.get('iscrowd', 0) and self.train:
                    self.ignored_crowd += 1
                    continue
                problem = box_problem(ann.get('bbox'), info['width'], info['height'])
                if problem is not None:
                    self.dropped.append((str(self._file_of(image_id)), ann['id'], problem))
                    continue
                kept.append(ann)
            selected[image_id] = kept
        for file, ann_id, why in self.dropped[:_MAX_LISTED]:
            _logger.warning('Dropped annotation %s of %s: its box %s %s', ann_id, file, coco.anns[ann_id].get('bbox'),
                            why)
        if self.dropped:
            _logger.warning('%s: %d annotation(s) with a non-finite, negative or empty box dropped (not trained on, '
                            'not evaluated)', src, len(self.dropped))
        if not coco.dataset.get('annotations'):
            _logger.warning('%s has no annotations at all: each of its %d images is a negative sample (no objects). '
                            'Is it the right file?', src, len(self.image_ids))
        if self.ignored_crowd:
            _logger.info('%s: %d crowd annotation(s) ignored in training (COCO convention)', src, self.ignored_crowd)
        return selected

    # -- loading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def _decode_masks(self, anns: List[dict], image_id: int, height: int, width: int) -> torch.Tensor:
        if not anns:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        masks = []
        for ann in anns:
            try:
                masks.append(self.coco.annToMask(ann))
            except Exception as e:  # pycocotools raises many types on bad segmentations
                raise CocoFormatError(f'{self.ann_file}: annotation {ann["id"]} of {self._file_of(image_id)} has a '
                                      f'segmentation that cannot be decoded ({type(e).__name__}: {e})') from e
        return torch.from_numpy(np.stack(masks))

    def target(self, image_id: int) -> Dict[str, torch.Tensor]:
        """Target in original image coordinates (no transform)."""
        info = self.coco.imgs[image_id]
        h, w = info['height'], info['width']
        anns = self.anns[image_id]
        boxes = torch.tensor([_xyxy_clipped(a['bbox'], w, h) for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            'image_id': torch.tensor(image_id),
            'boxes': boxes,
            'labels': torch.tensor([self.categories.label_of[a['category_id']] for a in anns], dtype=torch.int64),
        }
        if self.masks:
            target['masks'] = self._decode_masks(anns, image_id, h, w)
        if not self.train:
            target['iscrowd'] = torch.tensor([int(a.get('iscrowd', 0)) for a in anns], dtype=torch.int64)
            target['area'] = torch.tensor([float(a.get('area', 0.)) for a in anns], dtype=torch.float32)
        return target

    def _load(self, index: int) -> Tuple[Any, int, int]:
        """(image, index actually loaded, images skipped); the image is a SkippedInput when not replaced."""
        skipped = 0
        while True:
            image_id = self.image_ids[index]
            path = self._file_of(image_id)
            try:
                return load_rgb(path), index, skipped
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                log_skip(e, 'image', 'skipped_images')
                if not self.replace_corrupt:
                    return SkippedInput(str(path), e.reason), index, 1
                skipped += 1
                if skipped >= min(MAX_CONSECUTIVE_SKIPS, len(self)):
                    raise CorruptImageError(f'{skipped} consecutive unreadable images up to {path}; '
                                            f'is {self.image_dir} intact?') from e
                index = (index + 1) % len(self)

    def _transform(self, image, target, seed: Optional[int]):
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image, target)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image, target)
            finally:
                random.setstate(py_state)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        pil, index, skipped = self._load(index)
        if isinstance(pil, SkippedInput):
            return pil
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        if (pil.height, pil.width) != (info['height'], info['width']):
            raise CocoFormatError(f'{self._file_of(image_id)} is {pil.width}x{pil.height} but {self.ann_file} says '
                                  f'{info["width"]}x{info["height"]}: its boxes and masks would not fit the image')
        image = tv_tensors.Image(TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True))
        target = self.target(image_id)
        size = (info['height'], info['width'])
        target['boxes'] = tv_tensors.BoundingBoxes(target['boxes'], format='XYXY', canvas_size=size)
        if 'masks' in target:
            target['masks'] = tv_tensors.Mask(target['masks'])
        seed = None if epoch is None else sample_seed(self.seed, epoch, index)
        image, target = self._transform(image, target, seed)
        target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        target['skipped'] = torch.tensor(skipped)
        return image.as_subclass(torch.Tensor), target


def _numbered_id(path: Path, position: int) -> int:
    return int(path.stem) if path.stem.isdigit() else position


def image_ids_for(paths: Sequence[Path], folder: Optional[Path] = None,
                  annotations: Optional[Union[str, Path]] = None) -> List[int]:
    """The COCO ``image_id`` of each predict input.

    With ``annotations`` (a COCO JSON): the id of the image entry whose ``file_name`` is the input's
    path relative to ``folder`` (or its file name); an input not in the file gets a numbered id
    (below), with a warning naming it. Without: the file name's number for COCO-style names
    (``000000000139.jpg`` -> 139), else the position in the list.
    """
    paths = [Path(p) for p in paths]
    if annotations is None:
        return [_numbered_id(p, i) for i, p in enumerate(paths)]
    coco = load_coco(annotations)
    by_name: Dict[str, int] = {}
    for info in coco.dataset['images']:
        by_name.setdefault(str(info['file_name']), int(info['id']))
        by_name.setdefault(Path(str(info['file_name'])).name, int(info['id']))
    ids, unknown = [], []
    for i, p in enumerate(paths):
        rel = str(p.relative_to(folder)) if folder is not None and p.is_relative_to(folder) else p.name
        image_id = by_name.get(rel, by_name.get(p.name))
        if image_id is None:
            unknown.append(p)
            image_id = _numbered_id(p, i)
        ids.append(image_id)
    if unknown:
        _logger.warning('%d predict image(s) are not in %s; their image_id is the file name\'s number or position: %s',
                        len(unknown), annotations, ', '.join(str(p) for p in unknown[:_MAX_LISTED]))
    return ids


class ImageListDataset(Dataset):
    """The images of a folder (sorted, recursively), unlabeled, at original size.

    Items are ``(image, info)`` with ``info`` = ``{'path', 'image_id'}`` (see :func:`image_ids_for`).
    ``CocoDetectionDataModule`` predicts through :class:`~lightning_modules.core.datasets.PredictInputs`
    (same images and ids, plus the shared skip rules); this stays for scripts.
    """

    def __init__(self, folder: Union[str, Path], annotations: Optional[Union[str, Path]] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f'Image folder {self.folder} does not exist')
        self.files = sorted(p for p in self.folder.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {self.folder}')
        self.image_ids = image_ids_for(self.files, self.folder, annotations)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        return load_image_tensor(path), {'path': str(path), 'image_id': self.image_ids[index]}


def load_image_tensor(path: Union[str, Path]) -> torch.Tensor:
    """An image file as a float (3, H, W) tensor in [0, 1], at its size (what the detectors take)."""
    return TF.to_dtype(TF.pil_to_tensor(load_rgb(path)), torch.float32, scale=True)


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[List[torch.Tensor], List[Any]]:
    """Lists, not stacked tensors: the images differ in size (the detector pads them itself)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_images(images: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Predict inputs: a list of images of their own sizes."""
    return list(images)


def empty_detection_batch() -> Tuple[List[torch.Tensor], List[Any]]:
    """The evaluation batch of a loader whose images were all unreadable."""
    return [], []


class _ImageIds:
    """``(position, path) -> {'image_id': ...}`` for :class:`PredictInputs` (picklable)."""

    def __init__(self, paths: Sequence[Path], ids: Sequence[int]):
        self.by_path = {str(p): int(i) for p, i in zip(paths, ids)}

    def __call__(self, position: int, path: Path) -> Dict[str, int]:
        return {'image_id': self.by_path[str(path)]}


class CocoDetectionDataModule(ImageDataModule):
    """COCO-format train / val (/ test) sets and an optional folder of images to predict on.

    Paths are relative to ``root`` when it is given (and then to the working directory or the
    repository, see :func:`~lightning_modules.datamodules.resolve_path`).

    Args:
        root: dataset root (e.g. ``../shared/data/coco-mini``).
        train_images / train_annotations, val_images / val_annotations: image folders and
            instances JSONs; test_* default to the validation set.
        predict_images: unlabeled images for ``zoo-train predict``: a folder, a list file or a CSV
            with a ``path`` column (relative to the working directory or the repository).
        predict_annotations: a COCO JSON (relative to ``root``) whose ``file_name`` s give the
            predict images their ``image_id``; default: the annotations of the train / val / test
            split whose image folder is ``predict_images``, if any (else numeric file names, else
            positions, see :func:`image_ids_for`).
        skip_corrupt: skip (log, count) unreadable images in every split and in predict instead of
            stopping (see :mod:`lightning_modules.core.datasets`).
        min_size / max_size: shorter side / longest side after resizing (also given to the
            detector, which resizes evaluation images itself).
        hflip: horizontal flip probability in training.
        masks: load instance masks (Mask R-CNN); False for box-only detectors.
        batch_size: images per device; virtual_devices: K devices emulated by this process.
        eval_batch_size: images per evaluation batch.
        Other args: :class:`~lightning_modules.datamodules.ImageDataModule`.
    """

    def __init__(
            self,
            root: Optional[str] = None,
            train_images: Optional[str] = 'train2017',
            train_annotations: Optional[str] = 'annotations/instances_train2017.json',
            val_images: Optional[str] = 'val2017',
            val_annotations: Optional[str] = 'annotations/instances_val2017.json',
            test_images: Optional[str] = None,
            test_annotations: Optional[str] = None,
            predict_images: Optional[str] = None,
            min_size: int = 800,
            max_size: int = 1333,
            hflip: float = 0.5,
            masks: bool = True,
            batch_size: int = 2,
            virtual_devices: int = 1,
            eval_batch_size: int = 2,
            num_workers: int = 2,
            seed: Optional[int] = None,
            skip_corrupt: bool = False,
            pin_memory: bool = False,
            predict_annotations: Optional[str] = None,
    ):
        super().__init__(batch_size=batch_size, virtual_devices=virtual_devices, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, skip_corrupt=skip_corrupt, pin_memory=pin_memory)
        if min_size < 1 or max_size < min_size:
            raise ValueError(f'need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}')
        self.root = root
        self.train_images, self.train_annotations = train_images, train_annotations
        self.val_images, self.val_annotations = val_images, val_annotations
        self.test_images = test_images or val_images
        self.test_annotations = test_annotations or val_annotations
        self.predict_images = predict_images
        self.predict_annotations = predict_annotations
        self.min_size, self.max_size, self.hflip, self.masks = min_size, max_size, hflip, masks
        self.train_transform = train_transform(min_size, max_size, hflip)
        self.categories: Optional[CocoCategories] = None
        self.predict_set: Optional[PredictInputs] = None

    train_collate_fn = staticmethod(collate_detection)
    collate_fn = staticmethod(collate_detection)
    empty_batch = staticmethod(empty_detection_batch)

    def _path(self, path: str) -> Path:
        return resolve_path(Path(self.root) / path if self.root is not None else path)

    def _coco_set(self, images: str, annotations: str, train: bool) -> CocoDetectionDataset:
        ds = CocoDetectionDataset(
            self._path(images), self._path(annotations), transform=self.train_transform if train else None,
            train=train, masks=self.masks, categories=self.categories, skip_corrupt=self.skip_corrupt)
        if self.categories is None:
            self.categories = ds.categories
        return ds

    @property
    def num_classes(self) -> Optional[int]:
        """Including the background (label 0)."""
        return self.categories.num_classes if self.categories is not None else None

    @property
    def class_names(self) -> Optional[List[str]]:
        """Names by label: ``__background__`` then the categories in id order (None before setup)."""
        if self.categories is None:
            return None
        return ['__background__'] + [c['name'] for c in self.categories.categories]

    def build_datasets(self, stage: str):
        train = val = test = None
        if stage == 'fit' and self.train_annotations:
            train = self._coco_set(self.train_images, self.train_annotations, train=True)
        if stage in ('fit', 'validate') and self.val_annotations:
            val = self._coco_set(self.val_images, self.val_annotations, train=False)
        if stage == 'test' and self.test_annotations:
            test = self._coco_set(self.test_images, self.test_annotations, train=False)
        return train, val, test

    def _predict_annotations(self, folder: Path) -> Optional[Path]:
        """The annotation file that names the predict images: the given one, else the split's of that folder."""
        if self.predict_annotations:
            return self._path(self.predict_annotations)
        for images, annotations in ((self.val_images, self.val_annotations), (self.test_images, self.test_annotations),
                                    (self.train_images, self.train_annotations)):
            if images and annotations and self._path(images).resolve() == folder.resolve() \
                    and self._path(annotations).is_file():
                return self._path(annotations)
        return None

    def build_predict_set(self) -> PredictInputs:
        """The predict images at their size, each with its ``image_id`` (see :func:`image_ids_for`)."""
        if not self.predict_images:
            raise ValueError('predict needs images: set data.predict_images (a folder, a list file or a CSV)')
        source = resolve_path(self.predict_images)
        paths = list_inputs(source, IMAGE_EXTENSIONS)
        folder = source if source.is_dir() else None
        annotations = self._predict_annotations(folder) if folder is not None else (
            self._path(self.predict_annotations) if self.predict_annotations else None)
        if annotations is not None:
            _logger.info('predict: image ids from %s', annotations)
        ids = image_ids_for(paths, folder, annotations)
        dataset = PredictInputs(paths, load_image_tensor, skip=self.skip_corrupt, meta=_ImageIds(paths, ids),
                                what='image')
        dataset.folder = folder
        return dataset

    def predict_collate(self):
        return collate_images

    def setup(self, stage: str) -> None:
        if stage == 'predict':
            self.predict_set = self.build_predict_set()
            return
        super().setup(stage)
        if stage == 'fit' and self.train_set is None:
            raise ValueError('fit needs data.train_annotations')

    def default_prediction_writer(self, output: str, top_k: int = 5, resume: bool = False):
        """Detections: ``<output without extension>/`` gets a COCO results JSON and a drawn PNG per image,
        ``output`` the table (path, prediction, error, image_id, detections, results_file, picture_file)."""
        from .predict import DetectionWriter
        output = Path(output)
        return DetectionWriter(output_dir=str(output.with_suffix('')), table=str(output), resume=resume)

    def read_categories(self) -> Optional[CocoCategories]:
        """The label mapping of the training (else validation) annotations, if either file exists."""
        for ann in (self.train_annotations, self.val_annotations):
            if ann and self._path(ann).is_file():
                return CocoCategories.from_coco(load_coco(self._path(ann)))
        return None
