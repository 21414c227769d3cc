"""Segmentation data: transforms keep image and mask aligned, bad masks name their file, seeded
augmentation, padded eval batches, sliding-window inference, prediction pictures."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lightning_modules.segmentation import (
    MaskError, SegmentationFolderDataset, colorize, overlay, pad_collate, sliding_window_logits, train_transform)

# Class k is drawn in colour COLOURS[k]; class 0 is the background.
COLOURS = {0: (0, 0, 255), 3: (255, 0, 0), 7: (0, 255, 0)}


def _write_pair(folder, stem, h=90, w=120, mask_size=None, mask_mode='L', extra_label=None):
    """An image whose colour tells each pixel's class, and its mask: two off-centre rectangles."""
    (folder / 'img').mkdir(parents=True, exist_ok=True)
    (folder / 'mask').mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), np.uint8)
    mask[10:50, 5:45] = 3        # left: a flip that forgot the mask would put it on the wrong side
    mask[60:85, 70:115] = 7
    mask[0:3, :] = 255           # unlabelled strip
    if extra_label is not None:
        mask[-1, -1] = extra_label
    img = np.zeros((h, w, 3), np.uint8)
    for k, c in COLOURS.items():
        img[mask == k] = c
    img[mask == 255] = (128, 128, 128)
    Image.fromarray(img).save(folder / 'img' / f'{stem}.png')  # lossless: JPEG would blur colour edges
    m = Image.fromarray(mask)
    if mask_size is not None:
        m = m.resize(mask_size, Image.NEAREST)
    if mask_mode != 'L':
        m = m.convert(mask_mode)
    m.save(folder / 'mask' / f'{stem}.png')
    return folder


def _dataset(folder, num_classes=8, transform=None, **kw):
    return SegmentationFolderDataset(folder / 'img', folder / 'mask', num_classes, image_suffix='.png',
                                     transform=transform, **kw)


def _unnormalize(x):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (x * std + mean) * 255


@pytest.mark.parametrize('hflip', [0.0, 1.0, 0.5])
def test_train_transform_keeps_image_and_mask_aligned(tmp_path, hflip):
    """Random scale, flip and padded crop: every labelled pixel keeps its class's colour; padding is ignored."""
    ds = _dataset(_write_pair(tmp_path, 'a'), transform=train_transform(crop_size=112, base_size=90, hflip=hflip))
    padded_seen = 0
    for epoch in range(6):
        item = ds[(0, epoch)]
        x, y = item['image'], item['mask']
        assert x.shape == (3, 112, 112) and y.shape == (112, 112) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= {0, 3, 7, 255}
        rgb = _unnormalize(x)
        for k, c in COLOURS.items():
            # pixels 2+ away from a class border (resampling blends the borders)
            sel = -F.max_pool2d(-(y == k).float()[None], 5, 1, 2)[0] > 0
            if sel.sum() < 20:
                continue
            close = ((rgb[:, sel] - torch.tensor(c, dtype=torch.float)[:, None]).abs().max(0).values < 10).float()
            assert close.mean() > 0.99, (k, epoch, close.mean())
        pad = (x.abs().sum(0) == 0)  # padded image pixels are exactly 0 (the mean) ...
        assert (y[pad] == 255).all()  # ... and their mask is the ignore index
        padded_seen += int(pad.sum() > 0)
    assert padded_seen > 0  # images smaller than the crop were padded at least once


def test_flip_moves_both(tmp_path):
    ds = _dataset(_write_pair(tmp_path, 'a'), transform=train_transform(crop_size=200, base_size=90, scale_range=(1, 1),
                                                                        hflip=1.0))
    y = ds[(0, 0)]['mask']
    cols = (y == 3).any(0).nonzero().flatten()
    assert cols.min() > 60  # the left rectangle is now on the right (image width ~120)


def test_augmentation_is_seeded_by_index_and_epoch(tmp_path):
    ds = _dataset(_write_pair(tmp_path, 'a'), transform=train_transform(crop_size=64, base_size=90))
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(a['image'], b['image']) and torch.equal(a['mask'], b['mask'])
    assert any(not torch.equal(a['mask'], ds[(0, e)]['mask']) for e in (2, 3, 4))
    torch.manual_seed(5)
    ds[(0, 1)]  # the process's RNG is left untouched
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


def test_eval_items_keep_full_size_masks_and_pad_collate(tmp_path):
    from lightning_modules.segmentation import eval_image_transform
    folder = _write_pair(tmp_path, 'a')
    _write_pair(folder, 'b', h=60, w=80)
    ds = _dataset(folder, image_transform=eval_image_transform(45))
    items = [ds[0], ds[1]]
    assert items[0]['image'].shape == (3, 45, 60) and items[0]['mask'].shape == (90, 120)
    assert items[0]['orig_size'] == (90, 120)
    batch = pad_collate(items)
    assert batch['image'].shape == (2, 3, 45, 60)
    assert batch['size'].tolist() == [[45, 60], [45, 60]]
    assert [m.shape for m in batch['mask']] == [(90, 120), (60, 80)] and batch['index'].tolist() == [0, 1]


def test_mask_of_other_size_names_the_file(tmp_path):
    ds = _dataset(_write_pair(tmp_path, 'bad', mask_size=(60, 45)))
    with pytest.raises(MaskError, match=r"bad\.png is 60x45.*bad\.png is 120x90"):
        ds[0]


def test_out_of_range_label_names_the_file(tmp_path):
    ds = _dataset(_write_pair(tmp_path, 'bad', extra_label=40), num_classes=8)
    with pytest.raises(MaskError, match=r"bad\.png has labels \[40\] outside 0\.\.7"):
        ds[0]
    assert _dataset(tmp_path, num_classes=41)[0]['mask'].max() == 255  # 255 is the ignore index, not an error


def test_rgb_or_missing_mask_is_a_clear_error(tmp_path):
    ds = _dataset(_write_pair(tmp_path, 'rgb', mask_mode='RGB'))
    with pytest.raises(MaskError, match=r"rgb\.png is a RGB image"):
        ds[0]
    (tmp_path / 'mask' / 'rgb.png').unlink()
    with pytest.raises(FileNotFoundError, match=r"rgb\.png"):
        _dataset(tmp_path)


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    conv = nn.Conv2d(3, 4, 1)
    model = lambda x: {'out': conv(x)}  # noqa: E731  (per-pixel: windows must give the same logits)
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window_logits(model, x, 16, 10, 4), conv(x))
        torch.testing.assert_close(sliding_window_logits(model, x[..., :10, :12], 16, 10, 4), conv(x[..., :10, :12]))


def test_colorize_keeps_indices_and_overlay_draws():
    labels = torch.zeros(20, 30, dtype=torch.long)
    labels[5:10, 5:10] = 3
    labels[0] = 255
    img = colorize(labels)
    assert img.mode == 'P' and np.array_equal(np.asarray(img), labels.numpy().astype(np.uint8))
    base = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    drawn = overlay(base, labels, alpha=1.0)
    assert drawn.shape == base.shape and not torch.equal(drawn[:, 6, 6], drawn[:, 15, 15])
    assert torch.equal(drawn[:, 0, 0], base[:, 0, 0])  # ignored pixels are not painted


def test_datamodule_resumes_mid_epoch_with_the_same_crops(tmp_path):
    """Skipping the first 2 batches of an epoch (a resume) gives exactly the uninterrupted run's remaining batches."""
    from lightning_modules.segmentation import SegmentationDataModule
    for i in range(8):
        _write_pair(tmp_path, f'{i:02d}', h=40 + 4 * i, w=50)
    kw = dict(root=str(tmp_path), num_classes=8, train_images='img', train_masks='mask', val_images='img',
              val_masks='mask', image_suffix='.png', crop_size=32, base_size=40, batch_size=2, virtual_devices=2,
              num_workers=0, seed=3)
    dm = SegmentationDataModule(**kw)
    dm.setup('fit')
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = list(loader)
    assert len(full) == 2 and full[0]['image'].shape == (4, 3, 32, 32)
    resumed = SegmentationDataModule(**kw)
    resumed.setup('fit')
    resumed.load_state_dict({'train_epoch': 1, 'train_batches_done': 1})  # as Lightning restores a checkpoint
    rest = list(resumed.train_dataloader())
    assert len(rest) == 1
    assert torch.equal(rest[0]['image'], full[1]['image']) and torch.equal(rest[0]['mask'], full[1]['mask'])
