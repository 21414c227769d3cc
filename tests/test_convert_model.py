"""zoo.convert_model against hand-written references, on a torchvision detector and on timm CNNs."""
import copy

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest
from timm.layers import Conv2dSame
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import zoo
from zoo import UnknownModelError
from zoo.convert import ConversionError, NormAct2d, divisor_groups
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d
from zoo.task_registry import TaskRegistry

G = 4


class SmallNet(nn.Module):
    """conv-BN-ReLU, conv-BN, residual, pool, linear: every kind of layer the converter meets."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = norm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affines and running statistics, as in a trained network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith('num_batches_tracked'):
                t.fill_(500)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                offset = 1. if name.endswith('weight') and t.ndim == 1 else 0.  # norm scales around 1
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + offset)
    return net


def _ref_ws(w):
    """The zoo formula written out: (w - mean) / sqrt(biased var + 1e-5) per output channel."""
    flat = w.flatten(1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / (var + 1e-5).sqrt()).view_as(w)


def _ref_gn(x, groups, weight, bias, eps=1e-5):
    n, c, h, w = x.shape
    xg = x.view(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / (var + eps).sqrt()).view(n, c, h, w)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _ref_bn_eval(x, bn):
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return (x - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _ref_forward(src: SmallNet, x, norm):
    """The converted network by hand, from the source network's parameters."""
    y = F.conv2d(x, _ref_ws(src.conv1.weight), None, padding=1)
    y = F.relu(norm(y, src.bn1))
    z = F.conv2d(y, _ref_ws(src.conv2.weight), src.conv2.bias, padding=1)
    y = F.relu(y + norm(z, src.bn2))
    return src.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_wsgn_matches_hand_written_reference():
    src = _trained_like(SmallNet())
    net = zoo.convert_model(copy.deepcopy(src), 'wsgn', norm_groups=G)
    assert isinstance(net.conv1, WSConv2d) and isinstance(net.bn1, nn.GroupNorm) and net.bn1.num_groups == G
    assert torch.equal(net.conv1.weight, src.conv1.weight)  # raw weights kept, standardized in forward
    expected = _ref_forward(src, X, lambda y, bn: _ref_gn(y, G, bn.weight, bn.bias))  # affine carried over
    torch.testing.assert_close(net(X), expected, rtol=1e-4, atol=1e-5)


def test_bcn_without_ws_carries_running_stats_into_estimated_stage():
    """No conv changes, so BN statistics still describe the activations: BCN's batch stage starts from them."""
    src = _trained_like(SmallNet()).eval()
    net = zoo.convert_model(copy.deepcopy(src), 'bcn', norm_groups=G).eval()
    bn = net.bn1.bn
    assert isinstance(bn, EstimatedBatchNorm2d) and type(net.conv1) is nn.Conv2d
    assert torch.equal(bn.running_mean, src.bn1.running_mean) and torch.equal(bn.running_var, src.bn1.running_var)
    assert int(bn.num_batches_tracked) == 500  # counted as trained: no warm-up that would discard them

    def ref(y, b):  # BCN = GN(BN_eval(y)) with group affine (1, 0), written out; convs plain here
        return _ref_gn(_ref_bn_eval(y, b), G, torch.ones(8), torch.zeros(8))
    y = F.relu(ref(F.conv2d(X, src.conv1.weight, None, padding=1), src.bn1))
    y = F.relu(y + ref(F.conv2d(y, src.conv2.weight, src.conv2.bias, padding=1), src.bn2))
    torch.testing.assert_close(net(X), src.fc(y.mean((2, 3))), rtol=1e-4, atol=1e-5)
    # In training the estimates move at the layer's momentum, not replaced by the first batch.
    net.train()(X)
    moved = (bn.running_mean - src.bn1.running_mean).abs().max()
    assert 0 < moved < 0.05 * (1 + src.bn1.running_mean.abs().max())


def test_ws_conversion_drops_stale_statistics_by_default():
    src = _trained_like(SmallNet())
    net = zoo.convert_model(copy.deepcopy(src), 'wsbcn', norm_groups=G)
    bn = net.bn1.bn
    assert torch.equal(bn.running_mean, torch.zeros(8)) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, src.bn1.weight) and torch.equal(bn.bias, src.bn1.bias)  # affine carried
    kept = zoo.convert_model(_trained_like(SmallNet()), 'wsbcn', norm_groups=G, running_stats=True)
    assert int(kept.bn1.bn.num_batches_tracked) == 500 and kept.bn1.bn.running_mean.abs().sum() > 0


def test_bgn_group_statistics_pooled_from_channel_statistics():
    """BN statistics of real data, pooled per group, are BGN's statistics of the same data."""
    bn = nn.BatchNorm2d(8, momentum=1.)  # running stats = this batch's stats
    x = torch.randn(4, 8, 6, 6) * torch.arange(1., 9.).view(1, 8, 1, 1) + torch.arange(8.).view(1, 8, 1, 1)
    bn(x)
    bgn = zoo.convert_model(nn.Sequential(bn), 'bgn', norm_groups=2)[0]
    assert isinstance(bgn, BatchGroupNorm2d)
    xg = x.view(4, 2, -1).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(bgn.running_mean, xg.mean(1))
    # BN keeps unbiased per-channel variances (144 values each: x 1.007), hence the tolerance
    torch.testing.assert_close(bgn.running_var, xg.var(1), rtol=1e-2, atol=0)


def test_frozen_bn_detector_converts_to_trainable_ws_norms():
    """A torchvision Faster R-CNN with frozen-BN ResNet-FPN: every conv WS, no BN left, trains."""
    backbone = resnet_fpn_backbone(backbone_name='resnet18', weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96)
    frozen_conv = model.backbone.body.conv1.weight
    assert not frozen_conv.requires_grad
    keep = ('rpn.head.*', 'roi_heads.box_predictor')
    zoo.convert_model(model, 'wsbcn', exclude=keep)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(isinstance(m, WSConv2d) for n, m in convs.items() if not n.startswith('rpn.head.'))
    assert all(type(m) is nn.Conv2d for n, m in convs.items() if n.startswith('rpn.head.'))
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    assert sum(isinstance(m, BatchChannelNorm2d) for m in model.modules()) == 20  # 1 stem + 8 blocks x 2 + 3 ds
    assert model.backbone.body.conv1.weight is frozen_conv and not frozen_conv.requires_grad  # freezing kept
    assert model.backbone.body.bn1.bn.weight.requires_grad  # norms are never frozen
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [dict(boxes=torch.tensor([[5., 5., 40., 50.]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[10., 8., 30., 30.], [0., 0., 20., 60.]]), labels=torch.tensor([2, 1]))]
    losses = model.train()(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.layer4[0].conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        dets = model.eval()(images)
    assert len(dets) == 2 and set(dets[0]) == {'boxes', 'labels', 'scores'}


@pytest.mark.parametrize('arch', ['regnetx_002', 'efficientnet_b0'])
def test_timm_cnn_not_registered_by_the_zoo(arch):
    """timm norm+act layers keep their activation; odd channel counts need a group rule."""
    model = timm.create_model(arch, num_classes=7)
    acts = [type(m.act) for m in model.modules() if hasattr(m, 'act') and isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 64, 64)
    shape = model(x).shape
    with pytest.raises(ConversionError, match=r'channels do not split into 32 groups'):
        zoo.convert_model(model, 'wsgn')
    zoo.convert_model(model, 'wsgn', norm_groups=divisor_groups(32))
    assert all(isinstance(m, WSConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [type(m.act) for m in model.modules() if isinstance(m, NormAct2d)] == acts
    y = model(x)
    assert y.shape == shape
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_divisor_groups():
    rule = divisor_groups(32)
    assert [rule(c) for c in (24, 40, 64, 112, 1152, 7)] == [24, 20, 32, 28, 32, 7]


def test_keeps_dtype_device_mode_and_converts_a_bare_layer():
    net = SmallNet().double().eval()
    zoo.convert_model(net, 'wsbgn', norm_groups=G)
    assert net.bn1.weight.dtype == torch.float64 and not net.bn1.training
    assert net(X.double()).dtype == torch.float64
    gn = zoo.convert_model(nn.BatchNorm2d(8), 'gn', norm_groups=2)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2
    assert isinstance(zoo.convert_model(nn.Conv2d(3, 4, 3), 'wsbn'), WSConv2d)


def test_refuses_what_it_cannot_convert_and_names_the_modules():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.BatchNorm1d(8),
                        Conv2dSame(8, 8, 3))
    with pytest.raises(ConversionError) as e:
        zoo.convert_model(net, 'wsgn', norm_groups=32)
    msg = str(e.value)
    assert '1: 8 channels do not split into 32 groups' in msg and '3: BatchNorm1d' in msg and '4: Conv2dSame' in msg
    assert type(net[0]) is nn.Conv2d  # nothing changed on error
    zoo.convert_model(net, 'wsgn', norm_groups=4, exclude=['3', '4'])
    assert isinstance(net[0], WSConv2d) and isinstance(net[3], nn.BatchNorm1d) and type(net[4]) is Conv2dSame
    with pytest.raises(ValueError, match='Unknown variant'):
        zoo.convert_model(net, 'ws_gn')


def test_zoo_norms_are_kept_for_their_variant_and_refused_for_another():
    model = timm.create_model('resnet18_wsbcn', norm_kwargs=dict(batch_stage='batch'))  # BCN holds a BatchNorm2d
    bn = model.bn1.bn
    assert zoo.convert_model(model, 'wsbcn') is model and model.bn1.bn is bn
    with pytest.raises(ConversionError, match='bn1: BatchChannelNorm2d'):
        zoo.convert_model(model, 'wsgn')


def test_task_registry():
    reg = TaskRegistry('detector', 'zoo.list_detectors()')
    reg.register('maskrcnn_resnet50_fpn_wsgn', lambda **kw: nn.Identity())
    reg.register('fasterrcnn_resnet50_fpn_wsgn')(lambda **kw: nn.Linear(1, kw.get('n', 1)))
    assert reg.list() == ['fasterrcnn_resnet50_fpn_wsgn', 'maskrcnn_resnet50_fpn_wsgn']
    assert reg.list('mask*') == ['maskrcnn_resnet50_fpn_wsgn'] and len(reg) == 2
    assert reg.create('fasterrcnn_resnet50_fpn_wsgn', n=3).out_features == 3
    with pytest.raises(UnknownModelError, match=r"Unknown detector 'maskrcnn_resnet50_fpn_gnws'\. "
                                                r"Close matches: maskrcnn_resnet50_fpn_wsgn.*zoo.list_detectors\(\)"):
        reg.create('maskrcnn_resnet50_fpn_gnws')
    with pytest.raises(ValueError, match='already registered'):
        reg.register('maskrcnn_resnet50_fpn_wsgn', lambda **kw: None)
