"""Each layer against a plain formula written here (not the layer's code): forward and gradient."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.plugins import TorchSyncBatchNorm

from zoo.layers import (
    WS_FORMULAS, BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, convert_to_ws,
    set_bcn_batch_stage)



@pytest.fixture(autouse=True, scope='module')
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------- reference formulas

def ref_standardize(w, eps, unbiased, eps_in_sqrt):
    """w_hat = (w - mean) / s per output channel, with sums written out."""
    out = w.shape[0]
    flat = w.reshape(out, -1)
    n = flat.shape[1]
    mean = flat.sum(1, keepdim=True) / n
    sq = ((flat - mean) ** 2).sum(1, keepdim=True)
    var = sq / (n - 1) if unbiased else sq / n
    s = torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps
    return ((flat - mean) / s).reshape(w.shape)


def ref_estimated_bn(xs, momentum, eps, weight, bias):
    """Run the documented estimated-BN rule over a list of batches; returns outputs and estimates."""
    c = xs[0].shape[1]
    mu, var = torch.zeros(c), torch.ones(c)
    outs = []
    for t, x in enumerate(xs):
        x_c = x.transpose(0, 1).reshape(c, -1)  # C x (N*H*W)
        mu_b = x_c.mean(1)
        centre = mu_b if t == 0 else mu
        var_b = ((x_c - centre[:, None]) ** 2).mean(1)
        r = max(1.0 / (t + 1), momentum)
        mu = (1 - r) * mu + r * mu_b
        var = (1 - r) * var + r * var_b
        mu_d, var_d = mu.detach(), var.detach()
        outs.append((x - mu_d.view(1, -1, 1, 1)) / torch.sqrt(var_d.view(1, -1, 1, 1) + eps)
                    * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    return outs, mu, var


def ref_group_norm_groupwise_affine(x, groups, eps, gw, gb):
    n = x.shape[0]
    g = x.reshape(n, groups, -1)
    mean = g.mean(2, keepdim=True)
    var = ((g - mean) ** 2).mean(2, keepdim=True)
    y = (g - mean) / torch.sqrt(var + eps)
    return (y * gw.view(1, -1, 1) + gb.view(1, -1, 1)).reshape(x.shape)


def ref_batch_norm_train(x, eps, weight, bias):
    x_c = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = x_c.mean(1)
    var = ((x_c - mean[:, None]) ** 2).mean(1)
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), inputs)


# ---------------------------------------------------------------- weight standardization

@pytest.mark.parametrize('formula', sorted(WS_FORMULAS))
@pytest.mark.parametrize('groups', [1, 4])
def test_ws_conv_matches_formula_forward_and_grad(formula, groups):
    f = WS_FORMULAS[formula]
    conv = WSConv2d(8, 12, 3, padding=1, groups=groups, bias=True, ws_formula=formula)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    y = conv(x)

    w_ref = conv.weight.detach().clone().requires_grad_(True)
    b_ref = conv.bias.detach().clone().requires_grad_(True)
    y_ref = F.conv2d(x, ref_standardize(w_ref, f.eps, f.unbiased, f.eps_in_sqrt), b_ref, padding=1, groups=groups)
    torch.testing.assert_close(y, y_ref)

    g = grads(y, (x, conv.weight, conv.bias))
    g_ref = grads(y_ref, (x, w_ref, b_ref))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_ws_formulas_differ_on_small_kernels():
    """The variants are not interchangeable: a 1x1 conv with few inputs shows it."""
    w = torch.randn(4, 3, 1, 1)
    outs = {name: ref_standardize(w, f.eps, f.unbiased, f.eps_in_sqrt) for name, f in WS_FORMULAS.items()}
    assert (outs['ws'] - outs['zoo']).abs().max() > 0.05


def test_ws_conv_keeps_conv_keys_and_parameters():
    conv = nn.Conv2d(3, 5, 3, bias=False)
    ws = WSConv2d.from_conv(conv, 'bcn')
    assert ws.weight is conv.weight
    assert list(ws.state_dict()) == list(conv.state_dict())
    model = convert_to_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1))))
    assert isinstance(model[0], WSConv2d) and isinstance(model[1][0], WSConv2d)


def test_ws_unknown_formula_is_a_clear_error():
    with pytest.raises(ValueError, match='Unknown weight standardization formula'):
        WSConv2d(3, 4, 3, ws_formula='nope')


# ---------------------------------------------------------------- estimated BN (BCN batch stage)

def test_estimated_bn_matches_rule_over_steps():
    momentum, eps = 0.3, 1e-5
    layer = EstimatedBatchNorm2d(6, eps=eps, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(2, 6, 4, 5) * (1 + i) + i for i in range(6)]  # drifting distribution
    ref_outs, mu, var = ref_estimated_bn(xs, momentum, eps, layer.weight.detach(), layer.bias.detach())
    for x, y_ref in zip(xs, ref_outs):
        torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(layer.running_mean, mu)
    torch.testing.assert_close(layer.running_var, var)
    assert int(layer.num_batches_tracked) == len(xs)


def test_estimated_bn_gradient_does_not_flow_through_statistics():
    layer = EstimatedBatchNorm2d(4, momentum=0.5)
    layer(torch.randn(3, 4, 5, 5))  # move the estimates off their init
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = layer(x)
    mu, var = layer.running_mean.clone(), layer.running_var.clone()  # estimates the output used
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    y_ref = (x_ref - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps) * w_ref.view(1, -1, 1, 1) \
        + b_ref.view(1, -1, 1, 1)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads(y, (x, layer.weight, layer.bias)), grads(y_ref, (x_ref, w_ref, b_ref))):
        torch.testing.assert_close(a, b)


def test_estimated_bn_eval_uses_estimates_without_updating():
    layer = EstimatedBatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2) * 3 + 1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(1, 3, 2, 2)
    y = layer(x)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k])
    expected = (x - state['running_mean'].view(1, -1, 1, 1)) / torch.sqrt(state['running_var'].view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(y, expected)


def test_estimated_bn_warmup_then_fixed_rate():
    layer = EstimatedBatchNorm2d(1, momentum=0.25)
    seen = []
    for value in [1.0, 2.0, 3.0, 4.0, 5.0]:  # constant batches: mu_b = value
        layer(torch.full((1, 1, 2, 2), value))
        seen.append(layer.running_mean.item())
    # cumulative average for t = 0..3 (1/(t+1) >= 0.25), then r = 0.25
    assert seen[:4] == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert seen[4] == pytest.approx(2.5 + 0.25 * (5.0 - 2.5))


def test_estimated_bn_rejects_bad_momentum_and_shape():
    with pytest.raises(ValueError, match='momentum'):
        EstimatedBatchNorm2d(4, momentum=0.)
    with pytest.raises(ValueError, match='4-D'):
        EstimatedBatchNorm2d(4)(torch.randn(2, 4, 5))


# ---------------------------------------------------------------- BCN

def _bcn_with_random_affine(mode, channels=8, groups=4):
    bcn = BatchChannelNorm2d(channels, num_groups=groups, batch_stage=mode, momentum=0.2)
    with torch.no_grad():
        for p in bcn.parameters():
            p.uniform_(0.5, 1.5)
    return bcn


def test_bcn_estimated_mode_matches_formula():
    bcn = _bcn_with_random_affine('estimated')
    xs = [torch.randn(2, 8, 3, 3) * 2 + 1 for _ in range(3)]
    bn_w, bn_b = bcn.bn.weight.detach(), bcn.bn.bias.detach()
    ref_bn_outs, mu, var = ref_estimated_bn(xs, 0.2, 1e-5, bn_w, bn_b)
    for x, bn_out in zip(xs[:-1], ref_bn_outs[:-1]):
        torch.testing.assert_close(bcn(x), ref_group_norm_groupwise_affine(bn_out, 4, 1e-5, bcn.weight, bcn.bias))
    # last step: forward and gradients (input and all parameters), stats treated as constants
    x = xs[-1].clone().requires_grad_(True)
    y = bcn(x)
    torch.testing.assert_close(bcn.bn.running_mean, mu)
    torch.testing.assert_close(bcn.bn.running_var, var)
    x_ref = xs[-1].clone().requires_grad_(True)
    params_ref = [p.detach().clone().requires_grad_(True) for p in (bcn.bn.weight, bcn.bn.bias, bcn.weight, bcn.bias)]
    bn_ref = (x_ref - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) \
        * params_ref[0].view(1, -1, 1, 1) + params_ref[1].view(1, -1, 1, 1)
    y_ref = ref_group_norm_groupwise_affine(bn_ref, 4, 1e-5, params_ref[2], params_ref[3])
    torch.testing.assert_close(y, y_ref)
    got = grads(y, (x, bcn.bn.weight, bcn.bn.bias, bcn.weight, bcn.bias))
    want = grads(y_ref, (x_ref, *params_ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bcn_batch_mode_matches_formula():
    bcn = _bcn_with_random_affine('batch')
    x = (torch.randn(4, 8, 3, 3) * 2 + 1).requires_grad_(True)
    y = bcn(x)
    x_ref = x.detach().clone().requires_grad_(True)
    params_ref = [p.detach().clone().requires_grad_(True) for p in (bcn.bn.weight, bcn.bn.bias, bcn.weight, bcn.bias)]
    y_ref = ref_group_norm_groupwise_affine(
        ref_batch_norm_train(x_ref, 1e-5, params_ref[0], params_ref[1]), 4, 1e-5, params_ref[2], params_ref[3])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads(y, (x, bcn.bn.weight, bcn.bn.bias, bcn.weight, bcn.bias)), grads(y_ref, (x_ref, *params_ref))):
        torch.testing.assert_close(a, b)
    # running statistics as BatchNorm keeps them (unbiased variance, momentum 0.2)
    x_c = x.detach().transpose(0, 1).reshape(8, -1)
    torch.testing.assert_close(bcn.bn.running_mean, 0.2 * x_c.mean(1))
    torch.testing.assert_close(bcn.bn.running_var, 0.8 + 0.2 * x_c.var(1, unbiased=True))


def test_bcn_modes_share_keys_and_switch_keeps_state():
    est = BatchChannelNorm2d(64)
    big = BatchChannelNorm2d(64, batch_stage='batch')
    assert list(est.state_dict()) == list(big.state_dict())
    big(torch.randn(4, 64, 2, 2))
    state = {k: v.clone() for k, v in big.state_dict().items()}
    model = set_bcn_batch_stage(nn.Sequential(big), 'estimated')
    assert isinstance(model[0].bn, EstimatedBatchNorm2d) and model[0].batch_stage == 'estimated'
    for k, v in model[0].state_dict().items():
        if k.endswith('num_batches_tracked'):
            # trained statistics count as trained: the estimated stage's 1/(t+1) warm-up must not
            # replace them by the first micro-batch's statistics
            assert int(v) == max(int(state[k]), math.ceil(1. / model[0].bn.momentum)) > int(state[k])
        else:
            torch.testing.assert_close(v, state[k])


def test_bcn_is_not_replaced_by_lightning_sync_batchnorm():
    """Lightning's sync_batchnorm=True plugin must keep the estimated stage (only plain BN is converted)."""
    model = nn.Sequential(BatchChannelNorm2d(32), BatchChannelNorm2d(32, batch_stage='batch'))
    converted = TorchSyncBatchNorm().apply(model)
    assert isinstance(converted[0], BatchChannelNorm2d)
    assert isinstance(converted[0].bn, EstimatedBatchNorm2d)
    assert isinstance(converted[1], BatchChannelNorm2d)
    assert isinstance(converted[1].bn, nn.SyncBatchNorm)
    assert not isinstance(converted[0].bn, nn.modules.batchnorm._BatchNorm)


def test_bcn_rejects_indivisible_groups_and_unknown_mode():
    with pytest.raises(ValueError, match='divisible'):
        BatchChannelNorm2d(48, num_groups=32)
    with pytest.raises(ValueError, match='batch stage'):
        BatchChannelNorm2d(32, batch_stage='sync')


# ---------------------------------------------------------------- BGN

def ref_bgn(x, groups, eps, weight, bias):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(dim=(0, 2), keepdim=True)
    var = ((g - mean) ** 2).mean(dim=(0, 2), keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), g


def test_bgn_matches_formula_forward_grad_and_running_stats():
    bgn = BatchGroupNorm2d(8, num_groups=2, momentum=0.1)
    with torch.no_grad():
        bgn.weight.uniform_(0.5, 1.5)
        bgn.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 8, 3, 4) * 3 + 2).requires_grad_(True)
    y = bgn(x)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = bgn.weight.detach().clone().requires_grad_(True)
    b_ref = bgn.bias.detach().clone().requires_grad_(True)
    y_ref, g = ref_bgn(x_ref, 2, 1e-5, w_ref, b_ref)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads(y, (x, bgn.weight, bgn.bias)), grads(y_ref, (x_ref, w_ref, b_ref))):
        torch.testing.assert_close(a, b)
    g = g.detach().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(bgn.running_mean, 0.1 * g.mean(1))
    torch.testing.assert_close(bgn.running_var, 0.9 + 0.1 * g.var(1, unbiased=True))


def test_bgn_eval_uses_running_stats_so_images_are_independent():
    bgn = BatchGroupNorm2d(8, num_groups=4)
    for _ in range(5):
        bgn(torch.randn(4, 8, 3, 3) + 1)
    bgn.eval()
    a, b = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3) * 10
    alone = bgn(a)
    together = bgn(torch.cat([a, b]))[:1]
    torch.testing.assert_close(alone, together)
    mean, var = bgn.running_mean.view(1, 4, 1), bgn.running_var.view(1, 4, 1)
    torch.testing.assert_close(alone, ((a.reshape(1, 4, -1) - mean) / torch.sqrt(var + 1e-5)).reshape(a.shape))


def test_bgn_without_running_stats_uses_batch_stats_in_eval():
    bgn = BatchGroupNorm2d(8, num_groups=4, track_running_stats=False).eval()
    x = torch.randn(3, 8, 2, 2)
    torch.testing.assert_close(bgn(x), ref_bgn(x, 4, 1e-5, bgn.weight, bgn.bias)[0])


@pytest.mark.parametrize('make', [
    lambda: BatchChannelNorm2d(64), lambda: BatchChannelNorm2d(64, batch_stage='batch'),
    lambda: BatchGroupNorm2d(64, num_groups=32)], ids=['bcn', 'bcn_batch', 'bgn'])
@pytest.mark.parametrize('train', [True, False])
def test_zero_samples_pass_through_without_touching_statistics(make, train):
    """A detector's mask head sees no regions for an image without detections: (0, C, H, W)."""
    norm = make().train(train)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.empty(0, 64, 7, 7, requires_grad=True)
    y = norm(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in norm.parameters())  # used, zero gradient
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())
