"""Emulate K devices x B images per device for a torchvision detector in one process.

The detector gets the K*B images of the K virtual devices as one list, device by device (the
order :class:`~lightning_modules.samplers.VirtualDeviceSampler` yields). What each part sees:

- Backbone, FPN and RPN head: the detector's transform pads the images into one (K*B, C, H, W)
  batch in list order, so chunk k of that batch is device k's images: the generic
  :func:`lightning_modules.emulation.virtual_devices` splits every batch-dependent norm there
  (BN, BGN, BCN's large-batch stage) into K equal chunks. Exact, except for padding: all K*B
  images are padded to the largest of them, where each real device pads to its own largest, so
  norms that average over the padded zeros (GN, BCN, BN alike) see slightly different
  statistics unless all images of the batch have the same padded size.
- ROI heads (box head, mask head): they see the pooled regions of all images at once, in image
  order, with a different number of regions per image (the mask head only gets positives).
  :func:`detector_virtual_devices` records how many regions each image contributes (a hook on
  the ROI pooler) and splits the heads' batch-dependent norms into per-device chunks of those
  sizes: exact.
- Norms whose statistics are all-reduced over devices anyway (BCN's estimated batch stage,
  :class:`~zoo.layers.EstimatedBatchNorm2d`) and per-sample norms (GN, BCN's channel stage)
  need nothing: the one process computes what the K devices compute together (up to padding).
- Not emulated: the losses' normalisation. torchvision averages each loss over all sampled
  anchors / regions of the batch; DDP averages the K per-device averages. They agree when every
  device samples the same number (RPN: 256 anchors per image, box head: 512 regions per image,
  the usual case), not for the mask loss, whose positives vary per device. Random sampling of
  anchors and regions draws from one generator instead of K.
"""
from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.emulation import VirtualDeviceNorm, is_batch_dependent, virtual_devices

__all__ = ['RoiDeviceSizes', 'RoiDeviceNorm', 'detector_virtual_devices']

# (ROI pooler, head it feeds) pairs of torchvision's RoIHeads.
_ROI_STAGES = (('box_roi_pool', 'box_head'), ('mask_roi_pool', 'mask_head'), ('keypoint_roi_pool', 'keypoint_head'))


class RoiDeviceSizes:
    """Forward pre-hook of a ROI pooler: regions per virtual device of the batch it pools."""

    def __init__(self, num_devices: int):
        self.num_devices = num_devices
        self.sizes: Optional[List[int]] = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        proposals: Sequence[torch.Tensor] = args[1]  # MultiScaleRoIAlign(features, boxes, image_shapes)
        counts = [len(p) for p in proposals]
        if len(counts) % self.num_devices:
            raise ValueError(f'{len(counts)} images cannot be split into {self.num_devices} virtual devices')
        per = len(counts) // self.num_devices
        self.sizes = [sum(counts[d * per:(d + 1) * per]) for d in range(self.num_devices)]


class RoiDeviceNorm(VirtualDeviceNorm):
    """A head's batch-dependent norm, split into the per-device region counts of ``sizes``."""

    def __init__(self, norm: nn.Module, sizes: RoiDeviceSizes):
        super().__init__(norm, sizes.num_devices)
        self.sizes = sizes

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        sizes = self.sizes.sizes
        if sizes is None or sum(sizes) != x.shape[0]:
            raise RuntimeError(f'{x.shape[0]} regions reached a ROI head norm but the pooler counted {sizes}; '
                               f'is the head fed by another pooler?')
        return x.split(sizes)


@contextmanager
def detector_virtual_devices(model: nn.Module, num_devices: int) -> Iterator[nn.Module]:
    """Inside the context, a torchvision detector's training forward behaves as on ``num_devices`` devices."""
    if num_devices < 1:
        raise ValueError(f'num_devices must be >= 1, got {num_devices}')
    if num_devices == 1:
        yield model
        return
    roi_heads = getattr(model, 'roi_heads', None)
    swapped, hooks = [], []
    with ExitStack() as stack:
        for name, child in model.named_children():
            if child is not roi_heads:
                stack.enter_context(virtual_devices(child, num_devices))
        try:
            for pool_name, head_name in _ROI_STAGES:
                pool, head = getattr(roi_heads, pool_name, None), getattr(roi_heads, head_name, None)
                if pool is None or head is None:
                    continue
                sizes = RoiDeviceSizes(num_devices)
                hooks.append(pool.register_forward_pre_hook(sizes))
                found = [(parent, child_name, child) for parent in head.modules()
                         for child_name, child in parent.named_children() if is_batch_dependent(child)]
                for parent, child_name, child in found:
                    setattr(parent, child_name, RoiDeviceNorm(child, sizes))
                swapped += found
            if roi_heads is not None:
                for module in roi_heads.modules():
                    if is_batch_dependent(module) and not any(module is s[2] for s in swapped):
                        raise NotImplementedError(
                            f'{type(module).__name__} in the ROI heads outside the box / mask / keypoint head: '
                            f'cannot tell which device its regions belong to')
            yield model
        finally:
            for parent, child_name, child in swapped:
                setattr(parent, child_name, child)
            for hook in hooks:
                hook.remove()
