"""The one checkpoint reader: every file of weights the zoo opens goes through here.

- Files: safetensors, or torch files with ``torch.load(weights_only=True)``; nothing else is unpickled.
- Digests: a Lightning checkpoint the zoo wrote records ``zoo_sha256`` over all its tensors; a
  checkpoint whose tensors no longer match is refused.
- Layouts: a flat state dict, or one nested under ``state_dict`` / ``model`` (Lightning, the authors'
  training checkpoints, mmcv), even next to 0-dim metric tensors such as ``acc``.
- The LightningModule prefix (``model.``, ``ema.module.``, ...) is the one whose keys fit the model.
  **The EMA rule:** when both the raw weights and an EMA copy fit, the EMA copy is used (``use_ema=True``,
  timm's convention, and the weights a module that validates with its EMA reported metrics for);
  ``use_ema=False`` takes the raw weights.

Every failure is a :class:`WeightsError` that names the file and says what to do; :func:`check_state_dict`
checks keys and shapes against a model before anything is copied.
"""
import hashlib
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import safetensors.torch
import torch
import torch.nn as nn

__all__ = ['WeightsError', 'CHECKPOINT_DIGEST_KEY', 'state_dict_sha256', 'checkpoint_sha256', 'verify_checkpoint',
           'file_format', 'read_weights', 'unreadable_file_error', 'unwrap_checkpoint', 'strip_to_model_keys', 'read_state_dict', 'check_state_dict',
           'load_weights']

CHECKPOINT_DIGEST_KEY = 'zoo_sha256'  # Lightning checkpoints the zoo writes: checkpoint_sha256 of the rest
_NESTED_KEYS = ('state_dict', 'model')
_WRAPPER_PREFIX = 'module.'  # DataParallel / DDP


class WeightsError(RuntimeError, ValueError):
    """Weights missing, unreadable, truncated, tampered with, or not fitting the model.

    A ``ValueError`` too, so that code written for the fine-tuning and converter readers'
    earlier errors still catches it."""


# ----------------------------------------------------------------------------------- digests

def _update_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to('cpu').contiguous()
    h.update(f'{name}\0{t.dtype}\0{tuple(t.shape)}\0'.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (independent of file format)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        _update_tensor(h, name, state_dict[name])
    return h.hexdigest()


def _tensors(obj: Any, path: str):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f'{path}/{k}')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f'{path}/{i}')


def checkpoint_sha256(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor of a Lightning checkpoint (weights, optimizer state, ...), by path."""
    h = hashlib.sha256()
    for path, t in _tensors({k: v for k, v in checkpoint.items() if k != CHECKPOINT_DIGEST_KEY}, ''):
        _update_tensor(h, path, t)
    return h.hexdigest()


def verify_checkpoint(checkpoint: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Refuse a checkpoint whose tensors differ from the digest recorded when the zoo wrote it.

    Checkpoints without a digest (written by plain Lightning, or by the zoo before it recorded
    one) load unchecked.
    """
    expected = checkpoint.get(CHECKPOINT_DIGEST_KEY) if isinstance(checkpoint, Mapping) else None
    if not expected:
        return
    actual = checkpoint_sha256(checkpoint)
    if actual != expected:
        raise WeightsError(
            f'Checkpoint {path} does not match the digest recorded when it was written (expected sha256 '
            f'{expected[:16]}..., got {actual[:16]}...): its tensor data was modified or corrupted on disk. '
            f'Do not use it; resume from or load another checkpoint.')


# ----------------------------------------------------------------------------------- files

_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format (a zip archive)
_PICKLE_PROTOCOLS = range(2, 6)  # torch's legacy format: a pickle stream, b'\x80' + protocol


def file_format(path: Union[str, Path]) -> Optional[str]:
    """``'safetensors'``, ``'zip'`` or ``'pickle'`` (the two torch formats) from a file's first bytes;
    ``'empty'``; or None for anything else (random bytes, text, an HTML error page...)."""
    with Path(path).open('rb') as f:
        head = f.read(9)
    if not head:
        return 'empty'
    if len(head) == 9 and head[8:9] == b'{':  # an 8-byte header length, then the JSON header
        return 'safetensors'
    if head.startswith(_ZIP_MAGIC):
        return 'zip'
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return 'pickle'
    return None


def _refused_global(message: str) -> Optional[str]:
    """The object a weights-only load refused (``GLOBAL module.Name``), or None when it failed otherwise.

    Only this part of PyTorch's message is passed on: the rest advises ``weights_only=False`` or
    allow-listing the class, which the zoo never does."""
    import re
    m = re.search(r'Unsupported global: (GLOBAL [\w.]+)', message)
    if m is None:
        m = re.search(r'(Trying to (?:call reduce for|instantiate) unrecognized [^\n.]+)', message)
    return m.group(1) if m else None


def _corrupted(path: Path, size: int, why: str) -> 'WeightsError':
    return WeightsError(f'Cannot read checkpoint {path} ({size} bytes): {why}. The file is truncated or corrupted '
                        f'(an interrupted download?). Delete it and download it again.')


def read_weights(path: Union[str, Path]) -> Any:
    """Read a safetensors file, or a torch file with ``weights_only=True``; clear errors when bad.

    The format is told from the first bytes, so a file that is neither (random bytes, text, an HTML
    page saved under a checkpoint's name) is called that, not a file of refused Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f'Weights file {path} does not exist.')
    size = path.stat().st_size
    kind = file_format(path)
    if kind == 'empty':
        raise WeightsError(f'Checkpoint {path} is empty (0 bytes): an interrupted download or save? Delete it and '
                           f'download or save it again.')
    if kind is None:
        with path.open('rb') as f:
            head = f.read(8)
        raise WeightsError(
            f'{path} ({size} bytes) is not a readable checkpoint: neither a torch file (zip or pickle) nor '
            f'safetensors (it starts with bytes {head.hex(" ")}). Was the right file given, or was an error page '
            f'saved in its place? Delete it and download or save it again.')
    if kind == 'safetensors':
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:  # SafetensorError, a header that is not JSON, ...
            raise _corrupted(path, size, f'{type(e).__name__}: {e}') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is None:  # an unknown opcode, a cut stream: a damaged file, not a refusal
            why = str(e).split('WeightsUnpickler error:')[-1].split('Check the documentation')[0].strip()
            raise _corrupted(path, size, f'not a readable torch file ({why or type(e).__name__})') from None
        raise WeightsError(
            f'{path} holds Python objects besides tensors ({refused}), which the zoo does not load: it reads files '
            f'only with safetensors or torch.load(weights_only=True), so that loading a file can never run code. If '
            f'you trust the file, re-save its state_dict with safetensors.') from None  # PyTorch's message advises weights_only=False
    except Exception as e:  # zip errors, EOFError, KeyError / IndexError from a damaged pickle, ...
        raise _corrupted(path, size, f'{type(e).__name__}: {e}') from e


def unreadable_file_error(path: Union[str, Path]) -> Optional[WeightsError]:
    """The :class:`WeightsError` :func:`read_weights` raises for a local file (no checkpoint, damaged, or
    holding Python objects), or None when it reads or is not a local file: for loaders that read with
    another library (timm, Lightning) and must not pass on its advice to retry with ``weights_only=False``."""
    try:
        if Path(path).is_file():
            read_weights(path)
    except WeightsError as e:
        return e
    return None


# ----------------------------------------------------------------------------------- layouts

def unwrap_checkpoint(checkpoint: Any, source: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (flat, or nested under ``state_dict`` / ``model``).

    A nested entry wins even when the top level also holds tensors: training checkpoints keep
    0-dim metrics such as ``acc`` / ``best_acc`` next to ``state_dict``.
    """
    obj = checkpoint
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f'No state dict found in {source} (expected tensors, or a "state_dict" entry).')
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_to_model_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str],
                        use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Drop the LightningModule attribute prefix (``model.``, ``ema.module.``, ...) that fits the model
    best; the EMA rule (module docstring) decides between the raw weights and an EMA copy that fit equally."""
    model_keys = set(model_keys)
    candidates = {'': sum(k in model_keys for k in state_dict)}
    for k in state_dict:
        for i, ch in enumerate(k):
            if ch == '.' and k[:i + 1] not in candidates:
                prefix = k[:i + 1]
                candidates[prefix] = sum(key[len(prefix):] in model_keys for key in state_dict if key.startswith(prefix))
    best = max(candidates.values())
    fitting = [p for p, hits in candidates.items() if hits == best]
    ema = [p for p in fitting if 'ema' in p.lower()]
    prefix = (ema if use_ema and ema else [p for p in fitting if p not in ema] or fitting)[0]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _module_prefix_keys(state_dict: Mapping[str, torch.Tensor], use_ema: bool) -> Dict[str, torch.Tensor]:
    """Without the model's keys: a zoo LightningModule's ``ema.module.`` (EMA rule) or ``model.`` weights."""
    for prefix in (('ema.module.',) if use_ema else ()) + ('model.',):
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def read_state_dict(path: Union[str, Path], model_keys: Optional[Iterable[str]] = None,
                    use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The model weights in any file the zoo reads: safetensors, a state dict, a Lightning or training
    checkpoint. Checked (digest), unwrapped, ``module.`` removed, and the LightningModule prefix that
    fits ``model_keys`` stripped (without them: ``ema.module.`` or ``model.``), by the EMA rule."""
    checkpoint = read_weights(path)
    verify_checkpoint(checkpoint, path)
    state_dict = unwrap_checkpoint(checkpoint, str(path))
    state_dict = {k[len(_WRAPPER_PREFIX):] if k.startswith(_WRAPPER_PREFIX) else k: v for k, v in state_dict.items()}
    if model_keys is not None:
        return strip_to_model_keys(state_dict, model_keys, use_ema=use_ema)
    return _module_prefix_keys(state_dict, use_ema)


# ----------------------------------------------------------------------------------- fitting a model

def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` fits ``model`` (checked before any copy)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f'{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if wrong:
        problems.append(f'{len(wrong)} shape mismatches ({"; ".join(wrong[:5])})')
    if strict and missing:
        problems.append(f'{len(missing)} missing keys ({", ".join(missing[:5])})')
    if strict and unexpected:
        problems.append(f'{len(unexpected)} unexpected keys ({", ".join(unexpected[:5])})')
    if problems:
        raise WeightsError(f'Weights do not fit {type(model).__name__}: ' + '; '.join(problems) + '.')


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Check, then copy ``state_dict`` into ``model``: all of it or (on error) nothing."""
    check_state_dict(model, state_dict, strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    return model
