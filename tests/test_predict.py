"""``zoo-train predict`` on unlabeled images and clips, and the one-call ``predict_file``."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lightning_modules import prepare_cifar10
from lightning_modules.predict import list_inputs, predict_file

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / 'shared' / 'data' / 'videos'
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _zoo_train(cwd: Path, *args: str, logger: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-m', 'lightning_modules', 'predict', *args,
                          '--trainer.accelerator', 'cpu', *([] if logger else ['--trainer.logger', 'false'])],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope='module')
def unlabeled_photos(tmp_path_factory) -> tuple:
    """Two real CIFAR-10 test images per class, flat (no class folders), plus one upscaled to 64x64."""
    test_root = prepare_cifar10() / 'test'
    folder = tmp_path_factory.mktemp('photos')
    truth = {}
    for cls in CLASSES:
        for src in sorted((test_root / cls).iterdir())[:2]:
            dst = folder / f'{cls}_{src.name}'
            shutil.copy(src, dst)
            truth[dst.name] = cls
    big = folder / 'zz_big_cat.png'
    Image.open(folder / next(n for n in sorted(truth) if n.startswith('cat'))).resize((64, 64)).save(big)
    truth[big.name] = 'cat'
    return folder, truth


def test_predict_images_with_shipped_weights_writes_top5_with_label_names(unlabeled_photos, tmp_path):
    folder, truth = unlabeled_photos
    res = _zoo_train(tmp_path, '--model', 'lightning_modules.classification.ImageClassifier',
               '--model.init_args.model_name', 'resnet20_wsbcn.cifar10', '--model.init_args.pretrained', 'true',
               '--data', 'lightning_modules.classification.Cifar10DataModule', '--data.init_args.predict', str(folder),
               '--data.init_args.num_workers', '0', '--predict_output', 'out/preds.csv')
    assert 'Tip:' not in res.stdout + res.stderr  # Lightning's product tips are dropped
    assert 'CPU threads:' in res.stdout + res.stderr
    with open(tmp_path / 'out' / 'preds.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [Path(r['path']).name for r in rows] == sorted(truth)  # one row per input, in input order
    for row in rows:
        probs = [float(row[f'probability_{k}']) for k in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert row['label_1'] in CLASSES and row['label_1'] == CLASSES[int(row['class_1'])]
    correct = sum(row['label_1'] == truth[Path(row['path']).name] for row in rows)
    assert correct >= 15, f'{correct} of {len(rows)} real test images right; the shipped model scores 84%'

    # The one-call API gives the same answer with the preprocessing of the weights' own config.
    for row in rows[:3] + rows[-1:]:
        top = predict_file('resnet20_wsbcn.cifar10', row['path'])
        assert top[0]['label'] == row['label_1']
        assert top[0]['probability'] == pytest.approx(float(row['probability_1']), abs=1e-4)


def test_predict_skips_a_truncated_image_and_writes_its_reason(unlabeled_photos, tmp_path):
    """``skip_corrupt`` covers predict: one truncated PNG among the inputs is a row with its reason, not 0 rows."""
    folder, truth = unlabeled_photos
    inputs = tmp_path / 'inputs'
    shutil.copytree(folder, inputs)
    data = (inputs / 'zz_big_cat.png').read_bytes()
    (inputs / 'zz_cut.png').write_bytes(data[:len(data) // 2])
    args = ['--model', 'lightning_modules.classification.ImageClassifier',
            '--model.init_args.model_name', 'resnet20_wsbcn.cifar10', '--model.init_args.pretrained', 'true',
            '--data', 'lightning_modules.classification.Cifar10DataModule', '--data.init_args.predict', str(inputs),
            '--data.init_args.num_workers', '0', '--data.init_args.eval_batch_size', '4', '--predict_output', 'p.csv']
    with pytest.raises(AssertionError, match='zz_cut.png'):  # without skip_corrupt: an error naming the file
        _zoo_train(tmp_path, *args)
    res = _zoo_train(tmp_path, *args, '--data.init_args.skip_corrupt', 'true')
    with open(tmp_path / 'p.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [Path(r['path']).name for r in rows] == sorted(truth) + ['zz_cut.png']
    assert rows[-1]['prediction'] == '' and 'truncated' in rows[-1]['error'].lower()
    assert all(r['prediction'] in CLASSES and not r['error'] for r in rows[:-1])
    assert f'Predictions for {len(truth)} of {len(truth) + 1} inputs' in res.stdout


def test_prediction_tables_are_valid_after_every_batch_and_read_back_after_a_kill(tmp_path):
    from lightning_modules.core.writer import RowTable, read_rows
    rows = [{'path': f'{i}.jpg', 'prediction': 'cat', 'error': '', 'top_k': [{'class': 3, 'label': 'cat'}]}
            for i in range(5)]
    for suffix in ('.json', '.jsonl', '.csv'):
        path = tmp_path / f'table{suffix}'
        table = RowTable(path, ['path', 'prediction', 'error'], rows[:1])  # a resumed table starts with its rows
        for k in (1, 3):
            table.append(rows[k:k + 2])
            _, back = read_rows(path)
            assert [r['path'] for r in back] == [r['path'] for r in rows[:k + 2]]  # readable at every point
            if suffix == '.json':
                assert len(json.loads(path.read_text())) == k + 2  # valid JSON after every append
        table.close()
        text = path.read_text()
        path.write_text(text[:len(text) - 12])  # killed in the middle of the last row
        _, back = read_rows(path)
        assert [r['path'] for r in back] == [r['path'] for r in rows[:4]], suffix  # the cut row is left out
    with pytest.raises(ValueError, match='must end in'):
        RowTable(tmp_path / 'table.txt', ['path'])


def test_predict_reads_a_csv_and_refuses_missing_files(unlabeled_photos, tmp_path):
    folder, _ = unlabeled_photos
    listing = tmp_path / 'inputs.csv'
    listing.write_text('path,comment\n' + ''.join(f'{p},x\n' for p in sorted(folder.iterdir())[:3]))
    assert len(list_inputs(listing, ('.jpg', '.png'))) == 3
    listing.write_text('path\nmissing.jpg\n')
    with pytest.raises(FileNotFoundError, match='missing.jpg'):
        list_inputs(listing, ('.jpg',))
    with pytest.raises(ValueError, match='"path" column'):
        (tmp_path / 'bad.csv').write_text('file\na.jpg\n')
        list_inputs(tmp_path / 'bad.csv', ('.jpg',))


@pytest.mark.skipif(not VIDEOS.is_dir(), reason='shared clips missing')
def test_predict_clips_writes_a_row_per_clip(tmp_path):
    _zoo_train(tmp_path, '--model', 'lightning_modules.video.VideoClassifier',
               '--model.init_args.model_name', 'tsm_resnet18_wsbcn', '--model.init_args.num_classes', '3',
               '--model.init_args.num_segments', '2',
               '--data', 'lightning_modules.video.VideoDataModule', '--data.init_args.predict', str(VIDEOS),
               '--data.init_args.num_segments', '2', '--data.init_args.crop_size', '32',
               '--data.init_args.test_clips', '2', '--data.init_args.test_crops', '1',
               '--data.init_args.num_workers', '0', '--predict_output', 'clips.json', '--top_k', '2',
               '--data.init_args.train', str(VIDEOS / 'labels.csv'), '--data.init_args.skip_unlabelled', 'true')
    rows = json.loads((tmp_path / 'clips.json').read_text())
    clips = sorted(p for p in VIDEOS.iterdir() if p.suffix in ('.mp4', '.avi'))
    assert [r['path'] for r in rows] == [str(p) for p in clips]
    for row in rows:  # the leading columns of every task's table, then the top-k
        assert list(row)[:3] == ['path', 'prediction', 'error'] and row['error'] == ''
        assert len(row['top_k']) == 2 and row['prediction'] == row['top_k'][0]['label']
        assert {e['label'] for e in row['top_k']} <= {'cartwheel', 'soccer_juggling', 'wave'}  # the data's names
        assert sum(e['probability'] for e in row['top_k']) <= 1.0 + 1e-5


@pytest.mark.skipif(not VIDEOS.is_dir(), reason='shared clips missing')
def test_predict_file_on_a_clip_averages_its_views():
    import timm
    model = timm.create_model('tsm_resnet18_wsbcn', num_classes=4, num_segments=2)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), label_names=['a', 'b', 'c', 'd'])
    top = predict_file(model, VIDEOS / 'v_SoccerJuggling_g23_c01.avi', top_k=4, num_clips=2)
    assert sorted(e['label'] for e in top) == ['a', 'b', 'c', 'd']
    assert sum(e['probability'] for e in top) == pytest.approx(1.0, abs=1e-4)


def test_predict_from_a_training_config_leaves_nothing_but_its_predictions(unlabeled_photos, tmp_path):
    """The quickstart config names a logger, a run folder and checkpoint callbacks: predict uses none of them
    (no seed line, no logger notice, no lightning_logs/ or runs/ folder in the working directory)."""
    folder, truth = unlabeled_photos
    res = _zoo_train(tmp_path, '-c', str(REPO / 'configs/cifar10/quickstart.yaml'),
                     '--model.init_args.model_name', 'resnet20_wsbcn.cifar10', '--model.init_args.pretrained', 'true',
                     '--data.init_args.predict', str(folder), '--data.init_args.num_workers', '0',
                     '--predict_output', 'preds.csv', '--trainer.enable_progress_bar', 'false', logger=True)
    out = res.stdout + res.stderr
    assert 'Seed set' not in out and 'No seed found' not in out and 'ensorboard' not in out, out
    assert 'Be aware that' not in out and 'dirpath has changed' not in out and 'is_fx_tracing' not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['preds.csv']
