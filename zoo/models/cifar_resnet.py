"""CIFAR ResNets of He et al. 2016 (resnet20/32/44/56/110, 6n+2 layers) in every zoo variant.

3x3 stem (16 channels, stride 1, no max-pool), three stages of n BasicBlocks with 16/32/64
channels (strides 1/2/2), global average pool and a linear classifier. Shortcuts that change
shape use a 1x1 conv + norm (He et al.'s option B, as timm), so WS reaches them too.

The plain names (``resnet20``) are the BN baselines. GN, BCN and BGN use ``norm_groups=8``
by default here (2/4/8 channels per group in the three stages), since 32 groups cannot split
16 channels. For BGN with micro-batches that is not a recommendation (see
:class:`~zoo.layers.BatchGroupNorm2d`); ``norm_groups=1`` or ``2`` builds the other settings.

Activation checkpointing: ``checkpoint_stages=True`` (a model kwarg, e.g. in a config's
``model_kwargs``) or timm's ``set_grad_checkpointing()`` checkpoint each stage in training, with the
running statistics and BCN estimates updated once per step and the random draws replayed
(:mod:`zoo.layers.activation_checkpoint`): the same gradients, statistics and RNG state as without.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, ResNet, make_blocks

from zoo.hub.registry import HUB_ORG, pretrained_cfgs  # noqa: F401 (HUB_ORG: still importable from here)
from zoo.layers import DEFAULT_WS_FORMULA, FoldsConvNormsInEval, convert_to_ws, folds_in_eval
from zoo.layers.activation_checkpoint import set_activation_checkpointing
from ._variants import BN_VARIANT, NORM_VARIANTS, NormVariant, make_norm_layer, register_zoo_entrypoint
from .resnet import check_image_batch, fx_symbolic_tracing, weight_dtype
from ._weights import build_zoo_model

torch.fx.wrap('check_image_batch')  # one FX node, run on real tensors (see zoo.models.resnet)

__all__ = ['CifarResNet', 'CIFAR_DEPTHS', 'ZOO_CIFAR_MODELS']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class CifarResNet(FoldsConvNormsInEval, ResNet):
    """He et al. CIFAR ResNet. Shares timm ResNet's head, classifier and init methods."""

    def __init__(
            self,
            layers: Tuple[int, int, int] = (3, 3, 3),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            channels: Tuple[int, ...] = (16, 32, 64),
            norm_variant: NormVariant = BN_VARIANT,
            ws_formula: str = DEFAULT_WS_FORMULA,
            norm_groups: int = 8,
            norm_kwargs: Optional[Dict[str, Any]] = None,
            act_layer=nn.ReLU,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            checkpoint_stages: bool = False,
            device=None,
            dtype=None,
    ):
        nn.Module.__init__(self)  # ResNet.__init__ builds the ImageNet stem and four stages
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.norm_variant = norm_variant
        norm_layer = make_norm_layer(norm_variant.norm, norm_groups, norm_kwargs)

        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(channels[0], **dd)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.Identity()  # kept for ResNet's group_matcher and key layout
        stages, _ = make_blocks(
            (BasicBlock,) * len(channels), channels, layers, channels[0],
            act_layer=act_layer, norm_layer=norm_layer, drop_path_rate=drop_path_rate, **dd)
        for stage in stages:
            self.add_module(*stage)
        self.stage_names = tuple(name for name, _ in stages)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module='act1')] + [
            dict(num_chs=c, reduction=2 ** i, module=n) for i, (n, c) in enumerate(zip(self.stage_names, channels))]

        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)
        if norm_variant.ws:
            convert_to_ws(self, ws_formula)
        if checkpoint_stages:
            self.set_grad_checkpointing(True)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each stage in training, running statistics safe (the zoo's checkpointing, not timm's)."""
        self.grad_checkpointing = enable
        for stage in self._stages():
            set_activation_checkpointing(stage, enable)

    def _stages(self) -> List[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after :func:`check_image_batch`; errors name the model's class (scripted: ``CifarResNet``).

        The dtype check is left out of FX graphs: graph passes (quantization) replace the weights."""
        dtype: Optional[torch.dtype] = None
        if torch.jit.is_scripting():
            dtype = self.conv1.weight.dtype
        elif not fx_symbolic_tracing():
            dtype = weight_dtype(self.conv1)
        return check_image_batch('CifarResNet' if torch.jit.is_scripting() else type(self).__name__, x, self.in_chans,
                                 dtype)

    @folds_in_eval
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self._checked(x))))
        if torch.jit.is_scripting():  # TorchScript looks attributes up by literal name only: the three stages
            if len(self.stage_names) != 3:
                raise RuntimeError('a scripted CifarResNet runs three stages (layer1..layer3)')
            return self.layer3(self.layer2(self.layer1(x)))
        for stage in self._stages():  # checkpointed stages (set_grad_checkpointing) checkpoint themselves
            x = stage(x)
        return x

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
        """Features of the stem (index 0) and of each stage (1..3)."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        x = self._checked(x)
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self._stages()[:max_index] if stop_early else self._stages()
        for idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        for n in self.stage_names[max_index:]:
            setattr(self, n, nn.Sequential())
        if max_index < len(self.stage_names):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:1512.03385,arXiv:1903.10520',
        **kwargs,
    }


_SUFFIXES = ('',) + tuple(f'_{v}' for v in NORM_VARIANTS)
ZOO_CIFAR_MODELS = tuple(f'resnet{d}{s}' for d in CIFAR_DEPTHS for s in _SUFFIXES)


def _all_cfgs() -> Dict[str, Dict[str, Any]]:
    """The registry's CIFAR-10 weights (:mod:`zoo.hub.registry`); an untagged cfg for the other models."""
    cfgs = {}
    for name in ZOO_CIFAR_MODELS:
        tagged = pretrained_cfgs(name)
        for t, fields in tagged.items():
            cfgs[t] = _cfg(label_names=CIFAR10_CLASSES, **fields)
        if not tagged:
            cfgs[name] = _cfg()
    return cfgs


default_cfgs = generate_default_cfgs(_all_cfgs())


def _variant_of(suffix: str) -> NormVariant:
    return NORM_VARIANTS[suffix.lstrip('_')] if suffix else BN_VARIANT


def _create_cifar_resnet(name: str, depth: int, suffix: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    n = (depth - 2) // 6
    model_args = dict(layers=(n, n, n), norm_variant=_variant_of(suffix))
    kwargs.setdefault('feature_cfg', dict(out_indices=(0, 1, 2, 3)))
    return build_zoo_model(CifarResNet, name, pretrained, **dict(model_args, **kwargs))


for _d in CIFAR_DEPTHS:
    for _s in _SUFFIXES:
        register_zoo_entrypoint(
            f'resnet{_d}{_s}', __name__, f'CIFAR ResNet-{_d} with {_variant_of(_s).description}.',
            partial(_create_cifar_resnet, f'resnet{_d}{_s}', _d, _s))
