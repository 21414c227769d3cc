"""benchmarks/cifar_runs.py: which runs the queue skips, resumes or starts, with what command."""
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
import cifar_results  # benchmarks/ scripts (pytest's pythonpath)  # noqa: E402
import cifar_runs  # noqa: E402


def test_every_queued_config_exists_and_has_its_own_run_folder():
    configs = [ROOT / c for c in cifar_runs.DEFAULT_CONFIGS] + [ROOT / f'configs/cifar10/{name}.yaml' for name in (
        'resnet56_wsbcn', 'resnet56_b128', 'resnet20_wsbcn_b1', 'resnet20_bgn_g1', 'resnet20_bgn_g2')]
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
def calls(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cifar_runs, 'ARCHIVE_DIR', tmp_path / 'archive')  # not the repository's

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
    log = (tmp_path / 'runs' / 'fresh' / 'train.log').read_text().splitlines()  # each start and end, with threads
    assert log[0].startswith('[cifar_runs] start at ') and 'threads: 1 ' in log[0]
    assert re.fullmatch(r'\[cifar_runs\] done after \d+\.\d min at .+, threads: 1', log[-1]), log[-1]
    # The finished run's logs are archived (to be committed), and read back as the run itself.
    archived = tmp_path / 'archive' / 'finished'
    assert sorted(p.name for p in archived.rglob('*') if p.is_file()) == ['config.yaml', 'metrics.csv']
    original = cifar_results.read_run(tmp_path / 'runs' / 'finished')
    copy = cifar_results.read_run(archived)
    assert (copy.run, copy.test_top1, copy.test_step, copy.settings) == (
        original.run, original.test_top1, original.test_step, original.settings)


def test_a_failed_run_fails_the_queue(tmp_path, calls):
    assert cifar_runs.main([str(_config(tmp_path, 'broken')), str(_config(tmp_path, 'ok')), '--epochs', '1']) == 3
    assert len(calls) == 2  # the other run still ran
    log = (tmp_path / 'runs' / 'broken' / 'train.log').read_text().splitlines()
    assert log[-1].startswith('[cifar_runs] failed rc=3 after ')


def test_seeds_run_in_their_own_folders_with_the_config_otherwise_unchanged(tmp_path, calls):
    config = tmp_path / 'wsbcn.yaml'
    run_dir = str(tmp_path / 'runs' / 'wsbcn')
    config.write_text(yaml.safe_dump({
        'seed_everything': 0,
        'trainer': {'default_root_dir': run_dir, 'max_epochs': 160,
                    'logger': {'class_path': 'CSVLogger', 'init_args': {'save_dir': run_dir, 'name': 'logs'}},
                    'callbacks': [{'class_path': 'ModelCheckpoint', 'init_args': {'dirpath': run_dir + '/checkpoints'}}]},
        'model': {'init_args': {'model_name': 'resnet20_wsbcn', 'lr': 0.1}}}))
    assert cifar_runs.main([str(config), '--epochs', '15', '--threads', '1', '--seeds', '0', '1']) == 0
    cmds = sorted(cmd for cmd, _ in calls)
    assert len(cmds) == 2
    own, seed1 = sorted(cmds, key=len)
    assert own[:4] == ['zoo-train', 'fit', '-c', str(config)] and own.count('-c') == 1  # seed 0: the config as it is
    override = Path(run_dir + '_seed1') / 'seed.yaml'
    assert seed1[:6] == ['zoo-train', 'fit', '-c', str(config), '-c', str(override)]
    assert yaml.safe_load(override.read_text()) == {
        'seed_everything': 1,
        'trainer': {'default_root_dir': run_dir + '_seed1',
                    'logger': {'class_path': 'CSVLogger', 'init_args': {'save_dir': run_dir + '_seed1', 'name': 'logs'}},
                    'callbacks': [{'class_path': 'ModelCheckpoint',
                                   'init_args': {'dirpath': run_dir + '_seed1/checkpoints'}}]}}
    for folder in (run_dir, run_dir + '_seed1'):  # each start names its thread count in the run's own log
        assert 'threads: 1 (OMP_NUM_THREADS)' in (Path(folder) / 'train.log').read_text()


@pytest.mark.parametrize('groups', [1, 2])
def test_bgn_group_configs_reach_the_layers(groups):
    import zoo
    from zoo.layers import BatchGroupNorm2d
    cfg = yaml.safe_load((ROOT / f'configs/cifar10/resnet20_bgn_g{groups}.yaml').read_text())
    args = cfg['model']['init_args']
    model = zoo.create_model(args['model_name'], num_classes=10, **args['model_kwargs'])
    norms = [m for m in model.modules() if isinstance(m, BatchGroupNorm2d)]
    assert norms and {m.num_groups for m in norms} == {groups}
    base = yaml.safe_load((ROOT / 'configs/cifar10/resnet20_bgn.yaml').read_text())
    assert cfg['data'] == base['data'] and cfg['seed_everything'] == base['seed_everything']
    assert {k: v for k, v in args.items() if k != 'model_kwargs'} == base['model']['init_args']


def test_one_image_per_device_config_keeps_the_global_batch_and_schedule():
    cfg = yaml.safe_load((ROOT / 'configs/cifar10/resnet20_wsbcn_b1.yaml').read_text())
    base = yaml.safe_load((ROOT / 'configs/cifar10/resnet20_wsbcn.yaml').read_text())
    data, base_data = cfg['data']['init_args'], base['data']['init_args']
    assert (data['batch_size'], data['virtual_devices']) == (1, 128)
    assert data['batch_size'] * data['virtual_devices'] == base_data['batch_size'] * base_data['virtual_devices']
    assert cfg['model'] == base['model'] and cfg['trainer']['max_epochs'] == base['trainer']['max_epochs']


def test_wsbcn_at_one_image_per_device_is_the_two_image_computation():
    """What resnet20_wsbcn_b1.yaml's comment says: the same images per step, and WS+BCN (no per-device
    statistics) gives the same loss and gradients for 1 x 2K as for 2 x K images, up to float order."""
    import torch
    import zoo
    from lightning_modules.emulation import virtual_devices
    from lightning_modules.samplers import VirtualDeviceSampler

    def steps(devices, per_device, n=50000):  # the CIFAR-10 training set
        sampler = VirtualDeviceSampler(range(n), per_device, num_replicas=devices, ranks=range(devices))
        sampler.set_epoch(1)
        keys = list(sampler)
        return [sorted(keys[i:i + 128]) for i in range(0, len(keys), 128)]
    assert steps(64, 2) == steps(128, 1)

    two, one = (zoo.create_model('resnet20_wsbcn', num_classes=10).train() for _ in range(2))
    one.load_state_dict(two.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # the sampler's batch of 2 x 4 devices from that of 1 x 8
    with virtual_devices(two, 4):
        loss_two = torch.nn.functional.cross_entropy(two(x[order]), y[order])
    with virtual_devices(one, 8):
        loss_one = torch.nn.functional.cross_entropy(one(x), y)
    loss_two.backward()
    loss_one.backward()
    torch.testing.assert_close(loss_one, loss_two)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
