"""Running statistics that one NaN or inf in a training batch cannot poison.

A norm layer with running statistics (:class:`~zoo.layers.EstimatedBatchNorm2d`, the batch stage
of BCN, and :class:`~zoo.layers.BatchGroupNorm2d`) folds every training batch into them. One NaN
sample would make them NaN for good, and every later output NaN too. So these layers compute the
update, keep it only when its statistics are finite, and otherwise skip it: the statistics stay
as they were, the skip is counted in the layer's ``num_skipped_updates`` buffer (not saved in
checkpoints) and reported with a :class:`NonFiniteStatisticsWarning`.

- The keep-or-skip choice is a ``torch.where`` on device: no host sync, and a compiled graph has
  no data-dependent branch (``fullgraph=True`` still captures it).
- Under DDP the layers decide after their all-reduce, on the reduced statistics, which are
  non-finite on every rank as soon as they are on one: all ranks skip together.
- The counter is read on the host only to warn: after every update on CPU, every
  :data:`CHECK_INTERVAL` updates elsewhere (a read is a device sync), never while compiling,
  tracing or on the ``meta`` device.
- At most one warning per :data:`WARN_INTERVAL_S` seconds per process. The first layer to warn is
  where the bad values entered (later layers see them through it and skip the same batch);
  :func:`skipped_updates` lists every layer's count.

torch's own ``nn.BatchNorm2d`` (the BN variants, BCN's large-batch ``'batch'`` stage) is left as
torch has it: a NaN batch still poisons its running statistics.

Layers name themselves in warnings with their name in the model once :func:`name_stat_layers`
ran on it (``zoo.create_model`` does this).
"""
import math
import time
import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['NonFiniteStatisticsWarning', 'CHECK_INTERVAL', 'WARN_INTERVAL_S', 'keep_finite_update',
           'name_stat_layers', 'skipped_updates']

CHECK_INTERVAL = 100  # updates between host reads of the skip counter off the CPU
WARN_INTERVAL_S = 60.  # at most one warning per this many seconds, per process

_last_warning = -math.inf


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A norm layer skipped a running-statistics update whose statistics were NaN or inf."""


def register_skip_counter(module: nn.Module, device=None) -> None:
    """The ``num_skipped_updates`` buffer (non-persistent: checkpoints keep their keys)."""
    module.register_buffer('num_skipped_updates', torch.tensor(0, dtype=torch.long, device=device), persistent=False)
    module.layer_name = None


def load_skip_counter(module: nn.Module) -> None:
    """Give the counter a real device after a ``load_state_dict(..., assign=True)`` into a ``meta`` model.

    Non-persistent buffers are not in checkpoints, so assigning the loaded tensors leaves this
    one on ``meta``; it starts again at 0 beside the running statistics.
    """
    counter, ref = getattr(module, 'num_skipped_updates', None), getattr(module, 'running_mean', None)
    if isinstance(counter, torch.Tensor) and counter.is_meta and isinstance(ref, torch.Tensor) and not ref.is_meta:
        module.num_skipped_updates = torch.zeros((), dtype=torch.long, device=ref.device)


def keep_finite_update(
        module: nn.Module,
        finite: torch.Tensor,
        updates: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        apply: Optional[torch.Tensor] = None,
) -> None:
    """Write each ``(buffer, new_value)`` if the statistics are ``finite`` (a 0-d bool tensor), else count a skip.

    ``apply`` (default: ``finite``) can veto more, uncounted (e.g. an empty batch). Call under no_grad.
    """
    apply = finite if apply is None else apply
    for buf, new in updates:
        buf.copy_(torch.where(apply, new, buf))
    module.num_skipped_updates.add_((~finite).long())
    _report(module, finite.device)


def _report(module: nn.Module, device: torch.device) -> None:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or device.type == 'meta':
        return
    unchecked = getattr(module, '_updates_unchecked', 0) + 1
    if device.type != 'cpu' and unchecked < CHECK_INTERVAL:
        module._updates_unchecked = unchecked
        return
    module._updates_unchecked = 0
    total = int(module.num_skipped_updates)
    seen = getattr(module, '_skips_seen', 0)
    module._skips_seen = total
    if total <= seen:
        return
    global _last_warning
    now = time.monotonic()
    if now - _last_warning < WARN_INTERVAL_S:
        return
    _last_warning = now
    name = getattr(module, 'layer_name', None)
    where = f'{type(module).__name__} {name!r}' if name else (
        f'{type(module).__name__}({module.extra_repr()}) (zoo.layers.name_stat_layers(model) names it)')
    warnings.warn(
        f'{where} skipped {total - seen} update(s) of its running statistics: they were not finite (NaN or inf in '
        f'its input); the statistics were kept ({total} skipped by this layer so far). Later layers usually skip '
        f'the same batch: zoo.layers.skipped_updates(model) counts per layer. Similar warnings are silenced for '
        f'{WARN_INTERVAL_S:g} s.', NonFiniteStatisticsWarning, stacklevel=3)


def name_stat_layers(model: nn.Module) -> nn.Module:
    """Let every layer with a skip counter name itself (its name in ``model``) in warnings."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, 'num_skipped_updates', None), torch.Tensor):
            m.layer_name = name
    return model


def skipped_updates(model: nn.Module) -> Dict[str, int]:
    """``{layer name: skipped updates}`` for the layers of ``model`` that skipped any."""
    counts = {}
    for name, m in model.named_modules():
        counter = getattr(m, 'num_skipped_updates', None)
        if isinstance(counter, torch.Tensor) and int(counter):
            counts[name] = int(counter)
    return counts
