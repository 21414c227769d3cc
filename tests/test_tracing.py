"""Tracing: torch.fx (with timm's notrace lists, as timm's own model tests trace, and plain), TorchScript,
torch.export and the meta device.

The zoo's layers are timm notrace modules (FX records them as one call and runs their forward,
with its training-mode branches, at run time); the input checks are notrace functions. Without
timm's lists (``torch.fx.symbolic_trace``, torchvision's extractor, quantize_fx) the norms still
record themselves as one node (:mod:`zoo.layers.fx_leaf`) and WS convs trace to a standardization
node and a conv. Model-level checks of both, and timm's model tests: test_timm_citizen.py.
"""
import copy
import functools

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import zoo  # noqa: F401 (registers the zoo models in timm)
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, memory_lean
from zoo.layers.temporal_shift import TemporalShift
from zoo.models import NORM_VARIANTS, ZOO_MODELS, ZOO_TSM_MODELS
from zoo.models.tsm import TSM_VARIANTS

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:FutureWarning')

FX_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)

# Every code path of the registry: each variant of each family and block type (BasicBlock,
# Bottleneck, grouped Bottleneck). Deeper models repeat the same blocks; all names: -m slow.
TRACE_NAMES = (
    [f'resnet20{s}' for s in ('', *(f'_{v}' for v in NORM_VARIANTS))]
    + [f'resnet18_{v}' for v in NORM_VARIANTS]
    + ['resnet50_wsbcn', 'resnext50_32x4d_wsbgn']
    + [f'tsm_resnet18_{v}' for v in TSM_VARIANTS])

# (model, input shape, model kwargs) run for real: every CIFAR variant, the ImageNet and video families.
RUN_CASES = [(f'resnet20{s}', (2, 3, 16, 16), {}) for s in ('', *(f'_{v}' for v in NORM_VARIANTS))] + [
    ('resnet18_wsbcn', (2, 3, 32, 32), {}),
    ('tsm_resnet18_wsbcn', (1, 3, 4, 32, 32), dict(num_segments=4, num_classes=5)),
]


def _model(name, kwargs=None, **more):
    """A model whose norm affines and running statistics are off their init (zero-init last norms hide branches)."""
    model = timm.create_model(name, **dict(kwargs or {}, **more))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, (EstimatedBatchNorm2d, BatchGroupNorm2d, torch.nn.BatchNorm2d)) and m.running_mean is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1000)
    return model


def _fx_model(model):
    """The whole model as an FX GraphModule, built as timm's test_models.py does (torchvision's extractor)."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_KWARGS)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=FX_KWARGS)


def _fx_out(fx_model, x):
    (out,) = fx_model(x).values()
    return out


def _zoo_layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (WSConv2d, BatchChannelNorm2d, BatchGroupNorm2d))]


def _check_traces(name):
    model = timm.create_model(name, device='meta')  # no weights to initialise: tracing needs shapes only
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_KWARGS)
    assert model.training
    layers = _zoo_layer_names(model)
    assert bool(layers) == any(tag in name for tag in ('ws', 'bcn', 'bgn'))
    for nodes in (train_nodes, eval_nodes):
        assert set(layers) <= set(nodes)  # each zoo layer is one node (a leaf) ...
        assert not [n for n in nodes if any(n.startswith(f'{layer}.') for layer in layers)]  # ... not traced into
        assert nodes[-1] == 'fc'


@pytest.mark.parametrize('name', TRACE_NAMES)
def test_fx_traces_every_variant_in_train_and_eval(name):
    _check_traces(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', ZOO_MODELS)
def test_fx_traces_every_registered_model(name):
    _check_traces(name)


@pytest.mark.parametrize('name, shape, kwargs', RUN_CASES)
def test_fx_forward_and_backward_equal_eager(name, shape, kwargs):
    """Train mode (estimates / running stats updated, gradients) and eval mode give eager's exact results."""
    x = torch.randn(shape) * 2 + 0.5
    eager = _model(name, kwargs).train()
    traced = _fx_model(copy.deepcopy(eager))
    assert traced.training
    eager(x).logsumexp(1).mean().backward()
    _fx_out(traced, x).logsumexp(1).mean().backward()
    eager_params, traced_params = dict(eager.named_parameters()), dict(traced.named_parameters())
    assert eager_params.keys() == traced_params.keys()
    for n, p in eager_params.items():
        assert traced_params[n].grad is not None, n
        torch.testing.assert_close(traced_params[n].grad, p.grad, rtol=0, atol=0, msg=n)
    traced_buffers = dict(traced.named_buffers())
    for n, b in eager.named_buffers():  # the training step updated the statistics alike
        assert torch.equal(traced_buffers[n], b), n
    eager.eval()
    traced.eval()
    with torch.enable_grad():  # eval with autograd: eager runs the layers unfolded, as the graph does
        expected = eager(x).detach()
        assert torch.equal(_fx_out(traced, x).detach(), expected)
    with torch.no_grad():  # eager folds BCN's batch stage into the convs (zoo.layers.eval_folding), FX does not
        torch.testing.assert_close(_fx_out(traced, x), eager(x), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert expected.shape[0] == shape[0] and torch.isfinite(expected).all()


@pytest.mark.parametrize('name, shape, kwargs', [RUN_CASES[1], RUN_CASES[-2], RUN_CASES[-1]])  # wsbcn of each family
def test_torchvision_feature_extractor_gives_the_intermediates(name, shape, kwargs):
    model = _model(name, kwargs).eval()
    stages = [info['module'] for info in model.feature_info]
    x = torch.randn(shape)
    extractor = create_feature_extractor(model, return_nodes=stages, tracer_kwargs=FX_KWARGS)
    with torch.enable_grad():  # unfolded, as the graph runs (eager eval without autograd folds: see above)
        features = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert list(features) == stages
    for got, want in zip(features.values(), expected):
        assert torch.equal(got, want)
    timm_fx = timm.create_model(name, features_only=True, feature_cls='fx', **kwargs)  # timm's own FX features
    timm_fx.load_state_dict(model.state_dict(), strict=False)
    assert [f.shape for f in timm_fx.eval()(x)] == [f.shape for f in expected]


def test_fx_graph_keeps_the_input_checks():
    """The input check is one node of the graph, run on the real input: a wrong input still gets the clear error."""
    traced = _fx_model(timm.create_model('resnet20_wsbcn').eval())
    with pytest.raises(ValueError, match='single image'):
        traced(torch.randn(3, 16, 16))
    video = _fx_model(timm.create_model('tsm_resnet18_wsgn', num_segments=2, num_classes=3).eval())
    with pytest.raises(ValueError, match=r'\(B, T, C, H, W\)'):
        video(torch.randn(1, 2, 3, 16, 16))


# --- plain FX (no timm lists) and TorchScript, layer by layer ------------------------------------

def _train_step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize('build', [torch.fx.symbolic_trace, torch.jit.script], ids=['symbolic_trace', 'script'])
def test_plain_fx_and_torchscript_of_every_layer_give_eager_outputs_gradients_and_statistics(build):
    """FX graphs run the norms' own forward: exactly eager's. Scripted layers run plain paths (two-stage BCN,
    Welford moments for the estimates): equal to float32 rounding.

    Plain FX splits a WS conv into standardization and conv nodes, and TorchScript runs plain formulas:
    autograd's graphs, so eager runs its plain path too (the lean path equals it to rounding: test_memory_lean)."""
    exact = build is torch.fx.symbolic_trace
    with memory_lean(False):
        _check_fx_or_script_against_eager(build, exact)


def _check_fx_or_script_against_eager(build, exact):
    check = torch.equal if exact else functools.partial(torch.allclose, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 8, 8) * 2 + 0.5
    eager = _off_init(_layer_stack()).train()
    eager(torch.randn(2, 3, 8, 8))  # statistics off their init
    traced = build(copy.deepcopy(eager))
    for _ in range(2):
        eager.zero_grad()
        traced.zero_grad()
        assert check(_train_step(traced, x), _train_step(eager, x))
        params = dict(traced.named_parameters())
        for n, p in eager.named_parameters():
            assert check(params[n].grad, p.grad), n
        buffers = dict(traced.named_buffers())
        for n, b in eager.named_buffers():
            assert check(buffers[n], b), n
    eager.eval()
    traced.eval()  # a graph traced in train mode: the norms switch at run time, as torch's BatchNorm does
    with torch.no_grad():
        assert check(traced(x), eager(x))


def test_scripted_layers_skip_non_finite_updates_and_count_them():
    model = torch.jit.script(_off_init(_layer_stack()).train())
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float('nan')
    model(x)
    buffers = dict(model.named_buffers())
    for n in before:  # the zoo layers kept their statistics and counted the skip; torch's BatchNorm does not skip
        if n.startswith(('1.', '4.', '8.')) and n.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            assert torch.equal(buffers[n], before[n]), n
        if n.endswith('num_skipped_updates'):
            assert int(buffers[n]) == 1, n


def test_torchscript_of_layer_options():
    """BGN without running statistics, estimated BN without affine, a channels_last WS conv and TSM's shift script
    and trace too; a norm traced on its own (not in a model) says how to trace it."""
    x = torch.randn(2, 8, 6, 6)
    for layer in (BatchGroupNorm2d(8, num_groups=2, track_running_stats=False), EstimatedBatchNorm2d(8, affine=False),
                  WSConv2d(8, 4, 3, ws_formula='bit').to(memory_format=torch.channels_last),
                  TemporalShift(2, shift_div=4)):
        for train in (True, False):
            eager = layer.train(train)
            scripted = torch.jit.script(copy.deepcopy(eager))
            traced = torch.fx.symbolic_trace(torch.nn.Sequential(copy.deepcopy(eager)))
            want = eager(x)
            torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-6)
            assert torch.equal(traced(x), want)
    with pytest.raises(torch.fx.proxy.TraceError, match=r'symbolic_trace\(nn.Sequential\(layer\)\)'):
        torch.fx.symbolic_trace(BatchChannelNorm2d(8, num_groups=2))


@pytest.mark.parametrize('name', [n if n == 'tsm_resnet18_wsbcn' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ZOO_TSM_MODELS])
def test_plain_fx_of_video_models_equals_eager(name):
    """TSM's temporal shift (a forward pre-hook of each block's first conv) is one node of a plain FX graph too."""
    x = torch.randn(1, 3, 4, 32, 32) * 2 + 0.5
    eager = _model(name, dict(num_segments=4, num_classes=5)).train()
    for traced, run in ((torch.fx.symbolic_trace(copy.deepcopy(eager)), lambda m: m(x)),
                        (create_feature_extractor(copy.deepcopy(eager), return_nodes={'fc': 'out'}), lambda m: m(x)['out'])):
        model = copy.deepcopy(eager).train()
        traced.train()
        assert torch.equal(run(traced), model(x))
        assert all(torch.equal(b, dict(traced.named_buffers())[n]) for n, b in model.named_buffers())
        model.eval()
        traced.eval()
        with torch.enable_grad():
            assert torch.equal(run(traced), model(x))
    nodes = [n.target for n in torch.fx.symbolic_trace(eager).graph.nodes if n.op == 'call_module']
    assert 'layer1.0.temporal_shift' in nodes or 'bn' in name


# --- torch.export ---------------------------------------------------------------------------

def _layer_stack():
    """Every zoo layer, in both BCN batch stages, in one small network."""
    return torch.nn.Sequential(
        WSConv2d(3, 8, 3, padding=1), BatchChannelNorm2d(8, num_groups=2), torch.nn.ReLU(),
        WSConv2d(8, 8, 3, padding=1, ws_formula='ws'), BatchGroupNorm2d(8, num_groups=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1), BatchChannelNorm2d(8, num_groups=4, batch_stage='batch'),
        EstimatedBatchNorm2d(8))


def _off_init(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize('train', [True, False])
def test_torch_export_of_every_layer_gives_eager_outputs_gradients_and_statistics(train):
    x = torch.randn(2, 3, 8, 8) * 2 + 0.5
    eager = _off_init(_layer_stack()).train()
    eager(torch.randn(2, 3, 8, 8))  # statistics off their init
    eager.train(train)
    before = {n: b.clone() for n, b in eager.named_buffers()}
    program = torch.export.export(copy.deepcopy(eager), (x,))
    module = program.module()
    got, expected = module(x), eager(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    buffers = dict(module.named_buffers())
    changed = False
    for n, b in eager.named_buffers():  # train mode: the same statistics update
        torch.testing.assert_close(buffers[n], b, rtol=1e-6, atol=1e-7, msg=n)
        changed |= not torch.equal(b, before[n])
    assert changed == train
    got.square().mean().backward()
    expected.square().mean().backward()
    params = dict(module.named_parameters())
    assert params.keys() == dict(eager.named_parameters()).keys()
    for n, p in eager.named_parameters():
        torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _check_export(name, shape, kwargs, train=False):
    x = torch.randn(shape) * 2 + 0.5
    eager = _model(name, kwargs).train(train)
    program = torch.export.export(copy.deepcopy(eager), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, shape, kwargs', [RUN_CASES[1], RUN_CASES[-1]])
def test_torch_export_of_model_families_gives_eager_outputs(name, shape, kwargs):
    """CIFAR and TSM (whose body is the ImageNet ResNet); every layer in both modes: the test above; all: -m slow."""
    _check_export(name, shape, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('name, shape, kwargs', RUN_CASES[:-2] + [
    (f'resnet18_{v}', (2, 3, 32, 32), {}) for v in NORM_VARIANTS] + [
    (f'tsm_resnet18_{v}', (1, 3, 4, 32, 32), dict(num_segments=4, num_classes=5)) for v in TSM_VARIANTS])
def test_torch_export_of_every_variant(name, shape, kwargs, train):
    _check_export(name, shape, kwargs, train)


# --- meta device ------------------------------------------------------------------------------

@pytest.mark.parametrize('name, shape, kwargs', [
    ('resnet20_wsbcn', (2, 3, 16, 16), {}), ('resnet20_wsbgn', (2, 3, 16, 16), {}),
    ('resnet20_bcn', (2, 3, 16, 16), dict(norm_kwargs=dict(batch_stage='batch'))),
    ('tsm_resnet18_wsbcn', (1, 3, 2, 16, 16), dict(num_segments=2, num_classes=5))])
def test_meta_device_creation_forward_and_backward(name, shape, kwargs):
    """Shapes without memory (e.g. to plan a large model): creation, train and eval forward, backward."""
    model = timm.create_model(name, device='meta', **kwargs)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}
    x = torch.randn(shape, device='meta')
    out = model(x)
    out.sum().backward()
    assert out.is_meta and out.shape == (shape[0], model.num_classes)
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == out.shape
