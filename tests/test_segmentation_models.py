"""DeepLabV3 segmenters: every registered name trains at 1 image per device (BN: a clear error),
heads follow the backbone's variant, output stride, aux head, pretrained `.in1k` backbones."""
import pytest
import torch
import torch.nn as nn

import zoo
from zoo.layers import WS_FORMULAS, BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d
from zoo.models._variants import NORM_VARIANTS
from zoo.segmentation import backbone_variant, build_deeplabv3

NAMES = zoo.list_segmenters()
X2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X1 = X2[:1]


def _kwargs(name):
    return dict(backbone='resnet18_wsbgn') if name == 'deeplabv3' else {}


def test_registry_names_and_close_match_error():
    for arch in ('resnet18', 'resnet50', 'resnet101'):
        assert {f'deeplabv3_{arch}{v}' for v in ('', '_wsgn', '_wsbcn', '_gn', '_bgn')} <= set(NAMES)
    with pytest.raises(zoo.UnknownModelError, match='deeplabv3_resnet101_wsbcn'):
        zoo.create_segmenter('deeplabv3_resnet101_wsbnc')


@pytest.mark.parametrize('name', NAMES)
def test_forward_backward_batch1_train(name):
    """Batch 1 in train mode: GN / BCN / BGN train (ASPP pooling sees a 1x1 map); BN fails clearly."""
    torch.manual_seed(0)
    model = zoo.create_segmenter(name, num_classes=5, aux_loss=True, **_kwargs(name)).train()
    variant = backbone_variant(model.backbone.body.pretrained_cfg['architecture']) if name != 'deeplabv3' else 'wsbgn'
    assert model.norm_variant == variant
    if variant == 'bn':
        with pytest.raises(ValueError, match="image-pooling branch.*1 image per device"):
            model(X1)
        x = X2  # 2 images per device: BN trains
    else:
        x = X1
    out = model(x)
    assert out['out'].shape == (x.shape[0], 5, 32, 32) and out['aux'].shape == out['out'].shape
    (out['out'].square().mean() + out['aux'].square().mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.classifier[4].weight.grad.abs().sum() > 0 and model.classifier[0].convs[4][1].weight.grad.abs().sum() > 0
    # Heads follow the backbone: WS convs (the final classifier convs stay plain) and the variant's norm.
    head_convs = [m for h in (model.classifier, model.aux_classifier) for m in h.modules() if isinstance(m, nn.Conv2d)]
    plain = [m for m in head_convs if not isinstance(m, WSConv2d)]
    if variant == 'bn':
        assert len(plain) == len(head_convs)
        assert isinstance(model.classifier[0].convs[4][2], nn.BatchNorm2d)
    else:
        ws = NORM_VARIANTS[variant].ws  # GN and BGN as their papers: plain convs
        assert plain == ([model.classifier[4], model.aux_classifier[4]] if ws else head_convs)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        norm = {'gn': nn.GroupNorm, 'bgn': BatchGroupNorm2d, 'bcn': BatchChannelNorm2d}[NORM_VARIANTS[variant].norm]
        assert isinstance(model.classifier[0].convs[4][2], norm) and isinstance(model.backbone.body.bn1, norm)
    if variant == 'wsbcn':
        pool_norm = model.classifier[0].convs[4][2]
        assert isinstance(pool_norm, BatchChannelNorm2d) and isinstance(pool_norm.bn, EstimatedBatchNorm2d)
        assert pool_norm.bn.num_batches_tracked.item() == 1  # the estimates were updated by the batch of one


def test_output_stride_and_rates():
    m16 = build_deeplabv3('resnet18_wsgn', num_classes=3, output_stride=16)
    m8 = build_deeplabv3('resnet18_wsgn', num_classes=3, output_stride=8)
    x = torch.randn(2, 3, 64, 64)
    assert m16.backbone(x)['out'].shape[-2:] == (4, 4) and m8.backbone(x)['out'].shape[-2:] == (8, 8)
    assert m16.classifier[0].convs[1][0].dilation == (6, 6) and m8.classifier[0].convs[1][0].dilation == (12, 12)
    assert 'aux' not in m8(x)
    with pytest.raises(ValueError, match='output_stride'):
        build_deeplabv3('resnet18_wsgn', output_stride=32)


def test_no_imagenet_weights_is_a_clear_error():
    with pytest.raises(ValueError, match='No ImageNet weights for resnet18_wsbcn'):
        zoo.create_segmenter('deeplabv3_resnet18_wsbcn', pretrained_backbone=True)


def test_pretrained_bcn_backbone_loads_authors_release_and_switches_to_estimated(tmp_path):
    """`.in1k` release (fabricated in the authors' layout) -> backbone weights; BCN stage estimated from its stats."""
    from test_convert_authors import _authors_checkpoint, _save_release
    path = tmp_path / 'rn50_bcn_ws.pth'
    ref = _authors_checkpoint('resnet50', 'bcn')
    _save_release(ref, path)
    seg = zoo.create_segmenter('deeplabv3_resnet50_wsbcn', num_classes=3, pretrained_backbone=True,
                               backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=str(path))))
    body = seg.backbone.body
    for name in ('conv1', 'layer1.0.conv2', 'layer3.5.conv3', 'layer4.0.downsample.0'):  # raw conv weights
        torch.testing.assert_close(body.get_submodule(name).weight, ref.get_submodule(name).weight, msg=name)
    for name in ('bn1', 'layer2.1.bn2', 'layer4.2.bn3'):  # BCN: batch stage from pbn, group-wise affine
        ours, theirs = body.get_submodule(name), ref.get_submodule(name)
        assert isinstance(ours.bn, EstimatedBatchNorm2d)  # switched from the release's large-batch stage
        for buf in ('running_mean', 'running_var', 'weight', 'bias'):
            torch.testing.assert_close(getattr(ours.bn, buf), getattr(theirs.pbn, buf), msg=f'{name}.{buf}')
        torch.testing.assert_close(ours.weight, theirs.weight.flatten())
        assert ours.bn.num_batches_tracked.item() > 0  # estimates continue from ImageNet's statistics
    assert body.conv1.ws_formula == WS_FORMULAS['bcn']  # the release's WS formula, not the zoo default
