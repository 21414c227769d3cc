"""Pictures of predictions: colour-coded masks and overlays on the input images.

:class:`SegmentationWriter` is a Lightning prediction writer; with ``zoo-train predict`` it writes,
for each image, ``<output_dir>/masks/<id>.png`` (a palette PNG whose pixel values are the
predicted class indices, so it is also a prediction file) and ``<output_dir>/overlays/<id>.jpg``
(the classes drawn over the image with ``torchvision.utils.draw_segmentation_masks``)::

    zoo-train predict -c configs/segmentation/coco_mini_r18_wsbcn_cpu.yaml --ckpt_path last \\
        --trainer.callbacks+=lightning_modules.segmentation.SegmentationWriter \\
        --trainer.callbacks.output_dir predictions/
"""
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks

from ..datasets import load_rgb
from .transforms import IGNORE_INDEX

__all__ = ['PALETTE', 'palette', 'colorize', 'overlay', 'SegmentationWriter']


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


class SegmentationWriter(BasePredictionWriter):
    """Writes ``masks/<id>.png`` and ``overlays/<id>.jpg`` for every predicted image.

    Args:
        output_dir: where to write (created).
        alpha: opacity of the overlay colours.
    """

    def __init__(self, output_dir: str, alpha: float = 0.5):
        super().__init__(write_interval='batch')
        self.output_dir = Path(output_dir)
        self.alpha = alpha

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Sequence[int], batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        dataset = loader.dataset
        (self.output_dir / 'masks').mkdir(parents=True, exist_ok=True)
        (self.output_dir / 'overlays').mkdir(parents=True, exist_ok=True)
        for labels, index in zip(prediction['labels'], prediction['index'].tolist()):
            path = Path(dataset.images[index])
            colorize(labels).save(self.output_dir / 'masks' / f'{path.stem}.png')
            drawn = overlay(load_rgb(path), labels, self.alpha)
            TF.to_pil_image(drawn).save(self.output_dir / 'overlays' / f'{path.stem}.jpg', quality=90)
