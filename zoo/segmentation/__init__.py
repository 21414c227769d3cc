"""Semantic segmentation models of the zoo: DeepLabV3 on zoo backbones (see :mod:`.deeplabv3`)."""
from .deeplabv3 import (
    SEGMENTERS, ZooDeepLabV3, backbone_variant, build_deeplabv3, create_segmenter, list_segmenters)
