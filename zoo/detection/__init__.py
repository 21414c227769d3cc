"""Detection and instance segmentation: torchvision Faster / Mask R-CNN with zoo backbones and heads."""
from .backbone import TimmFPNBackbone, freeze_stages
from .models import DETECTOR_ARCHS, DETECTORS, create_detector, detector_name, list_detectors
