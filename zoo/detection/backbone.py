"""A timm ``features_only`` backbone with torchvision's FPN, as torchvision detectors expect it.

Any zoo ImageNet model (``resnet50_wsbcn``, ``resnext101_32x4d_wsgn``, ...) or timm ResNet gives
its four stage outputs (strides 4-32) to a :class:`~torchvision.ops.FeaturePyramidNetwork` with
256 channels and a max-pooled fifth level, the inputs of torchvision's RPN and RoI heads. The
state-dict keys are ``body.*`` and ``fpn.*``, as in torchvision's ``BackboneWithFPN``.
"""
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from zoo.layers import FoldsConvNormsInEval, convert_to_ws, folds_in_eval

__all__ = ['TimmFPNBackbone', 'STAGE_NAMES', 'freeze_stages']

FPN_CHANNELS = 256

# A ResNet's stages from the input on: the stem (conv1 + its norm), then layer1..layer4.
STAGE_NAMES = (('conv1', 'bn1'), ('layer1',), ('layer2',), ('layer3',), ('layer4',))


class TimmFPNBackbone(FoldsConvNormsInEval, nn.Module):
    """``body`` (a timm ``features_only`` model) followed by ``fpn``; ``out_channels`` for torchvision.

    Args:
        body: a timm feature extractor returning the stride-4, 8, 16 and 32 maps.
        norm_layer: the FPN's norm (``None``: no norm and biased convs, torchvision's default).
        ws_formula: when given, the FPN's convs are WS convs with this formula.
    """

    def __init__(self, body: nn.Module, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 ws_formula=None, out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        if ws_formula is not None:
            convert_to_ws(self.fpn, ws_formula)
        self.out_channels = out_channels

    @folds_in_eval  # in eval without autograd, BCN batch stages fold into the WS convs (body and FPN)
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def freeze_stages(body: nn.Module, trainable_stages: int) -> None:
    """Freeze the parameters of all but the last ``trainable_stages`` of the five ResNet stages.

    Detectron's default for a pretrained backbone is 3 (stem and layer1 frozen), as torchvision's
    ``trainable_backbone_layers``. Only ``requires_grad`` changes: the norms keep their type (GN,
    BCN, BGN; no frozen BN), and a BCN layer in a frozen stage still updates its batch-stage
    estimates in training, since those are statistics of the detection images, not learned weights.
    """
    if not 0 <= trainable_stages <= len(STAGE_NAMES):
        raise ValueError(f'trainable_backbone_layers must be in [0, {len(STAGE_NAMES)}], got {trainable_stages}')
    frozen = [n for stage in STAGE_NAMES[:len(STAGE_NAMES) - trainable_stages] for n in stage]
    children = dict(body.named_children())
    missing = [n for n in frozen if n not in children]
    if missing:
        raise ValueError(f'Cannot freeze {missing}: the backbone {type(body).__name__} has no such stages '
                         f'(it has {list(children)}); pass trainable_backbone_layers=5 to freeze nothing')
    for name in frozen:
        for p in children[name].parameters():
            p.requires_grad_(False)
