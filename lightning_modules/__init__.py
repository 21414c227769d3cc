"""Lightning training for the zoo: image classification module, data modules, CLI, device emulation.

Pieces meant for reuse (e.g. by video modules): :mod:`.optim` (optimizer, parameter groups,
schedules), :mod:`.metrics` (top-1 / top-5), :mod:`.emulation` (K devices in one process),
:mod:`.samplers` (per-device batches, resumable order).
"""
from .classification import ImageClassifier, NonFiniteLossError
from .datamodules import Cifar10DataModule, ImageDataModule, ImageFolderDataModule, prepare_cifar10
from .datasets import CorruptImageError, ImageFolderDataset
from .emulation import VirtualDeviceNorm, virtual_devices
from .metrics import accuracy_metrics
from .optim import OptimConfig, create_optimizer, create_scheduler, param_groups
from .samplers import ResumableTrainOrder, TrainDataLoader, VirtualDeviceSampler
from .detection import CocoDetectionDataModule, DetectionModule, DetectionWriter
