"""Deployment export: plain convs, folded norms, same outputs in eval as the original model."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d

ZOO_NORMS = (WSConv2d, BatchChannelNorm2d, EstimatedBatchNorm2d, BatchGroupNorm2d, nn.BatchNorm2d)


def _trained(name, x, steps=3, **kwargs):
    """A model whose estimates / running stats and norm affines are off their init."""
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:  # norm affines (zero-initialised last norms included) and biases
                p.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _types(model):
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize('name, size', [
    ('resnet20_wsbcn', 16), ('resnet20_wsgn', 16), ('resnet20_bgn', 16), ('resnet20_wsbgn', 16),
    ('resnet20', 16), ('resnet18_wsbcn', 32)])
def test_export_gives_same_outputs_with_plain_convs(name, size):
    x = torch.randn(4, 3, size, size) * 2 + 0.5
    model = _trained(name, x)
    with torch.no_grad():
        expected = model(x)
    exported = zoo.export_for_inference(model)
    with torch.no_grad():
        got = exported(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    types = _types(exported)
    assert not types & set(ZOO_NORMS), types & set(ZOO_NORMS)  # every fixed-statistics norm folded
    assert nn.Conv2d in types and not exported.training
    assert not any(p.requires_grad for p in exported.parameters())
    if 'bcn' in name:  # BCN's channel stage remains, as torch's own GroupNorm
        assert nn.GroupNorm in types
    # The original is untouched and still a WS model.
    assert any(isinstance(m, WSConv2d) for m in model.modules()) == ('ws' in name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_export_without_folding_keeps_norms_but_drops_ws():
    x = torch.randn(2, 3, 16, 16)
    model = _trained('resnet20_wsbcn', x)
    exported = zoo.export_for_inference(model, fold_norms=False)
    assert not any(isinstance(m, WSConv2d) for m in exported.modules())
    assert any(isinstance(m, BatchChannelNorm2d) for m in exported.modules())
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_export_keeps_tsm_temporal_shift_hooks():
    clip = torch.randn(1, 3, 4, 32, 32)
    model = timm.create_model('tsm_resnet18_wsbcn', num_segments=4, num_classes=5).eval()
    with torch.no_grad():  # estimates and affines off their init (zero-initialised last norms hide the shift)
        for m in model.modules():
            if isinstance(m, EstimatedBatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    exported = zoo.export_for_inference(model)
    with torch.no_grad():
        expected, got = model(clip), exported(clip)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # Without the shift hooks the frames would not mix: the exported model must still shift.
    no_shift = zoo.export_for_inference(model)
    for m in no_shift.modules():
        if isinstance(m, nn.Conv2d):
            m._forward_pre_hooks.clear()
    with torch.no_grad():
        assert not torch.allclose(no_shift(clip), expected, atol=1e-4)


def test_exported_state_is_smaller_and_loads_nothing_from_ws():
    """Folding removes the norm parameters; the export is a different, frozen parameter set."""
    model = timm.create_model('resnet20_wsbgn').eval()
    exported = zoo.export_for_inference(model)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(exported) < n_params(model)
    loss = F.cross_entropy(exported(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1]))
    assert not loss.requires_grad
