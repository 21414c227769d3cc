"""Semantic segmentation: LightningModule, image + mask DataModule, mask-aware transforms, prediction pictures."""
from .data import MaskError, SegmentationDataModule, SegmentationFolderDataset, load_mask
from .module import SemanticSegmenter, segmentation_metrics, sliding_window_logits
from .predict import SegmentationWriter, colorize, overlay, palette
from .transforms import IGNORE_INDEX, eval_image_transform, pad_collate, train_transform
