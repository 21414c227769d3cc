"""Image classification: ``ImageClassifier``, the ImageFolder and CIFAR-10 DataModules, top-1 / top-5."""
from .data import Cifar10DataModule, ImageFolderDataModule, prepare_cifar10
from .metrics import accuracy_metrics
from .module import ImageClassifier, NonFiniteLossError
