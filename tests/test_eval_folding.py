"""Eval folding (zoo.layers.eval_folding): a zoo model in eval with autograd off folds BCN's batch
stage into the WS conv before it, and gives the outputs of the unfolded layers in every case."""
import copy
import threading

import pytest
import timm
import torch
import torch.nn as nn

import zoo  # noqa: F401
from zoo.layers import BatchChannelNorm2d, WSConv2d, set_bcn_batch_stage
from zoo.layers.batch_channel_norm import _FusedBCN


def _trained_like(name, **kwargs):
    """A model whose BCN statistics and affines are not at their init values (folding must move them)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchChannelNorm2d):
                m.bn.running_mean.uniform_(-0.5, 0.5)
                m.bn.running_var.uniform_(0.5, 2.)
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-0.3, 0.3)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _bcn_layers(model):
    return [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]


class _PathCounter:
    """Counts BCN calls that ran only the channel stage (folded) and ones that ran the fused batch stage."""

    def __init__(self, monkeypatch):
        self.folded = self.unfolded = 0
        channel_stage, inference = BatchChannelNorm2d._channel_stage, _FusedBCN.inference

        def counted_channel_stage(layer, x, *args):
            self.folded += 1
            return channel_stage(layer, x, *args)

        def counted_inference(*args):
            self.unfolded += 1
            return inference(*args)
        monkeypatch.setattr(BatchChannelNorm2d, '_channel_stage', counted_channel_stage)
        monkeypatch.setattr(_FusedBCN, 'inference', staticmethod(counted_inference))


def _close(out, ref):
    """Equal up to float32 rounding, which accumulates over depth: relative to the largest output."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _unfolded(model, x):
    """The reference: the same model with autograd on (folding never applies), outputs detached."""
    with torch.enable_grad():
        return model(x).detach()


@pytest.mark.parametrize('name, shape', [
    ('resnet20_wsbcn', (2, 3, 32, 32)),
    ('resnet50_wsbcn', (1, 3, 64, 64)),
    ('tsm_resnet50_wsbcn', (1, 3, 2, 64, 64)),
])
def test_eval_without_autograd_folds_every_bcn_and_keeps_outputs(name, shape, monkeypatch):
    kwargs = {'num_segments': 2} if name.startswith('tsm') else {}
    model = _trained_like(name, **kwargs)
    x = torch.randn(shape)
    ref = _unfolded(model, x)
    counter = _PathCounter(monkeypatch)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = model(x)
        _close(out, ref)
    assert counter.folded == 2 * len(_bcn_layers(model)) and counter.unfolded == 0
    # The folded outputs equal the deployable export's (the same computation, folded in float64 there).
    with torch.no_grad():
        _close(model(x), zoo.export_for_inference(model)(x))


def test_batch_mode_bcn_folds_in_eval(monkeypatch):
    model = set_bcn_batch_stage(_trained_like('resnet20_wsbcn'), 'batch').eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _unfolded(model, x)
    counter = _PathCounter(monkeypatch)
    with torch.no_grad():
        _close(model(x), ref)
    assert counter.folded == len(_bcn_layers(model))


def test_training_and_autograd_never_fold(monkeypatch):
    model = _trained_like('resnet20_wsbcn')
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    counter = _PathCounter(monkeypatch)
    model(x).sum().backward()  # eval with autograd: saliency maps, adversarial inputs
    assert x.grad is not None and counter.folded == 0
    model.train()
    with torch.no_grad():
        model(x)
    assert counter.folded == 0


def test_folds_follow_parameter_and_statistics_changes():
    model = _trained_like('resnet20_wsbcn')
    other = _trained_like('resnet20_wsbcn')
    with torch.no_grad():
        for m in _bcn_layers(other):
            m.bn.running_mean.add_(0.2)
            m.bn.weight.mul_(1.3)
        for m in other.modules():
            if isinstance(m, WSConv2d):
                m.weight.mul_(-1.)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    model.load_state_dict(other.state_dict())  # in-place copies into parameters and buffers
    with torch.no_grad():
        after = model(x)
    _close(after, _unfolded(model, x))
    assert not torch.allclose(after, before, atol=1e-3)
    with torch.no_grad():  # one statistic of one layer, changed in place
        model.layer2[0].bn1.bn.running_var.mul_(4.)
        changed = model(x)
    _close(changed, _unfolded(model, x))
    assert not torch.allclose(changed, after, atol=1e-4)


def test_replaced_modules_are_never_folded():
    """A norm replaced after the model was built (or after a folded call) must not get a folded input."""
    model = _trained_like('resnet20_wsbcn')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # pairs found and weights folded
    block = model.layer1[0]
    block.bn1 = nn.Identity()
    block.conv2 = WSConv2d(16, 16, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        out = model(x)
    _close(out, _unfolded(model, x))


def test_hooks_see_the_unfolded_tensors():
    model = _trained_like('resnet20_wsbcn')
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    conv, norm = model.layer1[0].conv1, model.layer1[0].bn1
    conv.register_forward_hook(lambda m, args, out: seen.__setitem__('conv_out', out.clone()))
    norm.register_forward_pre_hook(lambda m, args: seen.__setitem__('norm_in', args[0].clone()))
    with torch.no_grad():
        out = model(x)
        stem = model.bn1(model.conv1(x)).relu()  # modules called one by one: nothing folds
        plain = torch.nn.functional.conv2d(stem, conv.standardized_weight(), None, 1, 1)
    torch.testing.assert_close(seen['norm_in'], seen['conv_out'])
    torch.testing.assert_close(seen['conv_out'], plain)
    _close(out, _unfolded(model, x))


def test_concurrent_threads_on_one_model_get_their_own_outputs():
    model = _trained_like('resnet20_wsbcn')
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    refs = [_unfolded(model, x) for x in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                with torch.no_grad():
                    _close(model(inputs[i]), refs[i])
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_copies_and_train_after_eval_stay_correct():
    model = _trained_like('resnet20_wsbcn')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.layer3[0].bn2.bn.running_mean.add_(1.)
        _close(twin(x), _unfolded(twin, x))
        _close(model(x), _unfolded(model, x))
    model.train()
    assert all(m._fold_cache is None for m in model.modules() if isinstance(m, WSConv2d))
    model(x).sum().backward()
    assert model.conv1.weight.grad is not None


def test_fx_traced_models_do_not_fold(monkeypatch):
    """Tracing runs no forward of the real model: the graph must not capture a fold, and runs unfolded."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = _trained_like('resnet20_wsbcn')
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    with torch.no_grad():
        last = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)[1][-1]
        graph = create_feature_extractor(model, return_nodes=[last], tracer_kwargs=tracer_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    counter = _PathCounter(monkeypatch)
    with torch.no_grad():
        out = graph(x)[last]
    assert counter.folded == 0 and counter.unfolded == len(_bcn_layers(model))
    _close(out, _unfolded(model, x))


def test_detector_backbone_and_segmenter_fold_in_eval(monkeypatch):
    """The dense-task models run at 1-2 images in eval: their backbones (and FPN, DeepLab heads) fold too."""
    torch.manual_seed(0)
    detector = zoo.create_detector('fasterrcnn_resnet50_fpn_wsbcn', num_classes=3, min_size=128, max_size=128).eval()
    segmenter = zoo.create_segmenter('deeplabv3_resnet18_wsbcn', num_classes=3).eval()
    # Folded too: in DeepLab, ASPP's image-pooling branch (a Sequential subclass whose forward runs it in order).
    cases = ((detector.backbone, torch.randn(1, 3, 128, 128), 0), (segmenter, torch.randn(1, 3, 96, 96), 0))
    for model, x, unfolded in cases:
        with torch.enable_grad():
            ref = model(x)
        counter = _PathCounter(monkeypatch)
        with torch.no_grad():
            out = model(x)
        assert counter.folded == len(_bcn_layers(model)) - unfolded and counter.unfolded == unfolded
        for key in ref:
            _close(out[key], ref[key].detach())
    detector.train()  # detector training is unchanged: its backbone's pairs are dropped and nothing folds
    assert '_fold_pairs' not in detector.backbone.__dict__
