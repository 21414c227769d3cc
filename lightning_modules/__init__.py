"""Lightning training for the zoo, laid out by task on one shared core.

- :mod:`.core`: the CLI, optimizer and schedule, emulation, samplers, checkpointing, predictions.
- :mod:`.classification`, :mod:`.video`, :mod:`.detection`, :mod:`.segmentation`: one folder per
  task, each with its module, data and transforms.

See ``docs/architecture.md``. Old import paths (``lightning_modules.cli``, ``.datamodules``,
``.video_data``, ...) still work: :data:`MOVED_MODULES` lists every one, in this one place.
"""
import importlib
import sys

from .core import ImageDataModule, OptimConfig, VirtualDeviceNorm, create_optimizer, create_scheduler, virtual_devices
from .core import CorruptImageError, ImageFolderDataset, ResumableTrainOrder, TrainDataLoader, VirtualDeviceSampler
from .core.optim import param_groups
from .classification import (Cifar10DataModule, ImageClassifier, ImageFolderDataModule, NonFiniteLossError,
                             accuracy_metrics, prepare_cifar10)
from .detection import CocoDetectionDataModule, DetectionModule, DetectionWriter

# The tasks, each a folder with its module, data and transforms. A new task registers here: importing it
# makes its classes known to zoo-train (``class_path: lightning_modules.<task>.<Class>``, or the class name).
TASKS = ('classification', 'video', 'detection', 'segmentation')

# Old module path -> where it lives now (kept so that old configs, scripts and imports go on working).
MOVED_MODULES = {
    'checkpointing': 'core.checkpointing',
    'cli': 'core.cli',
    'datamodules': 'classification.data',
    'datasets': 'core.datasets',
    'deploy': 'core.deploy',
    'emulation': 'core.emulation',
    'finetune': 'core.finetune',
    'metrics': 'classification.metrics',
    'optim': 'core.optim',
    'predict': 'core.predict',
    'runtime': 'core.runtime',
    'samplers': 'core.samplers',
    'video_data': 'video.data',
}


def _import_tasks() -> None:
    for task in TASKS:
        importlib.import_module(f'{__name__}.{task}')


def _alias_moved_modules() -> None:
    for old, new in MOVED_MODULES.items():
        module = importlib.import_module(f'{__name__}.{new}')
        sys.modules[f'{__name__}.{old}'] = module
        globals()[old] = module


_import_tasks()
_alias_moved_modules()
