"""Converters from the authors' ImageNet checkpoints to zoo state dicts, and a CLI for local files.

Releases (Qiao et al.; files listed in docs/hub.md):
- GN+WS ResNet-50/101, ResNeXt-50/101 32x4d: torchvision key names, ``nn.GroupNorm(32, C)`` norms,
  WS with s = unbiased std + 1e-5 (the zoo's ``ws_formula='ws'``).
- BCN+WS ResNet-50/101, ResNeXt-50 32x4d: norms hold ``bnX.pbn.*`` (a plain BatchNorm2d, the
  large-batch stage) and ``bnX.weight``/``bnX.bias`` of shape (1, 32, 1) (the group-wise affine);
  WS with s = sqrt(unbiased var + 1e-5) (``ws_formula='bcn'``). The zoo's BCN holds the batch
  stage as ``bnX.bn.*`` and the group affine with shape (32,).

Layouts accepted: a flat state dict, or one nested under ``state_dict`` / ``model`` (training
checkpoints, mmcv; unwrapped by the zoo's one checkpoint reader, :mod:`zoo.hub.reading`); wrapper prefixes ``module.`` (DataParallel), ``backbone.`` (mmcv) and
``_orig_mod.`` (torch.compile); mmcv norm names ``gnX`` / ``normX`` for ``bnX``. Conv weights are
stored un-standardized in all of them, so they are copied as they are; the model's WS formula
must be the one they were trained with, which the ``.in1k`` tags set.

Usage: ``python -m zoo.converters R-50-GN-WS.pth.tar out_dir --model resnet50_wsgn.in1k`` writes a
folder that loads with ``timm.create_model('local-dir:out_dir', pretrained=True)`` or
``zoo.load_model('out_dir')``.
"""
import argparse
import re
import sys
from typing import Any, Dict, Mapping, Optional

import torch

from zoo.hub.reading import unwrap_checkpoint

__all__ = ['unwrap_checkpoint', 'strip_prefixes', 'convert_gn_ws', 'convert_bcn_ws', 'CONVERTERS', 'main']

_WRAPPER_PREFIXES = ('module.', 'backbone.', '_orig_mod.')
_MMCV_NORM = re.compile(r'(^|\.)(?:gn|norm)(\d)(?=\.)')


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=_WRAPPER_PREFIXES) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (in any order and combination) from every key."""
    out = {}
    for k, v in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    return out


def _torchvision_names(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {_MMCV_NORM.sub(r'\1bn\2', k): v for k, v in strip_prefixes(state_dict).items()}


def convert_gn_ws(checkpoint: Any, model=None) -> Dict[str, torch.Tensor]:
    """GN+WS release -> zoo ``*_wsgn`` keys (the same module layout once wrappers are removed)."""
    return _torchvision_names(unwrap_checkpoint(checkpoint))


def convert_bcn_ws(checkpoint: Any, model=None) -> Dict[str, torch.Tensor]:
    """BCN+WS release -> zoo ``*_wsbcn`` keys: ``pbn`` -> ``bn``, group affine (1, G, 1) -> (G,)."""
    out = {}
    for k, v in _torchvision_names(unwrap_checkpoint(checkpoint)).items():
        k = k.replace('.pbn.', '.bn.')
        if k.endswith(('.weight', '.bias')) and v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == 1:
            v = v.reshape(v.shape[1])
        out[k] = v
    return out


CONVERTERS = {'gn_ws': convert_gn_ws, 'bcn_ws': convert_bcn_ws}


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog='python -m zoo.converters',
        description="Convert a local copy of the authors' GN+WS / BCN+WS ImageNet checkpoint to a zoo model "
                    'folder (model.safetensors + timm config.json).')
    p.add_argument('checkpoint', help='the downloaded file, e.g. R-50-GN-WS.pth.tar or rn50_bcn_ws.pth')
    p.add_argument('output', help='folder to write (created)')
    p.add_argument('--model', required=True,
                   help='zoo model with the tag of the release, e.g. resnet50_wsgn.in1k or resnext50_32x4d_wsbcn.in1k')
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    import zoo
    from zoo.hub import WeightsError, save_hub_folder
    args = _parse_args(argv)
    if '.' not in args.model:
        print(f'error: --model needs the release tag, e.g. {args.model}.in1k', file=sys.stderr)
        return 2
    try:
        model = zoo.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    except WeightsError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    model.eval()
    save_hub_folder(model, args.output, extra=dict(converted_from=str(args.checkpoint)))
    n = sum(p.numel() for p in model.parameters())
    print(f'{args.model}: {n / 1e6:.1f}M parameters converted from {args.checkpoint} -> {args.output}')
    print(f"load with: timm.create_model('local-dir:{args.output}', pretrained=True) after `import zoo`")
    return 0


if __name__ == '__main__':
    sys.exit(main())
