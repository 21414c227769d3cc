"""Weight Standardization (Qiao et al., arXiv:1903.10520).

Every conv standardizes its weight per output channel, over that channel's in/groups x kH x kW
inputs: ``w_hat = (w - mean(w)) / s``. The raw weight stays the parameter, so checkpoints hold
un-standardized weights and the state-dict keys are those of ``nn.Conv2d``.

Three formulas for ``s`` are in circulation and they differ enough on small kernels to break
exact reproduction of converted checkpoints, so the formula is selectable by name:

========== ================================ ==================================================
name       s =                              used by
========== ================================ ==================================================
``zoo``    sqrt(biased var + 1e-5)          default for new zoo models
``ws``     unbiased std + 1e-5              authors' WS code, GN+WS ImageNet releases, mmcv
``bcn``    sqrt(unbiased var + 1e-5)        authors' BCN ImageNet code and releases
``timm``   sqrt(biased var + 1e-6)          timm ``StdConv2d``
``bit``    sqrt(biased var + 1e-8)          timm BiT ResNetV2 models
========== ================================ ==================================================

Why ``zoo`` as the default: eps inside the root never divides by zero (the authors agreed it
belongs there after NaN reports), and the biased variance stays defined for a fan-in of one.
"""
from contextlib import nullcontext
from typing import NamedTuple, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .eval_folding import fold_target, mark_folded, tensors_state
from .memory_lean import lean_path_applies
from .moment_affine import autocast_enabled

__all__ = ['WSFormula', 'WS_FORMULAS', 'DEFAULT_WS_FORMULA', 'resolve_ws_formula', 'standardize_weight',
           'standardize_conv_weight', 'WSConv2d']


class WSFormula(NamedTuple):
    """How the per-output-channel scale ``s`` is computed (a NamedTuple: TorchScript reads its fields)."""
    eps: float
    unbiased: bool
    eps_in_sqrt: bool


WS_FORMULAS = {
    'zoo': WSFormula(eps=1e-5, unbiased=False, eps_in_sqrt=True),
    'ws': WSFormula(eps=1e-5, unbiased=True, eps_in_sqrt=False),
    'bcn': WSFormula(eps=1e-5, unbiased=True, eps_in_sqrt=True),
    'timm': WSFormula(eps=1e-6, unbiased=False, eps_in_sqrt=True),
    'bit': WSFormula(eps=1e-8, unbiased=False, eps_in_sqrt=True),
}
DEFAULT_WS_FORMULA = 'zoo'


def resolve_ws_formula(formula: Union[str, WSFormula]) -> WSFormula:
    if isinstance(formula, WSFormula):
        return formula
    if formula not in WS_FORMULAS:
        raise ValueError(f'Unknown weight standardization formula {formula!r}; choose one of {sorted(WS_FORMULAS)}.')
    return WS_FORMULAS[formula]


def _per_output_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (out, fan_in) rows, a view (no copy) for contiguous and channels_last weights."""
    if weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).flatten(1)  # (O, kH, kW, I) is the memory order
    return weight.flatten(1)


def _as_weight(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Undo :func:`_per_output_rows`, keeping ``weight``'s memory format."""
    if weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        shape = weight.shape  # indexed, not unpacked: TorchScript cannot unpack a shape of unknown length
        return rows.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    return rows.view_as(weight)


def _row_statistics(rows: torch.Tensor, eps: float, unbiased: bool, eps_in_sqrt: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_hat rows, mean, s, r)`` per output channel: ``w_hat = (w - mean) / s`` with ``r = sqrt(V + eps)``
    or ``sqrt(V)`` and ``s = r`` or ``r + eps`` (the lean backward needs all three statistics)."""
    if eps_in_sqrt and not unbiased:  # one fused kernel, which also returns the statistics
        w_hat, mean, invstd = torch.native_batch_norm(rows.unsqueeze(0), None, None, None, None, True, 0., eps)
        s = invstd.reciprocal()
        return w_hat.squeeze(0), mean, s, s
    var, mean = torch.var_mean(rows, dim=1, correction=int(unbiased))
    r = (var + eps).sqrt() if eps_in_sqrt else var.sqrt()
    s = r if eps_in_sqrt else r + eps
    return (rows - mean[:, None]) / s[:, None], mean, s, r


@torch.fx.wrap
def standardize_conv_weight(weight: torch.Tensor, eps: float, unbiased: bool, eps_in_sqrt: bool) -> torch.Tensor:
    """Standardize a conv weight per output channel (dim 0): ``(w - mean) / s`` with ``s`` as the formula's fields say.

    One FX node (``torch.fx.wrap``), run on the real weight: it branches on the weight's memory
    format, which a traced graph cannot. Plain arguments and TorchScript-compatible, so a traced
    graph scripts too; quantize_fx observes (and quantizes) its output, the standardized weight.
    """
    return _as_weight(_row_statistics(_per_output_rows(weight), eps, unbiased, eps_in_sqrt)[0], weight)


def standardize_weight(weight: torch.Tensor, formula: Union[str, WSFormula] = DEFAULT_WS_FORMULA) -> torch.Tensor:
    """Standardize a conv weight per output channel (dim 0) with the given formula."""
    f = resolve_ws_formula(formula)
    return standardize_conv_weight(weight, f.eps, f.unbiased, f.eps_in_sqrt)


def _autocast_dtype(device_type: str):
    """The autocast dtype convolutions run in on ``device_type``, or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else None


def _autocast_off(device_type: str):
    """Autocast disabled on ``device_type`` (a no-op context for devices without autocast, e.g. ``meta``)."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


class _LeanWSConv(torch.autograd.Function):
    """``conv2d(x, standardize(weight))`` that keeps the raw weight for backward, not the standardized copy.

    Autograd's graph of the same expression keeps ``w_hat`` alive until backward (one more copy of
    every conv weight), and its backward holds ``w_hat``, its gradient and the weight's gradient at
    once, at the layer where activations peak. Here backward recomputes ``w_hat`` for the input
    gradient only, frees it, and turns the conv's weight gradient into the raw weight's in place
    (:func:`_standardization_backward_`), so a WS conv's backward holds no more than a plain conv's.
    Under autocast, inputs are cast as autocast would (and the cast input is what is kept).
    Single backward only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups: int, formula: WSFormula):
        amp_dtype = _autocast_dtype(x.device.type)
        with torch.no_grad(), _autocast_off(x.device.type):
            rows, mean, s, r = _row_statistics(_per_output_rows(weight), formula.eps, formula.unbiased,
                                               formula.eps_in_sqrt)
            w_hat = _as_weight(rows, weight)
            if amp_dtype is not None:
                x, w_hat = x.to(amp_dtype), w_hat.to(amp_dtype)
                bias = bias.to(amp_dtype) if bias is not None else None
            out = F.conv2d(x, w_hat, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, mean, s, r)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.unbiased = formula.unbiased
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, s, r = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_b = needs_b and ctx.bias_shape is not None
        grad_out = grad_out.to(x.dtype)
        conv_args = (stride, padding, dilation, False, [0] * len(stride), groups)
        grad_x = grad_w = grad_b = None
        with torch.no_grad(), _autocast_off(x.device.type):
            if needs_x:  # the only use of w_hat: recomputed, then freed before the weight gradient exists
                # One pass: batch_norm's eval kernel with the saved statistics (variance s^2, eps 0).
                rows = F.batch_norm(_per_output_rows(weight).unsqueeze(0), mean, s.square(), None, None, False, 0., 0.)
                w_hat = _as_weight(rows.squeeze(0), weight).to(x.dtype)
                del rows
                grad_x = torch.ops.aten.convolution_backward(
                    grad_out, x, w_hat, None, *conv_args, [True, False, False])[0]
                del w_hat
            if needs_w or needs_b:
                _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    grad_out, x, weight.to(x.dtype), ctx.bias_shape, *conv_args, [False, needs_w, needs_b])
            if grad_w is not None:
                grad_w = _standardization_backward_(grad_w.to(weight.dtype), weight, mean, s, r, ctx.unbiased)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _standardization_backward_(grad: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, s: torch.Tensor,
                               r: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """The raw weight's gradient from ``grad`` (the standardized weight's), written into ``grad``.

    With ``w_hat = (w - mean) / s``, ``V`` the (biased or unbiased, divisor ``d``) variance,
    ``r = sqrt(V + eps)`` or ``sqrt(V)`` and ``s = r`` or ``r + eps`` (eps inside or outside the
    root): ``dw = (g - mean(g)) / s - (w - mean) * sum(g * (w - mean)) / (s^2 d r)``, per output channel.
    """
    if grad.stride() != weight.stride():  # the row views below must pair the same elements
        grad = grad.contiguous(memory_format=torch.channels_last if _is_channels_last(weight)
                               else torch.contiguous_format)
    rows_g, rows_w = _per_output_rows(grad), _per_output_rows(weight)
    out_channels, fan_in = rows_w.shape
    if rows_g.is_contiguous() and rows_w.is_contiguous():
        # Both sums in one fused pass: the weight and bias gradients of a batch norm on (1, O, fan_in).
        ones = mean.new_ones(out_channels)
        centred_dot, g_sum = torch.ops.aten.native_batch_norm_backward(
            rows_g.unsqueeze(0), rows_w.unsqueeze(0), ones, None, None, mean, ones, True, 0., [False, True, True])[1:]
    else:
        g_sum, centred_dot = rows_g.sum(1), (rows_g * (rows_w - mean[:, None])).sum(1)
    k = centred_dot / (s.square() * (fan_in - int(unbiased)) * r)
    const = mean * k - g_sum / (fan_in * s)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    grad.mul_(s.reciprocal().view(shape))
    grad.addcmul_(weight, (-k).view(shape))
    return grad.add_(const.view(shape))


def _is_channels_last(weight: torch.Tensor) -> bool:
    return weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _lean_conv_applies(conv: nn.Conv2d, x) -> bool:
    """Whether :class:`_LeanWSConv` can stand in for autograd's graph (eager training with plain tensors)."""
    w = conv.weight
    return type(w) is nn.Parameter and w.requires_grad and not isinstance(conv.padding, str) and lean_path_applies(x)


@register_notrace_module  # FX (timm, torchvision feature extraction): run as one module
class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized per output channel in ``forward``.

    Same constructor, parameters, keys and init as ``nn.Conv2d``, plus ``ws_formula``.

    Inference fast path: when no gradient can reach the weight (eval mode, and autograd off or
    the weight frozen), the standardized weight is computed once and reused. It is recomputed
    when the weight changes (in-place updates bump ``weight._version``; ``.to()``, ``load_state_dict``
    and optimizers are all seen), dropped by ``train()``, and never used in training, under
    ``torch.compile`` or for non-``Parameter`` weights (``torch.func``). Only in-place writes through
    ``weight.data`` bypass the version counter: call ``train()`` then ``eval()`` after those. The cache is a
    plain attribute, so state dicts are unchanged; it costs one extra copy of the conv weights.

    Eval folding (:mod:`zoo.layers.eval_folding`): when the model folds the BCN that follows this
    conv, the cached weight and bias also carry that BCN's batch-stage affine (and the cache holds
    the BCN's channel-stage affine), recomputed when either layer's parameters or statistics change.

    Traced by FX (``torch.fx.symbolic_trace``, torchvision's feature extractor, quantize_fx), it is
    two nodes, :func:`standardize_conv_weight` and the conv; timm's tracer keeps it one module.
    Scripted, it standardizes at every call (the caches are Python state).
    """
    ws_formula: WSFormula  # declared for TorchScript, which then reads its fields

    def __init__(self, *args, ws_formula: Union[str, WSFormula] = DEFAULT_WS_FORMULA, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws_formula = resolve_ws_formula(ws_formula)
        self._ws_cache = None
        self._fold_cache = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ws_formula: Union[str, WSFormula] = DEFAULT_WS_FORMULA) -> 'WSConv2d':
        """A WS conv sharing ``conv``'s parameters (so keys, init and device are kept)."""
        ws = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            ws_formula=ws_formula, device='meta')
        ws.weight = conv.weight
        ws.bias = conv.bias
        return ws

    def extra_repr(self) -> str:
        f = self.ws_formula
        return super().extra_repr() + f', ws_eps={f.eps}, ws_unbiased={f.unbiased}, ws_eps_in_sqrt={f.eps_in_sqrt}'

    def standardized_weight(self) -> torch.Tensor:
        """The weight the conv applies: standardized now, or reused from the inference cache."""
        w = self.weight
        if (torch.compiler.is_compiling() or self.training or type(w) is not nn.Parameter
                or (w.requires_grad and torch.is_grad_enabled())):
            return standardize_weight(w, self.ws_formula)
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape, w.stride(), self.ws_formula,
               torch.is_inference_mode_enabled())
        cache = getattr(self, '_ws_cache', None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, standardize_weight(w, self.ws_formula))
            self._ws_cache = cache
        return cache[1]

    def folded_params(self, norm: nn.Module):
        """``(weight, bias, channel_affine)``: this conv followed by ``norm``'s batch stage
        (``a * conv(x) + b``), and ``norm``'s per-channel channel-stage affine, cached under one key
        that is cheap to check at every call (:func:`tensors_state`)."""
        params = self._parameters  # not self.weight: Module.__getattr__ is slow, and this runs per call
        w, bias = params['weight'], params['bias']
        key = (norm._modules['bn'], self.ws_formula, torch.is_inference_mode_enabled()) + tensors_state(
            w, bias, *norm.eval_fold_tensors())
        cache = self._fold_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                fold_dtype = torch.promote_types(w.dtype, torch.float32)
                a, b = (t.to(fold_dtype) for t in norm.batch_stage_affine())
                weight = standardize_weight(w, self.ws_formula).to(fold_dtype) * a.view(-1, 1, 1, 1)
                shift = b if bias is None else bias.to(fold_dtype) * a + b
                cache = (key, weight.to(w.dtype), shift.to(w.dtype), norm.channel_affine())
            self._fold_cache = cache
        return cache[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            f = self.ws_formula
            return self._conv_forward(x, standardize_conv_weight(self.weight, f.eps, f.unbiased, f.eps_in_sqrt), self.bias)
        norm = fold_target(self)
        if norm is not None and x.ndim == 4 and x.shape[0] > 0 and not self.training and not torch.is_grad_enabled():
            weight, bias, channel_affine = self.folded_params(norm)
            out = self._conv_forward(x, weight, bias)
            mark_folded(norm, out, channel_affine)
            return out
        if _lean_conv_applies(self, x):  # training: keep the raw weight, not the standardized copy
            if self.padding_mode != 'zeros':
                x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
            else:
                padding = self.padding
            return _LeanWSConv.apply(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                                     self.ws_formula)
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def train(self, mode: bool = True) -> 'WSConv2d':
        if mode:  # training standardizes every step: free the copies
            self._ws_cache = self._fold_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._ws_cache = self._fold_cache = None  # .to() / .half() / .cuda(): recompute in the new dtype or device
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # pickling or deepcopy never carries the caches
        return {**self.__dict__, '_ws_cache': None, '_fold_cache': None}


def convert_to_ws(module: nn.Module, ws_formula: Union[str, WSFormula] = DEFAULT_WS_FORMULA) -> nn.Module:
    """Replace every plain ``nn.Conv2d`` in ``module`` by a ``WSConv2d`` sharing its parameters."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, WSConv2d.from_conv(child, ws_formula))
        else:
            convert_to_ws(child, ws_formula)
    return module


__all__ += ['convert_to_ws']
