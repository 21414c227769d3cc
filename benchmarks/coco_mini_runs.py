"""The coco-mini fine-tune of WS+BCN, WS+GN and the frozen-BN baseline through ``zoo-train``: AP table.

For each detector, from ``configs/coco/coco_mini_maskrcnn_r50_wsbcn_cpu.yaml`` with only the model
name changed:

1. before: ``zoo-train validate`` with the initial weights (the same seed, so the same weights
   ``fit`` starts from): val box AP and mask AP on the 100 val2017 images;
2. ``zoo-train fit`` (it validates once, at the end): the after numbers, and the fit's wall time.

Results go into a markdown table (``--table``, default ``benchmarks/results/coco_mini.md``). A run
whose fit already logged its final validation is not run again (delete its folder to redo it).
Each run is ordinary CLI output under ``--out/<detector>/`` (``before/`` and ``fit/`` CSV logs,
``checkpoints/``). Extra arguments after ``--`` go to both commands, for example a quick check:

    python benchmarks/coco_mini_runs.py --out /tmp/cm -- --trainer.max_steps 2 --trainer.val_check_interval 2 \\
        --trainer.limit_val_batches 2

No pretrained weights are available offline, so these runs start from random initialisation
(see the config): 100 training images and ~10 minutes per run give rough numbers only.
"""
import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'coco' / 'coco_mini_maskrcnn_r50_wsbcn_cpu.yaml'
DETECTORS = {
    'maskrcnn_resnet50_fpn_wsbcn': 'WS+BCN (estimated batch stage)',
    'maskrcnn_resnet50_fpn_wsgn': 'WS+GN',
    # torchvision's design: frozen BN over a pretrained backbone; from random init (no weights offline)
    # its BN trains, with batch statistics of the 2 images of the device.
    'maskrcnn_resnet50_fpn': 'BN baseline (trainable BN from random init)',
}
METRICS = ('val/bbox_map', 'val/bbox_map_50', 'val/segm_map', 'val/segm_map_50')


def metric_rows(log_root: Path) -> Iterator[Dict[str, str]]:
    """The rows of every ``logs/version_*/metrics.csv`` under ``log_root``, versions in order."""
    for path in sorted(log_root.glob('logs/version_*/metrics.csv'), key=lambda p: int(p.parent.name.split('_')[1])):
        with open(path, newline='') as f:
            yield from csv.DictReader(f)


def last_metrics(log_root: Path) -> Optional[Dict[str, float]]:
    """The last logged row holding ``val/bbox_map`` under ``log_root``."""
    found = None
    for row in metric_rows(log_root):
        if row.get('val/bbox_map'):
            found = {k: float(row[k]) for k in METRICS if row.get(k)}
    return found


def train_losses(log_root: Path) -> Optional[tuple]:
    """(first, last) logged ``train/loss`` of the fit (every ``log_every_n_steps``), or None."""
    losses = [(int(r['step']), float(r['train/loss'])) for r in metric_rows(log_root) if r.get('train/loss')]
    return (losses[0], losses[-1]) if losses else None


def trained_steps(checkpoint: Path) -> Optional[int]:
    if not checkpoint.is_file():
        return None
    import torch
    return int(torch.load(checkpoint, map_location='cpu', weights_only=True)['global_step'])


def zoo_train(command: str, config: Path, model: str, run_dir: Path, log_dir: Path, extra: Sequence[str],
              threads: int) -> float:
    """Run ``zoo-train <command>``; return its wall time in seconds (stop on failure, showing its log)."""
    args = [sys.executable, '-m', 'lightning_modules', command, '-c', str(config), '--model.model_name', model,
            '--trainer.default_root_dir', str(run_dir), '--trainer.logger.init_args.save_dir', str(log_dir)]
    if command == 'fit':
        args += ['--trainer.callbacks.dirpath', str(run_dir / 'checkpoints')]
    args += list(extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get('PYTHONPATH', '')]))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f'[{time.strftime("%H:%M:%S")}] {command} {model} ({threads} threads) -> {log_dir}', flush=True)
    start = time.time()
    with open(log_dir / f'{command}.log', 'w') as log:
        res = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    if res.returncode:
        tail = (log_dir / f'{command}.log').read_text()[-3000:]
        raise SystemExit(f'zoo-train {command} for {model} failed (exit {res.returncode}):\n{tail}')
    return elapsed


def fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.2f}'


def table(rows: List[dict], config: Path, extra: Sequence[str]) -> str:
    lines = [
        '# coco-mini fine-tune: AP before vs after (zoo-train, CPU)', '',
        f'Written by `benchmarks/coco_mini_runs.py` from `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}`'
        + (f' with `{" ".join(extra)}`' if extra else '') + '; *threads*: the CPU threads its fit ran with.',
        'Val2017 subset of coco-mini (100 images), COCO AP in percent (torchmetrics, pycocotools). 2 images per '
        'device. Detectors start from random initialisation: no ImageNet weights are available offline. 100 '
        'training images and a few minutes of CPU training give rough numbers only, not a COCO result.', '',
        '| detector | norm | box AP before | box AP after | box AP50 after | mask AP before | mask AP after '
        '| mask AP50 after | train loss, first -> last logged step | fit steps | fit time | threads |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        b, a = r['before'] or {}, r['after'] or {}
        fit_time = '-' if r['fit_s'] is None else f'{r["fit_s"] / 60:.1f} min'
        loss = '-' if not r.get('loss') else '{:.2f} (step {}) -> {:.2f} (step {})'.format(
            r['loss'][0][1], r['loss'][0][0], r['loss'][1][1], r['loss'][1][0])
        lines.append(
            f'| `{r["model"]}` | {r["norm"]} | {fmt(b.get("val/bbox_map"))} | {fmt(a.get("val/bbox_map"))} '
            f'| {fmt(a.get("val/bbox_map_50"))} | {fmt(b.get("val/segm_map"))} | {fmt(a.get("val/segm_map"))} '
            f'| {fmt(a.get("val/segm_map_50"))} | {loss} | {a.get("step") or "-"} '
            f'| {fit_time} | {r.get("threads") or "-"} |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', type=Path, default=DEFAULT_CONFIG)
    parser.add_argument('--models', nargs='+', default=list(DETECTORS), help='detector names (zoo.list_detectors())')
    parser.add_argument('--out', type=Path, default=REPO / 'runs' / 'coco_mini')
    parser.add_argument('--table', type=Path, default=REPO / 'benchmarks' / 'results' / 'coco_mini.md')
    parser.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', 2)))
    parser.add_argument('extra', nargs='*', help='after --: extra zoo-train arguments for every command')
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        run_dir = args.out / model
        before = last_metrics(run_dir / 'before')
        if before is None:
            zoo_train('validate', args.config, model, run_dir, run_dir / 'before', args.extra, args.threads)
            before = last_metrics(run_dir / 'before')
        after, fit_s = last_metrics(run_dir / 'fit'), None
        timing, threads = run_dir / 'fit' / 'fit_seconds.txt', run_dir / 'fit' / 'threads.txt'
        if after is None:
            fit_s = zoo_train('fit', args.config, model, run_dir, run_dir / 'fit', args.extra, args.threads)
            timing.write_text(f'{fit_s:.1f}\n')
            threads.write_text(f'{args.threads}\n')  # the table is often written later, by another invocation
            after = last_metrics(run_dir / 'fit')
        elif timing.is_file():
            fit_s = float(timing.read_text())
        if after is not None:
            after['step'] = trained_steps(run_dir / 'checkpoints' / 'last.ckpt')
        rows.append({'model': model, 'norm': DETECTORS.get(model, ''), 'before': before, 'after': after,
                     'fit_s': fit_s, 'loss': train_losses(run_dir / 'fit'),
                     'threads': threads.read_text().strip() if threads.is_file() else None})
        print(f'{model}: box AP {fmt((before or {}).get("val/bbox_map"))} -> {fmt((after or {}).get("val/bbox_map"))}, '
              f'mask AP {fmt((before or {}).get("val/segm_map"))} -> {fmt((after or {}).get("val/segm_map"))}',
              flush=True)
    text = table(rows, args.config, args.extra)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == '__main__':
    main()
