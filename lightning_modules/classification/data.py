"""Lightning DataModules: ImageNet-style ImageFolder trees and CIFAR-10.

Both share :class:`ImageDataModule`: ``batch_size`` is images **per device**; with
``virtual_devices=K`` one process draws batches of K x ``batch_size`` that reproduce K devices
of a DDP run (see :mod:`lightning_modules.emulation`). Under real DDP each process stands in for
K ranks of ``world_size * K``. The training loader is resumable mid-epoch (exact data order and
augmentation), see :mod:`lightning_modules.samplers`.
"""
import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .datasets import ImageFolderDataset, collate_skipping
from .predict import IMAGE_EXTENSIONS, UnlabeledImages, list_inputs
from .samplers import ResumableTrainOrder, TrainDataLoader, VirtualDeviceSampler

__all__ = ['ImageDataModule', 'ImageFolderDataModule', 'Cifar10DataModule', 'prepare_cifar10', 'REPO_ROOT',
           'CIFAR10_JPEG_SHA256', 'resolve_path']

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR10_ARCHIVE = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
CIFAR10_JPEG_SHA256 = 'dbe98f1ef6acd78c6ece0538b38efc7504f687ae231bbebc0e11a68cae04a13d'
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


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


def prepare_cifar10(source: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None,
                    sha256: Optional[str] = CIFAR10_JPEG_SHA256) -> Path:
    """The ImageFolder root (with ``train/`` and ``test/``) for ``source``.

    ``source`` is such a root already, or a ``.tar.gz`` of one: its checksum is verified (unless
    ``sha256`` is None) and it is extracted once into ``cache_dir/cifar10-<sha256[:12]>`` (atomically:
    a half-extracted folder is never reused); later calls reuse that folder.
    """
    src = resolve_path(source) if source is not None else DEFAULT_CIFAR10_ARCHIVE
    if src.is_dir():
        if not (src / 'train').is_dir():
            raise FileNotFoundError(f'{src} is not an ImageFolder root: it has no train/ folder')
        return src
    if not src.is_file():
        raise FileNotFoundError(
            f'CIFAR-10 data not found at {src}; pass data_path= the cifar10-jpeg.tar.gz archive or an ImageFolder root')
    digest = sha256_of(src)
    if sha256 is not None and digest != sha256:
        raise ValueError(f'Checksum mismatch for {src}: sha256 {digest}, expected {sha256} (corrupt or different file)')
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f'cifar10-{digest[:12]}'
    if (target / '.complete').is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f'.{target.name}.partial-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    print(f'Extracting {src} (sha256 verified) to {target} (once)...', flush=True)
    with tarfile.open(src) as tar:
        tar.extractall(tmp, filter='data')
    roots = [p for p in [tmp] + list(tmp.iterdir()) if (p / 'train').is_dir()]
    if not roots:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f'{src} holds no train/ folder')
    (roots[0] / '.complete').write_text(digest + '\n')
    try:
        roots[0].rename(target)
    except OSError:  # another process finished first
        if not (target / '.complete').is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target


class ImageDataModule(ResumableTrainOrder, pl.LightningDataModule):
    """Shared loaders: per-device batches, device emulation, resumable training order.

    Args:
        batch_size: images per device (per virtual device when emulating).
        virtual_devices: K devices emulated by each process (1: no emulation).
        eval_batch_size: batch of validation / test loaders (eval does not depend on the batch).
        num_workers: loader worker processes.
        seed: shuffling and augmentation seed; None takes ``seed_everything``'s (``PL_GLOBAL_SEED``).
        skip_corrupt: skip (and count) unreadable images instead of stopping with an error, in every
            split: training replaces them by the next readable image, evaluation drops them
            (``{val,test}/skipped_images`` and ``{val,test}/images`` say how many were scored).
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

    # Subclasses build the datasets.
    def build_datasets(self, stage: str) -> Tuple[Optional[ImageFolderDataset], ImageFolderDataset, ImageFolderDataset]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == 'predict':
            if self.predict is None:
                raise ValueError('zoo-train predict needs the inputs: --data.init_args.predict <folder, list or CSV>')
            self.predict_set = UnlabeledImages(list_inputs(resolve_path(self.predict), IMAGE_EXTENSIONS),
                                               self.eval_transform)
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
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                    persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return TrainDataLoader(
            self.train_set, batch_size=self.batch_size * self.virtual_devices, sampler=self.resume_sampler(self.train_sampler()),
            drop_last=True, **self._loader_kwargs())

    def eval_dataset(self, folder: Path, transform, per_class: Optional[int] = None) -> ImageFolderDataset:
        """A validation / test split; with ``skip_corrupt``, unreadable images are dropped and counted, not replaced."""
        return ImageFolderDataset(folder, transform, self.skip_corrupt, per_class=per_class, replace_corrupt=False)

    def _eval_loader(self, dataset) -> DataLoader:
        kwargs = self._loader_kwargs()
        if getattr(dataset, 'skip_corrupt', False):  # a subclass's own collate (e.g. detection lists) stays
            kwargs.setdefault('collate_fn', collate_skipping)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **kwargs)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` with timm's transforms.

    Training: RandomResizedCrop(``input_size``, ``scale``) + horizontal flip (colour jitter and
    auto-augment off unless asked). Eval: resize to ``input_size / crop_pct`` + center crop.

    ``input_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` left at None come from
    the model's pretrained config (timm's ``resolve_data_config``), so fine-tuned weights see the
    preprocessing they were trained with (CIFAR statistics for the shipped CIFAR weights, ImageNet's
    for the ImageNet ones); without a model, ImageNet's defaults. What was used is logged.
    """

    def __init__(
            self,
            root: str,
            train_dir: str = 'train',
            val_dir: str = 'val',
            test_dir: Optional[str] = None,
            input_size: Optional[int] = None,
            crop_pct: Optional[float] = None,
            scale: Sequence[float] = (0.08, 1.0),
            hflip: float = 0.5,
            color_jitter: Optional[float] = None,
            auto_augment: Optional[str] = None,
            interpolation: Optional[str] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            train_per_class: Optional[int] = None,
            val_per_class: Optional[int] = None,
            **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = root
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir or val_dir
        self.train_per_class, self.val_per_class = train_per_class, val_per_class
        self.preprocessing = dict(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
        self.augmentation = dict(scale=tuple(scale), hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment)
        self.build_transforms()

    @property
    def test_split_name(self) -> str:
        """The folder ``test`` scores; without ``test_dir`` it is the validation split, and says so."""
        return self.test_dir if self.test_dir != self.val_dir or self.val_dir == 'test' else f'{self.val_dir} (validation)'

    def data_config(self, model=None) -> dict:
        """The given preprocessing, the rest from ``model``'s pretrained config (ImageNet's without a model)."""
        resolved = resolve_data_config({'in_chans': 3}, model=model)  # timm's ImageNet defaults without a model
        cfg = {k: resolved[k] for k in ('crop_pct', 'interpolation', 'mean', 'std')}
        cfg['input_size'] = resolved['input_size'][-1]
        cfg.update({k: v for k, v in self.preprocessing.items() if v is not None})
        cfg['mean'], cfg['std'] = tuple(cfg['mean']), tuple(cfg['std'])
        return cfg

    def build_transforms(self, model=None) -> dict:
        cfg = self.data_config(model)
        common = {k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std')}
        self.train_transform = create_transform(is_training=True, **self.augmentation, **common)
        self.eval_transform = create_transform(is_training=False, crop_pct=cfg['crop_pct'], **common)
        return cfg

    def setup(self, stage: str) -> None:
        module = getattr(self.trainer, 'lightning_module', None) if self.trainer is not None else None
        model = getattr(module, 'model', None)
        if model is not None and getattr(model, 'pretrained_cfg', None):
            cfg = self.build_transforms(model)
            given = [k for k, v in self.preprocessing.items() if v is not None]
            rank_zero_info(
                f"{type(self).__name__} preprocessing: input {cfg['input_size']}, crop_pct {cfg['crop_pct']}, "
                f"{cfg['interpolation']}, mean {cfg['mean']}, std {cfg['std']} (from the model's pretrained config"
                + (f"; given: {', '.join(given)})" if given else ')'))
        super().setup(stage)

    def build_datasets(self, stage: str):
        root = resolve_path(self.root)
        train = None
        if stage == 'fit':
            train = ImageFolderDataset(root / self.train_dir, self.train_transform, self.skip_corrupt,
                                       per_class=self.train_per_class)
        val = self.eval_dataset(root / self.val_dir, self.eval_transform, self.val_per_class)
        test = val if self.test_dir == self.val_dir else self.eval_dataset(
            root / self.test_dir, self.eval_transform, self.val_per_class)
        return train, val, test


class Cifar10DataModule(ImageDataModule):
    """CIFAR-10 from the shared ``cifar10-jpeg.tar.gz`` (checked, extracted once) or an ImageFolder root.

    Training: the standard CIFAR recipe, random 32x32 crop of the image padded by ``padding``
    pixels + horizontal flip. Eval: resize + centre crop to 32 (nothing on CIFAR's own images). CIFAR-10 has no separate validation split: the
    validation loader is the test split, as in most CIFAR papers (say so when you report).

    Args:
        data_path: the archive or an ImageFolder root with ``train/`` and ``test/``; None: the
            shared archive ``../shared/data/cifar10-jpeg.tar.gz`` next to the repository.
        cache_dir: where the archive is extracted; None: ``$ZOO_CACHE_DIR`` or ``<repo>/.cache``.
        sha256: expected checksum of the archive (None: do not check).
        train_per_class / test_per_class: keep only the first n images of each class (quick runs).
    """

    def __init__(
            self,
            data_path: Optional[str] = None,
            cache_dir: Optional[str] = None,
            sha256: Optional[str] = CIFAR10_JPEG_SHA256,
            train_per_class: Optional[int] = None,
            test_per_class: Optional[int] = None,
            padding: int = 4,
            hflip: float = 0.5,
            **kwargs,
    ):
        super().__init__(**kwargs)
        self.data_path, self.cache_dir, self.sha256 = data_path, cache_dir, sha256
        self.train_per_class, self.test_per_class = train_per_class, test_per_class
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        self.train_transform = T.Compose([T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip(hflip)] + normalize)
        # Eval at the training size: images of another size (an ImageFolder root of 64x64 images,
        # photos to predict) are resized and centre-cropped to 32 (a no-op on CIFAR's own images).
        self.eval_transform = T.Compose([T.Resize(32), T.CenterCrop(32)] + normalize)
        self.root: Optional[Path] = None

    def prepare_data(self) -> None:
        prepare_cifar10(self.data_path, self.cache_dir, self.sha256)

    def build_datasets(self, stage: str):
        root = self.root = prepare_cifar10(self.data_path, self.cache_dir, self.sha256)
        train = None
        if stage == 'fit':
            train = ImageFolderDataset(root / 'train', self.train_transform, self.skip_corrupt,
                                       per_class=self.train_per_class)
        test = self.eval_dataset(root / 'test', self.eval_transform, self.test_per_class)
        return train, test, test
