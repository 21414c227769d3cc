"""The memory tools: freeze_norms (frozen-affine baseline), peak measurement, the batch-size helper
and its command line, and benchmarks/bench_memory.py's ratios and tables."""
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from torchvision.ops import FrozenBatchNorm2d

import zoo
from zoo import memory
from zoo.layers import EstimatedBatchNorm2d, WSConv2d
from zoo.layers.frozen_affine import _targets, freeze_norms, is_norm
from zoo.memory import (MiB, OptionUnavailable, Setup, build_model, max_images_per_device, measure_peak,
                        measure_setup, parse_bytes)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(task='classify', model='resnet20_wsbcn', img_size=(16, 16))


# ---------------------------------------------------------------------------- freeze_norms

def _norms(model):
    return [m for m in model.modules() if is_norm(m)]


@pytest.mark.parametrize('name', ['resnet20_wsbcn', 'resnet20_bgn', 'resnet20_wsgn', 'resnet20'])
def test_freeze_norms_replaces_every_norm(name):
    model = timm.create_model(name).train()
    x = torch.randn(2, 3, 16, 16)
    shape = model(x).shape
    n_norms = len(_targets(model))  # outermost norms (a BCN's batch stage is part of its BCN)
    n_ws = sum(isinstance(m, WSConv2d) for m in model.modules())
    assert n_norms > 0
    freeze_norms(model, calibrate=lambda m: m(x))
    assert _norms(model) == []
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == n_norms
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == n_ws  # WS convs kept
    assert all(not list(f.parameters()) for f in frozen)  # buffers only: nothing of them trains
    out = model(x)
    assert out.shape == shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_freeze_norms_kinds_kept_and_activation():
    keep = FrozenBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), keep, nn.GroupNorm(2, 4), EstimatedBatchNorm2d(4),
                          BatchNormAct2d(4, act_layer=nn.ReLU))
    freeze_norms(model)
    assert model[2] is keep
    assert all(isinstance(model[i], FrozenBatchNorm2d) for i in (1, 3, 4))
    assert isinstance(model[5], nn.Sequential) and isinstance(model[5][-1], nn.ReLU)  # timm's norm-act keeps its act
    assert (model(torch.randn(1, 3, 8, 8)) >= 0).all()
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith('0.'))


def test_freeze_norms_calibrated_is_the_batch_norm_of_that_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    nn.init.uniform_(model[1].weight, 0.5, 2)
    nn.init.uniform_(model[1].bias, -1, 1)
    x = torch.randn(4, 3, 10, 10) * 3 + 1
    expected = model(x)  # training mode: normalized with this batch's statistics
    freeze_norms(model, calibrate=lambda m: m(x))
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_freeze_norms_detector_heads():
    model = zoo.create_detector('maskrcnn_resnet18_fpn_wsbcn', num_classes=3)
    assert len(_norms(model)) > 0
    freeze_norms(model)
    assert _norms(model) == []
    assert not any(isinstance(m, FrozenBatchNorm2d) and list(m.parameters()) for m in model.modules())


# ---------------------------------------------------------------------------- measuring

def test_peak_grows_with_images():
    build, batch, kwargs = memory.setup_measurer(Setup(**TINY, option='lean'))
    one, two = (measure_peak(build, batch, n, **kwargs) for n in (1, 2))
    assert two['peak_bytes'] > one['peak_bytes'] > one['live_at_step_start_bytes'] > 0
    assert one['loss_finite'] and one['recomputed_modules'] == 0
    again = measure_peak(build, batch, 2, **kwargs)
    assert again['peak_bytes'] == two['peak_bytes']  # allocator events: exact, repeatable


def test_measure_in_fresh_process_matches():
    """The same step measured in a fresh process and in this one: equal up to what earlier tests in this
    process leave behind (lazily initialised kernels' buffers: 24 KB of 3.9 MB was seen in a full run)."""
    setup = Setup(**TINY)
    fresh = measure_setup(setup, 2, fresh_process=True)['peak_bytes']
    assert measure_setup(setup, 2, fresh_process=False)['peak_bytes'] == pytest.approx(fresh, rel=0.02)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def _tiny_batch(n):
    return torch.randn(n, 3, 24, 24), torch.randint(0, 10, (n,))


def test_max_images_per_device_is_the_largest_measured_fit():
    peaks = {n: measure_peak(_Tiny, _tiny_batch, n)['peak_bytes'] for n in range(1, 7)}
    assert all(peaks[n + 1] > peaks[n] for n in range(1, 6))
    lines = []
    for n in (1, 3, 5):
        budget = (peaks[n] + peaks[n + 1]) // 2
        fit = max_images_per_device(_Tiny, _tiny_batch, budget, progress=lines.append)
        assert fit.images == n
        assert fit.peak_bytes == peaks[n] <= budget < peaks[n + 1] == fit.next_peak_bytes
        assert {n, n + 1} <= set(fit.measurements) and not fit.capped
    assert lines and 'image(s): peak' in lines[0]
    assert max_images_per_device(_Tiny, _tiny_batch, peaks[1] - 1, progress=None).images == 0
    capped = max_images_per_device(_Tiny, _tiny_batch, 10 * peaks[6], max_images=4, progress=None)
    assert capped.images == 4 and capped.capped


@pytest.mark.parametrize('curve', [lambda n: 300 + 26 * n, lambda n: 300 + n ** 2, lambda n: 300 + 2 ** n,
                                   lambda n: 300 + 5 * n + 1000 * (n > 40), lambda n: 1000 + 40 * n ** 1.5])
@pytest.mark.parametrize('budget', [1000, 1024, 5000, 60_000])
def test_max_images_search_finds_the_bracket(monkeypatch, curve, budget):
    """The search on made-up peak curves (no model): the exact answer, in few measurements."""
    calls = []

    def fake_measure(fn, build, batch, n, **kwargs):
        calls.append(n)
        return {'peak_bytes': int(curve(n))}

    monkeypatch.setattr(memory, '_call', fake_measure)
    fit = max_images_per_device(None, None, budget, max_images=256, progress=None)
    expected = max([0] + [n for n in range(1, 257) if curve(n) <= budget])
    assert fit.images == expected and len(calls) == len(set(calls)) <= 12
    if 0 < expected < 256:
        assert curve(expected + 1) > budget and fit.next_peak_bytes == int(curve(expected + 1))


def test_max_images_from_min_images(monkeypatch):
    def fake_measure(fn, build, batch, n, **kwargs):
        if n < 2:
            raise ValueError('Expected more than 1 value per channel when training')
        return {'peak_bytes': 100 * n}

    monkeypatch.setattr(memory, '_call', fake_measure)
    with pytest.raises(ValueError, match='more than 1 value'):
        max_images_per_device(None, None, 1000, progress=None)
    fit = max_images_per_device(None, None, 1000, min_images=2, progress=None)
    assert fit.images == 10 and min(fit.measurements) == 2
    assert max_images_per_device(None, None, 150, min_images=2, progress=None).images == 0


def test_parse_bytes():
    assert parse_bytes('4GiB') == 4 * 2 ** 30
    assert parse_bytes('512MiB') == 512 * MiB == parse_bytes('512M')
    assert parse_bytes('2.5GB') == 2_500_000_000
    with pytest.raises(ValueError, match='not a size'):
        parse_bytes('4 parsecs')


# ---------------------------------------------------------------------------- options

def test_unavailable_checkpoint_flag_is_reported_not_faked():
    with pytest.raises(OptionUnavailable, match='checkpoint'):  # timm's own ResNet takes no such flag
        build_model(Setup(task='classify', model='resnet10t', option='checkpoint'))
    with pytest.raises(OptionUnavailable, match='recomputed'):  # a flag accepted but without effect
        measure_peak(_Tiny, _tiny_batch, 1, expect_recompute=True)


def test_setup_options():
    assert Setup(**TINY, option='plain').lean is False
    assert Setup(**TINY, option='checkpoint').lean is True and Setup(**TINY, option='checkpoint').checkpoints
    assert Setup(**TINY, option='frozen').lean is True and Setup(**TINY).lean is None
    with pytest.raises(ValueError, match='checkpoint-heads'):
        Setup(**TINY, option='checkpoint-heads')


# ---------------------------------------------------------------------------- command line

def test_cli_unknown_model_names_close_matches(capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(['--model', 'resnet50_wsbnc', '--img-size', '64', '--budget', '1GiB'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown model 'resnet50_wsbnc'" in err and 'resnet50_wsbcn' in err
    with pytest.raises(SystemExit):
        memory.main(['--task', 'detect', '--model', 'maskrcnn_resnet50_fpn_wsbnc', '--img-size', '64',
                     '--budget', '1GiB'])
    assert 'maskrcnn_resnet50_fpn_wsbcn' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(['--model', 'maskrcnn_resnet50_fpn_wsbcn', '--img-size', '64', '--budget', '1GiB'])
    assert '--task detect' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(['--model', 'resnet20_wsbcn', '--img-size', '64', '--budget', 'lots'])
    assert 'not a size' in capsys.readouterr().err


def test_cli_table_in_process(capsys, tmp_path):
    results = memory.main(['--model', 'resnet20_wsbcn', '--img-size', '16', '--budget', '6MiB',
                           '--options', 'lean', 'frozen', '--in-process', '--max-images', '8',
                           '--baseline', 'resnet20', '--out', str(tmp_path / 'fit.json')])
    out = capsys.readouterr().out
    lean, frozen = results['resnet20_wsbcn', 'lean'], results['resnet20_wsbcn', 'frozen']
    assert 1 <= lean.images <= frozen.images  # frozen affine norms keep fewer activations
    assert '| resnet20_wsbcn | lean |' in out and 'image(s): peak' in out
    saved = json.loads((tmp_path / 'fit.json').read_text())
    assert results['resnet20', None].images >= 1 and '| resnet20 | as built |' in out
    assert [r['images'] for r in saved['results']] == [results['resnet20', None].images, lean.images, frozen.images]
    assert '| resnet20_wsbcn | frozen |' in (tmp_path / 'fit.md').read_text()


# ---------------------------------------------------------------------------- bench_memory.py

def _bench_memory():
    spec = importlib.util.spec_from_file_location('bench_memory', REPO / 'benchmarks' / 'bench_memory.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_memory_ratios_table_and_goals(tmp_path):
    bm = _bench_memory()
    args = bm.parse_args(['--tasks', 'classify', '--cls-images', '2', '8', '--out', str(tmp_path / 'r.json')])
    keys = [k for k, _ in bm.CONFIGS['classify']]
    times = {'classify': {n: {k: [1.0 + 0.1 * i, 1.2 + 0.1 * i] for i, k in enumerate(keys)} for n in (2, 8)}}
    times['classify'][8]['checkpoint'] = {'unavailable': 'no checkpoint_stages'}
    memory_ = {'classify': {n: {k: {'peak_bytes': (100 + 10 * i) * MiB, 'loss_finite': True}
                                for i, k in enumerate(keys)} for n in (2, 8)}}
    results = bm.summarize(args, memory_, times)
    lean = results['classify']['2']['lean']
    assert lean['time_vs_bn'] == pytest.approx(1.2 / 1.1) and lean['memory_vs_bn'] == pytest.approx(1.1)
    assert lean['memory_vs_frozen'] == pytest.approx(110 / 140)
    assert 'unavailable' in results['classify']['8']['checkpoint']
    goals = bm.check_goals(results)
    verdicts = {(g['images'], g['what']): g['met'] for g in goals}
    assert verdicts == {(2, 'memory'): False, (2, 'time'): True, (8, 'memory'): False, (8, 'time'): True}
    report = {'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              'environment': {'device_name': 'x', 'threads': 1, 'torch': torch.__version__},
              'results': results, 'goals': goals}
    md = bm.markdown(report)
    assert '| resnet50_wsbcn lean | 2 | 1.2 | 1.09 [1.08-1.10] | 0.80 [0.79-0.81] | 110 | 1.10 | 0.79 |' in md
    assert '**missed**' in md and '**met**' in md
    path = tmp_path / 'r.json'
    path.write_text(json.dumps(report))
    assert bm.render(path) == md == path.with_suffix('.md').read_text()


@pytest.mark.slow
def test_bench_memory_quick_smoke(tmp_path):
    bm = _bench_memory()
    out = tmp_path / 'quick.json'
    bm.main(['--quick', '--tasks', 'classify', '--cls-model', 'resnet20_wsbcn', '--cls-baseline', 'resnet20',
             '--img-size', '16', '--cls-images', '2', '--threads', '1', '--out', str(out)])
    report = json.loads(out.read_text())
    rows = report['results']['classify']['2']
    assert set(rows) == {'bn', 'lean', 'plain', 'checkpoint', 'frozen'}
    assert rows['bn']['label'] == 'resnet20 (BN; reference)'
    assert all('peak_bytes' in r or 'unavailable' in r for r in rows.values())
    assert rows['lean']['memory_vs_bn'] > 0 and rows['lean']['time_vs_frozen'] > 0
    assert out.with_suffix('.md').read_text().startswith('**Classification**')
