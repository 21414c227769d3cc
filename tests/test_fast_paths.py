"""Fast paths keep the numerics: WS inference cache, fused BCN, one-read estimate updates, BGN affine."""
import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, standardize_weight
from zoo.layers.estimated_batch_norm import sample_channel_moments


def _ws_conv(**kw):
    return WSConv2d(4, 6, 3, padding=1, **kw)


def _reference(conv, x):
    return F.conv2d(x, standardize_weight(conv.weight.detach(), conv.ws_formula), conv.bias, padding=1)


# ---------------------------------------------------------------- WS inference cache

def test_ws_cache_reused_in_inference_and_matches():
    conv = _ws_conv().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = conv(x)
        w1 = conv.standardized_weight()
        assert conv.standardized_weight() is w1  # computed once
    torch.testing.assert_close(y, _reference(conv, x))
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), y)


@pytest.mark.parametrize('change', ['optimizer', 'load_state_dict', 'copy_', 'to_double'])
def test_ws_cache_recomputed_when_weights_change(change):
    conv = _ws_conv().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        before = conv(x)
    if change == 'optimizer':
        conv.train()
        opt = torch.optim.SGD(conv.parameters(), lr=0.5)
        conv(x).square().sum().backward()
        opt.step()
        conv.eval()
    elif change == 'load_state_dict':
        conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
    elif change == 'copy_':
        with torch.no_grad():
            conv.weight.copy_(torch.randn_like(conv.weight))
    else:
        conv.double()
        x = x.double()
    with torch.no_grad():
        after = conv(x)
    if change == 'to_double':
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _reference(conv, x))


def test_ws_cache_never_cuts_autograd():
    conv = _ws_conv()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    # training: a fresh standardized weight every call, gradient reaches the raw weight
    assert conv.standardized_weight() is not conv.standardized_weight()
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # eval with autograd on and a trainable weight: still no cache, the gradient still flows
    conv.eval()
    conv.weight.grad = None
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv._ws_cache is None
    # frozen weight: cached, and input gradients (e.g. saliency, adversarial) still work,
    # even when the cache was filled under inference_mode
    conv.requires_grad_(False)
    with torch.inference_mode():
        conv(x.detach())
    x.grad = None
    out = conv(x)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(out, _reference(conv, x))


@pytest.mark.parametrize('name, cache', [('resnet20_wsgn', '_ws_cache'), ('resnet20_wsbcn', '_fold_cache')])
def test_ws_cache_dropped_by_train_and_not_saved(name, cache):
    """WS+GN convs cache the standardized weight; WS+BCN convs the weight with BCN's batch stage folded in."""
    model = timm.create_model(name).eval()
    keys = list(model.state_dict())
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert all(getattr(c, cache) is not None for c in convs)
    assert list(model.state_dict()) == keys
    assert getattr(copy.deepcopy(model).conv1, cache) is None
    assert getattr(pickle.loads(pickle.dumps(model)).conv1, cache) is None
    model.eval()  # already eval: kept
    assert getattr(model.conv1, cache) is not None
    model.train()
    assert all(getattr(c, cache) is None for c in convs)


def test_ws_channels_last_weight_standardized_without_copy_and_equal():
    conv = _ws_conv()
    ref = standardize_weight(conv.weight.detach())
    conv = conv.to(memory_format=torch.channels_last)
    w_hat = standardize_weight(conv.weight)
    assert w_hat.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(w_hat, ref)
    for formula in ('ws', 'bcn'):
        torch.testing.assert_close(standardize_weight(conv.weight, formula), standardize_weight(conv.weight.contiguous(), formula))


# ---------------------------------------------------------------- fused BCN

def _bcn_pair(batch_stage='estimated', channels=16, groups=4, dtype=torch.float64):
    bcn = BatchChannelNorm2d(channels, num_groups=groups, batch_stage=batch_stage, momentum=0.3).to(dtype)
    with torch.no_grad():
        for p in bcn.parameters():
            p.uniform_(0.5, 1.5)
    return bcn, copy.deepcopy(bcn)


def _param_grads(module, out, g):
    return torch.autograd.grad((out * g).sum(), [module.bn.weight, module.bn.bias, module.weight, module.bias])


@pytest.mark.parametrize('train', [True, False])
def test_fused_bcn_equals_two_stage_forward_backward_and_estimates(train):
    fused, plain = _bcn_pair()
    for step in range(3):
        x = (torch.randn(3, 16, 5, 4, dtype=torch.float64) * (step + 1) + 2).requires_grad_(True)
        fused.train(train)
        plain.train(train)
        y_f = fused(x)
        y_p = plain._two_stage_forward(x)
        torch.testing.assert_close(y_f, y_p)
        g = torch.randn_like(y_f)
        torch.testing.assert_close(torch.autograd.grad((y_f * g).sum(), x)[0], torch.autograd.grad((y_p * g).sum(), x)[0])
        y_f, y_p = fused(x.detach()), plain._two_stage_forward(x.detach())
        for a, b in zip(_param_grads(fused, y_f, g), _param_grads(plain, y_p, g)):
            torch.testing.assert_close(a, b)
        for k, v in fused.state_dict().items():
            torch.testing.assert_close(v, plain.state_dict()[k], msg=k)


def test_fused_bcn_gradcheck_eval_batch_stage():
    """Large-batch BCN in eval (running statistics) also takes the fused path."""
    fused, _ = _bcn_pair('batch', channels=8, groups=2)
    fused.bn.running_mean.uniform_(-1, 1)
    fused.eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,))


def test_fused_bcn_channels_last_and_autocast_match_two_stage():
    fused, plain = _bcn_pair(dtype=torch.float32, channels=64, groups=32)
    x = torch.randn(2, 64, 6, 6)
    xl = x.contiguous(memory_format=torch.channels_last)
    y = fused(xl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, plain._two_stage_forward(x), rtol=1e-5, atol=1e-5)
    fused.eval()
    plain.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_f, y_p = fused(x.bfloat16()), plain._two_stage_forward(x.bfloat16())
    assert y_f.dtype == y_p.dtype
    torch.testing.assert_close(y_f.float(), y_p.float(), rtol=0.05, atol=0.05)


def test_fused_bcn_saves_one_activation_for_backward():
    """No needless copies: like BN, only the input is kept for backward (the two-stage path keeps two)."""
    fused, plain = _bcn_pair(dtype=torch.float32, channels=32, groups=8)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)

    def saved_activation_bytes(fn):
        saved = {}

        def pack(t):
            if t.numel() >= x.numel():
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(saved.values())
    assert saved_activation_bytes(fused) == x.numel() * 4
    assert saved_activation_bytes(plain._two_stage_forward) >= 2 * x.numel() * 4


def test_bcn_batch_stage_hooks_fall_back_to_two_stages():
    fused, _ = _bcn_pair()
    seen = []
    fused.bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused(torch.randn(2, 16, 3, 3, dtype=torch.float64))
    assert seen == [(2, 16, 3, 3)]


@pytest.mark.parametrize('mean_over_std', [0., 3., 30., 300.])
def test_sample_channel_moments_float32_precision(mean_over_std):
    """The fast CPU moments stay float32-accurate, also where E[x^2] - mean^2 would cancel."""
    x = torch.randn(4, 16, 9, 9) + mean_over_std * torch.randn(1, 16, 1, 1)
    x[:, 0] = 3.0  # a constant channel: variance exactly 0
    mean, var = sample_channel_moments(x)
    var64, mean64 = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=2e-5, atol=1e-6 * var64.max().item())
    assert (var[:, 0] == 0).all()


def test_estimates_from_per_sample_moments_equal_batch_update():
    a, b = EstimatedBatchNorm2d(5, momentum=0.2).double(), EstimatedBatchNorm2d(5, momentum=0.2).double()
    for step in range(3):
        x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 3 + step
        a.update_estimates(x)
        per_sample = x.transpose(0, 1).reshape(5, 4, -1)
        b.update_from_moments(per_sample.mean(2).T, per_sample.var(2, unbiased=False).T, 9)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


# ---------------------------------------------------------------- BGN

def test_bgn_eval_fused_affine_and_channels_last():
    bgn = BatchGroupNorm2d(8, num_groups=2)
    for _ in range(3):
        bgn(torch.randn(4, 8, 3, 3) * 2 + 1)
    bgn.eval()
    x = torch.randn(2, 8, 3, 3)
    mean, var = bgn.running_mean.repeat_interleave(4), bgn.running_var.repeat_interleave(4)
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bgn.eps)
    torch.testing.assert_close(bgn(x), expected * bgn.weight.view(1, -1, 1, 1) + bgn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(bgn(x.contiguous(memory_format=torch.channels_last)), bgn(x))


# ---------------------------------------------------------------- whole models

@pytest.mark.parametrize('name', ['resnet18_wsbcn', 'resnet20_bgn'])
def test_channels_last_model_trains_like_contiguous(name):
    """float64, so that only a real difference (not float32 rounding through the net) can fail it."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model = timm.create_model(name).double()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for m, inp in ((model, x), (cl, x_cl)):
        m(inp).logsumexp(1).sum().backward()
    for (n, p), q in zip(model.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * p.grad.abs().max().item(), msg=n)
    for (n, b), c in zip(model.named_buffers(), cl.buffers()):
        torch.testing.assert_close(c, b, msg=n)
    model.eval()
    cl.eval()
    with torch.no_grad():
        torch.testing.assert_close(cl(x_cl), model(x))


def test_compiled_eval_bypasses_ws_cache():
    """fullgraph capture in eval under no_grad (the cache is skipped while compiling)."""
    model = timm.create_model('resnet20_wsbcn').eval()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
