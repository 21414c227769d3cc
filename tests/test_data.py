"""Data: per-device sampling, resumable order, seeded augmentation, bad images, the CIFAR-10 archive."""
import hashlib
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_modules import CorruptImageError, ImageFolderDataModule, ImageFolderDataset, VirtualDeviceSampler
from lightning_modules.datamodules import Cifar10DataModule, prepare_cifar10
from lightning_modules.datasets import SkippedImage, collate_skipping


def make_image_folder(root: Path, classes=('a', 'b', 'c'), per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """A small ImageFolder tree of random JPEGs: root/{train,val}/<class>/NNN.jpg."""
    rng = np.random.default_rng(seed)
    for split in ('train', 'val'):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                base[..., ci % 3] = 200  # a learnable colour cue per class
                Image.fromarray(base).save(d / f'{i:03d}.jpg', quality=90)
    return root


def test_sampler_reproduces_distributed_samplers(tmp_path):
    data = list(range(50))
    k, b = 3, 2
    emu = VirtualDeviceSampler(data, b, num_replicas=k, ranks=range(k), seed=7)
    emu.set_epoch(2)
    keys = list(emu)
    assert all(e == 2 for _, e in keys)
    per_rank = []
    for r in range(k):
        s = DistributedSampler(data, num_replicas=k, rank=r, shuffle=True, seed=7)
        s.set_epoch(2)
        per_rank.append(list(s))
    steps = len(per_rank[0]) // b
    expected = [i for t in range(steps) for r in range(k) for i in per_rank[r][t * b:(t + 1) * b]]
    assert [i for i, _ in keys] == expected
    assert len(emu) == len(expected) == steps * k * b
    # Other epochs shuffle differently.
    emu.set_epoch(3)
    assert [i for i, _ in emu] != expected


def test_sampler_skip_to_resumes_mid_epoch():
    data = list(range(40))
    s = VirtualDeviceSampler(data, 2, num_replicas=2, ranks=(0, 1), seed=1)
    s.set_epoch(1)
    full = list(s)
    s.skip_to(1, 3)
    assert list(s) == full[3 * 4:]
    assert list(s) == full  # one-shot: the next iteration is a whole epoch again
    s.skip_to(0, 3)
    s.set_epoch(1)
    assert list(s) == full  # a skip for another epoch does not apply


def test_seeded_augmentation_is_independent_of_workers_and_process_rng(tmp_path):
    root = make_image_folder(tmp_path, per_class=4)
    dm = ImageFolderDataModule(str(root), input_size=16, batch_size=2, num_workers=0, seed=3)
    dm.setup('fit')
    ds = dm.train_set
    a = ds[(5, 0)][0]
    torch.manual_seed(123)
    b = ds[(5, 0)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(5, 1)][0])  # another epoch, another crop
    # Same batches with 0 and 2 workers.
    batches = []
    for workers in (0, 2):
        sampler = VirtualDeviceSampler(ds, 2, seed=3)
        batches.append([x for x, _ in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)])
    assert all(torch.equal(x, y) for x, y in zip(*batches))


def test_corrupt_image_error_names_the_file(tmp_path):
    root = make_image_folder(tmp_path, per_class=2)
    bad = root / 'train' / 'b' / '000.jpg'
    bad.write_bytes(b'not a jpeg at all')
    ds = ImageFolderDataset(root / 'train')
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match='000.jpg'):
        ds[index]
    # Through worker processes too: the error reaches the main process, naming the file.
    with pytest.raises(CorruptImageError, match=str(bad)):
        list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=lambda b: b))


def test_truncated_image_is_reported(tmp_path):
    root = make_image_folder(tmp_path, per_class=1, size=64)
    path = root / 'train' / 'a' / '000.jpg'
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptImageError, match='000.jpg'):
        ImageFolderDataset(root / 'train')[0]


def test_skip_corrupt_replaces_and_counts(tmp_path, caplog):
    root = make_image_folder(tmp_path, per_class=2)
    bad = root / 'train' / 'a' / '001.jpg'
    bad.write_bytes(b'')
    dm = ImageFolderDataModule(str(root), input_size=16, batch_size=2, num_workers=0, skip_corrupt=True, seed=0)
    dm.setup('fit')
    batches = list(dm.train_dataloader())
    assert all(len(b) == 3 and b[0].shape[0] == 2 for b in batches)  # batch size kept
    assert sum(int(b[2].sum()) for b in batches) == 1  # counted once
    assert '001.jpg' in caplog.text


def test_skip_corrupt_covers_eval_splits_by_dropping_and_counting(tmp_path):
    """Eval drops an unreadable image (never scores another in its place) and counts it."""
    root = make_image_folder(tmp_path, per_class=2)
    (root / 'val' / 'b' / '000.jpg').write_bytes(b'')
    shutil.copytree(root / 'val', root / 'test')  # Cifar10DataModule's layout
    dm = ImageFolderDataModule(str(root), input_size=16, eval_batch_size=4, num_workers=0, skip_corrupt=True)
    dm.setup('validate')
    batches = list(dm.val_dataloader())
    assert [len(b[1]) for b in batches] == [3, 2] and [int(b[2]) for b in batches] == [1, 0]  # dropped from its batch
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 1, 2, 2]  # class b lost its 000.jpg
    dm = Cifar10DataModule(data_path=str(root), sha256=None, eval_batch_size=8, num_workers=0, skip_corrupt=True)
    dm.setup('test')
    x, y, skipped = next(iter(dm.test_dataloader()))
    assert x.shape[0] == len(y) == 5 and int(skipped) == 1
    images, targets, skipped = collate_skipping([SkippedImage('a.jpg', 'truncated')])  # a batch of bad images only
    assert images.numel() == targets.numel() == 0 and int(skipped) == 1
    dm = ImageFolderDataModule(str(root), input_size=16, num_workers=0)
    dm.setup('validate')
    with pytest.raises(CorruptImageError, match='000.jpg'):  # without skip_corrupt: an error naming the file
        list(dm.val_dataloader())


def _tar_of(folder: Path, out: Path) -> Path:
    with tarfile.open(out, 'w:gz') as tar:
        tar.add(folder / 'train', arcname='train')
        tar.add(folder / 'val', arcname='test')
    return out


def test_prepare_cifar10_checks_extracts_once_and_reuses(tmp_path):
    archive = _tar_of(make_image_folder(tmp_path / 'src', per_class=2), tmp_path / 'mini.tar.gz')
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match='Checksum mismatch'):
        prepare_cifar10(archive, tmp_path / 'cache', sha256='0' * 64)
    assert not (tmp_path / 'cache').exists() or not any((tmp_path / 'cache').iterdir())
    root = prepare_cifar10(archive, tmp_path / 'cache', sha256=digest)
    assert (root / 'train' / 'a').is_dir() and (root / '.complete').read_text().strip() == digest
    marker = root / 'train' / 'a' / 'marker.txt'
    marker.write_text('kept')
    assert prepare_cifar10(archive, tmp_path / 'cache', sha256=digest) == root
    assert marker.exists()  # reused, not extracted again
    assert prepare_cifar10(root) == root  # an ImageFolder root is used as is
    with pytest.raises(FileNotFoundError, match='not found'):
        prepare_cifar10(tmp_path / 'missing.tar.gz')


def test_shared_cifar10_archive_checksum():
    from lightning_modules.datamodules import CIFAR10_JPEG_SHA256, DEFAULT_CIFAR10_ARCHIVE, sha256_of
    if not DEFAULT_CIFAR10_ARCHIVE.is_file():
        pytest.skip('shared CIFAR-10 archive not present')
    assert sha256_of(DEFAULT_CIFAR10_ARCHIVE) == CIFAR10_JPEG_SHA256


def test_imagefolder_transforms_are_timms(tmp_path):
    dm = ImageFolderDataModule(str(make_image_folder(tmp_path, per_class=1)), input_size=24, crop_pct=0.875)
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert 'RandomResizedCropAndInterpolation' in names and 'RandomHorizontalFlip' in names
    assert [type(t).__name__ for t in dm.eval_transform.transforms][:2] == ['Resize', 'CenterCrop']
    dm.setup('fit')
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 24, 24)
