"""benchmarks/cifar_runs.py: which runs the queue skips, resumes or starts, with what command."""
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('cifar_runs', ROOT / 'benchmarks' / 'cifar_runs.py')
cifar_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar_runs)


def test_every_queued_config_exists_and_has_its_own_run_folder():
    configs = [ROOT / c for c in cifar_runs.DEFAULT_CONFIGS] + [
        ROOT / 'configs/cifar10/resnet56_wsbcn.yaml', ROOT / 'configs/cifar10/resnet56_b128.yaml']
    run_dirs = [cifar_runs.run_dir_of(c) for c in configs]
    assert len(set(run_dirs)) == len(configs)
    for config, run_dir in zip(configs, run_dirs):
        cfg = yaml.safe_load(config.read_text())
        callbacks = cfg['trainer']['callbacks']
        ckpt = next(c['init_args'] for c in callbacks if c['class_path'].endswith('ModelCheckpoint'))
        assert Path(ckpt['dirpath']) == run_dir / 'checkpoints' and ckpt['save_last'], config


def _config(tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / 'runs' / name
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump({'trainer': {'default_root_dir': str(run_dir)}}))
    return path


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_call(cmd, stdout, stderr, env):
        seen.append((cmd, env['OMP_NUM_THREADS']))
        return 3 if 'broken' in cmd[3] else 0
    monkeypatch.setattr(cifar_runs.subprocess, 'call', fake_call)
    return seen


def test_queue_skips_finished_resumes_checkpointed_and_starts_new(tmp_path, calls, make_run):
    finished, checkpointed, fresh = (_config(tmp_path, n) for n in ('finished', 'checkpointed', 'fresh'))
    make_run(tmp_path / 'runs', 'finished', 'resnet20', 128, 1, [0.8])
    (tmp_path / 'runs' / 'checkpointed' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'runs' / 'checkpointed' / 'checkpoints' / 'last.ckpt').write_bytes(b'x')

    assert cifar_runs.main([str(finished), str(checkpointed), str(fresh), '--epochs', '3', '--threads', '1']) == 0
    by_config = {cmd[3]: (cmd, threads) for cmd, threads in calls}
    assert set(by_config) == {str(checkpointed), str(fresh)}  # the finished run is not trained again
    resume_cmd, threads = by_config[str(checkpointed)]
    assert resume_cmd[:2] == ['zoo-train', 'fit'] and resume_cmd[-2:] == ['--ckpt_path', 'last'] and threads == '1'
    fresh_cmd, _ = by_config[str(fresh)]
    assert '--ckpt_path' not in fresh_cmd
    assert fresh_cmd[fresh_cmd.index('--trainer.max_epochs') + 1] == '3'
    assert (tmp_path / 'runs' / 'fresh' / 'train.log').is_file()


def test_a_failed_run_fails_the_queue(tmp_path, calls):
    assert cifar_runs.main([str(_config(tmp_path, 'broken')), str(_config(tmp_path, 'ok')), '--epochs', '1']) == 3
    assert len(calls) == 2  # the other run still ran
