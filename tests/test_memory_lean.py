"""The memory-lean training path (zoo.layers.memory_lean): the plain path's values and gradients,
with less kept for backward."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import zoo  # noqa: F401  (registers the zoo models)
from zoo.layers import (WS_FORMULAS, BatchChannelNorm2d, BatchGroupNorm2d, WSConv2d, memory_lean, memory_lean_enabled,
                        set_memory_lean)

CONV_CONFIGS = {
    'bias': dict(bias=True, padding=1),
    'grouped_strided_dilated': dict(bias=False, groups=2, stride=2, dilation=2, padding=2),
    'reflect_padding': dict(padding_mode='reflect', padding=1),
}


def _fixed_weights(like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(7))


def _lean_and_plain(module: nn.Module, x: torch.Tensor):
    """Output, input gradient, parameter gradients and buffers of one training step, lean then plain."""
    results = []
    for lean in (True, False):
        m = copy.deepcopy(module)
        xi = x.detach().clone().requires_grad_()
        with memory_lean(lean):
            y = m(xi)
        (y.float() * _fixed_weights(y).float()).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()] + [b.clone() for b in m.buffers()])
    return results


def _assert_same(lean, plain, rtol, atol=0.):
    assert len(lean) == len(plain)
    for a, b in zip(lean, plain):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_switch_is_on_by_default_and_scoped():
    assert memory_lean_enabled()
    with memory_lean(False):
        assert not memory_lean_enabled()
    assert memory_lean_enabled()
    set_memory_lean(False)
    try:
        assert not memory_lean_enabled()
    finally:
        set_memory_lean(True)


@pytest.mark.parametrize('formula', sorted(WS_FORMULAS))
@pytest.mark.parametrize('config', sorted(CONV_CONFIGS))
@pytest.mark.parametrize('channels_last', [False, True])
def test_ws_conv_gradients_equal_plain_path_in_float64(formula, config, channels_last):
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3, ws_formula=formula, **CONV_CONFIGS[config]).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    lean, plain = _lean_and_plain(conv, x)
    _assert_same(lean, plain, rtol=1e-12, atol=1e-12)


def test_ws_conv_under_cpu_autocast_matches_plain_path():
    torch.manual_seed(0)
    conv = WSConv2d(8, 8, 3, padding=1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lean, plain = _lean_and_plain(conv, torch.randn(2, 8, 8, 8))
    assert lean[0].dtype == torch.bfloat16 and lean[2].dtype == torch.float32  # output bf16, weight grad float32
    _assert_same(lean, plain, rtol=1e-5, atol=1e-5)


def _perturbed(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p) * .3)
    return norm


NORMS = {
    'bcn_batch_stage': lambda: BatchChannelNorm2d(8, 2, batch_stage='batch'),
    'bcn_batch_stage_cumulative': lambda: BatchChannelNorm2d(8, 4, batch_stage='batch', momentum=None),
    'bcn_estimated_stage': lambda: BatchChannelNorm2d(8, 2),
    'bgn': lambda: BatchGroupNorm2d(8, 2),
    'bgn_batch_statistics_only': lambda: BatchGroupNorm2d(8, 4, track_running_stats=False),
}


@pytest.mark.parametrize('name', sorted(NORMS))
@pytest.mark.parametrize('channel_mean', [0., 5.])
def test_norm_outputs_gradients_and_statistics_equal_plain_path_in_float64(name, channel_mean):
    torch.manual_seed(0)
    norm = _perturbed(NORMS[name]().double()).train()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64) * 2 + channel_mean
    lean, plain = _lean_and_plain(norm, x)
    _assert_same(lean, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_norm_gradients_equal_plain_path_to_float32_rounding(name):
    torch.manual_seed(0)
    norm = _perturbed(NORMS[name]()).train()
    lean, plain = _lean_and_plain(norm, torch.randn(2, 8, 7, 7) * 3 + 4)
    _assert_same(lean, plain, rtol=2e-5, atol=2e-5)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs, parameters excluded."""
    saved = []

    def pack(t):
        if not isinstance(t, nn.Parameter):
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_ws_conv_keeps_its_input_and_no_standardized_weight():
    conv = WSConv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 4, 4, requires_grad=True)  # 4 KiB input, 147 KiB weight
    with memory_lean(True):
        lean = _saved_bytes(lambda: conv(x))
    with memory_lean(False):
        plain = _saved_bytes(lambda: conv(x))
    weight_bytes = conv.weight.numel() * 4
    assert plain >= x.numel() * 4 + weight_bytes  # autograd keeps the standardized copy
    assert lean < x.numel() * 4 + 64 * 4 * 4  # the input and three per-channel statistics


@pytest.mark.parametrize('name', ['bcn_batch_stage', 'bgn'])
def test_norm_keeps_one_activation(name):
    norm = NORMS[name]().train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    activation = x.numel() * 4
    with memory_lean(True):
        lean = _saved_bytes(lambda: norm(x))
    with memory_lean(False):
        plain = _saved_bytes(lambda: norm(x))
    assert plain >= 2 * activation
    assert activation <= lean < activation * 1.1  # x, the (N, C) moments and the parameters' copies


@pytest.mark.parametrize('model_name', ['resnet20_wsbcn', 'resnet20_wsgn', 'resnet20_bgn'])
def test_model_step_equals_plain_path_in_float64(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lean, plain = _lean_and_plain(model, x)
    _assert_same(lean, plain, rtol=1e-10, atol=1e-10)


def test_double_backward_needs_the_plain_path():
    conv = WSConv2d(3, 4, 3).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with memory_lean(False):
        grad, = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    grad.sum().backward()  # a gradient penalty: works on the plain path
    assert conv.weight.grad is not None
    with pytest.raises(RuntimeError, match='differentiate twice|once_differentiable'):
        grad, = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
        grad.sum().backward()


@pytest.mark.parametrize('model_name', ['resnet20_wsbcn', 'resnet20_bgn'])
def test_gradient_penalty_runs_on_the_plain_path_and_is_refused_on_the_lean_one(model_name):
    """Double backward: the plain path's second-order gradients are autograd's (checked against finite
    differences of the first-order gradient, in eval so that no statistic moves with the input); in
    training the lean path refuses instead of returning wrong ones."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=3).double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    model(x)  # statistics off their init
    model.eval()

    def penalty(inp):
        grad, = torch.autograd.grad(model(inp).square().sum(), inp, create_graph=True)
        return grad.square().sum()

    with memory_lean(False):
        second, = torch.autograd.grad(penalty(x), x)
        direction = torch.randn_like(x)
        eps = 1e-6
        up = penalty((x + eps * direction).detach().requires_grad_()).item()
        down = penalty((x - eps * direction).detach().requires_grad_()).item()
    assert (second * direction).sum().item() == pytest.approx((up - down) / (2 * eps), rel=1e-5)
    model.train()
    with pytest.raises(RuntimeError, match='one backward|differentiate twice|once_differentiable'):
        penalty(x).backward()
