"""CamVid (issue 28): the configs share one schedule, the real DataModule reads the real frames, the
runner queues, predicts the picture frames and archives, and the results script builds the tables,
plot and picture from run logs."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import camvid_results  # benchmarks/ scripts (pytest's pythonpath)
import camvid_runs
import cifar_runs

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / 'shared' / 'data' / 'camvid'
CONFIGS = sorted((ROOT / 'configs' / 'segmentation').glob('camvid_*.yaml'))
RUN_SPECIFIC = {'model.init_args.model_name', 'data.init_args.batch_size', 'data.init_args.virtual_devices'}

needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason='../shared/data/camvid is not here')


def _flat(d, prefix=''):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


def test_the_configs_differ_only_in_model_batch_and_devices_with_one_global_batch():
    assert {c.stem for c in CONFIGS} >= {'camvid_r18_bn_b8', 'camvid_r18_bn', 'camvid_r18_wsgn', 'camvid_r18_wsbcn'}
    flats = {}
    for config in CONFIGS:
        cfg = yaml.safe_load(config.read_text())
        run_dir = cfg['trainer']['default_root_dir']
        flat = _flat({k: v for k, v in cfg.items() if k != 'trainer'})
        flat.update({f'trainer.{k}': v for k, v in cfg['trainer'].items() if k not in ('logger', 'callbacks',
                                                                                   'default_root_dir')})
        assert cfg['trainer']['logger']['init_args']['save_dir'] == run_dir
        assert cfg['data']['init_args']['batch_size'] * cfg['data']['init_args']['virtual_devices'] == 8
        flats[config.stem] = flat
    reference = flats['camvid_r18_wsbcn']
    for name, flat in flats.items():
        differ = {k for k in set(flat) | set(reference) if flat.get(k) != reference.get(k)}
        assert differ <= RUN_SPECIFIC, (name, differ)


@needs_camvid
def test_the_real_datamodule_reads_camvid_at_half_resolution():
    from lightning_modules.core.cli import build_cli
    cli = build_cli(['-c', str(ROOT / 'configs/segmentation/camvid_r18_wsbcn.yaml')], run=False)
    data = cli.datamodule
    data.setup('fit')
    assert (len(data.train_set), len(data.val_set)) == (367, 101)
    assert len(data.class_names) == 11 and data.class_names[:2] == ['sky', 'building']  # from classes.txt
    batch = next(iter(data.train_dataloader()))
    assert batch['image'].shape == (8, 3, 192, 192) and batch['mask'].shape == (8, 192, 192)
    labels = set(batch['mask'].unique().tolist())
    assert labels <= set(range(11)) | {255} and len(labels) > 3
    data.setup('test')
    item = data.test_set[0]
    assert len(data.test_set) == 233 and item['image'].shape[-2:] == (180, 240) and item['mask'].shape == (360, 480)


def test_the_runner_predicts_the_picture_frames_and_archives_them(tmp_path, monkeypatch, make_run):
    frames = tmp_path / 'camvid'
    (frames / 'test').mkdir(parents=True)
    for f in camvid_runs.PICTURE_FRAMES:
        (frames / 'test' / f'{f}.jpg').write_bytes(b'jpeg')
    monkeypatch.setattr(camvid_runs, 'CAMVID', frames)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / 'camvid.yaml'
    config.write_text(yaml.safe_dump({'trainer': {'default_root_dir': str(tmp_path / 'runs' / 'r18_wsbcn')}}))
    calls = []

    def fake_call(cmd, stdout, stderr, env):
        calls.append(cmd)
        if cmd[1] == 'fit':  # the run: logs with a test mIoU
            make_run(tmp_path / 'runs', 'r18_wsbcn', 'deeplabv3_resnet18_wsbcn', 2, 4, [0.5])
            metrics = tmp_path / 'runs/r18_wsbcn/logs/version_0/metrics.csv'
            metrics.write_text(metrics.read_text().replace('test/top1', 'test/miou'))
        else:  # predict: one mask per frame
            out = Path(cmd[cmd.index('--trainer.callbacks.output_dir') + 1]) / 'masks'
            out.mkdir(parents=True)
            for f in camvid_runs.PICTURE_FRAMES:
                Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / f'{f}.png')
        return 0
    monkeypatch.setattr(cifar_runs.subprocess, 'call', fake_call)
    monkeypatch.setattr(camvid_runs.subprocess, 'call', fake_call)
    queue = cifar_runs.Queue(metric='test/miou', archive_dir=tmp_path / 'archive', extra=camvid_runs.QUEUE.extra,
                             after=camvid_runs.predict_pictures)
    assert cifar_runs.main([str(config), '--epochs', '2', '--threads', '1'], queue=queue) == 0
    fit, predict = calls
    assert fit[:2] == ['zoo-train', 'fit'] and fit[fit.index('--trainer.max_epochs') + 1] == '2'
    assert predict[:2] == ['zoo-train', 'predict']
    assert predict[predict.index('--ckpt_path') + 1] == str(tmp_path / 'runs/r18_wsbcn/checkpoints/last.ckpt')
    linked = Path(predict[predict.index('--data.init_args.predict_images') + 1])
    assert sorted(p.stem for p in linked.iterdir()) == sorted(camvid_runs.PICTURE_FRAMES)
    archived = sorted(p.name for p in (tmp_path / 'archive/r18_wsbcn/pictures/masks').iterdir())
    assert archived == sorted(f'{f}.png' for f in camvid_runs.PICTURE_FRAMES)
    # A second queue skips the finished run without predicting again.
    calls.clear()
    assert cifar_runs.main([str(config), '--epochs', '2', '--threads', '1'], queue=queue) == 0
    assert calls == []


def _fake_run(root: Path, name: str, model: str, batch: int, devices: int, seed: int, miou: float) -> Path:
    log = root / name / 'logs' / 'version_0'
    log.mkdir(parents=True)
    cfg = {'seed_everything': seed, 'trainer': {'max_epochs': 50, 'default_root_dir': str(root / name)},
           'model': {'init_args': {'model_name': model, 'num_classes': 11}},
           'data': {'init_args': {'batch_size': batch, 'virtual_devices': devices}}}
    (log / 'config.yaml').write_text(yaml.safe_dump(cfg))
    ious = {f'test/iou_{c}': miou + 0.01 * (c - 5) for c in range(11)}
    with open(log / 'metrics.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['epoch', 'step', 'val/miou', 'test/miou', *ious])
        w.writeheader()
        w.writerow({'epoch': 49, 'step': 2250, 'val/miou': miou})
        w.writerow({'epoch': 50, 'step': 2250, 'test/miou': miou, **ious})
    return root / name


@needs_camvid
def test_results_tables_plot_and_picture(tmp_path):
    runs = [_fake_run(tmp_path, f'r18_bn_b8_seed{s}', 'deeplabv3_resnet18', 8, 1, s, m)
            for s, m in enumerate((0.50, 0.52, 0.51))]
    runs += [_fake_run(tmp_path, f'r18_wsbcn_seed{s}', 'deeplabv3_resnet18_wsbcn', 2, 4, s, m)
             for s, m in enumerate((0.53, 0.54, 0.55))]
    runs.append(_fake_run(tmp_path, 'r18_bn', 'deeplabv3_resnet18', 2, 4, 0, 0.30))
    for run in runs:  # the picture frames' predictions: the ground truth itself, as a stand-in
        masks = run / camvid_runs.PICTURES / 'masks'
        masks.mkdir(parents=True)
        for f in camvid_runs.PICTURE_FRAMES:
            shutil.copy(CAMVID / 'testannot' / f'{f}.png', masks / f'{f}.png')
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{camvid_results.README_START}\nold\n{camvid_results.README_END}\nend\n')
    assert camvid_results.main([*map(str, runs), '--out', str(tmp_path / 'out' / 'camvid'), '--readme',
                                str(readme)]) == 0
    table = (tmp_path / 'out' / 'camvid.md').read_text()
    rows = {tuple(line.split(' | ')[:2]): line for line in table.splitlines() if line.startswith('| ')}
    assert '51.00 ± 1.00' in rows['| BN', '8'] and '(baseline)' in rows['| BN', '8']
    assert '54.00 ± 1.00' in rows['| WS+BCN', '2'] and '+3.00 ± 0.82 (p = 0.02)' in rows['| WS+BCN', '2']
    assert '| 30.00 | -21.00 |' in rows['| BN', '2']
    assert 'sky | building' in table and '| WS+BCN @ 2 | 49.0 |' in table  # class 0: 54 - 5
    assert Image.open(tmp_path / 'out' / 'camvid.png').size[0] > 500
    picture = Image.open(tmp_path / 'out' / 'camvid_pictures.png')
    assert picture.size[0] > picture.size[1]  # frame, ground truth and three configurations side by side
    text = readme.read_text()
    assert 'old' not in text and '54.00 ± 1.00' in text and 'camvid_pictures.png' in text and text.endswith('end\n')


def test_colours_map_classes_and_void():
    labels = np.array([[0, 3], [10, 255]], dtype=np.uint8)
    out = camvid_results.colourize(labels)
    assert out[0, 1].tolist() == [128, 64, 128] and out[1, 1].tolist() == [0, 0, 0]  # road; void black
    assert torch.tensor(out).shape == (2, 2, 3)
