"""COCO detection data: real coco-mini samples (alignment after resize + flip, lists, category mapping)
and every bad-input case on tiny self-made COCO files."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from lightning_modules.datasets import CorruptImageError
from lightning_modules.detection import (CocoCategories, CocoDetectionDataModule, CocoDetectionDataset,
                                         CocoFormatError, ImageListDataset, train_transform)

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / 'shared' / 'data' / 'coco-mini'
needs_coco_mini = pytest.mark.skipif(not (COCO_MINI / 'annotations').is_dir(), reason='shared coco-mini not found')


def _mask_box(mask: torch.Tensor):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@needs_coco_mini
@pytest.mark.parametrize('hflip', [0.0, 1.0])
def test_boxes_and_masks_follow_resize_and_flip(hflip):
    ds = CocoDetectionDataset(COCO_MINI / 'train2017', COCO_MINI / 'annotations/instances_train2017.json',
                              transform=train_transform(min_size=200, max_size=300, hflip=hflip))
    plain = CocoDetectionDataset(COCO_MINI / 'train2017', COCO_MINI / 'annotations/instances_train2017.json')
    checked = 0
    for index in range(3):
        image, target = ds[(index, 0)]
        _, orig = plain[index]
        h, w = image.shape[-2:]
        oh, ow = orig['masks'].shape[-2:]
        assert min(h, w) == 200 or max(h, w) == 300  # shorter side 200 unless the longer would pass 300
        assert max(h, w) <= 300
        assert target['masks'].shape == (len(target['boxes']), h, w) and target['masks'].dtype == torch.uint8
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
        expected = orig['boxes'] * scale
        if hflip:
            expected = torch.stack([w - expected[:, 2], expected[:, 1], w - expected[:, 0], expected[:, 3]], 1)
        torch.testing.assert_close(target['boxes'], expected, atol=0.05, rtol=1e-4)
        # each mask moved with its box: the resized (flipped) mask's extent is the original mask's, transformed
        for mask, orig_mask in zip(target['masks'], orig['masks']):
            if orig_mask.sum() < 50:  # a few pixels: rasterisation dominates
                continue
            x1, y1, x2, y2 = (_mask_box(orig_mask) * scale).tolist()
            moved = torch.tensor([w - x2, y1, w - x1, y2] if hflip else [x1, y1, x2, y2])
            # nearest-neighbour resampling at ~1/3 scale: one pixel of grid, and a thin tip may fall between samples
            assert torch.all((_mask_box(mask) - moved).abs() <= 2.0), (moved, _mask_box(mask))
            checked += 1
        if hflip:  # exactly the mirror image of the unflipped sample, pixels and masks alike
            same = CocoDetectionDataset(COCO_MINI / 'train2017', COCO_MINI / 'annotations/instances_train2017.json',
                                        transform=train_transform(min_size=200, max_size=300, hflip=0.0))
            unflipped, t0 = same[(index, 0)]
            assert torch.equal(image, unflipped.flip(-1)) and torch.equal(target['masks'], t0['masks'].flip(-1))
    assert checked >= 5


@needs_coco_mini
def test_datamodule_lists_labels_and_category_mapping():
    dm = CocoDetectionDataModule(root=str(COCO_MINI), min_size=160, max_size=256, batch_size=2, virtual_devices=2,
                                 num_workers=0, eval_batch_size=3)
    dm.setup('fit')
    assert dm.num_classes == 81 and len(dm.train_set) == len(dm.val_set) == 100
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 4 == len(targets)
    assert len({tuple(i.shape) for i in images}) > 1  # different sizes, not padded by the loader
    for image, target in zip(images, targets):
        assert min(image.shape[-2:]) == 160 or max(image.shape[-2:]) == 256
        assert target['masks'].shape[-2:] == image.shape[-2:]
    # contiguous labels 1..80 in sorted id order; back to the JSON's category ids
    cats = dm.categories
    ids = sorted(c['id'] for c in json.loads((COCO_MINI / 'annotations/instances_train2017.json').read_text())['categories'])
    assert [cats.category_id(label) for label in range(1, 81)] == ids and cats.label_of[90] == 80
    image_id = dm.val_set.image_ids[0]
    anns = [a for a in dm.val_set.coco.imgToAnns[image_id] if a['bbox'][2] > 0 and a['bbox'][3] > 0]
    _, target = dm.val_set[0]
    assert [cats.category_id(label) for label in target['labels'].tolist()] == [a['category_id'] for a in anns]
    # evaluation targets: original size and crowd flags
    assert target['masks'].shape[-2:] == (dm.val_set.coco.imgs[image_id]['height'], dm.val_set.coco.imgs[image_id]['width'])
    crowd = sum(int(dm.val_set[i][1]['iscrowd'].sum()) for i in range(len(dm.val_set)))
    assert crowd == sum(a['iscrowd'] for a in dm.val_set.coco.dataset['annotations'])
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == 3 and 'iscrowd' in targets[0] and 'area' in targets[0]


@needs_coco_mini
def test_augmentation_is_a_function_of_image_and_epoch():
    """What resume relies on: the same (index, epoch) key gives the same sample in any process state."""
    ds = CocoDetectionDataset(COCO_MINI / 'train2017', COCO_MINI / 'annotations/instances_train2017.json',
                              transform=train_transform(128, 200, 0.5), masks=False, seed=3)
    flips = []
    for epoch in range(8):
        a, ta = ds[(1, epoch)]
        torch.manual_seed(epoch + 100)
        b, tb = ds[(1, epoch)]
        assert torch.equal(a, b) and torch.equal(ta['boxes'], tb['boxes'])
        flips.append(ta['boxes'][0, 0].item())
    assert len(set(flips)) == 2  # flipped in some epochs, not in others


# -- bad input on tiny self-made COCO files -----------------------------------------------------------

def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}


def _ann(ann_id, image_id, box, category_id=1, iscrowd=0, height=40, width=60):
    x, y, w, h = box
    mask = np.zeros((height, width), np.uint8)
    if all(np.isfinite(box)):  # a broken box (NaN, inf) gets an empty mask
        mask[int(y):int(y + h), int(x):int(x + w)] = 1
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': list(box),
            'area': float(w * h), 'iscrowd': iscrowd, 'segmentation': _rle(mask)}


def make_coco(root: Path, annotations=None, images=None, categories=None, corrupt=()) -> Path:
    """Three 60x40 images (a.jpg with two objects, b.jpg with one, c.jpg with none) and their instances JSON."""
    (root / 'images').mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [
        {'id': 1, 'file_name': 'a.jpg', 'width': 60, 'height': 40},
        {'id': 2, 'file_name': 'b.jpg', 'width': 60, 'height': 40},
        {'id': 3, 'file_name': 'c.jpg', 'width': 60, 'height': 40}]
    for i, info in enumerate(images):
        path = root / 'images' / info['file_name']
        if info['file_name'] in corrupt:
            path.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
        elif not path.exists():
            Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(path)
    annotations = annotations if annotations is not None else [
        _ann(10, 1, (5, 5, 20, 10)), _ann(11, 1, (30, 10, 20, 20), category_id=5), _ann(12, 2, (0, 0, 10, 10))]
    categories = categories if categories is not None else [{'id': 1, 'name': 'person'}, {'id': 5, 'name': 'airplane'}]
    ann_file = root / 'instances.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': categories}))
    return ann_file


def _dataset(root, ann_file, **kwargs):
    return CocoDetectionDataset(root / 'images', ann_file, **kwargs)


def test_image_without_annotations_is_a_negative_sample(tmp_path):
    ds = _dataset(tmp_path, make_coco(tmp_path), transform=train_transform(32, 64, 0.5))
    assert len(ds) == 3
    image, target = ds[(2, 0)]
    assert target['boxes'].shape == (0, 4) and target['labels'].shape == (0,)
    assert target['masks'].shape == (0, *image.shape[-2:])
    _, target = ds[(0, 0)]
    assert target['labels'].tolist() == [1, 2]  # category ids 1, 5 -> labels 1, 2


def test_zero_size_box_is_dropped_with_a_warning_naming_it(tmp_path, caplog):
    anns = [_ann(10, 1, (5, 5, 20, 10)), _ann(11, 1, (30, 10, 0, 20)), _ann(12, 2, (0, 0, 10, 0))]
    with caplog.at_level(logging.WARNING):
        ds = _dataset(tmp_path, make_coco(tmp_path, anns))
    assert [a for _, a, _ in ds.dropped] == [11, 12]
    assert 'annotation 11' in caplog.text and 'a.jpg' in caplog.text and 'annotation 12' in caplog.text
    assert '2 annotation(s) with a non-finite, negative or empty box dropped' in caplog.text
    assert len(ds[0][1]['boxes']) == 1 and len(ds[1][1]['boxes']) == 0


def test_non_finite_and_negative_boxes_are_dropped_not_clipped_to_the_image(tmp_path, caplog):
    """``[NaN, 5, 10, 10]`` used to become ``[0, 5, 60, 15]``: Python's min / max drop the NaN."""
    anns = [_ann(10, 1, (5, 5, 20, 10)), _ann(11, 1, (float('nan'), 5, 10, 10)), _ann(12, 1, (5, 5, float('inf'), 10)),
            _ann(13, 2, (40, 5, -10, 10))]
    with caplog.at_level(logging.WARNING):
        ds = _dataset(tmp_path, make_coco(tmp_path, anns))
    assert [(a, why) for _, a, why in ds.dropped] == [
        (11, 'has a non-finite value'), (12, 'has a non-finite value'), (13, 'has a negative width or height')]
    assert 'annotation 11' in caplog.text and 'non-finite' in caplog.text
    assert ds[0][1]['boxes'].tolist() == [[5., 5., 25., 15.]]


def test_a_split_without_any_annotation_warns_with_the_image_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = _dataset(tmp_path, make_coco(tmp_path, []))
    assert f'has no annotations at all: each of its {len(ds)} images is a negative sample' in caplog.text


def test_crowd_is_ignored_in_training_and_kept_for_evaluation(tmp_path):
    anns = [_ann(10, 1, (5, 5, 20, 10)), _ann(11, 1, (30, 10, 20, 20), iscrowd=1)]
    ann_file = make_coco(tmp_path, anns)
    train = _dataset(tmp_path, ann_file, train=True)
    assert train.ignored_crowd == 1 and len(train[0][1]['boxes']) == 1 and 'iscrowd' not in train[0][1]
    evaluation = _dataset(tmp_path, ann_file, train=False)
    target = evaluation[0][1]
    assert target['iscrowd'].tolist() == [0, 1] and target['area'].tolist() == [200., 400.]
    assert target['masks'].shape == (2, 40, 60)


def test_missing_image_file_names_the_file(tmp_path):
    ann_file = make_coco(tmp_path)
    (tmp_path / 'images' / 'b.jpg').unlink()
    with pytest.raises(CocoFormatError, match=r'missing: .*b\.jpg \(annotations \[12\]\)'):
        _dataset(tmp_path, ann_file)


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path, caplog):
    ann_file = make_coco(tmp_path, corrupt=('b.jpg',))
    ds = _dataset(tmp_path, ann_file)
    with pytest.raises(CorruptImageError, match=r'b\.jpg'):
        ds[1]
    skipping = _dataset(tmp_path, ann_file, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        image, target = skipping[(1, 0)]
    assert int(target['skipped']) == 1 and 'b.jpg' in caplog.text
    assert int(target['image_id']) == 3  # the next readable image, with its own (empty) targets


def test_unknown_category_names_the_annotation_and_file(tmp_path):
    anns = [_ann(10, 1, (5, 5, 20, 10)), _ann(11, 2, (30, 10, 20, 20), category_id=7)]
    with pytest.raises(CocoFormatError, match=r'annotation 11 \(image .*b\.jpg\) has category id 7'):
        _dataset(tmp_path, make_coco(tmp_path, anns))


def test_other_mismatches_are_named(tmp_path):
    with pytest.raises(CocoFormatError, match='annotation 11 points at image id 9'):
        _dataset(tmp_path, make_coco(tmp_path, [_ann(11, 9, (1, 1, 5, 5))]))
    images = [{'id': 1, 'file_name': 'a.jpg', 'width': 80, 'height': 40}]
    ds = _dataset(tmp_path, make_coco(tmp_path, [], images=images))
    with pytest.raises(CocoFormatError, match=r'a\.jpg is 60x40 but .* says 80x40'):
        ds[0]
    bad = _ann(10, 1, (5, 5, 20, 10))
    bad['segmentation'] = {'size': [40, 60], 'counts': 17}
    ds = _dataset(tmp_path / 'seg', make_coco(tmp_path / 'seg', [bad]))
    with pytest.raises(CocoFormatError, match=r'annotation 10 of .*a\.jpg has a segmentation that cannot be decoded'):
        ds[0]
    (tmp_path / 'broken.json').write_text('{"images": [')
    with pytest.raises(CocoFormatError, match='broken.json is not valid JSON'):
        _dataset(tmp_path, tmp_path / 'broken.json')


def test_predict_folder_lists_images_with_coco_ids(tmp_path):
    make_coco(tmp_path)
    Image.new('RGB', (8, 6)).save(tmp_path / 'images' / '000000000139.jpg')
    ds = ImageListDataset(tmp_path / 'images')
    assert [p.name for p in ds.files] == ['000000000139.jpg', 'a.jpg', 'b.jpg', 'c.jpg']
    image, info = ds[0]
    assert image.shape == (3, 6, 8) and info['image_id'] == 139 and ds[2][1]['image_id'] == 2
    (tmp_path / 'nothing').mkdir()
    with pytest.raises(FileNotFoundError, match='No images'):
        ImageListDataset(tmp_path / 'nothing')


def test_categories_round_trip():
    cats = CocoCategories([{'id': 90, 'name': 'toothbrush'}, {'id': 1, 'name': 'person'}])
    assert cats.num_classes == 3 and cats.label_of == {1: 1, 90: 2} and cats.name(2) == 'toothbrush'
    assert CocoCategories(cats.to_list()) == cats
    with pytest.raises(CocoFormatError, match='duplicate'):
        CocoCategories([{'id': 1}, {'id': 1}])
