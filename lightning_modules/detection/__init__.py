"""Detection and instance segmentation (Mask R-CNN / Faster R-CNN) with zoo backbones.

- :mod:`.data`: COCO-format datasets, transforms and :class:`CocoDetectionDataModule`.
- :mod:`.module`: :class:`DetectionModule` (training, COCO AP, predict) and :func:`create_detector`.
- :mod:`.emulation`: K devices in one process for detectors.
- :mod:`.predict`: COCO results format and :class:`DetectionWriter` (JSON + drawn PNG per image).
"""
from .data import (CocoCategories, CocoDetectionDataModule, CocoDetectionDataset, CocoFormatError, ImageListDataset,
                   collate_detection, load_coco, train_transform)
from .emulation import detector_virtual_devices
from .module import DetectionModule, create_detector
from .predict import DetectionWriter, coco_results, draw_detections
