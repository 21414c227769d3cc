"""``zoo-export``: a zoo model as ONNX, TorchScript or a torch.export program, checked before it is written.

    zoo-export resnet20_wsbcn.cifar10 --format onnx --out resnet20_wsbcn.onnx
    zoo-export runs/wsbcn/last.ckpt --format exported --out model.pt2 --image cat.jpg dog.jpg

What is exported is the deployable form (:func:`zoo.export_for_inference`: plain convs, norms
with fixed statistics folded in, BCN's channel stage as GroupNorm), with a dynamic batch size
(ONNX, torch.export). The export is then run on a real batch (``--image`` files, or CIFAR-10 test
images from the shared data) with the model's own preprocessing, and its outputs are compared
with the original PyTorch model's: the max difference is printed, and an export that differs by
more than ``--tolerance`` (relative to the largest output) is not written (exit status 1).
For a video (TSM) model, the images are the frames of two clips. A segmenter (DeepLabV3, by name
or from a checkpoint or Hub folder) is exported as a model that maps images to logits at the input's
size, ``(N, num_classes, H, W)`` (the ``'out'`` of its dict); its check images get its evaluation
preprocessing (shorter side resized to ``eval_size``, no crop) and must come out at one size, which
the export then expects (the batch size stays dynamic). Detectors take lists of images and return
lists of dicts: they are refused with a pointer to torchvision's own export. ``--out`` is checked first: a
directory, or a place where no file can be made, fails before anything is built; errors name ``--out``.

ONNX needs the ``onnx`` extra (``pip install wsbcn-zoo[onnx]``: onnx, onnxscript, onnxruntime).
Details: ``docs/deployment.md``.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.segmentation import DeepLabV3

import zoo
from zoo.hub.task_models import registry_listing
from zoo.models.tsm import TSMResNet

from ..classification.data import prepare_cifar10
from .datasets import load_rgb
from .predict import IMAGE_EXTENSIONS, list_inputs

__all__ = ['FORMATS', 'ExportMismatchError', 'SegmentationLogits', 'load_source', 'real_batch', 'check_output_path',
           'export_checked', 'main']

FORMATS = ('onnx', 'torchscript', 'exported')
FORMAT_NAMES = {'onnx': 'ONNX export', 'torchscript': 'TorchScript export', 'exported': 'torch.export program'}
SUFFIXES = {'onnx': '.onnx', 'torchscript': '.pt', 'exported': '.pt2'}
_WEIGHT_SUFFIXES = ('.ckpt', '.pt', '.pth', '.bin', '.safetensors')
DEFAULT_IMAGES = 4  # CIFAR-10 test images (one per class) when no --image is given


class ExportMismatchError(RuntimeError):
    """The export's outputs differ from the PyTorch model's by more than the tolerance."""


class SegmentationLogits(nn.Module):
    """A segmenter as ``images -> logits (N, num_classes, H, W)``: its ``'out'``, a tensor an export can return."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(x)['out']


def _refuse_detector(model: nn.Module, source: str) -> None:
    if isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f'{source} is a detector ({type(model).__name__}): it takes a list of images and returns a list of dicts, '
            f'which zoo-export does not export. zoo-export exports classifiers, video models and segmenters; for a '
            f'detector, export zoo.export_for_inference(model) with torchvision\'s detection ONNX recipe '
            f'(torch.onnx.export on a list of images).')


def load_source(source: str, pretrained: bool = False) -> nn.Module:
    """A model name (``resnet20_wsbcn``, or with a weight tag: ``resnet20_wsbcn.cifar10``), or a saved model.

    A file (Lightning ``.ckpt``), folder or Hub id (``hf-hub:``, ``local-dir:``, ``ORG/NAME``) loads
    with :func:`zoo.load_model`; a tagged name loads its weights, a plain name only with ``pretrained``.
    """
    if Path(source).exists() or ':' in source or '/' in source:
        model = zoo.load_model(source)
    elif Path(source).suffix.lower() in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f'checkpoint {source} does not exist')
    elif (registry := registry_listing(source)) is not None:  # a segmenter or detector name
        if pretrained:
            raise ValueError(f'{source} has no weights by name: export its Lightning checkpoint or Hub folder '
                             f'(zoo-export runs/.../last.ckpt ...), or leave out --pretrained for random weights')
        model = registry.create(source)
    else:
        model = zoo.create_model(source, pretrained=pretrained or '.' in source)
    _refuse_detector(model, source)
    return model


def _segmenter_batch(model: nn.Module, paths: Sequence[Path]) -> torch.Tensor:
    """Images loaded as the segmentation predict path loads them, with the segmenter's evaluation
    preprocessing (its ``pretrained_cfg`` mean, std and ``eval_size``; the transform's defaults
    without one), all at one size."""
    from ..segmentation.data import SegmentationImageLoader  # here: the task packages import lightning_modules.core
    from ..segmentation.transforms import eval_image_transform
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    load = SegmentationImageLoader(eval_image_transform(**{k: cfg[k] for k in ('eval_size', 'mean', 'std') if k in cfg}))
    images = [load(p)['image'] for p in paths]
    sizes = {tuple(im.shape[-2:]) for im in images}
    if len(sizes) > 1:
        listed = ', '.join(f'{p} ({im.shape[-2]}x{im.shape[-1]})' for p, im in zip(paths, images))
        raise ValueError(f'the check images of a segmenter must come out at one size (the export is fixed to it), '
                         f'got {listed} after resizing; pass images of one size')
    return torch.stack(images)


def _default_images(n: int = DEFAULT_IMAGES) -> List[Path]:
    root = prepare_cifar10() / 'test'
    classes = sorted(p for p in root.iterdir() if p.is_dir())[:n]
    return [min(c.glob('*.jpg')) for c in classes]


def real_batch(model: nn.Module, images: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Images (files, a folder or a list file; default: CIFAR-10 test images) preprocessed as ``model`` expects.

    A batch ``(N, C, H, W)``; for a video model two clips ``(2, C, T, H, W)`` whose T frames are the
    images in turn (the second clip starting at the second image); for a segmenter its evaluation
    preprocessing (no crop), the images at one size.
    """
    if not images:
        paths = _default_images()
    elif len(images) == 1:
        paths = list_inputs(images[0], IMAGE_EXTENSIONS)
    else:
        paths = list_inputs(list(images), IMAGE_EXTENSIONS)
    if isinstance(model, DeepLabV3):
        return _segmenter_batch(model, paths)
    transform = create_transform(**resolve_data_config(model=model))
    frames = torch.stack([transform(load_rgb(p)) for p in paths])
    if isinstance(model, TSMResNet):
        order = torch.arange(model.num_segments)
        return torch.stack([frames[(order + start) % len(frames)] for start in (0, 1)]).transpose(1, 2)
    return frames


def _dynamic_batch():
    return ({0: torch.export.Dim.DYNAMIC},)  # any batch size (the example has two or more samples)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(f'ONNX export needs the onnx extra: pip install "wsbcn-zoo[onnx]" ({e})') from e
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, input_names=['input'],
                      output_names=['output'], dynamic_shapes=_dynamic_batch(), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return lambda inp: torch.from_numpy(session.run(None, {'input': inp.numpy()})[0])


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        scripted = torch.jit.trace(model, (x,), check_trace=False)
    except Exception as e:
        raise RuntimeError(f'TorchScript tracing of the deployable {type(model).__name__} failed: {e}') from e
    torch.jit.save(scripted, str(path))
    return torch.jit.load(str(path))


def _export_program(model: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


_EXPORTERS = {'onnx': _export_onnx, 'torchscript': _export_torchscript, 'exported': _export_program}


def _temp_file(out: Path, fmt: str) -> Path:
    """An empty file next to ``out`` (so that the final move is one rename), with a plain new file's
    permissions; an ``OSError`` that names ``out`` (not the temporary name) when it cannot be made."""
    if out.is_dir():
        raise IsADirectoryError(f'{out} is a directory: --out takes the path of the file to write '
                                f'(e.g. {out / ("model" + SUFFIXES[fmt])})')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{out.stem}.partial-', dir=out.parent,
                                   suffix='.pt2' if fmt == 'exported' else out.suffix)  # torch.export.save: .pt2
    except OSError as e:
        raise OSError(f'cannot write {out}: no file can be created in {out.parent} ({e.strerror or e})') from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # the permissions of a plain new file, not mkstemp's 0600
    return tmp


def check_output_path(out: Path, fmt: str) -> None:
    """Fail now, naming ``out``, if the export could not be written there (a directory, no such place,
    no permission): before a model is loaded or traced."""
    _temp_file(Path(out), fmt).unlink()


def _naming_out(e: Exception, tmp: Path, out: Path) -> Exception:
    """``e`` with the temporary file's name replaced by ``out`` (the name the user gave)."""
    message = str(e).replace(str(tmp), str(out))
    if message == str(e):
        return e
    kind = next(k for k in (ImportError, OSError, ValueError, RuntimeError, Exception) if isinstance(e, k))
    renamed = kind(message)
    renamed.__cause__ = e.__cause__
    return renamed


@torch.no_grad()
def export_checked(model: nn.Module, x: torch.Tensor, fmt: str, out: Path, tolerance: float = 1e-4) -> float:
    """Export ``model``'s deployable form to ``out`` as ``fmt``; returns the max output difference on ``x``.

    The file is written next to ``out`` and moved there only if the export, loaded back from disk,
    gives ``model``'s outputs on ``x`` within ``tolerance * max(1, max |output|)``; otherwise
    :class:`ExportMismatchError` and nothing is written. ``model`` is put in eval mode. ``out`` is
    checked before anything is computed; errors name ``out``, never the temporary file.
    """
    if fmt not in _EXPORTERS:
        raise ValueError(f'Unknown export format {fmt!r}; choose one of {FORMATS}')
    out = Path(out)
    tmp = _temp_file(out, fmt)
    try:
        model = model.eval()
        _refuse_detector(model, 'the model')
        deployable = zoo.export_for_inference(model)
        if isinstance(model, DeepLabV3):
            model, deployable = SegmentationLogits(model).eval(), SegmentationLogits(deployable).eval()
        expected = model(x)
        example = x if len(x) > 1 else torch.cat([x, x])  # a batch of one would fix the batch size at 1
        try:
            run = _EXPORTERS[fmt](deployable, example, tmp)
            got = run(x)
        except Exception as e:
            renamed = _naming_out(e, tmp, out)
            if renamed is e:
                raise
            raise renamed from None
        diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else float('inf')
        limit = tolerance * max(1., expected.abs().max().item())
        if not diff <= limit:  # NaN fails too
            raise ExportMismatchError(
                f'the {FORMAT_NAMES[fmt]} differs from the PyTorch model: max |difference| {diff:.3g} > {limit:.3g} '
                f'(outputs {tuple(got.shape)} vs {tuple(expected.shape)}); {out} was not written')
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise OSError(f'cannot write {out}: {e.strerror or e}') from None
        return diff
    finally:
        tmp.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='zoo-export', description=__doc__.split('\n\n')[0].replace('``', ''),  # reST markup: not for a terminal
        epilog='The export is checked against PyTorch on a real batch and written only if it matches.')
    p.add_argument('model', help='model name (resnet20_wsbcn.cifar10), Lightning .ckpt, Hub folder or id')
    p.add_argument('--format', required=True, choices=FORMATS, help='onnx, torchscript, or exported (torch.export .pt2)')
    p.add_argument('--out', required=True, type=Path, help='file to write')
    p.add_argument('--image', nargs='+', help='images (or a folder) for the check; default: CIFAR-10 test images')
    p.add_argument('--pretrained', action='store_true', help='load the default weights of an untagged model name')
    p.add_argument('--tolerance', type=float, default=1e-4, help='max |difference| / max(1, max |output|) (default 1e-4)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_output_path(args.out, args.format)  # before the model is loaded or traced
        model = load_source(args.model, args.pretrained)
        x = real_batch(model, args.image)
        diff = export_checked(model, x, args.format, args.out, args.tolerance)
    except (ExportMismatchError, ImportError, RuntimeError, ValueError, OSError) as e:  # OSError: unreadable files
        print(f'zoo-export: error: {e}', file=sys.stderr)
        return 1
    print(f'{FORMAT_NAMES[args.format]} of {args.model} written to {args.out}; '
          f'max |difference| from PyTorch on {tuple(x.shape)} real input: {diff:.3g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
