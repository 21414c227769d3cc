"""Predictions streamed to disk as they are made: one table per run, the same leading columns for every task.

:class:`PredictionWriter` is a Lightning ``BasePredictionWriter(write_interval='batch')``: after
each predict batch it appends that batch's rows to its table and flushes, so a crash (or a kill)
keeps every row of the batches finished before it. Every task's table starts with the same
columns (:data:`COMMON_COLUMNS`)::

    path        the input file
    prediction  the answer in one cell (top-1 class name, detected objects, classes by area)
    error       empty, or why the input was skipped (skip_corrupt / on_decode_error: skip)

and each task adds its own: :class:`TopKWriter` (classification, video) the top-k classes,
``DetectionWriter`` the detection count and per-image COCO results file, ``SegmentationWriter``
the mask file. Rows follow the input order. Class names come from the writer's ``label_names``, the
DataModule's ``class_names``, the module's ``class_names`` or the weights' ``label_names``, the
first whose length is the number of classes predicted.

Formats, by the table's extension: ``.csv`` (top-k flattened into ``label_1, class_1,
probability_1, ...``), ``.jsonl`` (one JSON object per line) or ``.json`` (an array, rewritten at
its end after every batch so that it is valid JSON at all times).

Rerunning over an existing table: by default it is **overwritten**, and the log line says how many
rows of an earlier run are replaced. With ``resume=True`` (``zoo-train predict --predict_resume
true``) the run **continues after them** instead: inputs whose path is already in the table are
not predicted again, and new rows are appended (the table's columns must be the same). Under DDP
each process writes ``<name>.rank<r><ext>``; a resume reads the tables of every rank.
"""
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from .datasets import PredictBatch

__all__ = ['COMMON_COLUMNS', 'TABLE_FORMATS', 'RowTable', 'read_rows', 'PredictionWriter', 'TopKWriter',
           'label_names_of', 'resolve_label_names', 'top_k_rows']

COMMON_COLUMNS = ('path', 'prediction', 'error')
TABLE_FORMATS = ('.csv', '.jsonl', '.json')


# -- class names and top-k ----------------------------------------------------------------------------

def label_names_of(model: nn.Module) -> Optional[List[str]]:
    """The weights' class names, from the (timm) model's pretrained config, if it has them."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('label_names')
    return list(names) if names else None


def resolve_label_names(num_classes: Optional[int], *sources: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The first of ``sources`` with ``num_classes`` names (any non-empty one when ``num_classes`` is None)."""
    for names in sources:
        if names and (num_classes is None or len(names) == num_classes):
            return [str(n) for n in names]
    return None


def top_k_rows(probs: torch.Tensor, k: int, label_names: Optional[Sequence[str]]) -> List[List[Dict]]:
    """Per sample: the ``k`` most probable classes as ``{'class', 'label', 'probability'}``."""
    values, indices = probs.float().topk(min(k, probs.shape[-1]), dim=-1)
    out = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        out.append([{'class': i, 'label': label_names[i] if label_names and i < len(label_names) else str(i),
                     'probability': round(v, 6)} for v, i in zip(vals, idxs)])
    return out


# -- the table file -----------------------------------------------------------------------------------

def _check_format(path: Path) -> None:
    if path.suffix.lower() not in TABLE_FORMATS:
        raise ValueError(f'prediction output must end in {", ".join(TABLE_FORMATS)}, got {path}')


def read_rows(path: Union[str, Path]) -> Tuple[Optional[List[str]], List[Dict[str, Any]]]:
    """``(columns, rows)`` of a prediction table written by :class:`RowTable` (columns: CSV only).

    A last row cut short by a kill (a CSV row with missing cells, a JSON line that does not parse)
    is left out: it is predicted again.
    """
    path = Path(path)
    text = path.read_text(encoding='utf-8')
    suffix = path.suffix.lower()
    if suffix == '.csv':
        reader = csv.DictReader(io.StringIO(text, newline=''))
        rows = [r for r in reader if None not in r.values() and None not in r]
        return list(reader.fieldnames or []), rows
    if suffix == '.jsonl':
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short
        return None, rows
    try:
        rows = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        # Killed while appending: keep the complete rows (one per line, see RowTable).
        rows = []
        for line in text.splitlines()[1:]:
            try:
                rows.append(json.loads(line.rstrip().rstrip(',')))
            except json.JSONDecodeError:
                continue
    if not isinstance(rows, list):
        raise ValueError(f'{path} is not a prediction table (a JSON array of rows)')
    return None, rows


class RowTable:
    """A prediction table opened for appending: every :meth:`append` is written and flushed at once.

    CSV and JSON Lines are appended to; a JSON array is kept valid after every write (the rows are
    written one per line, then the closing bracket, which the next append writes over).
    """

    def __init__(self, path: Union[str, Path], columns: Sequence[str], rows: Sequence[Dict[str, Any]] = ()):
        self.path = Path(path)
        _check_format(self.path)
        self.columns = list(columns)
        self.format = self.path.suffix.lower()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f'.{self.path.name}.tmp-{os.getpid()}')
        self._rows_written = 0
        with open(tmp, 'w', newline='', encoding='utf-8') as f:  # start (or rewrite, on resume) in one piece
            if self.format == '.csv':
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction='ignore')
                writer.writeheader()
                writer.writerows(rows)
            elif self.format == '.jsonl':
                f.writelines(json.dumps(r) + '\n' for r in rows)
            else:
                f.write('[\n' + ',\n'.join(json.dumps(r) for r in rows) + '\n]\n')
        os.replace(tmp, self.path)
        self._rows_written = len(rows)
        self._file = open(self.path, 'r+b' if self.format == '.json' else 'ab')
        if self.format == '.json':
            self._file.seek(0, os.SEEK_END)
            self._json_end = self._file.tell() - len(b'\n]\n')  # where the next row goes

    def append(self, rows: Sequence[Dict[str, Any]]) -> None:
        if not rows:
            return
        if self.format == '.csv':
            buf = io.StringIO(newline='')
            csv.DictWriter(buf, fieldnames=self.columns, extrasaction='ignore').writerows(rows)
            self._file.write(buf.getvalue().encode('utf-8'))
        elif self.format == '.jsonl':
            self._file.write(''.join(json.dumps(r) + '\n' for r in rows).encode('utf-8'))
        else:
            lead = ',\n' if self._rows_written else ''
            body = (lead + ',\n'.join(json.dumps(r) for r in rows)).encode('utf-8')
            self._file.seek(self._json_end)
            self._file.write(body + b'\n]\n')
            self._json_end += len(body)
            self._file.truncate()
        self._rows_written += len(rows)
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# -- the writer -----------------------------------------------------------------------------------------

class PredictionWriter(BasePredictionWriter):
    """Base of every task's writer: streams the rows of each predict batch to ``output`` (see the module doc).

    A task's writer says which columns it adds (:meth:`extra_columns`) and turns one batch's
    predictions into rows (:meth:`rows`, one per readable input, in the order of ``meta``); rows of
    unreadable inputs (``error`` set) are written here.

    Args:
        output: the table: ``.csv``, ``.jsonl`` or ``.json``.
        resume: continue after the rows already in ``output`` (skip their inputs) instead of
            overwriting it.
    """

    def __init__(self, output: Union[str, Path], resume: bool = False):
        super().__init__(write_interval='batch')
        self.output = Path(output)
        _check_format(self.output)
        self.resume = resume
        self._table: Optional[RowTable] = None
        self.counts = {'written': 0, 'errors': 0, 'kept': 0}

    # -- what a task writer provides ------------------------------------------------------------------
    def extra_columns(self) -> List[str]:
        return []

    def columns(self) -> List[str]:
        return list(COMMON_COLUMNS) + self.extra_columns()

    def rows(self, trainer, pl_module, prediction: Any, meta: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def error_row(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        row = {c: '' for c in self.columns()}
        row.update({k: v for k, v in meta.items() if k in row})
        row.update(path=meta['path'], prediction='', error=meta['error'])
        return row

    def flatten(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """The row as CSV cells (JSON tables keep nested values)."""
        return row

    def summary(self, output: Path) -> str:
        c = self.counts
        done = f'Predictions for {c["written"] - c["errors"]} of {c["written"]} inputs written to {output}'
        if c['errors']:
            done += f' ({c["errors"]} could not be read: see the error column)'
        if c['kept']:
            done += f'; {c["kept"]} rows of the earlier run kept'
        return done

    # -- where the rows go ----------------------------------------------------------------------------
    def table_path(self, trainer) -> Path:
        output = self.output
        if trainer.world_size > 1:  # each process predicts its share; one table per process
            output = output.with_name(f'{output.stem}.rank{trainer.global_rank}{output.suffix}')
        return output

    def _earlier_tables(self, trainer, own: Path) -> List[Path]:
        if trainer.world_size > 1 and self.resume:
            return sorted(self.output.parent.glob(f'{self.output.stem}.rank*{self.output.suffix}'))
        return [own] if own.is_file() else []

    @staticmethod
    def _predict_dataset(trainer):
        datamodule = getattr(trainer, 'datamodule', None)
        dataset = getattr(datamodule, 'predict_set', None)
        if dataset is None:  # dataloaders passed to trainer.predict directly
            source = getattr(getattr(trainer, 'predict_loop', None), '_data_source', None)
            loader = getattr(source, 'instance', None)
            dataset = getattr(loader, 'dataset', None)
        return dataset

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != 'predict':
            return
        self.counts = {'written': 0, 'errors': 0, 'kept': 0}
        own = self.table_path(trainer)
        kept: List[Dict[str, Any]] = []
        earlier = self._earlier_tables(trainer, own)
        if self.resume and earlier:
            done = set()
            for path in earlier:
                columns, rows = read_rows(path)
                self._check_resumable(path, columns, rows)
                done.update(str(r['path']) for r in rows)
                if path == own:
                    kept = rows
            dataset = self._predict_dataset(trainer)
            if not callable(getattr(dataset, 'exclude', None)):
                raise ValueError(f'predict resume needs a predict dataset that can leave out inputs already predicted '
                                 f'(lightning_modules.core.datasets.PredictInputs); got {type(dataset).__name__}')
            left_out = dataset.exclude(done)
            self._say(trainer, f'Resuming predictions in {own}: {len(done)} inputs already predicted '
                               f'({left_out} of them in this input list) are not predicted again; '
                               f'{len(dataset)} left (resume=True).')
        elif earlier:
            _, rows = read_rows(own)
            self._say(trainer, f'Overwriting {own}: its {len(rows)} rows from an earlier run are replaced '
                               f'(pass --predict_resume true, or resume=True to the writer, to continue after them).')
        self.counts['kept'] = len(kept)
        self._table = RowTable(own, self.columns(), kept)  # CSV rows were read flat, JSON ones whole

    def _check_resumable(self, path: Path, columns: Optional[List[str]], rows: List[Dict[str, Any]]) -> None:
        expected = self.columns()
        if columns is not None and columns != expected:
            raise ValueError(f'Cannot resume {path}: its columns {columns} are not this run\'s {expected} '
                             f'(another task or top_k?); write to another file or rerun without resume to overwrite it')
        if rows and any('path' not in r for r in rows):
            raise ValueError(f'Cannot resume {path}: rows without a "path"; not a prediction table')

    @staticmethod
    def _say(trainer, message: str) -> None:
        if trainer.is_global_zero or trainer.world_size > 1:
            print(message, flush=True)

    # -- per batch ------------------------------------------------------------------------------------
    def batch_meta(self, trainer, batch: Any, batch_indices: Optional[Sequence[int]]
                   ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """(metadata of the readable inputs, of the skipped ones) of a batch."""
        if isinstance(batch, PredictBatch):
            return list(batch.meta), list(batch.skipped)
        dataset = self._predict_dataset(trainer)  # a loader of another kind: its dataset must have paths
        paths = getattr(dataset, 'paths', None)
        if paths is None or batch_indices is None:
            raise ValueError(f'{type(self).__name__} needs PredictBatch batches (a predict DataModule of the zoo) or a '
                             f'predict dataset with `paths`')
        return [{'index': i, 'path': str(paths[i])} for i in batch_indices], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        meta, skipped = self.batch_meta(trainer, batch, batch_indices)
        rows = list(zip([m.get('index', 0) for m in meta], self.rows(trainer, pl_module, prediction, meta))) if meta else []
        rows += [(m.get('index', 0), self.error_row(m)) for m in skipped]
        rows = [r for _, r in sorted(rows, key=lambda ir: ir[0])]
        if self._table is None:  # used without setup (e.g. called by hand)
            self.setup(trainer, pl_module, 'predict')
        self._table.append([self.flatten(r) for r in rows] if self._table.format == '.csv' else rows)
        self.counts['written'] += len(rows)
        self.counts['errors'] += len(skipped)

    def _close(self) -> None:
        if self._table is not None:
            self._table.close()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()
        if self._table is not None and (trainer.is_global_zero or trainer.world_size > 1):
            print(self.summary(self._table.path), flush=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()  # every finished batch is already on disk

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()


class TopKWriter(PredictionWriter):
    """The top-k classes of every input (classification, video): ``path, prediction, error`` then
    ``label_r, class_r, probability_r`` for r = 1..k (JSON: a ``top_k`` list of ``{class, label, probability}``).

    ``prediction`` is the top-1 class name; ``label_names`` overrides every other source of names.
    """

    def __init__(self, output: Union[str, Path], top_k: int = 5, label_names: Optional[Sequence[str]] = None,
                 resume: bool = False):
        super().__init__(output, resume)
        if top_k < 1:
            raise ValueError(f'top_k must be >= 1, got {top_k}')
        self.top_k = top_k
        self.label_names = list(label_names) if label_names else None

    def extra_columns(self) -> List[str]:
        return [f'{c}_{r}' for r in range(1, self.top_k + 1) for c in ('label', 'class', 'probability')]

    def label_names_for(self, trainer, pl_module, num_classes: int) -> Optional[List[str]]:
        if self.label_names:
            return self.label_names
        return resolve_label_names(
            num_classes, getattr(getattr(trainer, 'datamodule', None), 'class_names', None),
            getattr(pl_module, 'class_names', None), label_names_of(getattr(pl_module, 'model', pl_module)))

    def rows(self, trainer, pl_module, prediction, meta):
        probs = prediction if isinstance(prediction, torch.Tensor) else torch.as_tensor(prediction)
        if probs.shape[0] != len(meta):
            raise ValueError(f'{len(meta)} readable inputs in the batch but predictions of shape {tuple(probs.shape)}')
        names = self.label_names_for(trainer, pl_module, probs.shape[-1])
        return [{'path': m['path'], 'prediction': top[0]['label'], 'error': '', 'top_k': top}
                for m, top in zip(meta, top_k_rows(probs, self.top_k, names))]

    def error_row(self, meta):
        return {'path': meta['path'], 'prediction': '', 'error': meta['error'], 'top_k': []}

    def flatten(self, row):
        flat = {k: row.get(k, '') for k in COMMON_COLUMNS}
        for r, entry in enumerate(row.get('top_k') or [], start=1):
            flat.update({f'label_{r}': entry['label'], f'class_{r}': entry['class'],
                         f'probability_{r}': entry['probability']})
        return flat
