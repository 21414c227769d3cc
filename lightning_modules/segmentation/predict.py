"""Pictures of predictions: colour-coded masks and overlays on the input images.

:class:`SegmentationWriter` is a Lightning prediction writer (a
:class:`~lightning_modules.core.writer.PredictionWriter`, streamed batch by batch); with
``zoo-train predict`` it writes, for each image, ``<output_dir>/masks/<id>.png`` (a palette PNG
whose pixel values are the predicted class indices, so it is also a prediction file),
``<output_dir>/overlays/<id>.jpg`` (the classes drawn over the image with
``torchvision.utils.draw_segmentation_masks``) and a row into its table (``predictions.csv`` in
``output_dir`` by default)::

    path, prediction, error, mask_file, overlay_file

``prediction``: the classes covering most of the image, e.g. ``road 34%, building 22%, sky 17%``
(names from the data's ``class_names`` or the module's, else class indices)::

    zoo-train predict -c configs/segmentation/coco_mini_r18_wsbcn_cpu.yaml --ckpt_path last \\
        --trainer.callbacks+=lightning_modules.segmentation.SegmentationWriter \\
        --trainer.callbacks.output_dir predictions/
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks

from ..core.datasets import PredictBatch, load_rgb
from ..core.writer import PredictionWriter, resolve_label_names
from .transforms import IGNORE_INDEX

__all__ = ['PALETTE', 'palette', 'colorize', 'overlay', 'describe_classes', 'SegmentationWriter']


def palette(num: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map (bit-interleaved class index), (num, 3) uint8; index 255 is white."""
    cmap = np.zeros((num, 3), dtype=np.uint8)
    for i in range(num):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    if num > IGNORE_INDEX:
        cmap[IGNORE_INDEX] = 255
    return cmap


PALETTE = palette()


def colorize(labels: Union[torch.Tensor, np.ndarray]) -> Image.Image:
    """A palette ('P') PIL image of class indices: pixel values stay the indices, colours show them."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    img = Image.fromarray(arr.astype(np.uint8))
    img.putpalette(PALETTE.flatten().tolist())  # an 'L' image with a palette becomes 'P'
    return img


def overlay(image: Union[Image.Image, torch.Tensor], labels: torch.Tensor, alpha: float = 0.5,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``image`` (PIL or uint8 (3, H, W)) with each present class of ``labels`` (H, W) drawn in its palette colour."""
    img = TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image
    labels = labels.to(torch.long).cpu()
    classes = [c for c in labels.unique().tolist() if c != ignore_index]
    if not classes:
        return img
    masks = labels[None] == torch.tensor(classes)[:, None, None]
    colors = [tuple(int(v) for v in PALETTE[c]) for c in classes]
    return draw_segmentation_masks(img, masks, alpha=alpha, colors=colors)


def describe_classes(labels: torch.Tensor, names: Optional[Sequence[str]] = None, top: int = 3,
                     ignore_index: int = IGNORE_INDEX) -> str:
    """``road 34%, building 22%, sky 17%``: the ``top`` classes of a label map by area."""
    labels = labels.to(torch.long).flatten().cpu()
    labels = labels[labels != ignore_index]
    if labels.numel() == 0:
        return ''
    counts = torch.bincount(labels)
    order = counts.argsort(descending=True)[:top].tolist()
    return ', '.join(f'{names[c] if names and c < len(names) else c} {100 * counts[c].item() / labels.numel():.0f}%'
                     for c in order if counts[c] > 0)


class SegmentationWriter(PredictionWriter):
    """Writes ``masks/<id>.png`` and ``overlays/<id>.jpg`` for every predicted image, and its row into ``table``.

    Args:
        output_dir: where to write (created).
        alpha: opacity of the overlay colours.
        table: the table (``.csv``, ``.jsonl``, ``.json``), relative to ``output_dir`` unless absolute.
        resume: continue after the images already in the table instead of overwriting it.
    """

    def __init__(self, output_dir: str, alpha: float = 0.5, table: str = 'predictions.csv', resume: bool = False):
        self.output_dir = Path(output_dir)
        super().__init__(Path(table) if Path(table).is_absolute() else self.output_dir / table, resume)
        self.alpha = alpha

    def extra_columns(self) -> List[str]:
        return ['mask_file', 'overlay_file']

    def batch_meta(self, trainer, batch, batch_indices):
        if isinstance(batch, PredictBatch) or not isinstance(batch, dict) or 'index' not in batch:
            return super().batch_meta(trainer, batch, batch_indices)
        dataset = self._predict_dataset(trainer)  # a SegmentationFolderDataset loader (no PredictBatch)
        images = getattr(dataset, 'images', None) or getattr(dataset, 'paths')
        return [{'index': i, 'path': str(images[i])} for i in batch['index'].tolist()], []

    def rows(self, trainer, pl_module, prediction: Dict[str, Any], meta: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        (self.output_dir / 'masks').mkdir(parents=True, exist_ok=True)
        (self.output_dir / 'overlays').mkdir(parents=True, exist_ok=True)
        num_classes = getattr(pl_module, 'num_classes', None)
        names = resolve_label_names(num_classes, getattr(getattr(trainer, 'datamodule', None), 'class_names', None),
                                    getattr(pl_module, 'class_names', None))
        ignore = getattr(pl_module, 'ignore_index', IGNORE_INDEX)
        rows = []
        for labels, m in zip(prediction['labels'], meta):
            path = Path(m['path'])
            mask_file = self.output_dir / 'masks' / f'{path.stem}.png'
            overlay_file = self.output_dir / 'overlays' / f'{path.stem}.jpg'
            colorize(labels).save(mask_file)
            drawn = overlay(load_rgb(path), labels, self.alpha)
            TF.to_pil_image(drawn).save(overlay_file, quality=90)
            rows.append({'path': str(path), 'prediction': describe_classes(labels, names, ignore_index=ignore),
                         'error': '', 'mask_file': str(mask_file), 'overlay_file': str(overlay_file)})
        return rows
