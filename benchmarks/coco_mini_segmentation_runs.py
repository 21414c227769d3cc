"""coco-mini semantic segmentation: WS+BCN vs WS+GN vs BN at 2 images per device, through zoo-train.

Runs ``configs/segmentation/coco_mini_r18_wsbcn_cpu.yaml`` once per variant (only ``model_name`` and
the output folders differ), one run at a time, then writes

- ``benchmarks/results/coco_mini_segmentation.md``: val mIoU and pixel accuracy of each run (from
  its ``metrics.csv``), steps, wall time, threads;
- ``benchmarks/results/coco_mini_segmentation.png``: val images, ground truth, and each variant's
  prediction (overlays), one row per image.

A finished run (``last.ckpt`` at the final step) is not run again; ``--force`` reruns. 100 training
images from scratch give rough numbers only::

    python benchmarks/coco_mini_segmentation_runs.py                   # ~10 min per run on 2 cores
    python benchmarks/coco_mini_segmentation_runs.py --max-steps 4 --val-limit 4 \\
        --runs-dir /tmp/seg_smoke --results-dir /tmp/seg_smoke        # smoke test of the script
"""
import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'configs' / 'segmentation' / 'coco_mini_r18_wsbcn_cpu.yaml'
VARIANTS = {  # label -> segmenter name
    'WS+BCN': 'deeplabv3_resnet18_wsbcn',
    'WS+GN': 'deeplabv3_resnet18_wsgn',
    'BN': 'deeplabv3_resnet18',
}


def run_config(base: dict, model_name: str, run_dir: Path, max_steps: Optional[int], val_limit: Optional[int]) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg['model']['init_args']['model_name'] = model_name
    t = cfg['trainer']
    t['default_root_dir'] = str(run_dir)
    t['logger']['init_args']['save_dir'] = str(run_dir)
    t['callbacks'][0]['init_args']['dirpath'] = str(run_dir / 'checkpoints')
    if max_steps is not None:
        t['max_steps'] = max_steps
        t['val_check_interval'] = max_steps  # validate once, at the end
        t['log_every_n_steps'] = 1
    if val_limit is not None:
        cfg['data']['init_args']['val_limit'] = val_limit
    return cfg


def finished(run_dir: Path, max_steps: int) -> bool:
    last = run_dir / 'checkpoints' / 'last.ckpt'
    if not last.is_file():
        return False
    import torch
    return torch.load(last, map_location='cpu', weights_only=True).get('global_step') == max_steps


def final_metrics(run_dir: Path) -> Dict[str, float]:
    """The last logged val metrics of the newest log version."""
    files = sorted(run_dir.glob('logs/version_*/metrics.csv'), key=lambda p: int(p.parent.name.split('_')[1]))
    out = {}
    for row in csv.DictReader(open(files[-1])) if files else []:
        for key in ('val/miou', 'val/pixel_acc'):
            if row.get(key):
                out[key] = float(row[key])
    return out


def predictions_figure(runs: Dict[str, Path], data_cfg: dict, out_png: Path, num_images: int = 4) -> None:
    """Rows: val images; columns: image, ground truth, then each variant's prediction (overlays)."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    from lightning_modules.segmentation import SegmentationDataModule, SemanticSegmenter, overlay
    from torchvision.transforms.v2 import functional as TF
    from lightning_modules.datasets import load_rgb

    dm = SegmentationDataModule(**dict(data_cfg, num_workers=0, val_limit=num_images))
    dm.setup('validate')
    models = {label: SemanticSegmenter.load_from_checkpoint(d / 'checkpoints' / 'last.ckpt', map_location='cpu').eval()
              for label, d in runs.items()}
    tiles, height = [], 240
    for i in range(min(num_images, len(dm.val_set))):
        item = dm.val_set[i]
        image = TF.pil_to_tensor(load_rgb(dm.val_set.images[i]))
        mask = item['mask']
        cells = [image, overlay(image, mask)]
        for model in models.values():
            with torch.no_grad():
                logits = model(item['image'][None])
                logits = F.interpolate(logits, size=mask.shape, mode='bilinear', align_corners=False)
            cells.append(overlay(image, logits[0].argmax(0)))
        w = round(image.shape[-1] * height / image.shape[-2])
        tiles += [TF.resize(c, [height, w], antialias=True) for c in cells]
    width = max(t.shape[-1] for t in tiles)
    tiles = [F.pad(t, (0, width - t.shape[-1])) for t in tiles]
    grid = make_grid(tiles, nrow=2 + len(models), padding=4, pad_value=255)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.float() / 255, out_png)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs-dir', default=str(REPO / 'runs' / 'segmentation'))
    p.add_argument('--results-dir', default=str(REPO / 'benchmarks' / 'results'))
    p.add_argument('--threads', type=int, default=2, help='OMP / torch threads of each run')
    p.add_argument('--max-steps', type=int, default=None, help='override (smoke tests); validates at the end')
    p.add_argument('--val-limit', type=int, default=None, help='validate on the first n val images only')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--force', action='store_true', help='rerun finished runs')
    args = p.parse_args(argv)

    base = yaml.safe_load(CONFIG.read_text())
    steps = args.max_steps or base['trainer']['max_steps']
    runs_dir, results = Path(args.runs_dir), Path(args.results_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    rows, runs = [], {}
    for label in args.variants:
        name = VARIANTS[label]
        run_dir = runs_dir / f'coco_mini_{name}'
        runs[label] = run_dir
        wall = None
        if args.force or not finished(run_dir, steps):
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = run_dir / 'config.yaml'
            cfg_path.write_text(yaml.safe_dump(run_config(base, name, run_dir, args.max_steps, args.val_limit)))
            print(f'[{label}] zoo-train fit -c {cfg_path}', flush=True)
            start = time.time()
            subprocess.run([sys.executable, '-m', 'lightning_modules', 'fit', '-c', str(cfg_path)], cwd=REPO,
                           env=env, check=True)
            wall = time.time() - start
            (run_dir / 'wall_seconds.txt').write_text(f'{wall:.1f}\n')
        elif (run_dir / 'wall_seconds.txt').is_file():
            wall = float((run_dir / 'wall_seconds.txt').read_text())
        m = final_metrics(run_dir)
        rows.append((label, name, m, wall))

    d = base['data']['init_args']
    lines = [
        '# coco-mini semantic segmentation: WS+BCN vs WS+GN vs BN at 2 images per device',
        '',
        f'DeepLabV3, ResNet-18 backbone from scratch, output stride {base["model"]["init_args"]["model_kwargs"]["output_stride"]}; '
        f'{d["batch_size"]} crops of {d["crop_size"]}x{d["crop_size"]} per device x {d["virtual_devices"]} emulated devices; '
        f'{steps} SGD steps, poly schedule; 100 training images, val on '
        f'{args.val_limit or 100} val images at full mask resolution (images resized to shorter side {d["eval_size"]}). '
        f'133 classes. Rough numbers only: 100 images, no ImageNet weights.',
        f'Produced by `python benchmarks/coco_mini_segmentation_runs.py` with {args.threads} threads per run '
        f'(config `{CONFIG.relative_to(REPO)}`).',
        '',
        '| normalization | model | val mIoU (%) | val pixel acc. (%) | steps | wall time (s) |',
        '|---|---|---|---|---|---|',
    ]
    for label, name, m, wall in rows:
        miou = f'{100 * m["val/miou"]:.2f}' if 'val/miou' in m else 'n/a'
        acc = f'{100 * m["val/pixel_acc"]:.2f}' if 'val/pixel_acc' in m else 'n/a'
        lines.append(f'| {label} | `{name}` | {miou} | {acc} | {steps} | '
                     f'{f"{wall:.0f}" if wall else "n/a"} |')
    lines += ['', 'Columns of the picture: image, ground truth, then ' + ', '.join(args.variants) + ' predictions.']
    results.mkdir(parents=True, exist_ok=True)
    (results / 'coco_mini_segmentation.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    predictions_figure(runs, d, results / 'coco_mini_segmentation.png')
    print(f'Wrote {results / "coco_mini_segmentation.md"} and {results / "coco_mini_segmentation.png"}')


if __name__ == '__main__':
    main()
