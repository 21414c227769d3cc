"""Micro-batch edge cases: batch 1, 1x1 feature maps, constant inputs, bf16 autocast: no NaN or inf."""
import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401

# Batch-free or estimated-statistics variants: the ones meant to train at one image per device.
MICRO_VARIANTS = ['wsbcn', 'bcn', 'wsgn', 'gn', 'bgn', 'wsbgn']
# (architecture, input size whose last stage is 1x1)
FAMILIES = [('resnet18', 32), ('resnet20', 4)]


def _name(arch, variant):
    return f'{arch}_{variant}'


def _assert_all_finite(model, *tensors):
    for t in tensors:
        assert torch.isfinite(t).all()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    for n, b in model.named_buffers():
        if b.is_floating_point():
            assert torch.isfinite(b).all(), n


def _train_steps(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        _assert_all_finite(model, loss)
        opt.step()
    return loss


@pytest.mark.parametrize('variant', MICRO_VARIANTS)
@pytest.mark.parametrize('arch, size', FAMILIES)
def test_batch_one_with_1x1_feature_maps(arch, size, variant):
    model = timm.create_model(_name(arch, variant))
    x = torch.randn(1, 3, size, size)
    assert model.forward_features(x).shape[-2:] == (1, 1)
    _train_steps(model, x)
    model.eval()
    with torch.no_grad():
        _assert_all_finite(model, model(x))


@pytest.mark.parametrize('variant', MICRO_VARIANTS + ['wsbn'])
@pytest.mark.parametrize('value', [0.0, 3.0])
def test_constant_inputs(variant, value):
    model = timm.create_model(_name('resnet20', variant))
    x = torch.full((2, 3, 8, 8), value)
    _train_steps(model, x)
    model.eval()
    with torch.no_grad():
        _assert_all_finite(model, model(x), model(x[:1]))


@pytest.mark.parametrize('variant', MICRO_VARIANTS + ['wsbn'])
@pytest.mark.parametrize('arch, size', [('resnet18', 32), ('resnet20', 8)])
def test_bf16_autocast(arch, size, variant):
    model = timm.create_model(_name(arch, variant))
    x = torch.randn(2, 3, size, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), torch.tensor([1, 2]))
        opt.zero_grad()
        loss.backward()
        _assert_all_finite(model, logits, loss)
        opt.step()
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        _assert_all_finite(model, model(x[:1]))


def test_bn_cannot_train_at_batch_one_with_1x1_maps_which_is_why_the_zoo_exists():
    """The baseline's failure mode, shown rather than hidden: BN has one value per channel."""
    model = timm.create_model('resnet20').train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        model(torch.randn(1, 3, 4, 4))
