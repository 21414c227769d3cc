"""Prediction on unlabeled images and clips: what ``zoo-train predict`` reads, and a one-call API.

Inputs (:func:`list_inputs`): a folder (searched recursively), a text file with one path per line,
or a CSV with a ``path`` column; relative paths in a list or CSV are relative to that file's folder.
No class sub-folders and no labels are needed. The DataModules turn them into
:class:`~lightning_modules.core.datasets.PredictInputs` (images: :class:`UnlabeledImages`), whose
unreadable files are an error naming the file, or with skipping on (``skip_corrupt``,
``on_decode_error: skip``) a row with the reason in its ``error`` column.

Output: the writers of :mod:`lightning_modules.core.writer` (:class:`TopKWriter` for classes),
streamed to disk batch by batch; label names from the data or the weights.

:func:`predict_file` does the same for one image or clip in Python, with the preprocessing of the
model's pretrained config (timm's ``resolve_data_config``), so a tag's weights see what they were
trained on.
"""
import csv
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from torchvision.datasets.folder import IMG_EXTENSIONS

from .datasets import ImageLoader, PredictInputs, load_rgb
from .writer import PredictionWriter, TopKWriter, label_names_of, resolve_label_names, top_k_rows

__all__ = ['IMAGE_EXTENSIONS', 'list_inputs', 'UnlabeledImages', 'PredictionWriter', 'TopKWriter', 'label_names_of',
           'resolve_label_names', 'top_k_rows', 'predict_file']

IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS)


def _listed_paths(source: Path) -> List[Path]:
    if source.suffix.lower() == '.csv':
        with open(source, newline='') as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or 'path' not in reader.fieldnames:
                raise ValueError(f'{source}: a prediction CSV needs a "path" column, found {reader.fieldnames}')
            entries = [row['path'].strip() for row in reader if (row['path'] or '').strip()]
    else:
        entries = [line.strip() for line in source.read_text().splitlines() if line.strip() and not line.startswith('#')]
    paths = [p if p.is_absolute() else source.parent / p for p in map(Path, entries)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f'{source} lists {len(missing)} missing file(s): {", ".join(missing[:5])}')
    return paths


def list_inputs(source: Union[str, Path, Sequence[Union[str, Path]]], extensions: Sequence[str]) -> List[Path]:
    """The input files of ``source``: a folder (recursive, by ``extensions``), a list / CSV file, or a list of paths."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f'missing input file(s): {", ".join(missing[:5])}')
    else:
        source = Path(source).expanduser()
        if source.is_dir():
            paths = sorted(p for p in source.rglob('*') if p.is_file() and p.suffix.lower() in extensions)
        elif source.is_file() and source.suffix.lower() in extensions:
            paths = [source]
        elif source.is_file():
            paths = _listed_paths(source)
        else:
            raise FileNotFoundError(f'prediction input {source} does not exist')
    if not paths:
        raise ValueError(f'no inputs with extensions {", ".join(extensions)} in {source}')
    return paths


class UnlabeledImages(PredictInputs):
    """Images without labels for predict: items are :class:`~lightning_modules.core.datasets.PredictItem`
    ``({'index', 'path'}, transform(image))``. An unreadable file raises, naming it, or with ``skip``
    is skipped (its row gets the reason)."""

    def __init__(self, paths: Sequence[Path], transform: Optional[Callable] = None, skip: bool = False):
        super().__init__(paths, ImageLoader(transform), skip=skip, what='image')
        self.transform = transform


@torch.no_grad()
def predict_file(model: Union[str, nn.Module], path: Union[str, Path], top_k: int = 5,
                 num_clips: int = 1, num_crops: int = 1) -> List[Dict]:
    """Top-k classes of one image or clip: ``predict_file('resnet20_wsbcn.cifar10', 'cat.jpg')``.

    ``model`` is a module or a zoo / timm name (loaded with ``pretrained=True``). Preprocessing
    comes from the model's pretrained config. Clips (by extension) go through the TSM evaluation
    path: ``num_clips`` x ``num_crops`` views, softmax averaged over views.
    """
    import zoo  # noqa: F401  (registers the zoo's names)
    if isinstance(model, str):
        model = zoo.create_model(model, pretrained=True)
    model.eval()
    cfg = resolve_data_config(model=model)
    from ..video.data import VIDEO_EXTENSIONS, EvalViews, VideoClipDataset, VideoSample
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        views = EvalViews(cfg['input_size'][-1], num_crops=num_crops, mean=cfg['mean'], std=cfg['std'])
        dataset = VideoClipDataset([VideoSample(path, 0)], getattr(model, 'num_segments', 8), train=False,
                                   eval_views=views, num_clips=num_clips)
        probs = model(dataset[0][0]).softmax(-1).mean(0, keepdim=True)
    else:
        x = create_transform(**cfg, is_training=False)(load_rgb(path)).unsqueeze(0)
        probs = model(x).softmax(-1)
    return top_k_rows(probs, top_k, label_names_of(model))[0]
