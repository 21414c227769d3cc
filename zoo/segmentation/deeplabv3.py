"""DeepLabV3 on any zoo (or timm) backbone, with heads in the backbone's normalization variant.

torchvision's ``DeepLabV3`` (``DeepLabHead``: ASPP + 3x3 conv + classifier, optional ``FCNHead``
auxiliary classifier) on a timm ``features_only`` backbone, dilated to output stride 8 or 16 with
timm's ``output_stride``. torchvision hard-codes BatchNorm and plain convs in its heads; they are
converted with :func:`zoo.convert_model` to the backbone's variant (WS convs; GN, BCN, BGN or BN),
except each head's final 1x1 classifier conv, which stays plain like the classifier of the zoo's
ImageNet models. The BN baseline keeps torchvision's heads as they are.

ASPP's image-pooling branch normalizes a 1x1 map: a BatchNorm there (the BN baseline, or BCN with
a large-batch ``'batch'`` stage) sees one value per channel per image and cannot train at one
image per device; it raises a clear error instead of torch's. GN, BGN and BCN with its estimated
stage (the zoo default for micro-batches) train at one image per device.

Activation checkpointing (less memory, one more forward of the checkpointed part in backward):
``checkpoint_head=True`` for the classifier head (ASPP and the convs after it) and the auxiliary
head, ``backbone_kwargs=dict(checkpoint_stages=True)`` for the backbone's stages (a ResNet's
layer1..4, every variant). Gradients, running statistics and BCN estimates are those of a run
without it (:mod:`zoo.layers.activation_checkpoint`).

Pretrained backbones: the authors' ``.in1k`` ImageNet weights where they exist (GN+WS and BCN+WS
ResNet-50 / 101), torchvision's ``.tv_in1k`` for the BN baseline. A BCN+WS backbone, trained with a
large-batch BCN stage, is switched to the estimated stage (``bcn_batch_stage``) for micro-batch
fine-tuning: its estimates start from the ImageNet running statistics.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.segmentation.deeplabv3 import ASPPPooling, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from ..convert import convert_model
from ..factory import create_model
from ..layers import FoldsConvNormsInEval, folds_in_eval, set_bcn_batch_stage
from ..layers.activation_checkpoint import checkpoint_resnet_stages, set_activation_checkpointing
from ..models._variants import NORM_VARIANTS
from ..models.resnet import AUTHORS_IN1K
from ..task_registry import TaskRegistry

__all__ = ['SEGMENTERS', 'ZooDeepLabV3', 'build_deeplabv3', 'create_segmenter', 'list_segmenters',
           'backbone_variant', 'SEGMENTER_ARCHS', 'SEGMENTER_VARIANTS']

SEGMENTERS = TaskRegistry('segmenter', 'zoo.list_segmenters()')

# Registered as deeplabv3_<arch>[_<variant>]; any other backbone: build_deeplabv3(backbone=...) or
# the generic name 'deeplabv3' with backbone=....
SEGMENTER_ARCHS = ('resnet18', 'resnet50', 'resnet101')
SEGMENTER_VARIANTS = ('', 'wsgn', 'wsbcn', 'gn', 'bgn')  # '' = the BN baseline; GN and BGN without WS, as their papers
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def backbone_variant(backbone: str) -> str:
    """The zoo variant of a backbone name (``resnet50_wsbcn`` -> ``'wsbcn'``); ``'bn'`` for plain timm names."""
    arch = backbone.split('.')[0]
    suffix = arch.rsplit('_', 1)[-1]
    return suffix if '_' in arch and suffix in NORM_VARIANTS else 'bn'


class FeatureDict(nn.Module):
    """A timm ``features_only`` backbone giving torchvision's ``{'out': last[, 'aux': previous]}``."""

    def __init__(self, body: nn.Module, aux: bool):
        super().__init__()
        self.body = body
        self.aux = aux

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        out = OrderedDict(out=feats[-1])
        if self.aux:
            out['aux'] = feats[-2]
        return out


def _single_value_guard(module: nn.Module, args) -> None:
    x = args[0]
    if module.training and x.numel() // x.shape[1] == 1:
        raise ValueError(
            'DeepLabV3: the BatchNorm of ASPP\'s image-pooling branch normalizes a 1x1 map, so at 1 image per '
            'device it sees a single value per channel and cannot train. Use >= 2 images per device, or a GN / '
            'BCN (estimated batch stage) variant such as deeplabv3_resnet50_wsbcn.')


class ZooDeepLabV3(FoldsConvNormsInEval, DeepLabV3):
    """torchvision ``DeepLabV3`` (forward returns ``{'out'[, 'aux']}`` at input size) with zoo metadata."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: Optional[nn.Module],
                 num_classes: int, norm_variant: str, output_stride: int):
        super().__init__(backbone, classifier, aux_classifier)
        self.num_classes = num_classes
        self.norm_variant = norm_variant
        self.output_stride = output_stride
        for pooling in (m for m in classifier.modules() if isinstance(m, ASPPPooling)):
            for bn in (m for m in pooling.modules() if isinstance(m, _BatchNorm)):
                bn.register_forward_pre_hook(_single_value_guard)

    @folds_in_eval  # in eval without autograd, BCN batch stages fold into the WS convs (backbone and heads)
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return super().forward(x)

    def get_classifier(self) -> nn.Module:
        """The heads (trained from scratch; ``backbone_lr_scale`` of the optimizer leaves them at full lr)."""
        return nn.ModuleList([m for m in (self.classifier, self.aux_classifier) if m is not None])


def _convert_head(head: nn.Module, variant: str, norm_kwargs: Optional[Dict[str, Any]], ws_formula: Optional[str]):
    if variant == 'bn':
        return head
    kwargs = dict(norm_kwargs=norm_kwargs, running_stats=False, exclude=('4',))  # '4': the 1x1 classifier conv
    if ws_formula is not None:
        kwargs['ws_formula'] = ws_formula
    return convert_model(head, variant, **kwargs)


def build_deeplabv3(
        backbone: str,
        num_classes: int = 21,
        output_stride: int = 8,
        aux_loss: bool = False,
        pretrained_backbone: bool = False,
        atrous_rates: Optional[Sequence[int]] = None,
        out_indices: Sequence[int] = (3, 4),
        bcn_batch_stage: Optional[str] = 'estimated',
        head_norm_kwargs: Optional[Dict[str, Any]] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint_head: bool = False,
) -> ZooDeepLabV3:
    """DeepLabV3 on ``backbone`` (any zoo / timm CNN name that supports ``features_only`` and ``output_stride``).

    Args:
        backbone: e.g. ``'resnet101_wsbcn'``, ``'resnet50_wsgn.in1k'``, ``'resnet50'`` (BN baseline).
        num_classes: output classes (background included for VOC: 21).
        output_stride: 8 or 16 (timm dilates the last stages).
        aux_loss: add torchvision's ``FCNHead`` on the stage before the last (``out_indices[0]``).
        pretrained_backbone: load ImageNet weights (the backbone name's own tag, if it has one).
        atrous_rates: ASPP rates; default (12, 24, 36) at stride 8, (6, 12, 18) at stride 16.
        out_indices: timm feature indices of the (aux, main) features.
        bcn_batch_stage: batch stage of the backbone's BCN layers after loading (None: leave it).
        head_norm_kwargs: extra kwargs of the head norms (e.g. ``dict(momentum=0.05)`` for BCN).
        backbone_kwargs: extra ``create_model`` kwargs of the backbone; ``checkpoint_stages=True``
            checkpoints its stages in training (a ResNet's ``layer1..4``: zoo and timm ResNets alike).
        checkpoint_head: activation checkpointing of the head (ASPP, 3x3 conv, classifier; and the
            auxiliary head) in training: its activations, large at output stride 8, are recomputed in
            backward instead of kept. Gradients and norm statistics are unchanged.
    """
    if output_stride not in ATROUS_RATES:
        raise ValueError(f'output_stride must be 8 or 16, got {output_stride}')
    variant = backbone_variant(backbone)
    backbone_kwargs = dict(backbone_kwargs or {})
    checkpoint_stages = backbone_kwargs.pop('checkpoint_stages', False)  # done here: timm's own ResNets take it too
    body = create_model(backbone, pretrained=pretrained_backbone, features_only=True, out_indices=tuple(out_indices),
                        output_stride=output_stride, **backbone_kwargs)
    if checkpoint_stages:
        checkpoint_resnet_stages(body, backbone)
    if bcn_batch_stage is not None:
        set_bcn_batch_stage(body, bcn_batch_stage)
    channels = body.feature_info.channels()
    rates = tuple(atrous_rates) if atrous_rates is not None else ATROUS_RATES[output_stride]
    ws_formula = (backbone_kwargs or {}).get('ws_formula') or getattr(body, '_model_args', {}).get('ws_formula')
    head = _convert_head(DeepLabHead(channels[-1], num_classes, rates), variant, head_norm_kwargs, ws_formula)
    aux = _convert_head(FCNHead(channels[-2], num_classes), variant, head_norm_kwargs, ws_formula) if aux_loss else None
    if checkpoint_head:
        for h in (head, aux):
            if h is not None:
                set_activation_checkpointing(h)
    return ZooDeepLabV3(FeatureDict(body, aux_loss), head, aux, num_classes, variant, output_stride)


def _pretrained_tag(arch: str, variant: str) -> str:
    """The backbone name with the tag of its ImageNet weights; an error if the zoo has none."""
    if not variant:
        return f'{arch}.tv_in1k'
    name = f'{arch}_{variant}.in1k'
    if name not in AUTHORS_IN1K:
        raise ValueError(f'No ImageNet weights for {arch}_{variant} (the authors released {sorted(AUTHORS_IN1K)}); '
                         f'use pretrained_backbone=False')
    return name


def _register(arch: str, variant: str) -> None:
    name = f'deeplabv3_{arch}' + (f'_{variant}' if variant else '')
    backbone = f'{arch}_{variant}' if variant else arch

    def build(pretrained_backbone: bool = False, **kwargs) -> ZooDeepLabV3:
        name_tag = _pretrained_tag(arch, variant) if pretrained_backbone else backbone
        return build_deeplabv3(name_tag, pretrained_backbone=pretrained_backbone, **kwargs)

    build.__name__ = name
    build.__doc__ = f'DeepLabV3 with a {backbone} backbone (see build_deeplabv3 for the kwargs).'
    SEGMENTERS.register(name, build)


for _arch in SEGMENTER_ARCHS:
    for _v in SEGMENTER_VARIANTS:
        _register(_arch, _v)
SEGMENTERS.register('deeplabv3', build_deeplabv3)  # any backbone: create_segmenter('deeplabv3', backbone=...)


def create_segmenter(name: str, **kwargs) -> ZooDeepLabV3:
    """Build a registered segmenter, e.g. ``create_segmenter('deeplabv3_resnet101_wsbcn', num_classes=21)``."""
    return SEGMENTERS.create(name, **kwargs)


def list_segmenters(filter: str = '') -> list:
    """Registered segmenter names (optionally a wildcard filter)."""
    return SEGMENTERS.list(filter)
