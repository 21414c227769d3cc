"""Classification DataModules: ImageNet-style ImageFolder trees and CIFAR-10.

Both build on :class:`lightning_modules.core.data.ImageDataModule` (images per device, emulated
devices, resumable order, skip-and-count of unreadable images, predict inputs, class names).
"""
import os
import shutil
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from lightning.pytorch.utilities import rank_zero_info
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T
from torchvision.datasets.folder import find_classes

from ..core.data import REPO_ROOT, ImageDataModule, default_cache_dir, resolve_path, sha256_of
from ..core.datasets import ImageFolderDataset

__all__ = ['ImageFolderDataModule', 'Cifar10DataModule', 'prepare_cifar10', 'CIFAR10_JPEG_SHA256',
           'ImageDataModule', 'resolve_path', 'REPO_ROOT']  # the last three: from core, for old imports

DEFAULT_CIFAR10_ARCHIVE = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
CIFAR10_JPEG_SHA256 = 'dbe98f1ef6acd78c6ece0538b38efc7504f687ae231bbebc0e11a68cae04a13d'
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _folder_classes(folder: Path) -> Optional[List[str]]:
    """The class sub-folders of an ImageFolder split, sorted as ``ImageFolder`` does; None if it is not one."""
    try:
        return list(find_classes(str(folder))[0])
    except (FileNotFoundError, NotADirectoryError):
        return None


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
    def class_names(self) -> Optional[List[str]]:
        """The class folders (of the datasets built, else of the train / val folder on disk, e.g. in predict)."""
        names = super().class_names
        if names is None:
            root = resolve_path(self.root)
            names = _folder_classes(root / self.train_dir) or _folder_classes(root / self.val_dir)
        return names

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

    @property
    def class_names(self) -> Optional[List[str]]:
        """The class folders of the data; the CIFAR-10 classes for the shared archive before it is extracted."""
        names = super().class_names
        if names is None and self.data_path is not None and resolve_path(self.data_path).is_dir():
            names = _folder_classes(resolve_path(self.data_path) / 'train')
        elif names is None and self.sha256 == CIFAR10_JPEG_SHA256:
            names = list(CIFAR10_CLASSES)
        return names

    def build_datasets(self, stage: str):
        root = self.root = prepare_cifar10(self.data_path, self.cache_dir, self.sha256)
        train = None
        if stage == 'fit':
            train = ImageFolderDataset(root / 'train', self.train_transform, self.skip_corrupt,
                                       per_class=self.train_per_class)
        test = self.eval_dataset(root / 'test', self.eval_transform, self.test_per_class)
        return train, test, test
