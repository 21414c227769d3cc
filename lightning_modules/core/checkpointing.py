"""What ``zoo-train`` does with checkpoints beyond Lightning: refuse silent model changes, pick the
newest resume point, and record a digest with every ``.ckpt`` it writes.

- :func:`hparams_differences`: LightningCLI replaces the model arguments of the command line by
  the hyper-parameters stored in ``--ckpt_path``'s checkpoint, so ``--model.init_args.model_name
  resnet20_wsgn --ckpt_path <a resnet20_wsbcn run>`` would train resnet20_wsbcn. The zoo's CLI lists
  every argument where the two differ and refuses unless ``--use_checkpoint_hparams true``.
- :func:`newest_resume_checkpoint`: Lightning resolves ``ckpt_path='last'`` to the newest
  ``last.ckpt`` only, ignoring the ``hpc_ckpt_N.ckpt`` that its SIGUSR1 handler saved before a
  SLURM requeue (Lightning issue #13773). The zoo takes the newest of both.
- :class:`DigestCheckpointIO`: writes :func:`zoo.hub.checkpoint_sha256` into each checkpoint and
  verifies it on every load (resume, ``validate``/``test --ckpt_path``), so bytes flipped inside
  tensor data are refused (``zoo.load_model`` checks the same digest).
"""
import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.hub import CHECKPOINT_DIGEST_KEY, checkpoint_sha256, verify_checkpoint
from zoo.hub.reading import unreadable_file_error

__all__ = ['hparams_differences', 'checkpoint_model_config', 'newest_resume_checkpoint', 'resume_candidates',
           'DigestCheckpointIO',
           'read_checkpoint_header']

_logger = logging.getLogger(__name__)

HPC_PREFIX = 'hpc_ckpt_'  # Lightning's SIGUSR1 save: default_root_dir/hpc_ckpt_N.ckpt


def read_checkpoint_header(path) -> Dict[str, Any]:
    """The checkpoint dict, with tensors memory-mapped (cheap: tensor data is not read)."""
    with in_the_zoos_words(path):
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # not the zip format: mmap is impossible
            return torch.load(path, map_location='cpu', weights_only=True)


@contextlib.contextmanager
def in_the_zoos_words(path) -> Iterator[None]:
    """Re-raise a failed read of ``path`` as the zoo's error when the file is not a checkpoint, is damaged or
    holds Python objects (never torch's advice to retry with ``weights_only=False``); other errors pass."""
    try:
        yield
    except Exception:
        refused = unreadable_file_error(path) if isinstance(path, (str, Path)) else None
        if refused is not None:
            raise refused from None
        raise


# ----------------------------------------------------------------------------------- hyper-parameters

def checkpoint_model_config(parser, config, subcommand: str, hparams: Mapping[str, Any]):
    """``config`` with the model section replaced by the checkpoint's hyper-parameters, as LightningCLI does."""
    hparams = dict(hparams)
    hparams.pop('_instantiator', None)
    if not hparams:
        return config
    if '_class_path' in hparams:
        hparams = {'class_path': hparams.pop('_class_path'), 'dict_kwargs': hparams}
    return parser.parse_object({subcommand: {'model': hparams}}, config.clone())


def _flatten(d: Any, prefix: str) -> Dict[str, Any]:
    if hasattr(d, 'as_dict'):
        d = d.as_dict()
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f'{prefix}.{k}'))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def hparams_differences(parser, config, subcommand: str, hparams: Mapping[str, Any]) -> List[str]:
    """``'model.init_args.X: command line/config A, checkpoint B'`` for every model argument that differs.

    Both sides go through the same parser, so defaults and types are compared as the CLI would
    instantiate them.
    """
    merged = checkpoint_model_config(parser, config, subcommand, hparams)
    ours = _flatten(config[subcommand].get('model'), 'model')
    theirs = _flatten(merged[subcommand].get('model'), 'model')
    # ``dict_kwargs`` holds what the checkpoint gives as init args; compare it with the init args
    theirs = {k.replace('model.dict_kwargs.', 'model.init_args.'): v for k, v in theirs.items()}
    # Both sides' keys: a key only one side has (a model_kwargs entry the checkpoint lacks) differs too.
    keys = sorted(set(ours) | set(theirs))
    return [f'{k}: command line/config {ours.get(k)!r}, checkpoint {theirs.get(k)!r}'
            for k in keys if ours.get(k) != theirs.get(k) and not _container_of_other(k, ours, theirs)]


def _container_of_other(key: str, ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """``model_kwargs: null`` on one side and ``model_kwargs.x`` on the other: reported once, on ``.x``."""
    return any(k.startswith(key + '.') for k in list(ours) + list(theirs))


# ----------------------------------------------------------------------------------- resume point

def _global_step(path: Path) -> Optional[int]:
    try:
        return int(read_checkpoint_header(path).get('global_step', -1))
    except Exception as e:  # a half-written file must not stop the resume from the other one
        _logger.warning('Skipping unreadable checkpoint %s as a resume point: %s', path, e)
        return None


def resume_candidates(trainer) -> List[Path]:
    """The ``last*.ckpt`` files (what Lightning's ``'last'`` looks at) and Lightning's ``hpc_ckpt_N.ckpt``."""
    candidates = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= {Path(p) for p in cb._find_last_checkpoints(trainer)}  # what Lightning's 'last' uses
    root = Path(trainer.default_root_dir)
    if root.is_dir():
        candidates |= set(root.glob(f'{HPC_PREFIX}*.ckpt'))
    return sorted(p for p in candidates if p.is_file())


def newest_resume_checkpoint(trainer) -> Optional[str]:
    """The newest of the ``last*.ckpt`` files and Lightning's ``hpc_ckpt_N.ckpt``, or None.

    "Newest" is the highest ``global_step`` stored in the file (then the later modification
    time): unlike mtime alone it survives copies between file systems and clock skew between
    nodes, and it is what decides how much work is lost. Unreadable files are skipped (logged).
    """
    scored = [(step, p.stat().st_mtime, str(p)) for p in resume_candidates(trainer)
              for step in [_global_step(p)] if step is not None]
    return max(scored)[2] if scored else None


# ----------------------------------------------------------------------------------- digests

class DigestCheckpointIO(TorchCheckpointIO):
    """Torch checkpoint I/O that records a digest of every tensor in the checkpoint and checks it on load."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        checkpoint[CHECKPOINT_DIGEST_KEY] = checkpoint_sha256(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> Dict[str, Any]:
        # weights_only=True always: left unset, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would make torch unpickle anything
        with in_the_zoos_words(path):
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        verify_checkpoint(checkpoint, path)
        return checkpoint
