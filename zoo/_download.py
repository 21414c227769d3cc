"""Downloads that end: a timeout on every network read, no network at all offline, and errors that say
what happened (no reply, refused, HTTP status) and how to load a local copy instead.

The timeout (seconds, per connection attempt and per read; default 30) comes from
``ZOO_DOWNLOAD_TIMEOUT``, else from a ``HF_HUB_ETAG_TIMEOUT`` the user set, else 30 s. Offline is
huggingface_hub's ``HF_HUB_OFFLINE=1``; it applies to the URL-hosted weights too (timm would otherwise
still download those).

A server that sends a byte now and then never trips a read timeout, so each file the zoo downloads
(from a URL, :func:`fetch_url`, or from the Hub, :func:`hub_download` and timm's ``hf-hub:`` names) is
also bounded as a whole: it must arrive within
``ZOO_DOWNLOAD_DEADLINE`` seconds (default 3600), and at no less than ``ZOO_DOWNLOAD_MIN_RATE`` bytes/s
(default 10000, measured over windows of the timeout above). Either set to 0 turns that bound off. Both
are checked after every read (one network read each), so a download ends at most one timeout after a
bound is crossed; a download cut for either leaves no partial file.

Why the Hub needs a probe: huggingface_hub reads ``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s each) once, when it is imported, into its ``constants``
module. But when the first metadata request of a file that is not cached times out, it retries with a
hard-coded 60 s timeout up to 5 more times with back-off (``file_download._ETAG_RETRY_TIMEOUT``), which no
setting shortens: about 6.5 minutes per file on a host that accepts connections and never replies.
So every Hub download of the zoo, and every one timm makes for ``hf-hub:`` names once ``zoo`` is
imported (:func:`bound_timm_hub_downloads`), first asks the Hub once, within the timeout and without
retries (:func:`probe_hub`). huggingface_hub's own settings are left as they are.
"""
import contextlib
import contextvars
import functools
import hashlib
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

__all__ = ['TIMEOUT_ENV', 'DEADLINE_ENV', 'MIN_RATE_ENV', 'download_timeout', 'download_deadline', 'download_min_rate',
           'offline', 'url_cache_path', 'fetch_url', 'sha256_mismatch',
           'fetch_first', 'probe_hub', 'hub_download', 'bound_timm_hub_downloads']

TIMEOUT_ENV = 'ZOO_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT = 30.0
DEADLINE_ENV = 'ZOO_DOWNLOAD_DEADLINE'
DEFAULT_DEADLINE = 3600.0  # seconds per file: 170 MB (ResNeXt-101) needs 50 kB/s
MIN_RATE_ENV = 'ZOO_DOWNLOAD_MIN_RATE'
DEFAULT_MIN_RATE = 10_000.0  # bytes/s over each window of download_timeout() seconds


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


def _bound(name: str, default: float) -> Optional[float]:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        bound = float(value)
    except ValueError:
        raise ValueError(f'{name}={value!r} is not a number (0 turns the bound off).') from None
    return bound if bound > 0 else None


def download_deadline() -> Optional[float]:
    """Seconds one file's download may take (``ZOO_DOWNLOAD_DEADLINE``, default 3600); None: no bound."""
    return _bound(DEADLINE_ENV, DEFAULT_DEADLINE)


def download_min_rate() -> Optional[float]:
    """Bytes/s a download must keep up over each timeout-long window (``ZOO_DOWNLOAD_MIN_RATE``, default 10000);
    None: no bound."""
    return _bound(MIN_RATE_ENV, DEFAULT_MIN_RATE)


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
            _copy_bounded(response, f, url, timeout, _local_copy_hint(url, path))
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


class _DownloadBounds:
    """The deadline and minimum rate of one file's download (module docstring): :meth:`add` each chunk received."""

    def __init__(self, url: str, window: float, total: Optional[int], hint: str):
        self.url, self.window, self.total, self.hint = url, window, total, hint
        self.deadline, self.min_rate = download_deadline(), download_min_rate()
        self.start = self.window_start = time.monotonic()
        self.received = self.window_bytes = 0

    def _so_far(self, now: float) -> str:
        of = f' of {self.total}' if self.total is not None else ''
        return f'received {self.received}{of} bytes in {now - self.start:.1f} s'

    def add(self, n: int) -> None:
        from zoo.hub import WeightsError
        self.received += n
        self.window_bytes += n
        now = time.monotonic()
        if self.deadline is not None and now - self.start > self.deadline:
            raise WeightsError(
                f'Download of {self.url} took too long: {self._so_far(now)}, more than the {self.deadline:g} s allowed '
                f'per file (set {DEADLINE_ENV} to allow more, 0 for no limit). Nothing was kept. {self.hint}')
        if self.min_rate is not None and now - self.window_start >= self.window:
            rate = self.window_bytes / (now - self.window_start)
            if rate < self.min_rate:
                raise WeightsError(
                    f'Download of {self.url} too slow: {self._so_far(now)}, the last {now - self.window_start:.1f} s '
                    f'at {rate:.0f} bytes/s, below the minimum of {self.min_rate:.0f} bytes/s (set {MIN_RATE_ENV} '
                    f'lower, 0 for no minimum). Nothing was kept. {self.hint}')
            self.window_start, self.window_bytes = now, 0


def _copy_bounded(response, f, url: str, window: float, hint: str) -> None:
    """Copy ``response`` to ``f``, one network read at a time, within the deadline and above the minimum rate."""
    bounds = _DownloadBounds(url, window, getattr(response, 'length', None), hint)  # length: Content-Length, if sent
    read = getattr(response, 'read1', None) or response.read  # read1: returns what one read got (a drip can't fill 1 MB)
    while True:
        chunk = read(1 << 20)
        if not chunk:
            return
        f.write(chunk)
        bounds.add(len(chunk))


# The Hub file being downloaded by the zoo in this context: (its URL, what to do instead), or None.
_HUB_DOWNLOAD: contextvars.ContextVar = contextvars.ContextVar('zoo_hub_download', default=None)
_SYNC_BYTE_STREAM: list = []  # the SyncByteStream class of huggingface_hub's HTTP client (httpx), once known


@functools.lru_cache(maxsize=None)
def _bounded_stream_class(sync_byte_stream: type) -> type:
    """A response body (a subclass of the HTTP client's ``SyncByteStream``) that checks the bounds on every
    network read: huggingface_hub reads in 10 MB chunks, and one chunk of a drip never completes."""

    class BoundedStream(sync_byte_stream):
        def __init__(self, stream, bounds: _DownloadBounds):
            self._stream, self._bounds = stream, bounds

        def __iter__(self):
            for chunk in self._stream:
                self._bounds.add(len(chunk))
                yield chunk

        def close(self) -> None:
            self._stream.close()

    return BoundedStream


def _bound_hub_response(response) -> None:
    """huggingface_hub's HTTP client calls this with every response, before its body is read."""
    download = _HUB_DOWNLOAD.get()
    if download is None or response.request.method != 'GET' or response.request.url.path.startswith('/api/'):
        return  # not a zoo download (or huggingface_hub's own side requests)
    url, hint = download
    length = response.headers.get('Content-Length')
    total = int(length) if length and length.isdigit() else None
    stream_class = _bounded_stream_class(_SYNC_BYTE_STREAM[0])
    response.stream = stream_class(response.stream, _DownloadBounds(url, download_timeout(), total, hint))


@contextlib.contextmanager
def _bounded_hub_download(repo_id: str, filename: str, revision: Optional[str]):
    """Bound the Hub downloads made inside (see the module docstring); on the error huggingface_hub deletes
    its temporary file."""
    from huggingface_hub.utils import get_session
    client = get_session()
    hooks = getattr(client, 'event_hooks', None)  # an httpx client (huggingface_hub >= 1.0); else not bounded
    client_module = sys.modules.get(type(client).__module__.split('.')[0])
    if isinstance(hooks, dict) and 'response' in hooks and hasattr(client_module, 'SyncByteStream'):
        _SYNC_BYTE_STREAM[:] = [client_module.SyncByteStream]
        if _bound_hub_response not in hooks['response']:  # once per client (huggingface_hub may build a new one)
            hooks['response'].append(_bound_hub_response)
    token = _HUB_DOWNLOAD.set((hf_hub_url(repo_id, filename, revision=revision), _hub_hint(repo_id)))
    try:
        yield
    finally:
        _HUB_DOWNLOAD.reset(token)


def _hub_hint(repo_id: str) -> str:
    return (f'Where there is internet, run `hf download {repo_id}` and bring that cache here (or point HF_HUB_CACHE '
            f'at it), or save the model folder and load it with local-dir:PATH.')


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
    with _bounded_hub_download(repo_id, filename, revision):
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               etag_timeout=download_timeout())


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
            with _bounded_hub_download(repo_id, filename, revision):
                return download(repo_id, filename, *args, revision=revision, cache_dir=cache_dir, **kwargs)
        return download(repo_id, filename, *args, revision=revision, cache_dir=cache_dir, **kwargs)

    bounded.zoo_bounded = True
    timm_hub.hf_hub_download = bounded
