"""ResNet / ResNeXt (ImageNet layout) in every zoo normalization variant.

Built on timm's ``ResNet``, so the state-dict keys are timm's / torchvision's (``conv1``,
``bn1``, ``layerX.Y.conv1..3``, ``layerX.Y.bn1..3``, ``layerX.0.downsample.0/1``, ``fc``).
timm hard-codes ``nn.Conv2d``; WS variants swap every conv (stem and shortcuts included) for a
:class:`~zoo.layers.WSConv2d` that shares its parameters, so keys and init stay as timm's.

Extra model kwargs, on top of timm's ResNet ones (``num_classes``, ``in_chans``,
``drop_path_rate``, ``global_pool``, ...):
    ws_formula: WS formula name (see :mod:`zoo.layers.weight_standardization`).
    norm_groups: groups of GN / BCN's channel stage / BGN (default 32).
    norm_kwargs: extra kwargs for the norm layer, e.g. ``dict(batch_stage='batch')`` for BCN.

``resnet50_gn`` is timm's own registration (same architecture), which the zoo does not shadow.
"""
from typing import Any, Dict, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import is_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from zoo.layers import DEFAULT_WS_FORMULA, convert_to_ws
from ._variants import BN_VARIANT, NORM_VARIANTS, NormVariant, make_norm_layer

__all__ = ['ZooResNet', 'IMAGENET_ARCHS', 'check_image_batch']


def check_image_batch(model_name: str, x: torch.Tensor, in_chans: int) -> None:
    """Clear errors for the usual wrong inputs, before they reach a conv."""
    if x.ndim != 4:
        hint = ' (a single image? add the batch dimension with x.unsqueeze(0))' if x.ndim == 3 else ''
        raise ValueError(f'{model_name} expects a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}{hint}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{model_name} expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); '
            f'create the model with in_chans={x.shape[1]} to change its stem')


class ZooResNet(ResNet):
    """timm ``ResNet`` with a zoo normalization variant (WS convs and / or BCN, GN, BGN norms)."""

    def __init__(
            self,
            *args,
            norm_variant: NormVariant = BN_VARIANT,
            ws_formula: str = DEFAULT_WS_FORMULA,
            norm_groups: int = 32,
            norm_kwargs: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        super().__init__(*args, norm_layer=make_norm_layer(norm_variant.norm, norm_groups, norm_kwargs), **kwargs)
        self.norm_variant = norm_variant
        if norm_variant.ws:
            convert_to_ws(self, ws_formula)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_chans)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        check_image_batch(type(self).__name__, x, self.in_chans)
        return super().forward_intermediates(x, *args, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:1903.10520',
        **kwargs,
    }


# name -> timm ResNet args
IMAGENET_ARCHS: Dict[str, Dict[str, Any]] = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet34': dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    'resnet101': dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    'resnet152': dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    'resnext50_32x4d': dict(block=Bottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4),
    'resnext101_32x4d': dict(block=Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=4),
    'resnext101_32x8d': dict(block=Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=8),
}

# Architectures timm already registers under the zoo's name; the zoo uses timm's.
_TIMM_OWNED = frozenset(n for n in (f'{a}_{v}' for a in IMAGENET_ARCHS for v in NORM_VARIANTS) if is_model(n))

default_cfgs = generate_default_cfgs({
    f'{arch}_{v}': _cfg(description=f'{arch} with {NORM_VARIANTS[v].description}')
    for arch in IMAGENET_ARCHS for v in NORM_VARIANTS if f'{arch}_{v}' not in _TIMM_OWNED
})


def _create_zoo_resnet(variant_name: str, arch: str, norm_variant: str, pretrained: bool = False, **kwargs) -> ZooResNet:
    model_args = dict(IMAGENET_ARCHS[arch], norm_variant=NORM_VARIANTS[norm_variant])
    return build_model_with_cfg(ZooResNet, variant_name, pretrained, **dict(model_args, **kwargs))


def _make_entrypoint(arch: str, norm_variant: str):
    name = f'{arch}_{norm_variant}'

    def entrypoint(pretrained: bool = False, **kwargs) -> ZooResNet:
        return _create_zoo_resnet(name, arch, norm_variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'{arch} with {NORM_VARIANTS[norm_variant].description}.'
    return entrypoint


ZOO_IMAGENET_MODELS = tuple(f'{a}_{v}' for a in IMAGENET_ARCHS for v in NORM_VARIANTS)
for _arch in IMAGENET_ARCHS:
    for _v in NORM_VARIANTS:
        if f'{_arch}_{_v}' not in _TIMM_OWNED:
            register_model(_make_entrypoint(_arch, _v))
