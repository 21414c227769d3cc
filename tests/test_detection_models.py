"""zoo.create_detector: every registered name, pretrained backbones, BCN's switch to micro-batches.

Cost control (the default run must stay short on 2 shared cores):
- every name is built on the ``meta`` device and its structure checked (no weights, no compute);
- forward (train and eval), backward and a checkpoint round trip run for every (task, variant)
  pair (ResNet-18, and each bottleneck architecture once), at one block per stage
  (``backbone_kwargs=dict(layers=(1, 1, 1, 1))``) and with few proposals and RoIs;
- the same at full depth for every name is marked slow.
"""
import io

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

import zoo
from zoo import UnknownModelError, WeightsError
from zoo.detection import DETECTOR_ARCHS
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, WS_FORMULAS
from zoo.models import NORM_VARIANTS
from test_convert_authors import _authors_checkpoint, _save_release

ALL_NAMES = zoo.list_detectors()
TASKS = {'fasterrcnn': FasterRCNN, 'maskrcnn': MaskRCNN}
NORM_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm, BatchChannelNorm2d, BatchGroupNorm2d)
EXPECTED_NORM = {'bn': nn.BatchNorm2d, 'gn': nn.GroupNorm, 'bcn': BatchChannelNorm2d, 'bgn': BatchGroupNorm2d}
# Few proposals and RoIs: each conv of the box head costs 29 M multiply-adds per RoI, of the mask head 115 M.
SMALL = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_train=32, rpn_post_nms_top_n_train=4,
             rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=3, rpn_batch_size_per_image=16,
             box_batch_size_per_image=4, box_detections_per_img=2, box_score_thresh=0.)
SHALLOW = dict(layers=(1, 1, 1, 1))


def _parse(name):
    task, rest = name.split('_', 1)
    arch, _, variant = rest.partition('_fpn')
    return task, arch, variant.lstrip('_') or None


def _images_targets(with_masks: bool):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 56, 64, generator=g)]
    targets = [dict(boxes=torch.tensor([[5., 5., 40., 50.]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[10., 8., 30., 30.], [0., 0., 20., 50.]]), labels=torch.tensor([2, 1]))]
    if with_masks:
        for img, t in zip(images, targets):
            m = torch.zeros(len(t['boxes']), *img.shape[1:], dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(t['boxes'].int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            t['masks'] = m
    return images, targets


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _norm_types(module):
    return {type(m) for m in module.modules() if isinstance(m, NORM_TYPES)}


@pytest.mark.parametrize('name', ALL_NAMES)
def test_every_detector_is_built_as_named(name):
    """Every name: its task, backbone, WS where the variant says, the variant's norm everywhere."""
    task, arch, variant = _parse(name)
    with torch.device('meta'):
        model = zoo.create_detector(name, num_classes=3)
    assert type(model) is TASKS[task]
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert all(p.requires_grad for p in model.parameters())  # no pretrained backbone: nothing frozen
    body, fpn, heads = model.backbone.body, model.backbone.fpn, model.roi_heads
    assert body.feature_info.channels()[-1] == (512 if arch == 'resnet18' else 2048)
    assert all(type(c) is nn.Conv2d for c in _convs(model.rpn.head))  # the RPN head stays plain
    normed = [body, fpn, heads.box_head] + ([heads.mask_head] if task == 'maskrcnn' else [])
    if variant is None:  # the BN baseline, torchvision's design (trainable BN without pretrained weights)
        assert _norm_types(body) == {nn.BatchNorm2d} and not _norm_types(fpn)
        assert isinstance(heads.box_head, TwoMLPHead) and not any(isinstance(c, WSConv2d) for c in _convs(model))
        return
    v = NORM_VARIANTS[variant]
    for part in normed:
        types = _norm_types(part)
        assert types and all(issubclass(t, EXPECTED_NORM[v.norm]) for t in types), (name, part, types)
        assert all(isinstance(c, WSConv2d) == v.ws for c in _convs(part))
    if v.norm == 'bcn':  # micro-batch stage everywhere by default
        assert all(isinstance(m.bn, EstimatedBatchNorm2d) for m in model.modules() if isinstance(m, BatchChannelNorm2d))
    if task == 'maskrcnn':
        assert type(heads.mask_predictor.mask_fcn_logits) is nn.Conv2d  # the logits stay plain


# The bottleneck architectures once each, on the paper's models and the baselines; ResNet-18 elsewhere.
_REAL_ARCH = {('maskrcnn', 'wsgn'): 'resnext101_32x4d', ('maskrcnn', 'wsbcn'): 'resnet50',
              ('fasterrcnn', None): 'resnet101', ('maskrcnn', None): 'resnext50_32x4d'}


def _real_cases():
    """Every (task, variant) pair once."""
    return [f'{task}_{_REAL_ARCH.get((task, v), "resnet18")}_fpn' + (f'_{v}' if v else '')
            for task in TASKS for v in (None, *NORM_VARIANTS)]


def _check_train_eval_round_trip(name, backbone_kwargs):
    task = _parse(name)[0]
    torch.manual_seed(0)
    model = zoo.create_detector(name, num_classes=3, backbone_kwargs=backbone_kwargs, **SMALL)
    images, targets = _images_targets(task == 'maskrcnn')
    losses = model.train()(images, targets)
    expected = {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert set(losses) == expected | ({'loss_mask'} if task == 'maskrcnn' else set())
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [model.backbone.body.conv1.weight, model.backbone.fpn.layer_blocks[0], model.roi_heads.box_head]
    grads += [model.roi_heads.mask_head] if task == 'maskrcnn' else []
    for part in grads:
        params = [part] if isinstance(part, torch.Tensor) else list(part.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (name, part)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, img in zip(detections, images):
        assert det['boxes'].shape[1] == 4 and det['scores'].shape == det['labels'].shape
        if task == 'maskrcnn':
            assert det['masks'].shape[1:] == (1, *img.shape[1:])

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    with torch.device('meta'):  # built again by name, weights only from the checkpoint
        again = zoo.create_detector(name, num_classes=3, backbone_kwargs=backbone_kwargs, **SMALL)
    again.load_state_dict(torch.load(buffer, weights_only=True), strict=True, assign=True)
    assert not any(t.is_meta for t in list(again.parameters()) + list(again.buffers()))
    with torch.no_grad():
        # Detections can be empty (BN's running statistics after one step): compare the features too.
        features, restored = model.backbone(images[0][None]), again.eval().backbone(images[0][None])
        assert all(torch.equal(features[k], restored[k]) for k in features)
        for a, b in zip(detections, again(images)):
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('name', _real_cases())
def test_train_eval_backward_and_checkpoint_round_trip(name):
    _check_train_eval_round_trip(name, SHALLOW)


@pytest.mark.slow
@pytest.mark.parametrize('name', ALL_NAMES)
def test_every_detector_at_full_depth(name):
    _check_train_eval_round_trip(name, None)


def test_torchvision_kwargs_pass_through_and_options():
    with torch.device('meta'):
        model = zoo.create_detector('maskrcnn_resnet50_fpn_wsbcn', num_classes=81, min_size=320, max_size=512,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.2, 0.2, 0.2], bcn_batch_stage='batch',
                                    trainable_backbone_layers=2, norm_groups=16, ws_formula='ws')
    t = model.transform
    assert t.min_size == (320,) and t.max_size == 512 and t.image_mean == [0.5] * 3 and t.image_std == [0.2] * 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 81
    bcns = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert all(m.batch_stage == 'batch' and m.num_groups == 16 for m in bcns)
    assert model.roi_heads.box_head[0][0].ws_formula == WS_FORMULAS['ws'] == model.backbone.body.conv1.ws_formula
    body = model.backbone.body
    assert not any(p.requires_grad for n in ('conv1', 'bn1', 'layer1', 'layer2') for p in getattr(body, n).parameters())
    assert all(p.requires_grad for p in body.layer3.parameters())
    with torch.device('meta'):
        frozen = zoo.create_detector('fasterrcnn_resnet18_fpn', frozen_bn=True)
    assert _norm_types(frozen.backbone.body) == {FrozenBatchNorm2d}
    with pytest.raises(ValueError, match='frozen_bn is for the BN baseline'):
        zoo.create_detector('fasterrcnn_resnet18_fpn_gn', frozen_bn=True)
    with pytest.raises(ValueError, match='trainable_backbone_layers must be in'):
        zoo.create_detector('fasterrcnn_resnet18_fpn_gn', trainable_backbone_layers=6)


def test_unknown_name_and_listing():
    expected = (r"Unknown detector 'maskrcnn_resnet50_fpn_gnws'.*Close matches: .*maskrcnn_resnet50_fpn_wsgn.*"
                r"zoo\.list_detectors\(\)")
    with pytest.raises(UnknownModelError, match=expected):
        zoo.create_detector('maskrcnn_resnet50_fpn_gnws')
    assert zoo.list_detectors('maskrcnn_*_wsbcn') == [
        f'maskrcnn_{a}_fpn_wsbcn' for a in sorted(DETECTOR_ARCHS)]
    assert len(ALL_NAMES) == len(TASKS) * len(DETECTOR_ARCHS) * (len(NORM_VARIANTS) + 1)


def test_no_imagenet_weights_is_a_clear_error():
    with pytest.raises(WeightsError, match=r'maskrcnn_resnet18_fpn_wsgn: no ImageNet weights for its backbone '
                                           r'resnet18_wsgn.*maskrcnn_resnet50_fpn_wsbcn'):
        zoo.create_detector('maskrcnn_resnet18_fpn_wsgn', pretrained_backbone=True)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        zoo.create_detector('maskrcnn_resnet50_fpn_wsgn', pretrained_backbone='/nowhere.pth')


def test_failed_download_names_the_detector_and_the_way_out(monkeypatch):
    import zoo.detection.models as det

    def offline(**kwargs):
        raise OSError('Name or service not known')
    monkeypatch.setattr(det.timm, 'create_model', offline)
    with pytest.raises(WeightsError, match=r'fasterrcnn_resnet50_fpn_wsgn: could not load .* resnet50_wsgn\.in1k: '
                                           r'OSError: Name or service not known.*pretrained_backbone=PATH'):
        zoo.create_detector('fasterrcnn_resnet50_fpn_wsgn', pretrained_backbone=True)


def _ref_features(ref, x):
    """layer1..layer4 outputs of the authors'-layout reference ResNet."""
    x = torch.nn.functional.max_pool2d(torch.relu(ref.bn1(ref.conv1(x))), 3, 2, 1)
    out = []
    for i in range(1, 5):
        x = getattr(ref, f'layer{i}')(x)
        out.append(x)
    return out


def test_pretrained_bcn_backbone_switches_to_estimated_stage_from_imagenet_statistics(tmp_path):
    """An authors' BCN+WS release (large-batch stage) becomes a micro-batch backbone with the same features."""
    ref = _authors_checkpoint('resnet50', 'bcn')
    ref.bn1.pbn.num_batches_tracked.zero_()  # a counter that would restart the estimates' warm-up
    path = tmp_path / 'rn50_bcn_ws.pth'
    _save_release(ref, path)
    model = zoo.create_detector('fasterrcnn_resnet50_fpn_wsbcn', num_classes=3, pretrained_backbone=path, **SMALL)
    body = model.backbone.body
    assert body.conv1.ws_formula == WS_FORMULAS['bcn']  # the release's WS formula in the backbone
    assert model.backbone.fpn.layer_blocks[0][0].ws_formula == WS_FORMULAS['zoo']  # new heads: zoo default
    stem, block = body.bn1.bn, body.layer2[0].bn1.bn
    assert isinstance(stem, EstimatedBatchNorm2d) and isinstance(block, EstimatedBatchNorm2d)
    assert torch.equal(block.running_mean, ref.layer2[0].bn1.pbn.running_mean)
    assert int(block.num_batches_tracked) == 1000 and int(stem.num_batches_tracked) == 100  # 1 / momentum
    # Detectron's freezing: stem and layer1 parameters fixed, their norms still BCN.
    assert not body.conv1.weight.requires_grad and not body.layer1[0].bn1.weight.requires_grad
    assert isinstance(body.layer1[0].bn1, BatchChannelNorm2d) and body.layer2[0].conv1.weight.requires_grad
    # Same features as the release in eval (estimates = ImageNet running statistics).
    x = torch.randn(1, 3, 64, 64)
    body.eval()
    with torch.no_grad():
        for got, expected in zip(body(x), _ref_features(ref, x)):
            assert got.shape == expected.shape and expected.abs().max() > 0.1
            assert (got - expected).abs().max() < 1e-4 * expected.abs().max()  # float rounding only
    # One micro-batch step moves the estimates at the momentum (0.01) from there; nothing replaces them.
    seen = []
    hook = body.layer2[0].bn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    images, targets = _images_targets(False)
    mean0, var0 = block.running_mean.clone(), block.running_var.clone()
    model.train()(images, targets)
    hook.remove()
    (x,) = seen
    batch_mean = x.mean((0, 2, 3))
    batch_var = (x - mean0.view(1, -1, 1, 1)).square().mean((0, 2, 3))  # around the previous estimate
    assert int(block.num_batches_tracked) == 1001
    torch.testing.assert_close(block.running_mean, mean0 + 0.01 * (batch_mean - mean0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.running_var, var0 + 0.01 * (batch_var - var0), rtol=1e-4, atol=1e-5)


def test_pretrained_baseline_loads_torchvision_weights_into_frozen_bn(tmp_path):
    tv = torchvision.models.resnet18()
    with torch.no_grad():
        tv.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / 'resnet18-tv.pth'
    torch.save(tv.state_dict(), path)
    model = zoo.create_detector('fasterrcnn_resnet18_fpn', num_classes=3, pretrained_backbone=path)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and torch.equal(body.bn1.running_mean, tv.bn1.running_mean)
    assert torch.equal(body.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
