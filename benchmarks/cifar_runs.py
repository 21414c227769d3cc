"""Run (or resume) the CIFAR-10 reproduction runs with ``zoo-train``, a few at a time.

Every run is an ordinary ``zoo-train fit -c <config> --trainer.max_epochs <epochs>``, so one
schedule is shared by all. A run that already has a test top-1 in its logs is skipped; one with a
``checkpoints/last.ckpt`` is resumed from it (``--ckpt_path last``), so the queue can be stopped
at any time and started again. On a small CPU machine, two one-thread runs side by side train
about 1.4x faster in total than one run using both cores. The thread count is logged with each
start: on CPU it changes float summation order, so a run resumed with other threads drifts slightly
from an uninterrupted one; each start also writes it into the run's ``train.log``, and each end its
wall time (a run's training time is the sum over its starts).

    python benchmarks/cifar_runs.py --epochs 15 --jobs 2 \\
        configs/cifar10/resnet20_wsbcn.yaml configs/cifar10/resnet20_b128.yaml ...

Other seeds of the same configs: ``--seeds 1 2`` runs each config once per seed, seed N in
``<run folder>_seedN`` (``runs/cifar10/resnet20_wsbcn_seed1``), with ``seed_everything: N`` (which
also seeds the data order and augmentation). The config's own seed keeps its own folder, so
``--seeds 0 1 2`` skips the finished seed-0 runs. The seed and the new folders reach ``zoo-train``
as a second config, ``seed.yaml`` in the run folder; ``benchmarks/cifar_results.py`` groups the
seeds of a config and reports their mean and spread.

    python benchmarks/cifar_runs.py --epochs 15 --jobs 1 --threads 1 configs/cifar10/resnet20_wsbcn.yaml --seeds 1

Every finished run's logs (LightningCLI's ``config.yaml``, the CSVLogger's ``metrics.csv``, and
``train.log`` with the thread count of each start) are copied to
``benchmarks/results/cifar10_runs/<run>/``, a few kB per run, to be committed: ``runs/`` is not
kept, so the results of runs finished in different sessions (the seeds of one configuration) can
be put together by ``cifar_results.py``, which reads those folders like run folders.
"""
import argparse
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from cifar_results import read_run  # a sibling script: on the path when run as one

DEFAULT_CONFIGS = [f'configs/cifar10/{name}.yaml' for name in (
    'resnet20_wsbcn', 'resnet20_b128', 'resnet20', 'resnet20_gn', 'resnet20_wsgn', 'resnet20_bgn')]


def run_dir_of(config: Path, seed: Optional[int] = None) -> Path:
    """The run folder of ``config`` (its ``trainer.default_root_dir``), or of its run with ``seed``."""
    cfg = yaml.safe_load(Path(config).read_text())
    try:
        run_dir = Path(cfg['trainer']['default_root_dir'])
    except (KeyError, TypeError):
        raise ValueError(f'{config}: no trainer.default_root_dir, so its runs have no folder of their own') from None
    if seed is None or seed == cfg.get('seed_everything'):
        return run_dir
    return run_dir.with_name(f'{run_dir.name}_seed{seed}')


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` with every path under the folder ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + '/')):
        return new + value[len(old):]
    return value


def seed_override(config: Path, seed: int) -> Optional[Dict[str, Any]]:
    """The second config that turns ``config`` into its run with ``seed``: the seed, and every
    setting that names the run folder (root dir, logger, checkpoints) moved to the seed's folder.
    None for the config's own seed."""
    cfg = yaml.safe_load(Path(config).read_text())
    old, new = str(run_dir_of(config)), str(run_dir_of(config, seed))
    if old == new:
        return None
    override: Dict[str, Any] = {'seed_everything': seed}
    for section, value in cfg.items():  # only the keys that change: the rest comes from the config
        if isinstance(value, dict):
            changed = {k: _moved(v, old, new) for k, v in value.items() if _moved(v, old, new) != v}
            if changed:
                override[section] = changed
    return override


def seed_override_path(run_dir: Path) -> Path:
    """Where a seed's second config (:func:`seed_override`) is written in its run folder."""
    return run_dir / 'seed.yaml'


ARCHIVE_DIR = Path('benchmarks/results/cifar10_runs')
ARCHIVED_LOGS = ('config.yaml', 'hparams.yaml', 'metrics.csv')


def archive_run(run_dir: Path, archive_dir: Optional[Path] = None, extra: Sequence[str] = ()) -> Path:
    """Copy a finished run's logs (not its checkpoints) to ``archive_dir / <run>`` (default
    :data:`ARCHIVE_DIR`), in the run folder's own layout, so ``cifar_results.py`` reads the copy as the run.
    ``extra``: other files of the run folder to keep (glob patterns relative to it, e.g. prediction pictures)."""
    dest = (archive_dir or ARCHIVE_DIR) / run_dir.name
    for version in sorted(run_dir.glob('logs/version_*')):
        for name in ARCHIVED_LOGS:
            if (version / name).is_file():
                (dest / 'logs' / version.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(version / name, dest / 'logs' / version.name / name)
    if (run_dir / 'train.log').is_file():
        shutil.copy2(run_dir / 'train.log', dest / 'train.log')
    for pattern in extra:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file():
                (dest / path.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / path.relative_to(run_dir))
    return dest


def is_finished(run_dir: Path, metric: str = 'test/top1') -> bool:
    try:
        read_run(run_dir, metric)
        return True
    except (FileNotFoundError, ValueError):
        return False


@dataclass
class Queue:
    """What a benchmark's runs share: the test metric that marks a run finished, where finished runs'
    logs go, the run-folder files kept with them, and a step run after each finished run
    (``after(config, run_dir, override, threads)``, e.g. pictures of its predictions)."""
    metric: str = 'test/top1'
    archive_dir: Optional[Path] = None  # None: ARCHIVE_DIR
    extra: Sequence[str] = ()
    after: Optional[Callable[[Path, Path, Optional[Path], int], None]] = None


def train_command(config: Path, epochs: int, resume: bool, override: Optional[Path] = None) -> List[str]:
    cmd = ['zoo-train', 'fit', '-c', str(config)] + (['-c', str(override)] if override else [])
    cmd += ['--trainer.max_epochs', str(epochs), '--trainer.enable_progress_bar', 'false']
    return cmd + (['--ckpt_path', 'last'] if resume else [])


def run_one(config: Path, epochs: int, threads: int, seed: Optional[int] = None, queue: Queue = Queue()) -> int:
    run_dir = run_dir_of(config, seed)
    name = f'{config} (seed {seed})' if seed is not None else str(config)
    if is_finished(run_dir, queue.metric):
        if queue.after is not None:  # idempotent: makes what a cut-off earlier start did not
            override_path = seed_override_path(run_dir)
            queue.after(config, run_dir, override_path if override_path.is_file() else None, threads)
        print(f'[skip] {name}: finished ({run_dir}; logs in {archive_run(run_dir, queue.archive_dir, queue.extra)})',
              flush=True)
        return 0
    resume = (run_dir / 'checkpoints' / 'last.ckpt').is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    override = seed_override(config, seed) if seed is not None else None
    override_path = None
    if override is not None:
        override_path = seed_override_path(run_dir)
        override_path.write_text(f'# written by benchmarks/cifar_runs.py: {config} with seed {seed}\n'
                                 + yaml.safe_dump(override, sort_keys=False))
    cmd = train_command(config, epochs, resume, override_path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    what = 'resume' if resume else 'start'
    print(f'[{what}] {" ".join(cmd)}  (threads: {threads}, log: {run_dir / "train.log"})', flush=True)
    start = time.time()
    with open(run_dir / 'train.log', 'a') as log:
        stamp = time.strftime('%Y-%m-%d %H:%M:%S %Z')
        log.write(f'[cifar_runs] {what} at {stamp}, threads: {threads} (OMP_NUM_THREADS): {" ".join(cmd)}\n')
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        minutes, outcome = (time.time() - start) / 60, 'done' if rc == 0 else f'failed rc={rc}'
        log.write(f'[cifar_runs] {outcome} after {minutes:.1f} min at {time.strftime("%Y-%m-%d %H:%M:%S %Z")}, '
                  f'threads: {threads}\n')
    print(f'[{outcome}] {name} after {minutes:.1f} min', flush=True)
    if rc == 0 and is_finished(run_dir, queue.metric):
        if queue.after is not None:
            queue.after(config, run_dir, override_path, threads)
        print(f'[archived] {name}: logs in {archive_run(run_dir, queue.archive_dir, queue.extra)} (commit them)',
              flush=True)
    return rc


def main(argv: Sequence[str] = None, default_configs: Sequence[str] = DEFAULT_CONFIGS, queue: Queue = Queue(),
         description: str = __doc__) -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', type=Path, default=[Path(c) for c in default_configs])
    parser.add_argument('--epochs', type=int, required=True, help='the one schedule shared by every run')
    parser.add_argument('--jobs', type=int, default=2, help='runs side by side')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help="run each config with these seeds (default: the config's own), seed N in <run folder>_seedN; "
                             'after the configs, as in: CONFIG ... --seeds 1 2')
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(c, seed) for c in args.configs for seed in (args.seeds or [None])]
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda run: run_one(run[0], args.epochs, threads, run[1], queue), runs))
    return max(codes, default=0)


if __name__ == '__main__':
    raise SystemExit(main())
