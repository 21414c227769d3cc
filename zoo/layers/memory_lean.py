"""The switch of the memory-lean training path of the zoo's normalized blocks.

Lean (the default): a WS conv keeps only its raw weight for backward and recomputes the
standardized one there; BGN and BCN with a ``'batch'`` stage keep only their input (one
activation per norm, as BN), and their normalized output is recomputed from it. The gradients are
those of the plain path to float32 rounding (tests compare them in float64).

The plain path (``set_memory_lean(False)``) is autograd's graph of the same formulas: it also
supports double backward (gradient penalties), which the lean functions do not.
"""
from contextlib import contextmanager

import torch

__all__ = ['memory_lean', 'memory_lean_enabled', 'set_memory_lean', 'lean_path_applies', 'is_exporting']

_LEAN = True


def memory_lean_enabled() -> bool:
    """Whether the zoo's WS convs and norms take the memory-lean path in training."""
    return _LEAN


def set_memory_lean(enabled: bool) -> None:
    """Turn the memory-lean path on (default) or off, for the whole process."""
    global _LEAN
    _LEAN = bool(enabled)


@contextmanager
def memory_lean(enabled: bool = True):
    """``with memory_lean(False): ...``: the plain path inside the block, the previous setting after."""
    global _LEAN
    previous, _LEAN = _LEAN, bool(enabled)
    try:
        yield
    finally:
        _LEAN = previous


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing (False on torch < 2.5, which has no such flag)."""
    exporting = getattr(torch.compiler, 'is_exporting', None)
    return bool(exporting and exporting())


def lean_path_applies(x) -> bool:
    """Whether a lean autograd function may stand in for autograd's graph on input ``x``: the switch is on,
    autograd records, ``x`` is a plain tensor (no FX proxy or subclass) and no tracer, compiler, exporter
    or ``torch.func`` transform is running (they need the plain ops)."""
    return (_LEAN and torch.is_grad_enabled() and type(x) is torch.Tensor and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not is_exporting()
            and not torch._C._are_functorch_transforms_active())
