"""The zoo's image models as first-class timm and torchvision citizens.

1. timm's own model checks: the checks of timm 1.0.31's ``tests/test_models.py`` (forward, backward,
   default cfgs, features_only, forward_intermediates, FX forward / backward with timm's tracer,
   TorchScript eager and through FX), written again here (no timm code vendored, nothing
   fetched), over the zoo's registered image models (ImageNet and CIFAR ResNets, every variant).
   Where timm only checks shapes and NaNs, outputs are also compared with eager ones.
2. Plain FX: ``torch.fx.symbolic_trace`` and torchvision's ``create_feature_extractor`` without
   timm's notrace lists, in train and eval: outputs, gradients and the norms' statistics updates
   equal eager; the graph scripts too.
3. TorchScript of the deployable form (``zoo.export_for_inference``).
4. FX graph-mode int8 quantization of shipped CIFAR-10 weights, scored against the float model.

Default run: ``resnet20`` in every variant (tiny CIFAR models that still hold every zoo layer) and
``resnet18_wsbcn`` (the ImageNet family's own forward); every other name: ``-m slow``. TSM models
take 5-D clips: they are skipped by the image checks and traced with clips in test_tracing.py.
"""
import copy
import io
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models import FeatureInfo
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import zoo
from zoo.layers import BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, memory_lean, standardize_weight
from zoo.models import NORM_VARIANTS, ZOO_CIFAR_MODELS, ZOO_IMAGENET_MODELS, ZOO_TSM_MODELS, CifarResNet, ZooResNet
from zoo.models.cifar_resnet import CIFAR10_CLASSES

# timm's test sizes: longest input side per check (a larger default input size is cut down to it).
FWD_SIZE, BWD_SIZE, JIT_SIZE, FEAT_SIZE, FX_SIZE, CFG_MAX_SIZE = 384, 128, 128, 96, 128, 448
TIMM_FX_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                      param_shapes_constant=True)

DEFAULT_NAMES = ('resnet20', *(f'resnet20_{v}' for v in NORM_VARIANTS), 'resnet18_wsbcn')
TSM_SKIP = 'TSM models take 5-D (B, C, T, H, W) clips; these are image-model checks (clips: test_tracing.py)'


def _params(names):
    return [n if n in DEFAULT_NAMES else pytest.param(n, marks=pytest.mark.slow) for n in names]


IMAGE_MODELS = _params(ZOO_IMAGENET_MODELS + ZOO_CIFAR_MODELS)
# TSM names are skipped, with the reason; one of them in the default run, to show it.
ALL_MODELS = IMAGE_MODELS + [pytest.param(n, marks=[pytest.mark.skip(reason=TSM_SKIP)] + (
    [] if n == 'tsm_resnet18_wsbcn' else [pytest.mark.slow])) for n in ZOO_TSM_MODELS]
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:FutureWarning')


def _input_size(model, target=None):
    size = tuple(model.pretrained_cfg['input_size'])
    if target and max(size) > target:
        size = tuple(min(s, target) for s in size)
    return size


def _no_nan(t):
    return not torch.isnan(t).any()


def _timm_fx_model(model):
    """The model as a GraphModule, built as timm's tests build it (torchvision's extractor, timm's notrace lists)."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TIMM_FX_KWARGS)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TIMM_FX_KWARGS)


def _fx_out(fx_model, x):
    (out,) = fx_model(x).values()
    return out


def _assert_close_to(got, want):
    """Equal to float32 rounding (eager eval without autograd folds BCN into the convs; graphs do not)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1., float(want.abs().max())))


def _off_init(model):
    """Norm affines off their init (zero-init last norms would hide whole branches), and running
    statistics of a real forward pass: random ones let eval activations of deep WS + BN / BGN models
    (WS convs scale the variance by their fan-in) overflow."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        stat_layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchGroupNorm2d))]
        momenta = [m.momentum for m in stat_layers]
        for m in stat_layers:
            m.momentum = 1.  # the statistics of this one batch
        for m in model.modules():
            if isinstance(m, EstimatedBatchNorm2d):
                m.num_batches_tracked.zero_()  # the first update takes the batch's statistics
        training = model.training
        model.train()(torch.randn(2, *_input_size(model, FX_SIZE)))
        model.train(training)
        for m, momentum in zip(stat_layers, momenta):
            m.momentum = momentum
    return model


# --- 1. timm's model checks -----------------------------------------------------------------------

@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward(name):
    model = timm.create_model(name).eval()
    out = model(torch.randn(1, *_input_size(model, FWD_SIZE)))
    assert out.shape == (1, model.num_classes) and _no_nan(out)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *_input_size(model, BWD_SIZE)))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {n}'
    assert out.shape == (2, 42) and _no_nan(out)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_default_cfgs(name):
    model = timm.create_model(name).eval()
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    for key in ('input_size', 'pool_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier'):
        assert key in cfg, key
    assert max(cfg['input_size']) <= CFG_MAX_SIZE
    x = torch.randn(1, *cfg['input_size'])
    features = model.forward_features(x)
    assert features.shape[1] == model.num_features and tuple(features.shape[-2:]) == tuple(cfg['pool_size'])
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    pooled = model(x)
    assert pooled.shape == pre_logits.shape == (1, model.num_features)
    model.reset_classifier(0, '')
    unpooled = model(x)
    assert unpooled.ndim == 4 and tuple(unpooled.shape[-2:]) == tuple(cfg['pool_size'])
    for key in ('classifier', 'first_conv'):
        assert f'{cfg[key]}.weight' in state_dict, key


def _check_features(model, size, features):
    info = model.feature_info
    if not isinstance(info, FeatureInfo):  # a classifier's list of dicts (features_only models have the class)
        info = FeatureInfo(info, list(range(len(info))))
    channels, reductions = info.channels(), info.reduction()
    assert len(channels) >= 3 and len(features) == len(channels)
    for c, r, f in zip(channels, reductions, features):
        assert f.shape[:2] == (1, c) and _no_nan(f)
        assert f.shape[-2] <= math.ceil(size[-2] / r) + 1 and f.shape[-1] <= math.ceil(size[-1] / r) + 1


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_features(name, feature_cls):
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    size = _input_size(model, FEAT_SIZE)
    features = model(torch.randn(1, *size))
    _check_features(model, size, features)
    assert [f.shape[1] for f in features] == model.feature_info.channels()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    size = _input_size(model, FEAT_SIZE)
    x = torch.randn(1, *size)
    out, intermediates = model.forward_intermediates(x)
    _check_features(model, size, intermediates)
    assert torch.allclose(out, model.forward_features(x))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_fx(name):
    """timm checks ``torch.all(fx == eager)``; here exactly against eager with autograd on (unfolded, as the
    graph runs) and to rounding against eager without autograd (which folds BCN into the convs)."""
    model = _off_init(timm.create_model(name)).eval()
    x = torch.randn(1, *_input_size(model, FX_SIZE))
    fx_model = _timm_fx_model(model)
    with torch.enable_grad():
        assert torch.equal(_fx_out(fx_model, x), model(x))
    with torch.no_grad():
        got, want = _fx_out(fx_model, x), model(x)
    _assert_close_to(got, want)
    assert got.shape == (1, model.num_classes) and _no_nan(got)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_backward_fx(name):
    model = timm.create_model(name, num_classes=42).train()
    fx_model = _timm_fx_model(model)
    out = _fx_out(fx_model, torch.randn(2, *_input_size(model, FX_SIZE)))
    out.mean().backward()
    for n, p in fx_model.named_parameters():
        assert p.grad is not None, f'no gradient for {n}'
    assert sum(p.numel() for p in fx_model.parameters()) == sum(p.numel() for p in model.parameters())
    assert out.shape == (2, 42) and _no_nan(out)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = _off_init(timm.create_model(name)).eval()
    x = torch.randn(1, *_input_size(model, JIT_SIZE))
    with torch.no_grad():
        want = model(x)  # also fills the eager caches, which scripting must ignore
    scripted = torch.jit.script(model)
    with torch.no_grad():
        got = scripted(x)
    assert got.shape == (1, model.num_classes) and _no_nan(got)
    _assert_close_to(got, want)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_fx_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = _off_init(timm.create_model(name)).eval()
    x = torch.randn(1, *_input_size(model, JIT_SIZE))
    scripted = torch.jit.script(_timm_fx_model(model))
    with torch.no_grad():
        got, want = _fx_out(scripted, x), model(x)
    assert got.shape == (1, model.num_classes) and _no_nan(got)
    _assert_close_to(got, want)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_forward_torchscript_with_features_fx(name):
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        features = scripted(torch.randn(1, *_input_size(model, JIT_SIZE)))
    assert isinstance(features, list) and len(features) == len(model.feature_info.channels())
    assert all(f.shape[0] == 1 and _no_nan(f) for f in features)


# --- 2. plain FX: torch.fx.symbolic_trace and torchvision's extractor without timm's lists ----------

def _plain_fx_builders():
    return {
        'symbolic_trace': torch.fx.symbolic_trace,
        'create_feature_extractor': lambda m: create_feature_extractor(m, return_nodes={'fc': 'out'}),
    }


def _out(result):
    return result['out'] if isinstance(result, dict) else result


def _assert_train_step_equal(eager, traced, x):
    """One train-mode forward and backward: outputs, every gradient and every buffer (statistics) equal."""
    eager.train()
    traced.train()
    out_e, out_t = eager(x), _out(traced(x))
    assert torch.equal(out_t, out_e)
    out_e.logsumexp(1).mean().backward()
    out_t.logsumexp(1).mean().backward()
    traced_params = dict(traced.named_parameters())
    assert traced_params.keys() == dict(eager.named_parameters()).keys()
    for n, p in eager.named_parameters():
        assert torch.equal(traced_params[n].grad, p.grad), n
    traced_buffers = dict(traced.named_buffers())
    for n, b in eager.named_buffers():
        assert torch.equal(traced_buffers[n], b), n


def _assert_eval_equal(eager, traced, x):
    """Eval outputs, and gradients with autograd on (saliency, fine-tuning in eval mode), equal."""
    eager.eval()
    traced.eval()
    eager.zero_grad()
    traced.zero_grad()
    with torch.enable_grad():  # unfolded eager, as the graph runs
        out_e, out_t = eager(x), _out(traced(x))
        assert torch.equal(out_t, out_e)
        out_e.logsumexp(1).mean().backward()
        out_t.logsumexp(1).mean().backward()
    traced_params = dict(traced.named_parameters())
    for n, p in eager.named_parameters():
        assert torch.equal(traced_params[n].grad, p.grad), n
    with torch.no_grad():
        _assert_close_to(_out(traced(x)), eager(x))


@pytest.mark.parametrize('builder', list(_plain_fx_builders()))
@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_plain_fx_equals_eager_in_train_and_eval(name, builder):
    """Traced without timm's notrace lists; the graph is traced in train mode, then switched to eval.

    A plainly traced WS conv is autograd's graph of the formula (standardization and conv nodes), so eager
    runs its plain path too (the memory-lean path equals it to rounding: test_memory_lean)."""
    with memory_lean(False):
        _check_plain_fx_against_eager(name, builder)


def _check_plain_fx_against_eager(name, builder):
    build = _plain_fx_builders()[builder]
    eager = _off_init(timm.create_model(name)).train()
    x = torch.randn(2, *_input_size(eager, FX_SIZE)) * 2 + 0.5
    traced = build(copy.deepcopy(eager))
    before = {n: b.clone() for n, b in eager.named_buffers()}
    for _ in range(2):  # two steps: the second uses (and updates) statistics the first one updated
        eager.zero_grad()
        traced.zero_grad()
        _assert_train_step_equal(eager, traced, x)
    stats = [n for n, b in eager.named_buffers() if n.endswith('running_mean')]
    assert all(not torch.equal(eager.get_buffer(n), before[n]) for n in stats)  # the steps updated them
    _assert_eval_equal(eager, traced, x)
    _assert_eval_equal(eager, build(copy.deepcopy(eager).eval()), x)  # traced in eval


@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_plain_fx_graph_scripts(name):
    model = _off_init(timm.create_model(name)).eval()
    x = torch.randn(1, *_input_size(model, JIT_SIZE))
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))
    with torch.no_grad():
        _assert_close_to(scripted(x), model(x))


def test_plain_fx_graph_shows_the_ws_convs_and_keeps_the_norms_whole():
    """WS convs trace to ``standardize_conv_weight`` and a conv (what quantize_fx quantizes); the norms with
    running statistics are ``call_module`` nodes, as torch's BatchNorm is."""
    model = timm.create_model('resnet20_wsbcn')
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    called = {node.target for node in graph.nodes if node.op == 'call_module'}
    functions = [node.target.__name__ for node in graph.nodes if node.op == 'call_function']
    ws_convs = [n for n, m in modules.items() if isinstance(m, WSConv2d)]
    assert functions.count('standardize_conv_weight') == functions.count('conv2d') == len(ws_convs)
    assert not called & set(ws_convs)
    assert {n for n, m in modules.items() if isinstance(m, zoo.BatchChannelNorm2d)} <= called
    assert not [t for t in called if t.endswith('.bn')]  # each BCN is one node, not its stages


# --- 3. TorchScript of the deployable form ------------------------------------------------------------

@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_export_for_inference_scripts_saves_and_loads(name):
    model = _off_init(timm.create_model(name)).eval()
    deploy = zoo.export_for_inference(model)
    x = torch.randn(2, *_input_size(model, JIT_SIZE))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(deploy), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        _assert_close_to(loaded(x), deploy(x))
        _assert_close_to(loaded(x), model(x))
    if isinstance(model, (ZooResNet, CifarResNet)):  # not timm's own resnet50_gn, which the zoo does not shadow
        with pytest.raises(Exception, match='single image'):  # the input check is scripted along
            loaded(x[0])


# --- 4. FX graph-mode int8 quantization ---------------------------------------------------------------

ARCHIVE = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
N_TEST, N_CALIBRATION = 500, 256
TEST_STRIDE, CALIBRATION_STRIDE = 20, 195  # every 20th of the 10,000 test images, every 195th train image


@pytest.fixture(scope='module')
def cifar10():
    """(calibration images, test images, test labels), read straight from the shared archive (every
    class, as the archive holds them by class) and preprocessed with the models' data config."""
    if not ARCHIVE.is_file():
        pytest.skip(f'CIFAR-10 archive not found at {ARCHIVE}')
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=timm.create_model('resnet20')))
    seen = {'train': 0, 'test': 0}
    picked = {'train': [], 'test': []}
    with tarfile.open(ARCHIVE, 'r:gz') as tar:
        for member in tar:
            parts = member.name.split('/')
            if not (member.isfile() and len(parts) == 3 and parts[0] in seen):
                continue
            split = parts[0]
            if seen[split] % (TEST_STRIDE if split == 'test' else CALIBRATION_STRIDE) == 0:
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')
                picked[split].append((transform(image), CIFAR10_CLASSES.index(parts[1])))
            seen[split] += 1
    assert seen == {'train': 50_000, 'test': 10_000} and len(picked['test']) == N_TEST
    calibration = torch.stack([x for x, _ in picked['train'][:N_CALIBRATION]])
    return calibration, torch.stack([x for x, _ in picked['test']]), torch.tensor([y for _, y in picked['test']])


def quantize_int8(model, calibration):
    """``quantize_fx`` post-training static int8 (x86 backend defaults), calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping('x86'), (calibration[:1],))
    with torch.no_grad():
        for batch in calibration.split(128):
            prepared(batch)
    return convert_fx(prepared)


@pytest.mark.parametrize('name', ['resnet20_wsgn.cifar10', 'resnet20_wsbcn.cifar10'])
def test_quantize_fx_int8_keeps_the_accuracy_of_shipped_weights(name, cifar10):
    calibration, images, labels = cifar10
    model = timm.create_model(name, pretrained=True).eval()
    int8 = quantize_int8(model, calibration)
    with torch.no_grad():
        float_pred, int8_pred = model(images).argmax(1), int8(images).argmax(1)
    float_top1 = (float_pred == labels).float().mean().item() * 100
    int8_top1 = (int8_pred == labels).float().mean().item() * 100
    print(f'{name}: {N_TEST} CIFAR-10 test images, top-1 float {float_top1:.2f}%, int8 {int8_top1:.2f}%')
    assert float_top1 > 80 and int8_top1 >= float_top1 - 2
    assert (float_pred == int8_pred).float().mean() > 0.9
    # The convs run as quantized kernels whose int8 weights are the *standardized* weights.
    packed = int8.conv1_packed_weight_0.unpack()[0]
    assert packed.is_quantized and packed.qscheme() == torch.per_channel_affine
    w_hat = standardize_weight(model.conv1.weight.detach(), model.conv1.ws_formula)
    step = packed.q_per_channel_scales().float().view(-1, 1, 1, 1)
    assert ((packed.dequantize() - w_hat).abs() <= step / 2 + 1e-6).all()


# --- docs/deployment.md -------------------------------------------------------------------------------

DEPLOYMENT_DOC = Path(__file__).resolve().parents[1] / 'docs' / 'deployment.md'


def _python_blocks(path):
    return re.findall(r'^```python\n(.*?)^```', path.read_text(), flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(_python_blocks(DEPLOYMENT_DOC))))
def test_deployment_doc_python_blocks_run_as_written(index, tmp_path):
    """Each block on its own, in a fresh interpreter (no variable from an earlier block), from an empty folder."""
    code = _python_blocks(DEPLOYMENT_DOC)[index]
    env = {**os.environ, 'PYTHONPATH': str(DEPLOYMENT_DOC.parents[1]), 'HF_HUB_OFFLINE': '1'}
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f'block {index} failed:\n{code}\n{result.stderr[-3000:]}'
