"""The data side every task shares: per-device batches, device emulation, a resumable training order,
one contract for bad inputs, predict inputs, class names.

:class:`ImageDataModule` is the base of the DataModules of every task (classification, video,
detection, segmentation): ``batch_size`` is samples (images, clips) **per device**; with
``virtual_devices=K`` one process draws batches of K x ``batch_size`` that reproduce K devices of a
DDP run (see :mod:`lightning_modules.core.emulation`). Under real DDP each process stands in for K
ranks of ``world_size * K``. The training loader is resumable mid-epoch (exact data order and
augmentation), see :mod:`lightning_modules.core.samplers`.

What every DataModule guarantees (tested once for all tasks in ``tests/test_task_contract.py``):

- bad inputs in every split and in predict follow :mod:`lightning_modules.core.datasets`: an
  error naming the file, or with skipping on, skipped, logged, counted (training: replaced by the
  next readable input; evaluation: dropped from the batch, whose count says so, an all-bad batch
  being an empty batch; predict: a row with the reason);
- ``predict_set`` is a :class:`~lightning_modules.core.datasets.PredictInputs` and the predict loader
  yields :class:`~lightning_modules.core.datasets.PredictBatch` es, written by
  :meth:`default_prediction_writer` (or a writer of the config) as they come;
- ``class_names`` (a list of str, or None when the data does not name its classes) and
  ``num_classes`` after ``setup``.
"""
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, default_collate

from .datasets import CollatePredict, CollateSkipping, ImageFolderDataset, PredictInputs
from .predict import IMAGE_EXTENSIONS, UnlabeledImages, list_inputs
from .samplers import ResumableTrainOrder, TrainDataLoader, VirtualDeviceSampler
from .writer import PredictionWriter, TopKWriter

__all__ = ['ImageDataModule', 'REPO_ROOT', 'resolve_path', 'default_cache_dir', 'sha256_of']

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: Union[str, Path]) -> Path:
    """``path`` as given if it exists (relative to the working directory), else relative to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def default_cache_dir() -> Path:
    return Path(os.environ.get('ZOO_CACHE_DIR', REPO_ROOT / '.cache'))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def empty_image_batch() -> Tuple[torch.Tensor, torch.Tensor]:
    """The evaluation batch of a classification loader whose images were all unreadable."""
    return torch.empty(0), torch.empty(0, dtype=torch.long)


class ImageDataModule(ResumableTrainOrder, pl.LightningDataModule):
    """Shared loaders: per-device batches, device emulation, resumable training order, the data contract.

    A task's DataModule builds its datasets (:meth:`build_datasets`, :meth:`build_predict_set`) and
    says how its samples are batched: ``train_collate_fn`` (training), ``collate_fn`` (evaluation
    and predict; None: torch's ``default_collate``) and ``empty_batch`` (an evaluation batch of
    unreadable inputs only). The rest is here.

    Args:
        batch_size: images per device (per virtual device when emulating).
        virtual_devices: K devices emulated by each process (1: no emulation).
        eval_batch_size: batch of validation / test loaders (eval does not depend on the batch).
        num_workers: loader worker processes.
        seed: shuffling and augmentation seed; None takes ``seed_everything``'s (``PL_GLOBAL_SEED``).
        skip_corrupt: skip (and count) unreadable images instead of stopping with an error, in every
            split: training replaces them by the next readable image, evaluation drops them
            (``{val,test}/skipped_images`` and ``{val,test}/images`` say how many were scored),
            predict writes their row with the reason in its ``error`` column.
        predict: unlabeled images for ``zoo-train predict``: a folder, a list file or a CSV with a
            ``path`` column (see :func:`lightning_modules.predict.list_inputs`); eval transform.
    """

    def __init__(
            self,
            batch_size: int = 2,
            virtual_devices: int = 1,
            eval_batch_size: int = 128,
            num_workers: int = 2,
            seed: Optional[int] = None,
            skip_corrupt: bool = False,
            pin_memory: bool = False,
            predict: Optional[str] = None,
    ):
        super().__init__()
        if batch_size < 1 or virtual_devices < 1:
            raise ValueError(f'batch_size and virtual_devices must be >= 1, got {batch_size}, {virtual_devices}')
        self.batch_size = batch_size
        self.virtual_devices = virtual_devices
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.pin_memory = pin_memory
        self.predict = predict
        self.train_set = self.val_set = self.test_set = self.predict_set = None

    # -- what a task provides ------------------------------------------------------------------------
    train_collate_fn: Optional[Callable] = None  # training batches (None: default_collate)
    collate_fn: Optional[Callable] = None  # evaluation and predict batches of readable samples
    empty_batch: Callable[[], Any] = staticmethod(empty_image_batch)  # an evaluation batch of bad inputs only

    def build_datasets(self, stage: str) -> Tuple[Optional[ImageFolderDataset], ImageFolderDataset, ImageFolderDataset]:
        raise NotImplementedError

    def build_predict_set(self) -> PredictInputs:
        """The ``predict`` images with the eval transform (unreadable ones skipped with ``skip_corrupt``)."""
        if self.predict is None:
            raise ValueError('zoo-train predict needs the inputs: --data.init_args.predict <folder, list or CSV>')
        return UnlabeledImages(list_inputs(resolve_path(self.predict), IMAGE_EXTENSIONS), self.eval_transform,
                               skip=self.skip_corrupt)

    @property
    def class_names(self) -> Optional[List[str]]:
        """Class names in label order, or None when the data does not name its classes."""
        for dataset in (self.train_set, self.val_set, self.test_set):
            classes = getattr(dataset, 'classes', None)
            if classes:
                return [str(c) for c in classes]
        return None

    _num_classes: Optional[int] = None

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of the data (``len(class_names)`` unless a task sets it), None when unknown."""
        if self._num_classes is not None:
            return self._num_classes
        names = self.class_names
        return len(names) if names is not None else None

    @num_classes.setter
    def num_classes(self, value: Optional[int]) -> None:
        self._num_classes = value

    def default_prediction_writer(self, output: str, top_k: int = 5, resume: bool = False) -> Optional[PredictionWriter]:
        """The writer ``zoo-train predict`` adds when the config names none: top-k classes into ``output``."""
        return TopKWriter(output, top_k, resume=resume)

    # -- setup and loaders ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == 'predict':
            self.predict_set = self.build_predict_set()
            return
        self.train_set, self.val_set, self.test_set = self.build_datasets(stage)
        if self.train_set is not None:
            self.train_set.seed = self.resolved_seed()

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get('PL_GLOBAL_SEED', 0))

    def _world(self) -> Tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_sampler(self) -> VirtualDeviceSampler:
        world, rank = self._world()
        k = self.virtual_devices
        return VirtualDeviceSampler(
            self.train_set, self.batch_size, num_replicas=world * k, ranks=[rank * k + i for i in range(k)],
            shuffle=True, seed=self.resolved_seed())

    def _loader_kwargs(self) -> dict:
        # Its own generator: a loader draws its workers' base seed from the global one at every new iterator
        # (each epoch without workers), which would shift what dropout draws after a resume.
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                    generator=torch.Generator().manual_seed(self.resolved_seed()))

    def train_dataloader(self) -> DataLoader:
        return TrainDataLoader(
            self.train_set, batch_size=self.batch_size * self.virtual_devices, sampler=self.resume_sampler(self.train_sampler()),
            drop_last=True, collate_fn=self.train_collate_fn, **self._loader_kwargs())

    def eval_dataset(self, folder: Path, transform, per_class: Optional[int] = None) -> ImageFolderDataset:
        """A validation / test split; with ``skip_corrupt``, unreadable images are dropped and counted, not replaced."""
        return ImageFolderDataset(folder, transform, self.skip_corrupt, per_class=per_class, replace_corrupt=False)

    def eval_collate(self, dataset) -> Optional[Callable]:
        """The collate of an evaluation set: with skipping on, readable items collated, the others counted."""
        if getattr(dataset, 'skip_corrupt', False):
            return CollateSkipping(self.collate_fn or default_collate, self.empty_batch)
        return self.collate_fn

    def predict_collate(self) -> Callable:
        """The collate of the readable predict samples (wrapped in :class:`CollatePredict`)."""
        return self.collate_fn or default_collate

    def _eval_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.eval_collate(dataset),
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup('predict')
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=CollatePredict(self.predict_collate()), **self._loader_kwargs())
