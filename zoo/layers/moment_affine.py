"""Norms as per-(sample, channel) affines of their input, which keep only that input for backward.

BN, GN, BGN and BCN (either batch stage) all compute ``y = A * x + B`` where ``A, B`` are (N, C)
coefficients that depend on ``x`` only through its per-(sample, channel) mean and variance over
(H, W) (the law of total variance gives any coarser statistic). So one read of ``x`` gives the
moments, one pass writes ``y``, and backward needs only ``x``: with ``dA = sum(dy * (x - m))`` and
``dB' = sum(dy)`` over (H, W), the tiny (N, C) graph of the coefficients gives the gradients of the
moments and parameters, and ``dx`` is again one affine of ``x`` plus ``A * dy``.

Autograd's graph of the same layers keeps two activations where these keep one: BGN (batch norm on
grouped views, then a per-channel affine) keeps the normalized output for the affine's gradient,
and BCN's two stages keep the batch stage's output as the group norm's input.
"""
from typing import Callable, Sequence

import torch

__all__ = ['MomentAffine', 'affine_per_sample_channel', 'per_sample_channel_sums', 'autocast_enabled']


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` that is False (not an error) for devices without autocast, e.g. ``meta``."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def per_sample_channel_sums(t: torch.Tensor, x: torch.Tensor, centre=None):
    """``sum(t)`` and ``sum(t * (x - centre))`` over (H, W) per (sample, channel), as (N, C) tensors.

    ``centre`` is an (N, C) tensor or None (zero).
    """
    n, c = t.shape[:2]
    if t.is_contiguous() and x.is_contiguous() and t.dtype == x.dtype:
        # (1, N*C, H*W) views make these the bias and weight gradients of a batch norm with the
        # given mean and unit inverse std: one fused native pass, no product tensor.
        t1, x1 = t.view(1, n * c, -1), x.view(1, n * c, -1)
        ones = x1.new_ones(n * c)
        mean = x1.new_zeros(n * c) if centre is None else centre.reshape(-1).to(x1.dtype)
        _, s_tx, s_t = torch.ops.aten.native_batch_norm_backward(
            t1, x1, ones, None, None, mean, ones, True, 0., [False, True, True])
        return s_t.view(n, c), s_tx.view(n, c)
    xc = x if centre is None else x - centre[:, :, None, None].to(x.dtype)
    return t.sum((2, 3)), (t * xc).sum((2, 3))


def affine_per_sample_channel(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with (N, C) coefficients, in one pass where possible; a new tensor like ``x``."""
    n, c = scale.shape
    if x.is_contiguous() and x.dtype == scale.dtype and not autocast_enabled(x.device.type):
        # On (1, N*C, H*W) views with zero mean, unit variance and eps 0, batch_norm's eval kernel
        # computes exactly x * scale + shift in one fused pass (faster than broadcasting mul / add).
        # It writes through a view into ``out``, so the result is no view (in-place ops may follow).
        out = torch.empty_like(x)
        torch.ops.aten.native_batch_norm.out(
            x.view(1, n * c, -1), scale.reshape(-1), shift.reshape(-1), scale.new_zeros(n * c), scale.new_ones(n * c),
            False, 0., 0., out=out.view(1, n * c, -1), save_mean=scale.new_empty(0), save_invstd=scale.new_empty(0))
        return out
    return torch.mul(x, scale[:, :, None, None].to(x.dtype)).add_(shift[:, :, None, None].to(x.dtype))


Coefficients = Callable[..., Sequence[torch.Tensor]]


class MomentAffine(torch.autograd.Function):
    """``y = A * x + B`` with ``(A, B) = coefficients(m, v, *params)``, keeping only ``x``.

    ``m, v``: the (N, C) mean and biased variance of ``x`` over (H, W), computed by the caller
    without autograd (it may update running statistics from them); ``coefficients`` is a plain
    function of tensors giving (N, C) ``A`` and ``B``, recomputed in backward. Backward works with
    centred sums, ``y = A * (x - m) + (B + A * m)``, so large channel means lose no precision.
    Single backward only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x, mean, var, coefficients: Coefficients, out_dtype: torch.dtype, *params):
        with torch.no_grad():
            big_a, big_b = coefficients(mean, var, *params)
        ctx.save_for_backward(x, mean, var, *params)
        ctx.coefficients = coefficients
        return affine_per_sample_channel(x, big_a.to(out_dtype), big_b.to(out_dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, mean, var, *params = ctx.saved_tensors
        hw = x.shape[2] * x.shape[3]
        with torch.enable_grad():
            m, v = mean.detach().requires_grad_(), var.detach().requires_grad_()
            leaves = [p.detach().requires_grad_(needs) for p, needs in zip(params, ctx.needs_input_grad[5:])]
            big_a, big_b = ctx.coefficients(m, v, *leaves)
            centred_b = torch.addcmul(big_b, big_a, m)
        s_dy, s_dyxc = per_sample_channel_sums(dy.to(mean.dtype), x.to(mean.dtype), mean)
        wrt = [m, v] + [p for p in leaves if p.requires_grad]
        grads = list(torch.autograd.grad((big_a, centred_b), wrt, (s_dyxc, s_dy), allow_unused=True))
        grad_m, grad_v = (g if g is not None else torch.zeros_like(mean) for g in grads[:2])
        grad_m = grad_m - big_a.detach() * s_dy                        # y depends on m through x - m too
        grad_params = iter(grads[2:])
        grad_leaves = [next(grad_params) if p.requires_grad else None for p in leaves]
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = A dy + dm / hw + dv * 2 (x - m) / hw: an affine of x plus A dy
            coef_x = grad_v * (2. / hw)
            coef_0 = grad_m / hw - coef_x * mean
            grad_x = affine_per_sample_channel(x, coef_x.to(x.dtype), coef_0.to(x.dtype))
            grad_x.addcmul_(dy.to(x.dtype), big_a.detach().to(x.dtype)[:, :, None, None])
        return (grad_x, None, None, None, None, *grad_leaves)
