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
    checkpoint_stages: activation checkpointing of the four stages in training (default False), as
        ``set_grad_checkpointing()``; see :mod:`zoo.layers.activation_checkpoint`.

Activation checkpointing (``checkpoint_stages=True`` or timm's ``set_grad_checkpointing()``) is per
stage (``layer1..4``) and keeps norms with running statistics exact: gradients, running statistics
(BN, BGN) and BCN's estimates are those of a run without it, each updated once per step. The stages
checkpoint themselves, so timm's ``features_only`` models built from a model with
``checkpoint_stages=True`` (the detectors' and segmenters' backbones) checkpoint too; do not turn on
the ``features_only`` wrapper's own ``set_grad_checkpointing``: timm's plain checkpointing would update
the running statistics twice.

Pretrained ``.in1k`` tags load the authors' ImageNet releases (GN+WS ResNet-50/101, ResNeXt-50/101;
BCN+WS ResNet-50/101, ResNeXt-50) and convert them on load. Such a tag also builds the model the
weights need (``ws_formula='ws'``; or ``'bcn'`` with ``norm_kwargs=dict(batch_stage='batch')``):
always when the tag is named, and for an untagged name only with ``pretrained=True``; an untagged
name with ``pretrained=False`` builds the zoo defaults (see :mod:`zoo.models._weights`).

``resnet50_gn`` is timm's own registration (same architecture), which the zoo does not shadow.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._registry import is_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from zoo.hub.registry import entries, pretrained_cfgs
from zoo.layers import DEFAULT_WS_FORMULA, FoldsConvNormsInEval, convert_to_ws, folds_in_eval
from zoo.layers.activation_checkpoint import set_activation_checkpointing
from ._variants import BN_VARIANT, NORM_VARIANTS, NormVariant, make_norm_layer, register_zoo_entrypoint
from ._weights import build_zoo_model

__all__ = ['ZooResNet', 'IMAGENET_ARCHS', 'check_image_batch', 'check_batch_values', 'shape_text', 'weight_dtype']

STAGES = ('layer1', 'layer2', 'layer3', 'layer4')

# True inside torch.fx.symbolic_trace only (is_fx_tracing, the fallback on old torch, also warns under torch.export)
fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


@register_notrace_function
def check_image_batch(model_name: str, x: torch.Tensor, in_chans: int,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Clear errors for the usual wrong inputs, before they reach a conv; returns ``x``.

    Branches on the input's shape and dtype, so FX records it as one call (timm's notrace
    functions; ``torch.fx.wrap`` below for the methods that call it) and runs it on real tensors.
    Callers use the returned ``x``, so graph passes that drop unused nodes keep the check.
    TorchScript-compatible, so scripted models (and scripted FX graphs) keep it too. ``dtype``: the
    dtype of the model's weights (None: not checked), see :func:`check_batch_values`.
    """
    if x.ndim != 4:
        hint = ' (a single image? add the batch dimension with x.unsqueeze(0))' if x.ndim == 3 else ''
        raise ValueError(f'{model_name} expects a 4-D (N, C, H, W) image batch, got shape {shape_text(x)}{hint}')
    check_batch_values(model_name, x, 'image batch', dtype)
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{model_name} expects {in_chans} input channels, got {x.shape[1]} (input shape {shape_text(x)}); '
            f'create the model with in_chans={x.shape[1]} to change its stem')
    return x


def shape_text(x: torch.Tensor) -> str:
    """``str(tuple(x.shape))``, also in TorchScript (which has no tuples of unknown length)."""
    return '(' + ', '.join([str(d) for d in x.shape]) + (',)' if x.ndim == 1 else ')')


def _autocast_on(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting():  # TorchScript's is_autocast_enabled takes no device
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled(x.device.type)


def weight_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``module.weight`` (a model's first conv: the input dtype it expects), None if it has no tensor weight."""
    weight = getattr(module, 'weight', None)
    return weight.dtype if isinstance(weight, torch.Tensor) else None


def check_batch_values(model_name: str, x: torch.Tensor, kind: str, expected: Optional[torch.dtype] = None) -> None:
    """A floating-point batch of at least one sample (shape and dtype only: no look at the values), of dtype
    ``expected`` (the weights', if given) unless autocast runs the convs in lower precision (never from float64)."""
    if not x.is_floating_point():
        dtype = 'not floating-point' if torch.jit.is_scripting() else str(x.dtype)  # TorchScript prints a number
        raise TypeError(
            f'{model_name} expects a floating-point {kind}, got dtype {dtype} (shape {shape_text(x)}): convert '
            f'and normalize it first, e.g. (x.float() / 255 - mean) / std with the mean and std of '
            f'model.pretrained_cfg, or timm.data.create_transform(**timm.data.resolve_data_config(model=model))')
    if x.shape[0] == 0:
        raise ValueError(
            f'{model_name} got an empty {kind} (shape {shape_text(x)}): there is nothing to compute; '
            f'skip empty batches before calling the model')
    if expected is not None and x.dtype != expected and (x.dtype == torch.float64 or not _autocast_on(x)):
        if torch.jit.is_scripting():
            raise TypeError(f'{model_name} expects the dtype of its weights for its {kind}, got another '
                            f'(shape {shape_text(x)}): convert it with x.to(dtype) first')
        raise TypeError(
            f'{model_name} expects a {expected} {kind} (the dtype of its weights), got {x.dtype} (shape '
            f'{shape_text(x)}): convert it first with x.to({expected}), or convert the model with '
            f'model.to({x.dtype}) to compute in {x.dtype}')


# FX patches wrapped names in the globals of the calling module (timm's list reaches forward() only).
torch.fx.wrap('check_image_batch')


class ZooResNet(FoldsConvNormsInEval, ResNet):
    """timm ``ResNet`` with a zoo normalization variant (WS convs and / or BCN, GN, BGN norms)."""

    def __init__(
            self,
            *args,
            norm_variant: NormVariant = BN_VARIANT,
            ws_formula: str = DEFAULT_WS_FORMULA,
            norm_groups: int = 32,
            norm_kwargs: Optional[Dict[str, Any]] = None,
            checkpoint_stages: bool = False,
            **kwargs,
    ):
        super().__init__(*args, norm_layer=make_norm_layer(norm_variant.norm, norm_groups, norm_kwargs), **kwargs)
        self.norm_variant = norm_variant
        if norm_variant.ws:
            convert_to_ws(self, ws_formula)
        if checkpoint_stages:
            self.set_grad_checkpointing(True)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each stage in training, running statistics safe (the zoo's checkpointing, not timm's)."""
        self.grad_checkpointing = enable
        for name in STAGES:
            set_activation_checkpointing(getattr(self, name), enable)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after :func:`check_image_batch`; errors name the model's class (scripted: ``ZooResNet``).

        The dtype check is left out of FX graphs: graph passes (quantization) replace the weights."""
        dtype: Optional[torch.dtype] = None
        if torch.jit.is_scripting():
            dtype = self.conv1.weight.dtype
        elif not fx_symbolic_tracing():
            dtype = weight_dtype(self.conv1)
        return check_image_batch('ZooResNet' if torch.jit.is_scripting() else type(self).__name__, x, self.in_chans,
                                 dtype)

    @folds_in_eval
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's ResNet.forward_features, spelled out (TorchScript has no super()), without its
        # checkpoint_seq: checkpointed stages checkpoint themselves.
        x = self.maxpool(self.act1(self.bn1(self.conv1(self._checked(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @folds_in_eval
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``ResNet.forward_intermediates`` without its ``checkpoint_seq`` (stages checkpoint themselves)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(STAGES) + 1, indices)
        x = self.act1(self.bn1(self.conv1(self._checked(x))))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        names = STAGES[:max_index] if stop_early else STAGES
        for idx, name in enumerate(names, start=1):
            x = getattr(self, name)(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates


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

# The authors' ImageNet releases (Qiao et al.): '.in1k' tags that load and convert the published
# files, listed in the weights registry with their build args (WS formula, BCN batch stage).
AUTHORS_IN1K = {e.name: e for e in entries(dataset='imagenet-1k')}


def _imagenet_cfgs() -> Dict[str, Dict[str, Any]]:
    cfgs = {}
    for arch in IMAGENET_ARCHS:
        for v in NORM_VARIANTS:
            name = f'{arch}_{v}'
            if name in _TIMM_OWNED:
                continue
            tagged = pretrained_cfgs(name)
            for t, fields in tagged.items():
                cfgs[t] = _cfg(**fields)
            if not tagged:
                cfgs[name] = _cfg(description=f'{arch} with {NORM_VARIANTS[v].description}')
    return cfgs


default_cfgs = generate_default_cfgs(_imagenet_cfgs())


def _create_zoo_resnet(variant_name: str, arch: str, norm_variant: str, pretrained: bool = False, **kwargs) -> ZooResNet:
    model_args = dict(IMAGENET_ARCHS[arch], norm_variant=NORM_VARIANTS[norm_variant])
    return build_zoo_model(ZooResNet, variant_name, pretrained, **dict(model_args, **kwargs))


ZOO_IMAGENET_MODELS = tuple(f'{a}_{v}' for a in IMAGENET_ARCHS for v in NORM_VARIANTS)
for _arch in IMAGENET_ARCHS:
    for _v in NORM_VARIANTS:
        if f'{_arch}_{_v}' not in _TIMM_OWNED:
            register_zoo_entrypoint(
                f'{_arch}_{_v}', __name__, f'{_arch} with {NORM_VARIANTS[_v].description}.',
                partial(_create_zoo_resnet, f'{_arch}_{_v}', _arch, _v))
