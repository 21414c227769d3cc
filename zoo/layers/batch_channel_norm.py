"""Batch-Channel Normalization (Qiao et al., arXiv:1903.10520): ``BCN(x) = CN(BN(x))``.

1. Batch stage, per channel with its own affine, in one of two modes:
   - ``'estimated'`` (default, for micro-batches): :class:`EstimatedBatchNorm2d`, running
     estimates normalize in training and eval, statistics reduced across processes.
   - ``'batch'`` (large batches): a plain ``nn.BatchNorm2d``, as in the authors' ImageNet code.
     Being a ``_BatchNorm``, it is converted by ``sync_batchnorm=True`` if you ask for that.
2. Channel stage: group normalization (``num_groups`` groups, per sample, no running
   statistics) followed by the authors' *group-wise* affine (one scale and shift per group).

Both modes have the same state-dict keys (``bn.weight``, ``bn.bias``, ``bn.running_mean``,
``bn.running_var``, ``bn.num_batches_tracked``, ``weight``, ``bias``), so a checkpoint trained in
one mode loads into the other; :func:`set_bcn_batch_stage` switches a built model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .estimated_batch_norm import EstimatedBatchNorm2d

__all__ = ['BatchChannelNorm2d', 'BCN_BATCH_STAGES', 'set_bcn_batch_stage']

BCN_BATCH_STAGES = ('estimated', 'batch')


def _make_batch_stage(mode: str, num_channels: int, eps: float, momentum, dd) -> nn.Module:
    if mode == 'estimated':
        return EstimatedBatchNorm2d(num_channels, eps=eps, momentum=0.01 if momentum is None else momentum, **dd)
    if mode == 'batch':
        return nn.BatchNorm2d(num_channels, eps=eps, momentum=0.1 if momentum is None else momentum, **dd)
    raise ValueError(f'Unknown BCN batch stage {mode!r}; choose one of {BCN_BATCH_STAGES}.')


class BatchChannelNorm2d(nn.Module):
    """Batch stage (estimated or batch statistics) followed by a group norm with group-wise affine.

    Args:
        num_channels: channels C; must be divisible by ``num_groups``.
        num_groups: groups of the channel stage (32 in the paper).
        eps: epsilon of both stages.
        batch_stage: ``'estimated'`` (micro-batches) or ``'batch'`` (large batches).
        momentum: update rate of the batch stage's running statistics; ``None`` picks 0.01 for
            ``'estimated'`` (see :class:`EstimatedBatchNorm2d`) and 0.1 for ``'batch'``.
    """

    def __init__(
            self,
            num_channels: int,
            num_groups: int = 32,
            eps: float = 1e-5,
            batch_stage: str = 'estimated',
            momentum=None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f'BatchChannelNorm2d: {num_channels} channels are not divisible into {num_groups} groups')
        dd = {'device': device, 'dtype': dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.batch_stage = batch_stage
        self.bn = _make_batch_stage(batch_stage, num_channels, eps, momentum, dd)
        self.weight = nn.Parameter(torch.ones(num_groups, **dd))
        self.bias = nn.Parameter(torch.zeros(num_groups, **dd))

    def extra_repr(self) -> str:
        return f'{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, batch_stage={self.batch_stage!r}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        # The group-wise affine, spread to channels, lets one fused group_norm do the channel stage.
        per_group = self.num_channels // self.num_groups
        weight = self.weight.repeat_interleave(per_group)
        bias = self.bias.repeat_interleave(per_group)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def set_bcn_batch_stage(model: nn.Module, batch_stage: str, momentum=None) -> nn.Module:
    """Switch every BCN layer of ``model`` to ``batch_stage``, keeping its learned state.

    For example, fine-tune at 2 images per device a model trained with large-batch BCN.
    """
    for m in model.modules():
        if isinstance(m, BatchChannelNorm2d) and m.batch_stage != batch_stage:
            old = m.bn
            ref = old.weight if old.weight is not None else old.running_mean
            new = _make_batch_stage(batch_stage, m.num_channels, m.eps, momentum, {'device': ref.device, 'dtype': ref.dtype})
            new.load_state_dict(old.state_dict())
            new.train(old.training)
            m.bn = new
            m.batch_stage = batch_stage
    return model
