"""Eval-mode folding of BCN's batch stage into the WS conv that feeds it, on the live model.

In eval with autograd off, BCN's batch stage is a fixed per-channel affine ``a * x + b``. Folded
into the conv before it (``w' = a * w_hat``, ``bias' = a * bias + b``), what is left of BCN is one
group norm: the computation of :func:`zoo.export_for_inference`, without exporting anything.
Parameters, buffers, state dicts and hooks of the model stay as they are.

How it is kept safe:

- A model turns it on for one forward call (:func:`fold_conv_norms`) and only for ``(conv, BCN)``
  pairs whose structure guarantees that the norm is the conv's only consumer (adjacent in an
  ``nn.Sequential`` or in torchvision's ``ASPPPooling``, ``convK -> bnK`` in timm's own
  BasicBlock / Bottleneck, the stem of a timm ResNet), found after every ``train()`` / ``eval()``
  and checked at every call, so a module replaced after construction is never folded into.
- The conv marks its folded output; the BCN drops its batch stage only for that very tensor.
- The fold map and the marks are thread-local, so concurrent inference threads on one model do
  not see each other's state.
- Off in training, with autograd on, under ``torch.compile`` / ``torch.export`` / tracing, and for
  a conv with forward hooks or a norm with any hooks (the user observes the unfolded tensors).
"""
import functools
import threading
import types
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models._features import FeatureDictNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPPPooling

__all__ = ['FoldsConvNormsInEval', 'conv_norm_pairs', 'fold_conv_norms', 'folding_applies', 'folds_in_eval']

_state = threading.local()


def conv_norm_pairs(model: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    """``(parent, conv_name, norm_name)`` where the norm is the only consumer of the conv's output.

    Known structures only, and only where the class runs their own ``forward``: adjacent modules
    of an ``nn.Sequential`` (downsample, deep stems, torchvision's ``Conv2dNormActivation``), of
    torchvision's ``ASPPPooling`` (a Sequential run in order, then upsampled), or of timm's
    ``features_only`` wrappers (a conv whose output is not one of the returned features),
    ``convK -> bnK`` in timm's BasicBlock / Bottleneck, and the stem ``conv1 -> bn1`` of a timm
    ResNet (the zoo's ImageNet, CIFAR and TSM ResNets are subclasses that keep that stem).
    """
    for parent in model.modules():
        forward = type(parent).forward
        sequential = isinstance(parent, nn.Sequential) and forward in (nn.Sequential.forward, ASPPPooling.forward)
        features = isinstance(parent, FeatureDictNet) and type(parent)._collect is FeatureDictNet._collect
        if sequential or features:
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                if not (features and a in parent.return_layers):
                    yield parent, a, b
        if forward in (BasicBlock.forward, Bottleneck.forward):
            for i in (1, 2, 3):
                yield parent, f'conv{i}', f'bn{i}'
        if isinstance(parent, ResNet):
            yield parent, 'conv1', 'bn1'


def tensors_state(*tensors) -> tuple:
    """A cheap cache key for values derived from ``tensors``: each one's identity, storage and
    version counter, which in-place updates, ``load_state_dict``, ``.to()`` and replacement change."""
    return tuple([(id(t), t.data_ptr(), t._version) for t in tensors if t is not None])


def _is_tracing() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or fx_tracing()
                or (is_exporting is not None and is_exporting()))


def folding_applies(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may fold now: eval, autograd off, plain eager execution."""
    if torch.compiler.is_compiling():  # first, so that dynamo sees a constant and no Python state
        return False
    return not model.training and not torch.is_grad_enabled() and not _is_tracing()


def _candidate_pairs(model: nn.Module) -> List[tuple]:
    """``(parent, conv_name, norm_name, conv, norm)`` for every WS conv -> BCN pair of ``model``.

    A :class:`FoldsConvNormsInEval` model keeps the list until its next ``train()`` / ``eval()``;
    every call checks again that each pair is still in place, so a module replaced since is left
    unfolded (correct, only slower) until then.
    """
    pairs = model.__dict__.get('_fold_pairs')
    if pairs is None:
        from .batch_channel_norm import BatchChannelNorm2d
        from .weight_standardization import WSConv2d
        pairs = []
        for parent, conv_name, norm_name in conv_norm_pairs(model):
            conv, norm = parent._modules.get(conv_name), parent._modules.get(norm_name)
            if (isinstance(conv, WSConv2d) and isinstance(norm, BatchChannelNorm2d)
                    and norm.num_channels == conv.out_channels):
                pairs.append((parent, conv_name, norm_name, conv, norm))
        if isinstance(model, FoldsConvNormsInEval):
            model.__dict__['_fold_pairs'] = pairs
    return pairs


def _foldable_now(parent, conv_name, norm_name, conv, norm) -> bool:
    return (parent._modules.get(conv_name) is conv and parent._modules.get(norm_name) is norm
            and not conv.training and not norm.training and not conv._forward_hooks
            and not norm._forward_hooks and not norm._forward_pre_hooks and norm.fixed_in_eval())


class FoldsConvNormsInEval:
    """Mixin for a model whose forward methods use :func:`folds_in_eval`: ``train()`` and
    ``eval()`` make the next folding forward look for its conv -> BCN pairs again."""

    def train(self, mode: bool = True):
        self.__dict__.pop('_fold_pairs', None)
        return super().train(mode)


@contextmanager
def fold_conv_norms(model: nn.Module):
    """Within this block, on this thread, the foldable conv -> BCN pairs of ``model`` run folded."""
    folds: Dict[nn.Module, nn.Module] = {pair[3]: pair[4] for pair in _candidate_pairs(model) if _foldable_now(*pair)}
    outer = getattr(_state, 'folds', None)
    _state.folds = {**outer, **folds} if outer else folds
    try:
        yield
    finally:
        _state.folds = outer
        if outer is None:
            _state.marks = {}


def folds_in_eval(method):
    """Decorator for a model's forward methods: run them under :func:`fold_conv_norms` when it applies.

    ``torch.jit.script`` compiles the undecorated method (it finds the source through ``__wrapped__``),
    so a scripted model runs unfolded, but it resolves the method's global names in the globals of
    the function it was given: the wrapper is therefore built with the method's globals, and reaches
    its own helpers through its closure only.
    """
    applies, fold = folding_applies, fold_conv_norms

    def forward_folded(self, *args, **kwargs):
        if not applies(self):
            return method(self, *args, **kwargs)
        with fold(self):
            return method(self, *args, **kwargs)

    wrapper = types.FunctionType(forward_folded.__code__, method.__globals__, method.__name__,
                                 forward_folded.__defaults__, forward_folded.__closure__)
    return functools.wraps(method)(wrapper)


def fold_target(conv: nn.Module) -> Optional[nn.Module]:
    """The BCN that ``conv`` folds into in the current forward on this thread, or None."""
    folds = getattr(_state, 'folds', None)
    return folds.get(conv) if folds else None


def mark_folded(norm: nn.Module, out: torch.Tensor, channel_affine: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Tell ``norm`` that ``out`` (and only it) already has the batch stage applied, and hand it
    the channel-stage affine that was cached with the folded weights."""
    marks = getattr(_state, 'marks', None)
    if marks is None:
        marks = _state.marks = {}
    marks[norm] = (weakref.ref(out), channel_affine)


def take_folded(norm: nn.Module, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The channel-stage affine if ``x`` is the folded output marked for ``norm``, else None (the mark is used up)."""
    marks = getattr(_state, 'marks', None)
    if not marks:
        return None
    mark = marks.pop(norm, None)
    return mark[1] if mark is not None and mark[0]() is x else None
