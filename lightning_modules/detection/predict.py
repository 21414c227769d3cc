"""Predictions in COCO results format, and a writer of one JSON + one drawn PNG per image.

:func:`coco_results` turns a torchvision detector's output for one image into COCO results
(``image_id``, ``category_id`` with the original COCO ids, ``bbox`` as x, y, w, h, ``score``
and, for masks, ``segmentation`` as compressed RLE): the format ``COCO.loadRes`` and the COCO
evaluation server read. :class:`DetectionWriter` (a
:class:`~lightning_modules.core.writer.PredictionWriter`, streamed batch by batch) writes, for
each image ``name.ext``, ``name.json`` (those results) and ``name.png`` (the image with the
boxes, labels and masks of detections scoring at least ``score_threshold``, drawn with
``torchvision.utils.draw_bounding_boxes`` / ``draw_segmentation_masks``), and one row per image
into its table (``predictions.csv`` in ``output_dir`` by default)::

    path, prediction, error, image_id, detections, results_file, picture_file

``prediction``: the detections scoring at least ``score_threshold``, most confident first
(``person 0.98, dog 0.71``); ``detections``: how many; ``results_file``: the image's COCO results
(all detections). Without a writer in the config, ``zoo-train predict --predict_output out.csv``
writes the table to ``out.csv`` and the files to ``out/``::

    zoo-train predict -c configs/coco/coco_mini_finetune.yaml --ckpt_path runs/.../last.ckpt \\
        --data.predict_images my_images/ \\
        --trainer.callbacks+=lightning_modules.detection.DetectionWriter \\
        --trainer.callbacks.output_dir predictions/
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..core.datasets import load_rgb
from ..core.writer import PredictionWriter
from .data import CocoCategories

__all__ = ['coco_results', 'draw_detections', 'DetectionWriter']

_logger = logging.getLogger(__name__)


def _encode_mask(mask: torch.Tensor) -> Dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.to(torch.uint8).cpu().numpy()))
    return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


def coco_results(output: Dict[str, torch.Tensor], image_id: int, categories: Optional[CocoCategories],
                 mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """COCO results of one image; without ``categories``, ``category_id`` is the model's label."""
    boxes = output['boxes'].detach().float().cpu()
    masks = output.get('masks')
    results = []
    for i, (box, label, score) in enumerate(zip(boxes.tolist(), output['labels'].tolist(), output['scores'].tolist())):
        x1, y1, x2, y2 = box
        res = {'image_id': int(image_id),
               'category_id': categories.category_id(label) if categories is not None else int(label),
               'bbox': [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
               'score': round(float(score), 5)}
        if masks is not None:
            res['segmentation'] = _encode_mask(masks[i, 0] >= mask_threshold)
        results.append(res)
    return results


def draw_detections(image: torch.Tensor, results: Sequence[Dict[str, Any]], categories: Optional[CocoCategories],
                    score_threshold: float = 0.5) -> torch.Tensor:
    """``image`` (uint8, 3 x H x W) with the masks, boxes and labels of results scoring >= ``score_threshold``."""
    shown = [r for r in results if r['score'] >= score_threshold]
    if not shown:
        return image
    names = {c['id']: c['name'] for c in categories.categories} if categories is not None else {}
    colors = [_color(r['category_id']) for r in shown]
    masks = [r['segmentation'] for r in shown if 'segmentation' in r]
    if masks:
        decoded = torch.from_numpy(mask_utils.decode([{'size': m['size'], 'counts': m['counts'].encode('ascii')}
                                                      for m in masks])).permute(2, 0, 1).bool()
        image = draw_segmentation_masks(image, decoded, alpha=0.45, colors=colors)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r['bbox'] for r in shown)], dtype=torch.float32)
    labels = [f'{names.get(r["category_id"], r["category_id"])} {r["score"]:.2f}' for r in shown]
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)


def _color(category_id: int) -> tuple:
    rng = np.random.default_rng(category_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def describe_detections(results: Sequence[Dict[str, Any]], categories: Optional[CocoCategories],
                        score_threshold: float, limit: int = 10) -> str:
    """``person 0.98, dog 0.71``: the detections scoring at least ``score_threshold``, most confident first."""
    names = {c['id']: c['name'] for c in categories.categories} if categories is not None else {}
    shown = sorted((r for r in results if r['score'] >= score_threshold), key=lambda r: -r['score'])
    text = ', '.join(f'{names.get(r["category_id"], r["category_id"])} {r["score"]:.2f}' for r in shown[:limit])
    return text + (f', ... ({len(shown) - limit} more)' if len(shown) > limit else '')


class DetectionWriter(PredictionWriter):
    """Writes ``<output_dir>/<image name>.json`` (COCO results) and ``.png`` (detections drawn) per image,
    and a row per image into ``table`` (see the module doc), batch by batch.

    Args:
        output_dir: created if needed; files of images with the same name in different
            subfolders keep the subfolder (relative to the predicted folder).
        score_threshold: detections drawn on the PNG and listed in the table (the JSON keeps all
            the detector returns).
        draw: also write the PNGs.
        table: the table (``.csv``, ``.jsonl``, ``.json``), relative to ``output_dir`` unless absolute.
        resume: continue after the images already in the table instead of overwriting it.
    """

    def __init__(self, output_dir: str, score_threshold: float = 0.5, draw: bool = True,
                 table: str = 'predictions.csv', resume: bool = False):
        self.output_dir = Path(output_dir)
        super().__init__(Path(table) if Path(table).is_absolute() else self.output_dir / table, resume)
        self.score_threshold = score_threshold
        self.draw = draw
        self.written = 0

    def extra_columns(self) -> List[str]:
        return ['image_id', 'detections', 'results_file', 'picture_file']

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.written = 0

    def rows(self, trainer, pl_module, prediction, meta):
        categories = getattr(pl_module, 'categories', None)
        root = getattr(self._predict_dataset(trainer), 'folder', None)
        rows = []
        for pred in prediction:
            path = Path(pred['path'])
            rel = path.relative_to(root) if root is not None and path.is_relative_to(root) else Path(path.name)
            out = (self.output_dir / rel).with_suffix('')
            out.parent.mkdir(parents=True, exist_ok=True)
            results_file = out.with_suffix('.json')
            results_file.write_text(json.dumps(pred['results']))
            picture = ''
            if self.draw:
                image = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).contiguous()
                picture = out.with_suffix('.png')
                write_png(draw_detections(image, pred['results'], categories, self.score_threshold), str(picture))
            self.written += 1
            rows.append({
                'path': str(path), 'error': '',
                'prediction': describe_detections(pred['results'], categories, self.score_threshold),
                'image_id': pred['image_id'],
                'detections': sum(r['score'] >= self.score_threshold for r in pred['results']),
                'results_file': str(results_file), 'picture_file': str(picture)})
        return rows

    def summary(self, output: Path) -> str:
        text = (f'Wrote detections of {self.written} image(s) to {self.output_dir}/ (COCO results JSON'
                + (' + drawn PNG' if self.draw else '') + f' per image); table: {output}')
        if self.counts['errors']:
            text += f' ({self.counts["errors"]} image(s) could not be read: see its error column)'
        if self.counts['kept']:
            text += f'; {self.counts["kept"]} rows of the earlier run kept'
        return text
