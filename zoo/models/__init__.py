"""timm-registered zoo models; importing this module registers them."""
from .cifar_resnet import CIFAR_DEPTHS, ZOO_CIFAR_MODELS, CifarResNet
from .resnet import IMAGENET_ARCHS, ZOO_IMAGENET_MODELS, ZooResNet
from ._variants import NORM_VARIANTS, NormVariant
from .tsm import TSM_ARCHS, ZOO_TSM_MODELS, TSMResNet

ZOO_MODELS = ZOO_IMAGENET_MODELS + ZOO_CIFAR_MODELS + ZOO_TSM_MODELS
