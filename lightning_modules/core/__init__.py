"""What every task shares, written once: the CLI, optimizer and schedule, device emulation, samplers,
checkpoints (digests, resume points), prediction writing and input listing.

A task (``classification/``, ``video/``, ``detection/``, ``segmentation/``) brings its module, data
and transforms, and builds on these pieces; see ``docs/architecture.md``.
"""
from .data import REPO_ROOT, ImageDataModule, resolve_path
from .datasets import CorruptImageError, ImageFolderDataset
from .emulation import VirtualDeviceNorm, split_devices, virtual_devices
from .optim import OptimConfig, create_optimizer, create_scheduler, param_groups
from .samplers import ResumableTrainOrder, TrainDataLoader, VirtualDeviceSampler
