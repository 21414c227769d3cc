"""Run (or resume) the CIFAR-10 reproduction runs with ``zoo-train``, a few at a time.

Every run is an ordinary ``zoo-train fit -c <config> --trainer.max_epochs <epochs>``, so one
schedule is shared by all. A run that already has a test top-1 in its logs is skipped; one with a
``checkpoints/last.ckpt`` is resumed from it (``--ckpt_path last``), so the queue can be stopped
at any time and started again. On a small CPU machine, two one-thread runs side by side train
about 1.4x faster in total than one run using both cores. The thread count is logged with each
start: on CPU it changes float summation order, so a run resumed with other threads drifts slightly
from an uninterrupted one.

    python benchmarks/cifar_runs.py --epochs 15 --jobs 2 \\
        configs/cifar10/resnet20_wsbcn.yaml configs/cifar10/resnet20_b128.yaml ...
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_results import read_run  # noqa: E402

DEFAULT_CONFIGS = [f'configs/cifar10/{name}.yaml' for name in (
    'resnet20_wsbcn', 'resnet20_b128', 'resnet20', 'resnet20_gn', 'resnet20_wsgn', 'resnet20_bgn')]


def run_dir_of(config: Path) -> Path:
    """The run folder a config writes to (its ``trainer.default_root_dir``)."""
    cfg = yaml.safe_load(Path(config).read_text())
    return Path(cfg['trainer']['default_root_dir'])


def is_finished(run_dir: Path) -> bool:
    try:
        read_run(run_dir)
        return True
    except (FileNotFoundError, ValueError):
        return False


def train_command(config: Path, epochs: int, resume: bool) -> List[str]:
    cmd = ['zoo-train', 'fit', '-c', str(config), '--trainer.max_epochs', str(epochs),
           '--trainer.enable_progress_bar', 'false']
    return cmd + (['--ckpt_path', 'last'] if resume else [])


def run_one(config: Path, epochs: int, threads: int) -> int:
    run_dir = run_dir_of(config)
    if is_finished(run_dir):
        print(f'[skip] {config}: finished ({run_dir})', flush=True)
        return 0
    resume = (run_dir / 'checkpoints' / 'last.ckpt').is_file()
    cmd = train_command(config, epochs, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f'[{"resume" if resume else "start"}] {" ".join(cmd)}  (threads: {threads}, log: {run_dir / "train.log"})', flush=True)
    start = time.time()
    with open(run_dir / 'train.log', 'a') as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f'[{"done" if rc == 0 else f"failed rc={rc}"}] {config} after {(time.time() - start) / 60:.1f} min',
          flush=True)
    return rc


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', type=Path, default=[Path(c) for c in DEFAULT_CONFIGS])
    parser.add_argument('--epochs', type=int, required=True, help='the one schedule shared by every run')
    parser.add_argument('--jobs', type=int, default=2, help='runs side by side')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda c: run_one(c, args.epochs, threads), args.configs))
    return max(codes, default=0)


if __name__ == '__main__':
    raise SystemExit(main())
