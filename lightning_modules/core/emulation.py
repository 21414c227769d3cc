"""Emulate "K devices x B images per device" in one process.

Under real DDP without a synchronized norm, every layer that normalizes with *batch* statistics
sees only its own device's B images; layers that do not depend on the batch (convs, GN, the
channel stage of BCN) give the same result whatever the split. So the emulation only has to
change the batch-dependent norms:

- ``nn.BatchNorm*`` (any ``_BatchNorm`` except ``SyncBatchNorm``, so also BCN's large-batch
  stage and timm's ``BatchNormAct2d``) and :class:`~zoo.layers.BatchGroupNorm2d`: the batch of
  K*B is split into K chunks and each chunk is normalized with its own statistics. Running
  statistics are updated from the first chunk only, because DDP broadcasts rank 0's buffers
  before every forward (``broadcast_buffers=True``), so rank 0's are the ones a real run keeps.
- :class:`~zoo.layers.EstimatedBatchNorm2d` all-reduces its statistics under DDP, so a real run
  updates it with the statistics of the whole global batch: exactly what it computes on the
  K*B images of one process. It is left alone.

Gradients: DDP averages the per-device gradients of per-device mean losses; with equal chunks
that is the gradient of the mean loss over the K*B images, which is what one process computes.

The data side (which images form each virtual device's chunk) is
:class:`lightning_modules.samplers.VirtualDeviceSampler`. :func:`virtual_devices` swaps the
batch-dependent norms for chunking wrappers only for the duration of a forward, so checkpoints,
EMA copies and state-dict keys never see the wrappers.
"""
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.layers import BatchGroupNorm2d

__all__ = ['BATCH_DEPENDENT_NORMS', 'is_batch_dependent', 'VirtualDeviceNorm', 'virtual_devices', 'split_devices']

# Norms whose training output depends on the other samples of the device's batch.
BATCH_DEPENDENT_NORMS = (_BatchNorm, BatchGroupNorm2d)


def is_batch_dependent(module: nn.Module) -> bool:
    return isinstance(module, BATCH_DEPENDENT_NORMS) and not isinstance(module, nn.SyncBatchNorm)


def split_devices(x: torch.Tensor, num_devices: int) -> Tuple[torch.Tensor, ...]:
    """The K per-device chunks of a batch; the batch must split evenly."""
    if x.shape[0] % num_devices:
        raise ValueError(
            f'A batch of {x.shape[0]} samples cannot be split into {num_devices} virtual devices of equal size; '
            f'use a batch of virtual_devices x images_per_device samples (drop_last).')
    return x.chunk(num_devices)


class VirtualDeviceNorm(nn.Module):
    """Runs ``norm`` on each of ``num_devices`` chunks; running stats come from the first chunk."""

    def __init__(self, norm: nn.Module, num_devices: int):
        super().__init__()
        self.norm = norm
        self.num_devices = num_devices

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The per-device chunks of ``x`` (equal ones here; detectors' ROI heads split by image)."""
        return split_devices(x, self.num_devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.norm.training or self.num_devices == 1:
            return self.norm(x)
        chunks = self.split(x)
        outputs = [self.norm(chunks[0])]
        # Other devices update throw-away copies of the buffers (never restore in place: autograd
        # may have saved the running stats for backward).
        buffers = dict(self.norm._buffers)
        try:
            for chunk in chunks[1:]:
                for name, buf in buffers.items():
                    if buf is not None:
                        self.norm._buffers[name] = buf.detach().clone()
                outputs.append(self.norm(chunk))
        finally:
            self.norm._buffers.update(buffers)
        return torch.cat(outputs)


def _batch_dependent_children(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if is_batch_dependent(child):
                found.append((parent, name, child))
    return found


@contextmanager
def virtual_devices(model: nn.Module, num_devices: int) -> Iterator[nn.Module]:
    """Inside the context, ``model``'s forward behaves as on ``num_devices`` DDP devices."""
    if num_devices < 1:
        raise ValueError(f'num_devices must be >= 1, got {num_devices}')
    swapped = _batch_dependent_children(model) if num_devices > 1 else []
    for parent, name, child in swapped:
        setattr(parent, name, VirtualDeviceNorm(child, num_devices))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
