"""Prediction on unlabeled images and clips: what ``zoo-train predict`` reads and writes, and a one-call API.

Inputs (:func:`list_inputs`): a folder (searched recursively), a text file with one path per line,
or a CSV with a ``path`` column; relative paths in a list or CSV are relative to that file's folder.
No class sub-folders and no labels are needed.

Output (:class:`TopKWriter`): one row per input, in input order, with its top-k classes, their
label names and probabilities, as CSV or JSON (by the output file's extension). Label names come
from the weights' ``label_names`` (the model's pretrained config) when they exist. An input that
could not be decoded (videos with ``on_decode_error='skip'``) gets a row with its error instead.

:func:`predict_file` does the same for one image or clip in Python, with the preprocessing of the
model's pretrained config (timm's ``resolve_data_config``), so a tag's weights see what they were
trained on.
"""
import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from timm.data import create_transform, resolve_data_config
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .datasets import load_rgb

__all__ = ['IMAGE_EXTENSIONS', 'list_inputs', 'UnlabeledImages', 'TopKWriter', 'label_names_of',
           'top_k_rows', 'predict_file']

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


class UnlabeledImages(Dataset):
    """Images without labels; items ``(image, index)``. An unreadable file raises, naming it."""

    def __init__(self, paths: Sequence[Path], transform=None):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = load_rgb(self.paths[index])
        return (self.transform(img) if self.transform is not None else img), index


def label_names_of(model: nn.Module) -> Optional[List[str]]:
    """The weights' class names, from the (timm) model's pretrained config, if it has them."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('label_names')
    return list(names) if names else None


def top_k_rows(probs: torch.Tensor, k: int, label_names: Optional[Sequence[str]]) -> List[List[Dict]]:
    """Per sample: the ``k`` most probable classes as ``{'class', 'label', 'probability'}``."""
    values, indices = probs.float().topk(min(k, probs.shape[-1]), dim=-1)
    out = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        out.append([{'class': i, 'label': label_names[i] if label_names and i < len(label_names) else str(i),
                     'probability': round(v, 6)} for v, i in zip(vals, idxs)])
    return out


def _write(path: Path, rows: List[Dict], top_k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == '.json':
        path.write_text(json.dumps(rows, indent=1) + '\n')
        return
    fields = ['path'] + [f'{c}_{r}' for r in range(1, top_k + 1) for c in ('label', 'class', 'probability')] + ['error']
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {'path': row['path'], 'error': row.get('error', '')}
            for r, entry in enumerate(row['top_k'], start=1):
                flat.update({f'label_{r}': entry['label'], f'class_{r}': entry['class'],
                             f'probability_{r}': entry['probability']})
            writer.writerow(flat)


class TopKWriter(BasePredictionWriter):
    """Writes the top-k classes of every input of the predict loader to ``output`` (``.csv`` or ``.json``).

    The predict dataset must have ``paths``; batches carry each item's index (images: ``(x, index)``;
    clips: the ``label`` slot holds the index). ``label_names`` overrides the weights' own names.
    """

    def __init__(self, output: Union[str, Path], top_k: int = 5, label_names: Optional[Sequence[str]] = None):
        super().__init__(write_interval='batch')
        if Path(output).suffix.lower() not in ('.csv', '.json'):
            raise ValueError(f'prediction output must end in .csv or .json, got {output}')
        self.output = Path(output)
        self.top_k = top_k
        self.label_names = list(label_names) if label_names else None
        self._rows: Dict[int, Dict] = {}

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._rows = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        indices = batch['label'] if isinstance(batch, dict) else batch[1]
        paths = trainer.predict_dataloaders.dataset.paths
        names = self.label_names or label_names_of(getattr(pl_module, 'model', pl_module))
        for index, top in zip(indices.tolist(), top_k_rows(prediction, self.top_k, names)):
            self._rows[index] = {'path': str(paths[index]), 'top_k': top}

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        paths = trainer.predict_dataloaders.dataset.paths
        rows = [self._rows.get(i, {'path': str(p), 'top_k': [], 'error': 'not decoded (skipped)'})
                for i, p in enumerate(paths)]
        output = self.output
        if trainer.world_size > 1:  # each process predicts its share; one file per process
            output = output.with_name(f'{output.stem}.rank{trainer.global_rank}{output.suffix}')
            rows = [r for i, r in enumerate(rows) if i in self._rows]
        _write(output, rows, self.top_k)
        skipped = sum('error' in r for r in rows)
        print(f'Predictions for {len(rows) - skipped} of {len(rows)} inputs written to {output}'
              + (f' ({skipped} could not be decoded)' if skipped else ''), flush=True)


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
    from .video_data import VIDEO_EXTENSIONS, EvalViews, VideoClipDataset, VideoSample
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
