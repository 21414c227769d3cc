"""Activation checkpointing that norm layers with running statistics survive.

Checkpointing (``torch.utils.checkpoint``) keeps only a segment's inputs in the forward and runs the
segment again in backward to rebuild its activations: less memory, one more forward. The second run
is the pitfall for the zoo's norms. It would fold the batch into the running statistics a second time
(``nn.BatchNorm2d``, :class:`~zoo.layers.BatchGroupNorm2d`, and :class:`~zoo.layers.EstimatedBatchNorm2d`,
BCN's batch stage, which also all-reduces its statistics across processes and normalizes with the
estimates it has just updated), so a checkpointed run would drift from an unchecked one.

:func:`checkpoint_module` runs a module under non-reentrant checkpointing with a ``context_fn`` that
makes the recomputation see what the forward saw, and leave nothing behind:

- after the forward, the segment's buffers are snapshot (its *post*-forward state: the estimates a
  BCN layer normalized with), and its module tree (children and ``training`` flags) is recorded;
- the recomputation runs on fresh copies of that snapshot, on the recorded tree (so norms that a
  context swapped in for the forward only, as device emulation does, are there again), with
  :func:`recomputing` True, so that :class:`~zoo.layers.EstimatedBatchNorm2d` neither updates nor
  all-reduces; afterwards the live buffers and tree are put back as they were, untouched (a
  recomputed ``nn.BatchNorm2d`` updated the copies only);
- random draws (dropout, drop-path) are replayed (``preserve_rng_state``), and the global generator
  ends the step where it would without checkpointing, so exact resume still holds.

Gradients, running statistics and RNG state are those of the unchecked run. Limits: an estimated
stage called twice in one segment would recompute both calls with the estimates after the second (no
zoo model does that); a non-finite batch that BGN or BN skips (:mod:`zoo.layers.nonfinite_stats`) may
be warned about a second time by the recomputation (the counters stay right).

:func:`set_activation_checkpointing` turns it on for an ``nn.Sequential`` (a ResNet stage, torchvision's
detection and segmentation heads) by switching its class to a checkpointed subclass: same object,
children, state-dict keys and ``isinstance``, so wrappers that already hold it (timm's
``features_only`` models) checkpoint too.

Checkpointing runs in training with autograd on only, when an input or parameter of the segment
needs a gradient (a frozen stage on frozen inputs runs plainly). Under FX or TorchScript tracing,
and in scripted models, segments run plainly; under ``torch.compile`` a checkpointed segment is a
graph break and runs eagerly (compile accepts no custom ``context_fn``).
"""
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.utils.checkpoint
from torch.utils._pytree import tree_leaves

__all__ = ['checkpoint_module', 'recomputing', 'set_activation_checkpointing', 'activation_checkpointing', 'checkpoint_resnet_stages',
           'CheckpointedSequential']

_state = threading.local()  # recomputation runs in the thread that runs its backward node
# True inside torch.fx.symbolic_trace only (is_fx_tracing, the fallback on old torch, also warns under torch.export)
_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def recomputing() -> bool:
    """True while a :func:`checkpoint_module` segment is recomputed in backward (in this thread).

    Layers with running statistics return from their update without changing anything (and without
    all-reducing) then: the forward already made the update.
    """
    return getattr(_state, 'depth', 0) > 0


def _tracing() -> bool:
    return torch.jit.is_tracing() or _fx_symbolic_tracing()


def _needs_checkpoint(module: nn.Module, args, kwargs) -> bool:
    if not (torch.is_grad_enabled() and module.training) or _tracing():
        return False
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))):
        return True
    return any(p.requires_grad for p in module.parameters())


_Tree = List[Tuple[nn.Module, bool, Dict[str, Optional[nn.Module]]]]
_Buffers = List[Tuple[nn.Module, str, torch.Tensor]]


class _AfterForward:
    """Forward context: records the segment's post-forward buffers and module tree."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.tree: _Tree = []
        self.buffers: _Buffers = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is None:
            with torch.no_grad():
                for m in self.module.modules():
                    self.tree.append((m, m.training, dict(m._modules)))
                    self.buffers += [(m, n, b.detach().clone()) for n, b in m._buffers.items() if b is not None]
        return False


class _Recompute:
    """Recompute context: the recorded tree and fresh copies of the post-forward buffers, :func:`recomputing` on."""

    def __init__(self, after: _AfterForward):
        self.after = after
        self.saved_tree: _Tree = []
        self.saved_buffers: List[Tuple[nn.Module, str, Optional[torch.Tensor]]] = []

    def __enter__(self):
        self.saved_tree = [(m, m.training, dict(m._modules)) for m, _, _ in self.after.tree]
        for m, training, children in self.after.tree:
            m.training = training
            m._modules.clear()
            m._modules.update(children)
        with torch.no_grad():
            for m, name, snapshot in self.after.buffers:
                self.saved_buffers.append((m, name, m._buffers.get(name)))
                m._buffers[name] = snapshot.clone()  # a copy: a second backward recomputes from the snapshot again
        _state.depth = getattr(_state, 'depth', 0) + 1
        return self

    def __exit__(self, *exc) -> bool:
        _state.depth -= 1
        for m, name, live in reversed(self.saved_buffers):
            m._buffers[name] = live  # the live tensors were never written to
        for m, training, children in self.saved_tree:
            m.training = training
            m._modules.clear()
            m._modules.update(children)
        self.saved_buffers, self.saved_tree = [], []
        return False


@torch.compiler.disable  # compile accepts no custom context_fn: run the segment eagerly (a graph break)
def _checkpoint(module: nn.Module, fn: Callable, args, kwargs):
    def context_fn():
        after = _AfterForward(module)
        return after, _Recompute(after)

    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **kwargs)


def checkpoint_module(module: nn.Module, *args, fn: Optional[Callable] = None, **kwargs) -> Any:
    """``module(*args, **kwargs)`` (or ``fn(*args, **kwargs)``), checkpointed when that saves memory.

    Checkpointed (non-reentrant, random state replayed) in training with autograd on, when an input
    or a parameter of ``module`` needs a gradient; a plain call otherwise. The recomputation in
    backward sees the buffers the forward left and updates none (see the module docstring).

    Args:
        module: the segment: its buffers and submodules are what the recomputation restores.
        fn: what to run instead of ``module`` itself (e.g. the parent class's forward, from inside a
            ``forward`` that calls this), default ``module``.
    """
    run = module if fn is None else fn
    if not _needs_checkpoint(module, args, kwargs):
        return run(*args, **kwargs)
    return _checkpoint(module, run, args, kwargs)


class CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose forward runs under :func:`checkpoint_module` (same children and keys).

    Made by :func:`set_activation_checkpointing` (which also derives it from ``nn.Sequential``
    subclasses such as torchvision's heads); scripted, it runs its children plainly.
    """

    def forward(self, input):
        if not torch.jit.is_scripting():
            return self._checkpointed_forward(input)
        for module in self:
            input = module(input)
        return input

    @torch.jit.unused
    def _checkpointed_forward(self, input):
        return checkpoint_module(self, input, fn=self._plain_forward)

    @torch.jit.unused
    def _plain_forward(self, input):
        return nn.Sequential.forward(self, input)

    def __reduce_ex__(self, protocol):
        # Classes derived on demand are not importable by name: pickle the plain class and re-derive.
        return _rebuild_checkpointed, (_plain_class(type(self)),), self.__dict__


_DERIVED: Dict[type, type] = {nn.Sequential: CheckpointedSequential}


def _plain_class(cls: type) -> type:
    return next(plain for plain, derived in _DERIVED.items() if derived is cls)


def _checkpointed_class(cls: type) -> type:
    if cls not in _DERIVED:
        if not issubclass(cls, nn.Sequential) or cls.forward is not nn.Sequential.forward:
            raise TypeError(f'set_activation_checkpointing: {cls.__name__} is no nn.Sequential with nn.Sequential\'s '
                            f'forward; wrap the call in checkpoint_module instead')
        _DERIVED[cls] = type(f'Checkpointed{cls.__name__}', (CheckpointedSequential, cls), {'__module__': __name__})
    return _DERIVED[cls]


def _rebuild_checkpointed(plain: type) -> nn.Module:
    module = plain.__new__(plain)
    module.__class__ = _checkpointed_class(plain)
    return module


def set_activation_checkpointing(module: nn.Sequential, enable: bool = True) -> nn.Sequential:
    """Checkpoint ``module`` (an ``nn.Sequential``, or a subclass without its own forward) in training, or stop.

    Switches the class of ``module`` in place, to a subclass of :class:`CheckpointedSequential` and of
    its own class, or back: the object, its children, hooks and state-dict keys stay. Returns ``module``.
    """
    cls = type(module)
    if enable and not isinstance(module, CheckpointedSequential):
        module.__class__ = _checkpointed_class(cls)
    elif not enable and isinstance(module, CheckpointedSequential):
        module.__class__ = _plain_class(cls)
    return module


def checkpoint_resnet_stages(body: nn.Module, backbone: str) -> None:
    """Checkpoint the stages (``layer1``, ``layer2``, ...) of a ResNet body, e.g. a ``features_only`` backbone
    of a detector or segmenter, whichever model built it (timm's own ResNets take no ``checkpoint_stages``)."""
    stages = [m for n, m in body.named_children() if n.startswith('layer') and isinstance(m, nn.Sequential)]
    if not stages:
        raise ValueError(f'checkpoint_stages: the backbone {backbone} has no ResNet stages (layer1, layer2, ...) '
                         f'to checkpoint; its features_only model has {[n for n, _ in body.named_children()]}')
    for stage in stages:
        set_activation_checkpointing(stage)


def activation_checkpointing(module: nn.Module) -> bool:
    """Whether :func:`set_activation_checkpointing` turned checkpointing on for ``module``."""
    return isinstance(module, CheckpointedSequential)
