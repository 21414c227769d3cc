"""Downloads that end: a timeout on every network read, no network at all offline, and errors that say
what happened (no reply, refused, HTTP status) and how to load a local copy instead.

The timeout (seconds, per connection attempt and per read; default 30) comes from
``ZOO_DOWNLOAD_TIMEOUT``, else from a ``HF_HUB_ETAG_TIMEOUT`` the user set, else 30 s. Offline is
huggingface_hub's ``HF_HUB_OFFLINE=1``; it applies to the URL-hosted weights too (timm would otherwise
still download those).

Why the Hub needs a probe: huggingface_hub reads ``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s each) once, when it is imported, into its ``constants``
module. But when the first metadata request of a file that is not cached times out, it retries with a
hard-coded 60 s timeout up to 5 more times with back-off (``file_download._ETAG_RETRY_TIMEOUT``), which no
setting shortens: about 6.5 minutes per file on a host that accepts connections and never replies.
So every Hub download of the zoo, and every one timm makes for ``hf-hub:`` names once ``zoo`` is
imported (:func:`bound_timm_hub_downloads`), first asks the Hub once, within the timeout and without
retries (:func:`probe_hub`). huggingface_hub's own settings are left as they are.
"""
import functools
import hashlib
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

__all__ = ['TIMEOUT_ENV', 'download_timeout', 'offline', 'url_cache_path', 'fetch_url', 'sha256_mismatch',
           'fetch_first', 'probe_hub', 'hub_download', 'bound_timm_hub_downloads']

TIMEOUT_ENV = 'ZOO_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT = 30.0


def download_timeout() -> float:
    """``ZOO_DOWNLOAD_TIMEOUT``, else a ``HF_HUB_ETAG_TIMEOUT`` set by the user, else 30 s."""
    for name in (TIMEOUT_ENV, 'HF_HUB_ETAG_TIMEOUT'):
        value = os.environ.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f'{name}={value!r} is not a number of seconds.') from None
    return DEFAULT_TIMEOUT


def offline() -> bool:
    """huggingface_hub's offline mode, or ``HF_HUB_OFFLINE`` set since it was imported."""
    env = os.environ.get('HF_HUB_OFFLINE', '').upper()
    return bool(hf_constants.is_offline_mode()) or env in hf_constants.ENV_VARS_TRUE_VALUES


def url_cache_path(url: str, model_dir=None) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (used by timm for URL weights) keeps ``url``."""
    model_dir = Path(model_dir) if model_dir else Path(torch.hub.get_dir()) / 'checkpoints'
    return model_dir / os.path.basename(urlparse(url).path)


def _local_copy_hint(url: str, path: Path) -> str:
    return (f'Download {url} where there is internet and pass pretrained_cfg_overlay=dict(file=PATH) '
            f'(or put the file at {path}, where timm looks for it).')


def fetch_url(url: str, model_dir=None, what: str = 'weights') -> Path:
    """``url`` in timm's/torch.hub's cache, downloaded first if needed; raises WeightsError, never hangs."""
    from zoo.hub import WeightsError
    path = url_cache_path(url, model_dir)
    if path.is_file():
        return path
    if offline():
        raise WeightsError(
            f'Offline (HF_HUB_OFFLINE=1): the {what} at {url} are not in the cache, and no download was '
            f'attempted. {_local_copy_hint(url, path)}')
    timeout = download_timeout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'{path.name}.{os.getpid()}.partial')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open('wb') as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(partial, path)  # whole files only: a cut download never looks cached
    except urllib.error.HTTPError as e:
        raise WeightsError(f'Could not download the {what}: {url} answered HTTP {e.code} {e.reason}. '
                           f'{_local_copy_hint(url, path)}') from e
    except (socket.timeout, TimeoutError) as e:
        raise WeightsError(_no_reply(url, timeout) + _local_copy_hint(url, path)) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, 'reason', e)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise WeightsError(_no_reply(url, timeout) + _local_copy_hint(url, path)) from e
        raise WeightsError(f'Could not download the {what} from {url}: the host cannot be reached ({reason}). '
                           f'{_local_copy_hint(url, path)}') from e
    finally:
        partial.unlink(missing_ok=True)
    return path


def sha256_mismatch(path: Path, expected: Optional[str]) -> Optional[str]:
    """Why ``path`` is not the file ``expected`` names (a SHA-256 hex digest, or its first 8+ digits as in
    torch.hub / OpenMMLab file names), or None when it is (or nothing is expected)."""
    if not expected:
        return None
    h = hashlib.sha256()
    with path.open('rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    actual = h.hexdigest()
    if actual.startswith(expected.lower()):
        return None
    return f'has SHA-256 {actual[:16]}..., expected {expected[:16]}{"..." if len(expected) > 16 else ""}'


def fetch_first(urls: Sequence[str], sha256: Sequence[Optional[str]], model_dir=None, what: str = 'weights') -> Path:
    """The file of the first source in ``urls`` (the original, then its mirrors) that can be had and whose
    SHA-256 matches ``sha256`` (one digest or prefix per URL; None: no published digest, not checked).

    Copies already in the cache come first, in source order, so nothing is downloaded that is there;
    a copy that fails its check is deleted. Offline (``HF_HUB_OFFLINE=1``), only cached copies count.
    """
    from zoo.hub import WeightsError
    sources = list(zip(urls, list(sha256) + [None] * (len(urls) - len(sha256))))
    failures = []
    for url, digest in sources:
        path = url_cache_path(url, model_dir)
        if path.is_file():
            why = sha256_mismatch(path, digest)
            if why is None:
                return path
            path.unlink()
            failures.append(f'{url}: the cached copy {path} {why}; deleted')
    if offline():
        raise WeightsError(
            f'Offline (HF_HUB_OFFLINE=1): the {what} are not in the cache under any of their names, and no download '
            f'was attempted. {_local_copy_hint(urls[0], url_cache_path(urls[0], model_dir))}'
            + ''.join(f' Mirror: {u}.' for u in urls[1:]))
    for url, digest in sources:
        try:
            path = fetch_url(url, model_dir, what)
        except WeightsError as e:
            failures.append(f'{url}: {e}')
            continue
        why = sha256_mismatch(path, digest)
        if why is None:
            return path
        path.unlink()
        failures.append(f'{url}: the download {why}; deleted')
    raise WeightsError(f'Could not get the {what} from any of their {len(urls)} sources, tried in order:\n- '
                       + '\n- '.join(failures))


def _no_reply(url: str, timeout: float) -> str:
    host = urlparse(url).netloc or url
    return (f'No reply from {host} within {timeout:g} s while downloading {url} (the connection was accepted or '
            f'is pending, but nothing came back). Set {TIMEOUT_ENV} to wait longer. ')


def probe_hub(repo_id: str, filename: str, revision: Optional[str] = None) -> Tuple[bool, str]:
    """``(True, '')`` if the Hub answers for ``repo_id`` within the timeout (any HTTP answer counts), else
    ``(False, why)``. huggingface_hub itself retries a silent host for minutes before giving up."""
    url = hf_hub_url(repo_id, filename, revision=revision)
    timeout = download_timeout()
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except HfHubHTTPError:
        return True, ''  # the server answered (404, 401, ...): hf_hub_download reports it as usual
    except Exception as e:  # timeouts and connection errors of huggingface_hub's HTTP client
        if 'timeout' in type(e).__name__.lower() or 'timed out' in str(e):
            return False, _no_reply(url, timeout)
        return False, f'The Hugging Face Hub at {hf_constants.ENDPOINT} cannot be reached ({type(e).__name__}: {e}). '
    return True, ''


def _answer_or_cache(repo_id: str, filename: str, revision: Optional[str], cache_dir) -> Optional[str]:
    """None when the Hub answers (or offline: huggingface_hub then reads its cache itself); when it does not,
    the cached copy of ``repo_id/filename``, or :class:`WeightsError` naming the repo."""
    from zoo.hub import WeightsError
    if offline():
        return None
    ok, why = probe_hub(repo_id, filename, revision)
    if ok:
        return None
    try:  # as huggingface_hub does when the Hub is down: use the cached copy
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError:
        raise WeightsError(
            f'{why}{repo_id}/{filename} is not in the Hugging Face cache either. Where there is internet, run '
            f'`hf download {repo_id}` and bring that cache here (or point HF_HUB_CACHE at it), or save the '
            f'model folder and load it with local-dir:PATH.') from None


def hub_download(repo_id: str, filename: str, revision: Optional[str] = None, cache_dir=None) -> str:
    """``hf_hub_download`` that fails within the timeout when the Hub does not answer (cached files still load)."""
    cached = _answer_or_cache(repo_id, filename, revision, cache_dir)
    if cached is not None:
        return cached
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, etag_timeout=download_timeout())


def bound_timm_hub_downloads() -> None:
    """Give timm's Hub downloads (``timm.create_model('hf-hub:ORG/NAME')``: its config.json, then its weights)
    the zoo's probe, so they end within the timeout with a :class:`WeightsError` naming the repo.

    timm fetches the config of an ``hf-hub:`` name before any zoo code runs, through the one
    ``hf_hub_download`` of ``timm.models._hub``; that name is wrapped here (once; ``import zoo`` calls this).
    """
    from timm.models import _hub as timm_hub
    download = timm_hub.hf_hub_download
    if download is None or getattr(download, 'zoo_bounded', False):
        return

    @functools.wraps(download.func if isinstance(download, functools.partial) else download)
    def bounded(repo_id, filename, *args, revision=None, cache_dir=None, **kwargs):
        if not kwargs.get('local_files_only'):
            cached = _answer_or_cache(repo_id, filename, revision, cache_dir)
            if cached is not None:
                return cached
        return download(repo_id, filename, *args, revision=revision, cache_dir=cache_dir, **kwargs)

    bounded.zoo_bounded = True
    timm_hub.hf_hub_download = bounded
