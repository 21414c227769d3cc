"""Faster R-CNN and Mask R-CNN with FPN and a zoo backbone, by name.

Names: ``{fasterrcnn,maskrcnn}_{arch}_fpn[_{variant}]``, e.g. ``maskrcnn_resnet50_fpn_wsbcn``:

- ``arch``: a zoo ImageNet architecture, one of :data:`DETECTOR_ARCHS`;
- ``variant``: a zoo normalization variant (``wsbcn``, ``wsgn``, ``wsbgn``, ``wsbn``, ``bcn``,
  ``gn``, ``bgn``). The backbone is the zoo model ``{arch}_{variant}`` (timm ``features_only``), and
  the FPN, the box head (4 convs of 256 channels + 1 fc of 1024, torchvision's
  ``FastRCNNConvFCHead``) and the mask head (4 convs, ``MaskRCNNHeads``) use the same variant:
  WS convs (for ``ws*``) and its norm, as the paper's "GN+WS everywhere" models. The RPN head
  (one 3x3 conv) and the predictors stay plain, as in the paper and mmdet's ``gn+ws`` configs.
- no variant (``maskrcnn_resnet50_fpn``): the BN baseline, torchvision's ``maskrcnn_resnet50_fpn``
  design: timm's ``{arch}`` backbone, FPN without norm, torchvision's two-fc box head and plain
  4-conv mask head. As in torchvision, its BN is frozen (``FrozenBatchNorm2d``) with a pretrained
  backbone and a trainable ``BatchNorm2d`` without one (frozen identity statistics would leave
  a from-scratch backbone unnormalized); ``frozen_bn=True / False`` decides explicitly.

A BCN or BGN layer in the box and mask heads sees the (num_rois, 256, 7x7 or 14x14) RoI features:
its batch statistics (BCN's estimated stage, BGN's groups) are taken over the RoIs of the batch.

Activation checkpointing (less memory, one more forward of the checkpointed parts in backward):
``checkpoint_heads=True`` for the box and mask heads, ``backbone_kwargs=dict(checkpoint_stages=True)``
for the backbone's stages (layer1..4, every variant). Gradients, running statistics and BCN
estimates are those of a run without it (:mod:`zoo.layers.activation_checkpoint`).

``num_classes`` counts the background, torchvision's convention: 91 (the default) for COCO's
category ids 1-90 used as labels directly, 81 for the 80 COCO categories mapped to 1-80.
"""
import os
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from zoo.hub import WeightsError
from zoo.layers import DEFAULT_WS_FORMULA, convert_to_ws, set_bcn_batch_stage
from zoo.layers.activation_checkpoint import checkpoint_resnet_stages, set_activation_checkpointing
from zoo.models import NORM_VARIANTS
from zoo.models._variants import make_norm_layer
from zoo.models.resnet import _TIMM_OWNED
from zoo.task_registry import TaskRegistry
from .backbone import STAGE_NAMES, TimmFPNBackbone, freeze_stages

__all__ = ['DETECTORS', 'DETECTOR_ARCHS', 'create_detector', 'list_detectors', 'detector_name', 'detector_backbone']

DETECTORS = TaskRegistry('detector', 'zoo.list_detectors()')

# The paper's four COCO backbones (those with the authors' ImageNet weights), and ResNet-18 as a
# small one for CPU runs and tests.
DETECTOR_ARCHS = ('resnet18', 'resnet50', 'resnet101', 'resnext50_32x4d', 'resnext101_32x4d')
DETECTOR_TASKS = {'fasterrcnn': FasterRCNN, 'maskrcnn': MaskRCNN}
DETECTOR_TITLES = {'fasterrcnn': 'Faster R-CNN', 'maskrcnn': 'Mask R-CNN'}
FEATURE_INDICES = (1, 2, 3, 4)  # layer1..layer4 of a ResNet: strides 4, 8, 16, 32
HEAD_CHANNELS = 256
BOX_FC_CHANNELS = 1024
BASELINE_TAG = 'tv_in1k'  # torchvision's ImageNet weights, as torchvision's own baseline uses
ZOO_TAG = 'in1k'  # the authors' GN+WS / BCN+WS ImageNet releases


def detector_name(task: str, arch: str, variant: Optional[str] = None) -> str:
    return f'{task}_{arch}_fpn' + (f'_{variant}' if variant else '')


def _backbone_name(arch: str, variant: Optional[str]) -> str:
    return f'{arch}_{variant}' if variant else arch


def detector_backbone(name: str) -> Tuple[str, Optional[str]]:
    """The backbone and variant of a detector name: ``'maskrcnn_resnet50_fpn_wsbcn'`` ->
    ``('resnet50_wsbcn', 'wsbcn')``, ``'fasterrcnn_resnet18_fpn'`` -> ``('resnet18', None)`` (the BN baseline)."""
    arch, _, variant = name.split('_', 1)[-1].partition('_fpn')
    variant = variant.lstrip('_') or None
    return _backbone_name(arch, variant), variant


def _pretrained_source(name: str, backbone: str, variant: Optional[str], pretrained) -> Dict[str, Any]:
    """timm kwargs that load the backbone's ImageNet weights, or a clear error when there are none."""
    if not pretrained:
        return {}
    tag = BASELINE_TAG if variant is None else ZOO_TAG
    tagged = f'{backbone}.{tag}'
    has_tag = tagged in timm.list_pretrained(f'{backbone}.*')
    if isinstance(pretrained, (str, os.PathLike)):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f'{name}: pretrained_backbone file {pretrained} does not exist')
        # A local copy: the tag's converter and build args apply when the tag exists (e.g. an authors' file).
        return dict(model_name=tagged if has_tag else backbone, pretrained=True,
                    pretrained_cfg_overlay=dict(file=str(pretrained)))
    if not has_tag:
        with_weights = [n for n in DETECTORS.list() if _has_weights(n)]
        raise WeightsError(
            f'{name}: no ImageNet weights for its backbone {backbone} (no {tagged} in timm / the zoo). Detectors '
            f'whose backbones have them: {", ".join(with_weights)}. Or pass pretrained_backbone=PATH to a local '
            f'file of {backbone} weights.')
    return dict(model_name=tagged, pretrained=True)


def _has_weights(name: str) -> bool:
    backbone, variant = detector_backbone(name)
    tag = BASELINE_TAG if variant is None else ZOO_TAG
    return f'{backbone}.{tag}' in timm.list_pretrained(f'{backbone}.*')


def _build_body(name, arch, variant, pretrained_backbone, norm_groups, ws_formula, norm_kwargs, backbone_kwargs):
    backbone = _backbone_name(arch, variant)
    kwargs = dict(model_name=backbone, features_only=True, out_indices=FEATURE_INDICES)
    kwargs.update(_pretrained_source(name, backbone, variant, pretrained_backbone))
    zoo_args = dict(norm_groups=norm_groups, ws_formula=ws_formula, norm_kwargs=norm_kwargs)
    if variant is not None and backbone not in _TIMM_OWNED:
        # The zoo's own model: explicit args win over a pretrained tag's (which may set ws_formula, batch stage).
        kwargs.update({k: v for k, v in zoo_args.items() if v is not None})
    elif ws_formula is not None or norm_kwargs or norm_groups != 32:
        raise ValueError(f'{name}: its backbone {backbone} is timm\'s own model, built as timm defines it; '
                         f'norm_groups / ws_formula / norm_kwargs apply to zoo backbones only')
    backbone_kwargs = dict(backbone_kwargs or {})
    checkpoint_stages = backbone_kwargs.pop('checkpoint_stages', False)  # done here: timm's own ResNets take it too
    kwargs.update(backbone_kwargs)
    try:
        body = timm.create_model(**kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # WeightsError, a failed Hub / URL download, ...
        if pretrained_backbone is not True:
            raise
        raise WeightsError(f'{name}: could not load the ImageNet weights of its backbone {kwargs["model_name"]}: '
                           f'{type(e).__name__}: {e} Offline, pass pretrained_backbone=PATH to a local copy.') from e
    if checkpoint_stages:
        checkpoint_resnet_stages(body, backbone)
    return body


def _build_detector(
        task: str,
        arch: str,
        variant: Optional[str],
        num_classes: int = 91,
        pretrained_backbone: Union[bool, str, os.PathLike] = False,
        trainable_backbone_layers: Optional[int] = None,
        norm_groups: int = 32,
        ws_formula: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        bcn_batch_stage: str = 'estimated',
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        frozen_bn: Optional[bool] = None,
        checkpoint_heads: bool = False,
        **kwargs,
) -> nn.Module:
    name = detector_name(task, arch, variant)
    if frozen_bn and variant is not None:
        raise ValueError(f'{name}: frozen_bn is for the BN baseline ({detector_name(task, arch)}); '
                         f'the {variant} variant trains its norms')
    body = _build_body(name, arch, variant, pretrained_backbone, norm_groups, ws_formula, norm_kwargs, backbone_kwargs)
    if variant is None:  # BN baseline: plain FPN and heads (torchvision's defaults)
        if bool(pretrained_backbone) if frozen_bn is None else frozen_bn:
            body = freeze_batch_norm_2d(body)
        backbone = TimmFPNBackbone(body)
    else:
        v = NORM_VARIANTS[variant]
        head_norm_kwargs = dict(norm_kwargs or {})
        if v.norm == 'bcn':
            head_norm_kwargs['batch_stage'] = bcn_batch_stage
            set_bcn_batch_stage(body, bcn_batch_stage)  # pretrained statistics become the estimates
        norm = make_norm_layer(v.norm, norm_groups, head_norm_kwargs)
        head_ws = (ws_formula or DEFAULT_WS_FORMULA) if v.ws else None
        backbone = TimmFPNBackbone(body, norm_layer=norm, ws_formula=head_ws)
        kwargs.setdefault('box_head', _ws(FastRCNNConvFCHead(
            (HEAD_CHANNELS, 7, 7), [HEAD_CHANNELS] * 4, [BOX_FC_CHANNELS], norm_layer=norm), head_ws))
        if task == 'maskrcnn':
            mask_head = MaskRCNNHeads(HEAD_CHANNELS, [HEAD_CHANNELS] * 4, 1, norm_layer=norm)
            kwargs.setdefault('mask_head', _ws(mask_head, head_ws))
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if pretrained_backbone else len(STAGE_NAMES)
    freeze_stages(backbone.body, trainable_backbone_layers)  # after every module swap above
    model = DETECTOR_TASKS[task](backbone, num_classes=num_classes, **kwargs)
    if checkpoint_heads:
        for head in (model.roi_heads.box_head, getattr(model.roi_heads, 'mask_head', None)):
            _checkpoint_conv_blocks(head)
    return model


def _checkpoint_conv_blocks(head: Optional[nn.Module]) -> None:
    """Checkpoint each conv -> norm -> ReLU block of a conv head on its own (not the BN baseline's two-fc head).

    One segment per block, not per head: a head checkpointed whole is recomputed whole in backward,
    while the rest of the graph is still alive, so the peak keeps every activation of the head; per
    block, the recomputation holds one block's activations beside the blocks' inputs.
    """
    if isinstance(head, nn.Sequential):
        for block in head:
            if isinstance(block, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in block.children()):
                set_activation_checkpointing(block)


def _ws(head: nn.Module, ws_formula: Optional[str]) -> nn.Module:
    return convert_to_ws(head, ws_formula) if ws_formula is not None else head


def create_detector(name: str, num_classes: int = 91, pretrained_backbone: Union[bool, str, os.PathLike] = False,
                    **kwargs) -> nn.Module:
    """A torchvision ``FasterRCNN`` / ``MaskRCNN`` by zoo name (see :func:`list_detectors`).

    Args:
        name: e.g. ``'maskrcnn_resnet50_fpn_wsbcn'``; an unknown name raises
            :class:`zoo.UnknownModelError` with close matches.
        num_classes: classes *including the background* (torchvision's convention; label 0 is
            the background): 91 for COCO category ids, 81 for the 80 categories numbered 1-80.
        pretrained_backbone: ``True`` loads the backbone's ImageNet weights: the authors' ``.in1k``
            release for a zoo variant (GN+WS, BCN+WS), torchvision's ``.tv_in1k`` for the BN
            baseline; a backbone without such weights raises :class:`zoo.WeightsError`. A path loads
            a local file instead (the release's own layout is converted, as for the ``.in1k`` tag).
        trainable_backbone_layers: how many of the five backbone stages (stem, layer1..4, counted
            from the last) train; default 3 (stem and layer1 frozen, Detectron's default) with a
            pretrained backbone, else 5. Norms stay GN / BCN / BGN; only parameters are frozen.
        norm_groups: groups of GN / BCN / BGN, in the backbone and the heads (default 32).
        ws_formula: WS formula of the heads and, when given, the backbone (default: the pretrained
            tag's formula for the backbone, the zoo's for the heads).
        norm_kwargs: extra kwargs of every norm layer, e.g. ``dict(momentum=0.001)`` for BCN.
        bcn_batch_stage: BCN's batch stage everywhere, ``'estimated'`` (default: micro-batches; a
            pretrained large-batch BCN backbone is switched, its estimates starting from the
            ImageNet running statistics) or ``'batch'`` (large batches per device).
        backbone_kwargs: extra kwargs of ``timm.create_model`` for the backbone; ``checkpoint_stages=True``
            checkpoints its four stages in training (any variant: the BN baseline's timm ResNet too).
        frozen_bn: BN baseline only: freeze its BN (default: with a pretrained backbone, as torchvision).
        checkpoint_heads: activation checkpointing of the box head (4 convs + fc) and the mask head
            (4 convs) in training, each one checkpointed segment: their activations are recomputed
            in backward instead of kept. Any variant accepts it; the BN baseline's box head
            (torchvision's two-fc ``TwoMLPHead``, two 1024-d vectors per region) is left as it is, its
            mask head is checkpointed. Gradients and norm statistics are unchanged. For the backbone
            stages, pass ``backbone_kwargs=dict(checkpoint_stages=True)``.
        **kwargs: passed to torchvision's ``FasterRCNN`` / ``MaskRCNN``: ``min_size``, ``max_size``,
            ``image_mean``, ``image_std``, ``rpn_anchor_generator``, ``box_detections_per_img``, ...
    """
    return DETECTORS.create(name, num_classes=num_classes, pretrained_backbone=pretrained_backbone, **kwargs)


def list_detectors(filter: str = '') -> list:
    """Registered detector names, optionally filtered by a wildcard (``'maskrcnn_*_wsbcn'``)."""
    return DETECTORS.list(filter)


def _register(task: str, arch: str, variant: Optional[str]) -> None:
    build = partial(_build_detector, task, arch, variant)
    build.__doc__ = (f'{DETECTOR_TITLES[task]} with FPN and a {_backbone_name(arch, variant)} backbone '
                     f'(see create_detector for the kwargs).')  # the model card's description
    DETECTORS.register(detector_name(task, arch, variant), build)


for _task in DETECTOR_TASKS:
    for _arch in DETECTOR_ARCHS:
        for _variant in (None, *NORM_VARIANTS):
            _register(_task, _arch, _variant)
