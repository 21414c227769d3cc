"""The README's quickstart numbers, measured: the README's first command (``zoo-train fit -c
configs/cifar10/quickstart.yaml``) run as it is, its wall time and the test accuracy it logs.

    python benchmarks/quickstart_results.py --readme README.md            # runs it (minutes), records it
    python benchmarks/quickstart_results.py --readme README.md --no-run   # the README text from the record

The record is ``benchmarks/results/quickstart.json`` (commit it); the README's text between
``<!-- quickstart-results:start -->`` and ``<!-- quickstart-results:end -->`` is :func:`render` of it,
so the README states no quickstart number this script did not measure (``tests/test_docs.py`` checks
that the two agree). Run it on a machine whose cores are otherwise idle: the record keeps the load
average before the run, the core count and ``OMP_NUM_THREADS``, since all three change the time.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

from cifar_results import update_readme

REPO = Path(__file__).resolve().parents[1]
CONFIG = 'configs/cifar10/quickstart.yaml'
RESULTS = REPO / 'benchmarks' / 'results' / 'quickstart.json'
README_START, README_END = '<!-- quickstart-results:start -->', '<!-- quickstart-results:end -->'
LOG_ROOT = REPO / 'runs' / 'quickstart' / 'logs'  # the config's CSVLogger: save_dir runs/quickstart, name logs


def _last_value(metrics_csv: Path, column: str) -> Optional[float]:
    with metrics_csv.open(newline='') as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    return float(values[-1]) if values else None


def _git_commit() -> str:
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (' (with uncommitted changes)' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def measure() -> Dict[str, Any]:
    """Run the quickstart as the README does (from the repository root) and return its record."""
    import torch
    exe = shutil.which('zoo-train')
    command = ([exe] if exe else [sys.executable, '-m', 'lightning_modules']) + ['fit', '-c', CONFIG]
    before = set(LOG_ROOT.glob('version_*'))
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    start = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.monotonic() - start
    new = sorted(set(LOG_ROOT.glob('version_*')) - before, key=lambda p: int(p.name.split('_')[1]))
    if not new:
        raise RuntimeError(f'the run logged nothing under {LOG_ROOT}')
    metrics = new[-1] / 'metrics.csv'
    top1, top5 = _last_value(metrics, 'test/top1'), _last_value(metrics, 'test/top5')
    if top1 is None:
        raise RuntimeError(f'{metrics} has no test/top1: did the run test after fit?')
    return {
        'command': f'zoo-train fit -c {CONFIG}',
        'wall_seconds': round(wall, 1),
        'test_top1': round(100 * top1, 2),
        'test_top5': round(100 * top5, 2) if top5 is not None else None,
        'cpu_count': os.cpu_count(),
        'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
        'load_average_before': round(load, 2) if load is not None else None,
        'cuda': torch.cuda.is_available(),
        'torch': torch.__version__,
        'commit': _git_commit(),
        'date': datetime.now(timezone.utc).strftime('%Y-%m-%d'),
        'metrics': str(metrics.relative_to(REPO)),
    }


def render(results: Optional[Dict[str, Any]]) -> str:
    """The README's quickstart sentence for a record (None: none measured yet)."""
    if not results:
        return ('Its time and test accuracy are not recorded yet: `python benchmarks/quickstart_results.py '
                '--readme README.md` runs it and writes them here (from `benchmarks/results/quickstart.json`).')
    minutes, seconds = divmod(round(results['wall_seconds']), 60)
    threads = results['omp_num_threads']
    top5 = f' (top-5 {results["test_top5"]:.2f}%)' if results.get('test_top5') is not None else ''
    load = results.get('load_average_before')
    return (f'Measured by `benchmarks/quickstart_results.py` ({results["date"]}, commit {results["commit"]}, '
            f'torch {results["torch"]}{", CUDA" if results.get("cuda") else ", CPU"}, {results["cpu_count"]} cores'
            f'{f", load average {load:g} before the run" if load is not None else ""}, '
            f'{f"OMP_NUM_THREADS={threads}" if threads else "OMP_NUM_THREADS unset"}): '
            f'{minutes} min {seconds:02d} s, test top-1 {results["test_top1"]:.2f}%{top5}.')


def load_results(path: Path = RESULTS) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--readme', type=Path, help='write the sentence between the quickstart markers of this file')
    p.add_argument('--no-run', action='store_true', help='do not run: render the committed record only')
    p.add_argument('--results', type=Path, default=RESULTS, help=f'the record (default {RESULTS.relative_to(REPO)})')
    args = p.parse_args(argv)
    if not args.no_run:
        results = measure()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + '\n')
    text = render(load_results(args.results))
    print(text)
    if args.readme:
        update_readme(args.readme, text, README_START, README_END)
    return 0


if __name__ == '__main__':
    sys.exit(main())
