"""wsbcn-zoo: Weight Standardization, Batch-Channel and Batch Group Normalization models for timm.

``import zoo`` registers every zoo model in timm, so ``timm.create_model('resnet50_wsbcn')`` works.
"""
from . import layers, models
from ._download import bound_timm_hub_downloads
from .convert import convert_model
from .detection import create_detector, list_detectors
from .export import export_for_inference
from .factory import UnknownModelError, create_model, list_models
from .hub import (WeightsError, list_pretrained, load_hub_model, load_lightning_checkpoint, load_model,
                  save_hub_folder)
from .layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, set_bcn_batch_stage
from .models import ZOO_MODELS
from .segmentation import create_segmenter, list_segmenters

bound_timm_hub_downloads()  # timm's hf-hub: downloads end within ZOO_DOWNLOAD_TIMEOUT

__version__ = '0.1.0'
