"""One data contract for every task, each guarantee written once and run for all four tasks.

Tiny data sets are made in tmp_path from real files (CIFAR-10 JPEGs, the shared clips, coco-mini
images, CamVid frames), plus three bad inputs per split: a zero-byte file, a truncated copy and a
text file renamed to the task's extension. The DataModules and modules are the real ones, with the
smallest models (resnet20, TSM R-18 on 2 frames of 32 px, Mask R-CNN R-18 at 64 px, DeepLabV3 R-18 at 32 px).

Guarantees:
- without skipping, a bad input is an error naming the file, in every split and in predict;
- with skipping, in every split: training batches keep their size and count the replaced inputs,
  evaluation drops and counts them (a batch of bad inputs only is an empty batch with its count),
  each skip is logged with its path; the modules evaluate through an all-bad batch;
- predict writes one row per input, in order, with ``path, prediction, error`` first and the
  reason of every skipped input in ``error``, streamed: a crash keeps the finished batches' rows;
- a rerun overwrites the table (and says so) or, with ``resume``, predicts only what is missing;
- every DataModule has ``class_names`` and ``num_classes``; predictions use the names.
"""
import csv
import json
import logging
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import lightning.pytorch as pl
import pytest
import torch

from conftest import SHARED_DATA
from lightning_modules.core.datasets import UnreadableInputError, batch_is_empty, skipped_in_batch

VIDEOS = SHARED_DATA / 'videos'
COCO_MINI = SHARED_DATA / 'coco-mini'
CAMVID = SHARED_DATA / 'camvid'
CIFAR = SHARED_DATA / 'cifar10-jpeg.tar.gz'

# Bad inputs, named to sort after the real ones: an evaluation batch of 2 over 3 real + 3 bad is
# [real, real], [real, bad], [bad, bad] (all bad). Predict inputs a0 a1 b1 b2 b3 c0 c1 batch as
# [a0, a1], [b1, b2] (all bad), [b3, c0], [c1].
BAD_KINDS = ('zero', 'trunc', 'text')
EVAL_BATCH = 2


def _write_bad(path_of: Callable[[int, str], Path], real: Path) -> List[Path]:
    """The three bad files: zero bytes, the first 40% of ``real``, a text file (``path_of(i, kind)`` names each)."""
    out = []
    for i, kind in enumerate(BAD_KINDS, start=1):
        path = path_of(i, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = real.read_bytes()
        path.write_bytes({'zero': b'', 'trunc': data[:len(data) * 2 // 5], 'text': b'this is not an image\n' * 8}[kind])
        out.append(path)
    return out


def _predict_folder(folder: Path, reals: List[Path], ext: str, bad_ext: Dict[str, str] = None) -> List[Path]:
    """a0 a1 c0 c1 (copies of ``reals``) and b1_zero b2_trunc b3_text: 7 inputs, 3 bad."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in zip(('a0', 'a1', 'c0', 'c1'), reals):
        shutil.copy(src, folder / f'{name}{src.suffix if ext is None else ext}')
    bad_ext = bad_ext or {}
    _write_bad(lambda i, kind: folder / f'b{i}_{kind}{bad_ext.get(kind, ext or reals[0].suffix)}', reals[0])
    return sorted(p for p in folder.iterdir() if p.is_file())


# -- the four tasks ----------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    data: Callable[..., Any]  # (root, skip, **kw) -> DataModule
    model: Callable[[Any], pl.LightningModule]  # (datamodule) -> module
    writer: Callable[..., Any]  # (tmp, resume) -> PredictionWriter
    train_size: Callable[[Any], int]  # a training batch -> its size
    train_skipped: Callable[[Any], int]  # a training batch -> inputs replaced in it
    eval_size: Callable[[Any], int]  # an evaluation batch -> readable inputs in it
    table: Callable[[Path], Path]  # tmp -> the predictions table
    extra_columns: tuple  # what the task's table adds after path, prediction, error
    skip_metric: str  # the evaluation count of skipped inputs, e.g. 'skipped_images'


def _trainer(**kw) -> pl.Trainer:
    kw = dict(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, **kw)
    return pl.Trainer(**kw)


# classification: ImageFolder tree of real CIFAR-10 JPEGs ---------------------------------------------

@pytest.fixture(scope='module')
def cifar_jpegs(tmp_path_factory) -> Dict[str, List[Path]]:
    """8 real CIFAR-10 training JPEGs of each of the archive's first two classes."""
    if not CIFAR.is_file():
        pytest.skip('shared CIFAR-10 archive missing')
    out = tmp_path_factory.mktemp('cifar')
    found: Dict[str, List[Path]] = {}
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            cls = parts[1]
            if cls not in found and len(found) == 2:
                break
            if len(found.setdefault(cls, [])) < 8:
                path = out / cls / parts[2]
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
                found[cls].append(path)
    return found


def _classification_data(root: Path, jpegs, skip: bool, **kw):
    from lightning_modules.classification import ImageFolderDataModule
    (c1, first), (c2, second) = sorted(jpegs.items())
    if not root.exists():
        for split, n1, n2 in (('train', 3, 2), ('val', 2, 1)):  # 5 + 3 bad; 3 + 3 bad
            for cls, files, n in ((c1, first, n1), (c2, second, n2)):
                (root / split / cls).mkdir(parents=True)
                for f in files[:n] if split == 'train' else files[-n:]:
                    shutil.copy(f, root / split / cls / f.name)
            _write_bad(lambda i, kind: root / split / c2 / f'z{i}_{kind}{".png" if kind == "text" else ".jpg"}', second[0])
        _predict_folder(root / 'predict', first[:2] + second[:2], None, {'text': '.png'})
    kw = dict(dict(input_size=32, crop_pct=1.0, batch_size=2, eval_batch_size=EVAL_BATCH, num_workers=0, seed=0,
                   skip_corrupt=skip, predict=str(root / 'predict')), **kw)
    return ImageFolderDataModule(str(root), **kw)


def _classification_model(dm):
    from lightning_modules.classification import ImageClassifier
    return ImageClassifier('resnet20_wsbcn', num_classes=dm.num_classes)


# video: a manifest of real clips -------------------------------------------------------------------

REAL_CLIPS = (('TrumanShow_wave_f_nm_np1_fr_med_26.avi', 'wave'), ('RATRACE_wave_f_nm_np1_fr_goo_37.avi', 'wave'),
              ('hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi', 'cartwheel'),
              ('SchoolRulesHowTheyHelpUs_wave_f_nm_np1_ba_med_0.avi', 'wave'),
              ('v_SoccerJuggling_g23_c01.avi', 'soccer_juggling'))


def _video_data(root: Path, skip: bool, **kw):
    from lightning_modules.video import VideoDataModule
    if not (VIDEOS / 'labels.csv').is_file():
        pytest.skip('shared clips missing')
    real = VIDEOS / REAL_CLIPS[0][0]
    if not root.exists():
        bad = _write_bad(lambda i, kind: root / 'bad' / f'z{i}_{kind}{".mp4" if kind == "zero" else ".avi"}', real)
        for split, clips in (('train', REAL_CLIPS), ('val', REAL_CLIPS[1:4])):  # 5 + 3 bad; 3 + 3 bad
            with open(root / f'{split}.csv', 'w', newline='') as f:
                w = csv.writer(f)
                w.writerow(['path', 'label'])
                w.writerows([(VIDEOS / name, label) for name, label in clips] + [(b, 'wave') for b in bad])
        _predict_folder(root / 'predict', [VIDEOS / n for n, _ in REAL_CLIPS[:4]], None,
                        {'zero': '.mp4', 'trunc': '.avi', 'text': '.avi'})
    kw = dict(dict(train=str(root / 'train.csv'), val=str(root / 'val.csv'), test=str(root / 'val.csv'),
                   num_segments=2, crop_size=32, val_clips=1, val_crops=1, test_clips=1, test_crops=1, batch_size=2,
                   eval_batch_size=EVAL_BATCH, num_workers=0, seed=0, predict=str(root / 'predict'),
                   on_decode_error='skip' if skip else 'raise'), **kw)
    return VideoDataModule(**kw)


def _video_model(dm):
    from lightning_modules.video import VideoClassifier
    return VideoClassifier('tsm_resnet18_wsbcn', num_classes=dm.num_classes, num_segments=2)


# detection: coco-mini images with their instances, renamed ----------------------------------------------

SMALL_DETECTOR = dict(rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10, box_detections_per_img=5,
                      box_score_thresh=0.0, rpn_batch_size_per_image=16, rpn_pre_nms_top_n_train=50,
                      rpn_post_nms_top_n_train=10, box_batch_size_per_image=8)


def _coco_subset(root: Path, split: str, count: int, offset: int) -> None:
    """``count`` real images of coco-mini val2017 as ``<split>/r<i>.jpg``, their instances (original ids), and
    the three bad files (ids after the real ones, so they come last) in ``<split>.json``."""
    src = json.loads((COCO_MINI / 'annotations' / 'instances_val2017.json').read_text())
    images = sorted(src['images'], key=lambda i: i['id'])[offset:offset + count]
    keep_ids = {i['id'] for i in images}
    anns = [a for a in src['annotations'] if a['image_id'] in keep_ids]
    cats = sorted({a['category_id'] for a in json.loads((COCO_MINI / 'annotations' / 'instances_val2017.json')
                                                        .read_text())['annotations'] if a['image_id'] in keep_ids})
    (root / split).mkdir(parents=True)
    entries = []
    for k, info in enumerate(images):
        shutil.copy(COCO_MINI / 'val2017' / info['file_name'], root / split / f'r{k}.jpg')
        entries.append(dict(info, file_name=f'r{k}.jpg'))
    bad = _write_bad(lambda i, kind: root / split / f'z{i}_{kind}.jpg', COCO_MINI / 'val2017' / images[0]['file_name'])
    for i, path in enumerate(bad):
        entries.append({'id': 900000 + i, 'file_name': path.name, 'width': 64, 'height': 48})
    categories = [c for c in src['categories'] if c['id'] in cats]
    (root / f'{split}.json').write_text(json.dumps({'images': entries, 'annotations': anns, 'categories': categories}))


def _all_categories(root: Path) -> List[Dict]:
    cats = {}
    for split in ('train', 'val'):
        for c in json.loads((root / f'{split}.json').read_text())['categories']:
            cats[c['id']] = c
    return [cats[k] for k in sorted(cats)]


def _detection_data(root: Path, skip: bool, **kw):
    from lightning_modules.detection import CocoDetectionDataModule
    if not (COCO_MINI / 'annotations').is_dir():
        pytest.skip('shared coco-mini missing')
    if not root.exists():
        _coco_subset(root, 'train', 5, 0)
        _coco_subset(root, 'val', 3, 5)
        for split in ('train', 'val'):  # one category list for both files (the train set's mapping is used)
            data = json.loads((root / f'{split}.json').read_text())
            data['categories'] = _all_categories(root)
            (root / f'{split}.json').write_text(json.dumps(data))
        _predict_folder(root / 'predict', sorted((root / 'train').glob('r*.jpg'))[:4], '.jpg')
    kw = dict(dict(root=str(root), train_images='train', train_annotations='train.json', val_images='val',
                   val_annotations='val.json', predict_images=str(root / 'predict'), min_size=64, max_size=96,
                   batch_size=1, eval_batch_size=EVAL_BATCH, num_workers=0, seed=0, skip_corrupt=skip), **kw)
    return CocoDetectionDataModule(**kw)


def _detection_model(dm):
    from lightning_modules.detection import DetectionModule
    return DetectionModule('maskrcnn_resnet18_fpn_wsbcn', num_classes=len(_all_categories(Path(dm.root))) + 1,
                           model_kwargs=SMALL_DETECTOR, optim={'lr': 0.001, 'warmup_steps': 1, 'milestones': (10.,)})


# segmentation: CamVid frames and their class-index masks ------------------------------------------------

def _segmentation_data(root: Path, skip: bool, **kw):
    from lightning_modules.segmentation import SegmentationDataModule
    if not CAMVID.is_dir():
        pytest.skip('shared camvid missing')
    if not root.exists():
        frames = sorted((CAMVID / 'train').glob('*.jpg'))[:8]
        for split, chosen in (('train', frames[:5]), ('val', frames[5:8])):
            (root / split).mkdir(parents=True)
            (root / f'{split}annot').mkdir()
            for f in chosen:
                shutil.copy(f, root / split / f.name)
                shutil.copy(CAMVID / 'trainannot' / f'{f.stem}.png', root / f'{split}annot' / f'{f.stem}.png')
            bad = _write_bad(lambda i, kind: root / split / f'z{i}_{kind}.jpg', chosen[0])
            for b in bad:  # each bad image has a real mask: the image is what cannot be read
                shutil.copy(CAMVID / 'trainannot' / f'{chosen[0].stem}.png', root / f'{split}annot' / f'{b.stem}.png')
        shutil.copy(CAMVID / 'classes.txt', root / 'classes.txt')
        _predict_folder(root / 'predict', frames[:4], '.jpg')
    kw = dict(dict(root=str(root), num_classes=11, train_images='train', train_masks='trainannot', val_images='val',
                   val_masks='valannot', predict_images='predict', crop_size=32, base_size=40, eval_size=32,
                   batch_size=2, eval_batch_size=EVAL_BATCH, num_workers=0, seed=0, skip_corrupt=skip,
                   class_names='classes.txt'), **kw)
    return SegmentationDataModule(**kw)


def _segmentation_model(dm):
    from lightning_modules.segmentation import SemanticSegmenter
    return SemanticSegmenter('deeplabv3_resnet18_wsbcn', num_classes=11)


def _topk_writer(tmp, resume=False):
    from lightning_modules.core.writer import TopKWriter
    return TopKWriter(tmp / 'out' / 'predictions.csv', top_k=2, resume=resume)


def _detection_writer(tmp, resume=False):
    from lightning_modules.detection import DetectionWriter
    return DetectionWriter(str(tmp / 'out'), score_threshold=0.0, draw=False, resume=resume)


def _segmentation_writer(tmp, resume=False):
    from lightning_modules.segmentation import SegmentationWriter
    return SegmentationWriter(str(tmp / 'out'), resume=resume)


TASKS = {
    'classification': Task(
        'classification', None, _classification_model, _topk_writer,
        train_size=lambda b: b[0].shape[0], train_skipped=lambda b: int(b[2].sum()), eval_size=lambda b: len(b[1]),
        table=lambda tmp: tmp / 'out' / 'predictions.csv',
        extra_columns=('label_1', 'class_1', 'probability_1', 'label_2', 'class_2', 'probability_2'),
        skip_metric='skipped_images'),
    'video': Task(
        'video', _video_data, _video_model, _topk_writer,
        train_size=lambda b: b['video'].shape[0], train_skipped=lambda b: int(b['skipped']),
        eval_size=lambda b: len(b['label']), table=lambda tmp: tmp / 'out' / 'predictions.csv',
        extra_columns=('label_1', 'class_1', 'probability_1', 'label_2', 'class_2', 'probability_2'),
        skip_metric='skipped_videos'),
    'detection': Task(
        'detection', _detection_data, _detection_model, _detection_writer,
        train_size=lambda b: len(b[0]), train_skipped=lambda b: sum(int(t['skipped']) for t in b[1]),
        eval_size=lambda b: len(b[0]), table=lambda tmp: tmp / 'out' / 'predictions.csv',
        extra_columns=('image_id', 'detections', 'results_file', 'picture_file'), skip_metric='skipped_images'),
    'segmentation': Task(
        'segmentation', _segmentation_data, _segmentation_model, _segmentation_writer,
        train_size=lambda b: b['image'].shape[0], train_skipped=lambda b: int(b['skipped'].sum()),
        eval_size=lambda b: len(b['mask']), table=lambda tmp: tmp / 'out' / 'predictions.csv',
        extra_columns=('mask_file', 'overlay_file'), skip_metric='skipped_images'),
}


def _task(name: str, request, tmp_path_factory) -> Task:
    spec = TASKS[name]
    root = tmp_path_factory.getbasetemp() / f'contract_data_{spec.name}'
    if spec.name == 'classification':
        jpegs = request.getfixturevalue('cifar_jpegs')
        spec.make = lambda skip, **kw: _classification_data(root, jpegs, skip, **kw)
    else:
        spec.make = lambda skip, **kw: spec.data(root, skip, **kw)
    return spec


@pytest.fixture(params=sorted(TASKS))
def task(request, tmp_path_factory):
    """The task, with ``make(skip, **kw)`` building its DataModule over one tiny data set (made once per task)."""
    return _task(request.param, request, tmp_path_factory)


def _read_table(path: Path) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:3] == ['path', 'prediction', 'error']
    return rows


def _names(paths) -> List[str]:
    return [Path(p).stem for p in paths]


# -- the guarantees ------------------------------------------------------------------------------------

def test_a_bad_input_is_an_error_naming_the_file_in_every_split_and_in_predict(task):
    dm = task.make(skip=False)
    dm.setup('fit')
    dm.setup('predict')
    loaders = {'train': dm.train_dataloader(), 'val': dm.val_dataloader(), 'predict': dm.predict_dataloader()}
    for split, loader in loaders.items():
        if split == 'train':  # shuffled: draw the bad ones by their keys
            bad = [i for i, p in enumerate(_dataset_paths(dm.train_set)) if Path(p).stem.startswith('z')]
            with pytest.raises(UnreadableInputError, match=r'z\d_(zero|trunc|text)'):
                dm.train_set[(bad[0], 0)]
            continue
        with pytest.raises(UnreadableInputError, match=r'[zb]\d_(zero|trunc|text)'):
            for _ in loader:
                pass


def _dataset_paths(dataset) -> List[str]:
    """Input files of a training / evaluation set of any task, in index order."""
    if hasattr(dataset, 'samples') and dataset.samples and isinstance(dataset.samples[0], tuple):
        return [str(s[0]) for s in dataset.samples]  # ImageFolder, video samples
    if hasattr(dataset, 'image_ids'):
        return [str(dataset._file_of(i)) for i in dataset.image_ids]  # COCO
    return [str(p) for p in dataset.images]  # segmentation


def test_skipping_works_in_every_split(task, caplog):
    dm = task.make(skip=True)
    dm.setup('fit')
    with caplog.at_level(logging.WARNING):
        train = list(dm.train_dataloader())
    assert train and all(task.train_size(b) == dm.batch_size for b in train)  # batches keep their size
    assert sum(task.train_skipped(b) for b in train) >= len(BAD_KINDS)  # every bad input drawn, replaced, counted
    for kind in BAD_KINDS:
        assert any(kind in r.getMessage() and 'Skipping' in r.getMessage() for r in caplog.records), kind
    for split in ('val', 'test'):
        dm.setup({'val': 'validate', 'test': 'test'}[split])
        batches = list(getattr(dm, f'{split}_dataloader')())
        assert [task.eval_size(b) for b in batches] == [2, 1, 0], split  # dropped from their batch
        assert [skipped_in_batch(b) for b in batches] == [0, 1, 2], split  # and counted
        assert batch_is_empty(batches[-1]) and not batch_is_empty(batches[0])  # an all-bad batch is empty


def test_training_replaces_bad_inputs_on_emulated_devices(task):
    """One epoch over 5 real + 3 bad inputs, 2 emulated devices of 1 input each: every step runs, the
    replaced inputs are counted (video too: its DataModule has the shared sampler and virtual_devices)."""
    dm = task.make(skip=True, batch_size=1, virtual_devices=2)
    model = task.model(dm)
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, dm)
    assert trainer.global_step == 4  # 8 inputs, 2 per step (drop_last)
    assert trainer.callback_metrics[f'train/{task.skip_metric}'] >= len(BAD_KINDS)


def test_the_module_evaluates_through_an_all_bad_batch(task):
    dm = task.make(skip=True)
    model = task.model(dm)
    trainer = _trainer()
    val = trainer.validate(model, dm, verbose=False)[0]
    assert val[f'val/{task.skip_metric}'] == len(BAD_KINDS)
    test = trainer.test(model, dm, verbose=False)[0]
    assert test[f'test/{task.skip_metric}'] == len(BAD_KINDS)


def test_predict_writes_a_row_per_input_with_the_reason_of_each_skip(task, tmp_path):
    dm = task.make(skip=True)
    model = task.model(dm)
    writer = task.writer(tmp_path)
    _trainer(callbacks=[writer]).predict(model, dm, return_predictions=False)
    with open(task.table(tmp_path), newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ['path', 'prediction', 'error', *task.extra_columns]
    inputs = sorted(p for p in (Path(dm.predict_set.paths[0]).parent).iterdir() if p.is_file())
    assert [r['path'] for r in rows] == [str(p) for p in inputs]  # one row per input, in input order
    errors = {Path(r['path']).stem: r['error'] for r in rows if r['error']}
    assert sorted(errors) == ['b1_zero', 'b2_trunc', 'b3_text']
    assert 'empty file' in errors['b1_zero'] and 'truncated' in errors['b2_trunc'].lower()  # the reason, not
    assert 'cannot identify' in errors['b3_text'] or 'Invalid data' in errors['b3_text']  # just "skipped"
    if task.name == 'video':
        assert errors['b2_trunc'].startswith('truncated: decoded ')  # ... of the N frames its header declares
    good = [r for r in rows if not r['error']]
    assert len(good) == 4 and all(r['prediction'] or r.get('detections') == '0' for r in good)
    names = dm.class_names
    if task.name in ('classification', 'video'):  # class names from the data, not numbers
        assert all(r['prediction'] == r['label_1'] and r['label_1'] in names for r in good)
    if task.name == 'segmentation':
        assert all(r['prediction'].split(' ')[0] in names and Path(r['mask_file']).is_file() for r in good)
    if task.name == 'detection':
        assert all(Path(r['results_file']).is_file() and int(r['detections']) >= 0 for r in good)


class _Boom(RuntimeError):
    pass


def _failing_at(model, batch_idx: int, seen: List[str]):
    """``model.predict_step`` that records the paths it is given and raises at ``batch_idx``."""
    step = model.predict_step

    def predict_step(batch, idx, *args):
        seen.extend(m['path'] for m in batch.meta + batch.skipped)
        if idx == batch_idx:
            raise _Boom(f'boom at batch {idx}')
        return step(batch, idx, *args)
    model.predict_step = predict_step
    return model


def test_a_crash_keeps_the_finished_rows_and_a_rerun_resumes_or_overwrites(task, tmp_path, capsys):
    dm = task.make(skip=True)
    model = task.model(dm)
    seen: List[str] = []
    with pytest.raises(_Boom):
        _trainer(callbacks=[task.writer(tmp_path)]).predict(_failing_at(model, 2, seen), dm, return_predictions=False)
    rows = _read_table(task.table(tmp_path))
    assert _names(r['path'] for r in rows) == ['a0', 'a1', 'b1_zero', 'b2_trunc']  # batches 1 and 2, on disk
    assert [bool(r['error']) for r in rows] == [False, False, True, True]

    # resume: only the inputs not in the table are predicted; their rows come after the kept ones
    seen.clear()
    _trainer(callbacks=[task.writer(tmp_path, resume=True)]).predict(
        _failing_at(task.model(dm), -1, seen), dm, return_predictions=False)
    assert sorted(_names(seen)) == ['b3_text', 'c0', 'c1']
    rows = _read_table(task.table(tmp_path))
    assert _names(r['path'] for r in rows) == ['a0', 'a1', 'b1_zero', 'b2_trunc', 'b3_text', 'c0', 'c1']
    assert 'Resuming predictions' in capsys.readouterr().out

    # the default: a rerun overwrites the table, and says so
    seen.clear()
    _trainer(callbacks=[task.writer(tmp_path)]).predict(_failing_at(task.model(dm), -1, seen), dm,
                                                        return_predictions=False)
    assert len(seen) == 7 and len(_read_table(task.table(tmp_path))) == 7
    assert 'Overwriting' in capsys.readouterr().out


def test_datamodules_name_their_classes(task):
    dm = task.make(skip=True)
    dm.setup('fit')
    names, n = dm.class_names, dm.num_classes
    assert isinstance(names, list) and all(isinstance(c, str) for c in names) and len(names) == n
    expected = {
        'classification': lambda: sorted(p.name for p in (Path(dm.root) / 'train').iterdir()),
        'video': lambda: ['cartwheel', 'soccer_juggling', 'wave'],
        'detection': lambda: ['__background__'] + [c['name'] for c in _all_categories(Path(str(dm.root)))],
        'segmentation': lambda: (CAMVID / 'classes.txt').read_text().split(),
    }[task.name]
    assert names == expected()


def test_detection_predict_takes_image_ids_from_the_annotations(request, tmp_path_factory, tmp_path):
    task = _task('detection', request, tmp_path_factory)
    root = Path(task.make(skip=True).root)
    val = json.loads((root / 'val.json').read_text())
    expected = {i['file_name']: i['id'] for i in val['images'] if i['file_name'].startswith('r')}
    dm = task.make(skip=True, predict_images=str(root / 'val'))  # the val folder: its annotations name the ids
    dm.setup('predict')
    ids = {Path(dm.predict_set[i].meta['path']).name: dm.predict_set[i].meta['image_id']
           for i in range(len(dm.predict_set)) if Path(dm.predict_set.paths[i]).name.startswith('r')}
    assert ids == expected and min(ids.values()) > 0
    copy = tmp_path / 'elsewhere'  # another folder, with the annotation file given
    shutil.copytree(root / 'val', copy)
    dm = task.make(skip=True, predict_images=str(copy), predict_annotations='val.json')
    dm.setup('predict')
    assert {Path(p).name: dm.predict_set[i].meta['image_id'] for i, p in enumerate(dm.predict_set.paths)
            if Path(p).name.startswith('r')} == expected
