"""zoo-train's process settings: CPU threads beside loader workers, and Lightning's tips dropped."""
import logging

import pytest
import torch

from lightning_modules.runtime import default_cpu_threads, quiet_known_noise, set_cpu_threads


def test_threads_leave_the_cores_the_workers_use():
    assert default_cpu_threads(num_workers=1, cores=2) == 1
    assert default_cpu_threads(num_workers=0, cores=2) == 2
    assert default_cpu_threads(num_workers=8, cores=4) == 1
    assert default_cpu_threads(num_workers=2, cores=16) == 14


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_explicit_omp_num_threads_wins(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert set_cpu_threads(num_workers=0) == 1
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert set_cpu_threads(num_workers=0) == default_cpu_threads(0)


def test_lightning_tips_are_dropped_and_other_info_kept(caplog):
    from lightning.pytorch.utilities import rank_zero_info
    quiet_known_noise()
    with caplog.at_level(logging.INFO, logger='lightning.pytorch.utilities.rank_zero'):
        rank_zero_info('💡 Tip: install something')
        rank_zero_info('GPU available: False')
    assert [r.getMessage() for r in caplog.records] == ['GPU available: False']
