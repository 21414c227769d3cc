"""TSM (temporal shift) ResNets for video recognition, in the zoo's normalization variants.

Input: clips shaped ``(B, C, T, H, W)`` (channels first, then time, as in PyTorch's 3D convs),
with ``T == num_segments`` (default 8; a model kwarg). Inside, the frames are folded into the
batch, ``(B * T, C, H, W)``, and run through the 2D :class:`~zoo.models.ZooResNet`; every residual
block shifts part of its branch's channels one frame back and forward in time before ``conv1``
(:mod:`zoo.layers.temporal_shift`). The head pools each frame, averages the T frames (TSN's
segment consensus) and classifies.

Folding frames into the batch means a BCN batch stage (or BatchNorm) sees ``B * T`` samples, and
the estimated batch stage all-reduces its statistics across processes as for images.

The shift has no parameters: state-dict keys equal those of the 2D model of the same name
(``tsm_resnet50_wsbcn`` <-> ``resnet50_wsbcn``), so ImageNet weights load unchanged, e.g.
``timm.create_model('tsm_resnet50_wsbcn', pretrained=True, num_classes=400,
pretrained_cfg_overlay=dict(file='resnet50_wsbcn.safetensors', num_classes=1000))``: the overlay's
``num_classes`` is the file's, so its 1000-class head is dropped for a new 400-class one. Weights
load through :func:`~zoo.models._weights.build_zoo_model`, so a file that does not fit raises
:class:`zoo.hub.WeightsError` naming the keys. With ``num_segments=1`` there is no shift and the
model equals the 2D one.

Names: ``tsm_{resnet18,resnet50,resnet101}_{wsbcn,wsgn,bn}``; ``_bn`` is plain conv + BatchNorm.
Extra kwargs: ``num_segments``, ``shift_div`` (1/shift_div of the channels shift each way,
default 8) and every :class:`~zoo.models.ZooResNet` kwarg (``ws_formula``, ``norm_groups``,
``norm_kwargs``, ...).
"""
from functools import partial
from typing import Any, Dict

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs

from zoo.layers.temporal_shift import add_temporal_shift
from ._variants import BN_VARIANT, NORM_VARIANTS, register_zoo_entrypoint
from ._weights import build_zoo_model
from .resnet import IMAGENET_ARCHS, ZooResNet, check_batch_values

__all__ = ['TSMResNet', 'TSM_ARCHS', 'TSM_VARIANTS', 'ZOO_TSM_MODELS', 'check_video_batch']

TSM_ARCHS = ('resnet18', 'resnet50', 'resnet101')
TSM_VARIANTS = {'wsbcn': NORM_VARIANTS['wsbcn'], 'wsgn': NORM_VARIANTS['wsgn'], 'bn': BN_VARIANT}


@register_notrace_function
def check_video_batch(model_name: str, x: torch.Tensor, in_chans: int, num_segments: int) -> torch.Tensor:
    """Clear errors for the usual wrong clip layouts, before they reach a conv; returns ``x`` (see check_image_batch)."""
    shape = tuple(x.shape)
    if x.ndim != 5:
        hint = ''
        if x.ndim == 4:
            hint = (' (an image batch, or a single clip without its batch dimension? '
                    'add it with x.unsqueeze(0))')
        raise ValueError(f'{model_name} expects a 5-D (B, C, T, H, W) clip batch, got shape {shape}{hint}')
    check_batch_values(model_name, x, 'clip batch')
    if x.shape[1] != in_chans:
        hint = ''
        if x.shape[2] == in_chans:
            hint = '; it looks like (B, T, C, H, W): use x.permute(0, 2, 1, 3, 4)'
        raise ValueError(f'{model_name} expects {in_chans} channels in dim 1 of (B, C, T, H, W), got shape {shape}{hint}')
    if x.shape[2] != num_segments:
        raise ValueError(
            f'{model_name} was built for clips of {num_segments} frames, got T={x.shape[2]} (shape {shape}); '
            f'create it with num_segments={x.shape[2]} (weights load unchanged)')
    return x


torch.fx.wrap('check_video_batch')  # one FX node, run on real tensors (see zoo.models.resnet)


class TSMResNet(ZooResNet):
    """:class:`~zoo.models.ZooResNet` with a temporal shift in every residual branch; input (B, C, T, H, W)."""

    def __init__(self, *args, num_segments: int = 8, shift_div: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if num_segments < 1:
            raise ValueError(f'num_segments must be >= 1, got {num_segments}')
        self.num_segments = num_segments
        self.shift_div = shift_div
        if num_segments > 1:
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in stage:
                    add_temporal_shift(block, block.conv1, num_segments, shift_div)

    def fold_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B * T, C, H, W), the frames of a clip next to each other."""
        x = check_video_batch(type(self).__name__, x, self.in_chans, self.num_segments)
        return x.transpose(1, 2).flatten(0, 1)  # no shape unpacking: FX traces it

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """Clips checked and folded into frames, so that ZooResNet's ``forward_features`` (per-frame features,
        (B * T, C', H', W')) and ``forward_intermediates`` run on them; not timm's, whose ``checkpoint_seq``
        would checkpoint the stages a second time, updating running statistics twice."""
        return self.fold_frames(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = x.unflatten(0, (-1, self.num_segments)).mean(1)  # segment consensus
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 400, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:1811.08383,arXiv:1903.10520',
        'notes': ('input (B, C, T, H, W) clips, T = num_segments; input_size is one frame',),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f'tsm_{arch}_{v}': _cfg(description=f'TSM {arch} with {TSM_VARIANTS[v].description}')
    for arch in TSM_ARCHS for v in TSM_VARIANTS
})


def _create_tsm_resnet(name: str, arch: str, variant: str, pretrained: bool = False, **kwargs) -> TSMResNet:
    model_args = dict(IMAGENET_ARCHS[arch], norm_variant=TSM_VARIANTS[variant])
    return build_zoo_model(TSMResNet, name, pretrained, **dict(model_args, **kwargs))


ZOO_TSM_MODELS = tuple(f'tsm_{a}_{v}' for a in TSM_ARCHS for v in TSM_VARIANTS)
for _arch in TSM_ARCHS:
    for _v in TSM_VARIANTS:
        register_zoo_entrypoint(
            f'tsm_{_arch}_{_v}', __name__,
            f'TSM {_arch} with {TSM_VARIANTS[_v].description}; input (B, C, T, H, W).',
            partial(_create_tsm_resnet, f'tsm_{_arch}_{_v}', _arch, _v))
