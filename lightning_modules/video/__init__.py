"""Video classification (TSM): ``VideoClassifier``, clip decoding and the video DataModule."""
from .data import (VIDEO_EXTENSIONS, EvalViews, VideoClipDataset, VideoDataModule, VideoDecodeError, VideoSample,
                   collate_videos, decode_video, read_manifest, scan_class_folders)
from .module import VideoClassifier
