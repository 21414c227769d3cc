"""Process settings ``zoo-train`` picks before a run: CPU threads, and quiet for known noise.

CPU threads: torch's default (one thread per core) plus DataLoader workers oversubscribes small
machines; on 2 shared cores training ran about 7x slower than with one torch thread (issue 15:
0.08 vs 0.59 steps/s). Workers already use one torch thread each (torch sets that in every worker),
so the main process gets the cores the workers leave: ``max(1, cores - workers)``. An explicit
``OMP_NUM_THREADS`` (or ``torch.set_num_threads`` before the CLI) is left alone.

Noise: Lightning's product tips and deprecation warnings raised inside Lightning's own code say
nothing about the user's run; they are dropped by message, nothing else is.
"""
import logging
import os
import warnings

import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ['available_cores', 'default_cpu_threads', 'set_cpu_threads', 'quiet_known_noise']

# Messages of Lightning's info logs and warnings that are never about the user's run.
_TIP_PREFIX = '💡 Tip:'
_KNOWN_DEPRECATIONS = (
    r'`isinstance\(treespec, LeafSpec\)` is deprecated',  # lightning.pytorch.utilities._pytree on torch >= 2.9
)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cpu_threads(num_workers: int, cores: int = 0) -> int:
    """Torch threads for the training process when ``num_workers`` loader workers share ``cores``."""
    return max(1, (cores or available_cores()) - max(0, num_workers))


def set_cpu_threads(num_workers: int) -> int:
    """Apply :func:`default_cpu_threads` unless ``OMP_NUM_THREADS`` is set; returns the threads in use."""
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(default_cpu_threads(num_workers))
        how = f'{available_cores()} cores - {num_workers} loader workers (set OMP_NUM_THREADS to override)'
    else:
        how = f'OMP_NUM_THREADS={os.environ["OMP_NUM_THREADS"]}'
    threads = torch.get_num_threads()
    rank_zero_info(f'CPU threads: {threads} for training, 1 per loader worker ({how})')
    return threads


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP_PREFIX)


def quiet_known_noise() -> None:
    """Drop Lightning's product tips and its own known deprecation warnings (idempotent)."""
    for name in ('lightning.pytorch.utilities.rank_zero', 'lightning.fabric.utilities.rank_zero'):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    for message in _KNOWN_DEPRECATIONS:
        warnings.filterwarnings('ignore', message=message)
