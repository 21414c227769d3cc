"""Temporal shift (TSM, Lin et al., arXiv:1811.08383): 2D convs that see neighbouring frames.

Frames of a clip are folded into the batch, ``(B * T, C, H, W)``. Before a residual branch, one
``1 / shift_div`` of the channels is shifted one frame back in time, another ``1 / shift_div``
one frame forward, and the rest stays; the frames shifted in past either end of the clip are zeros.
The shift has no parameters, so a 2D network keeps its state-dict keys and loads 2D weights
unchanged.

FX: :class:`TemporalShift` is one ``call_module`` node under every tracer (:mod:`zoo.layers.fx_leaf`);
:func:`temporal_shift` is TorchScript-compatible.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .fx_leaf import fx_leaf_call

__all__ = ['TemporalShift', 'temporal_shift', 'add_temporal_shift']


def temporal_shift(x: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """Shift channel groups of ``x`` (``(B * num_segments, C, H, W)``) along time; zero padding."""
    if num_segments == 1:
        return x
    nt, c = x.shape[0], x.shape[1]
    if nt % num_segments:
        raise ValueError(f'temporal_shift: batch of {nt} frames is not a whole number of {num_segments}-frame clips')
    x = x.unflatten(0, (-1, num_segments))  # (B, T, C, H, W)
    fold = c // shift_div
    # Few whole-tensor ops (no zero tensor written into slice by slice): cheap to export with a dynamic batch.
    back = F.pad(x[:, 1:, :fold], (0, 0, 0, 0, 0, 0, 0, 1))  # frame t sees frame t + 1; zeros after the last
    forward = F.pad(x[:, :-1, fold:2 * fold], (0, 0, 0, 0, 0, 0, 1, 0))  # frame t sees frame t - 1
    return torch.cat([back, forward, x[:, :, 2 * fold:]], 2).flatten(0, 1)


@register_notrace_module  # FX (timm, torchvision feature extraction): run as one module
class TemporalShift(nn.Module):
    """:func:`temporal_shift` as a module without parameters or buffers (adds no state-dict keys).

    Used as a forward pre-hook of a residual branch's first conv (:func:`add_temporal_shift`), so
    the shortcut keeps the unshifted activations, as TSM's "residual shift" does.
    """

    def __init__(self, num_segments: int, shift_div: int = 8):
        super().__init__()
        if num_segments < 1:
            raise ValueError(f'num_segments must be >= 1, got {num_segments}')
        if shift_div < 2:
            raise ValueError(f'shift_div must be >= 2 (two channel groups are shifted), got {shift_div}')
        self.num_segments = num_segments
        self.shift_div = shift_div

    def extra_repr(self) -> str:
        return f'num_segments={self.num_segments}, shift_div={self.shift_div}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            traced = fx_leaf_call(self, x)
            if traced is not None:
                return traced
        return temporal_shift(x, self.num_segments, self.shift_div)

    def shift_input(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook: shift the first positional input of ``module``."""
        return (self(args[0]),) + tuple(args[1:])


def add_temporal_shift(owner: nn.Module, conv: nn.Module, num_segments: int, shift_div: int = 8) -> TemporalShift:
    """Shift the input of ``conv`` in time; the shift module is registered on ``owner`` as ``temporal_shift``.

    The shift sits in ``owner`` (the residual block) so it shows in ``print(model)``; being
    parameter-free, it leaves the state dict unchanged.
    """
    shift = TemporalShift(num_segments, shift_div)
    owner.temporal_shift = shift
    conv.register_forward_pre_hook(shift.shift_input)
    return shift
