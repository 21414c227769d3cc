"""Downloads that end: a timeout on every network read, no network at all offline, and errors that say
what happened (no reply, refused, HTTP status) and how to load a local copy instead.

The timeout (seconds, per connection attempt and per read; default 30) comes from
``ZOO_DOWNLOAD_TIMEOUT``. Offline is huggingface_hub's ``HF_HUB_OFFLINE=1``; it applies to the
URL-hosted weights too (timm would otherwise still download those).
"""
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

__all__ = ['TIMEOUT_ENV', 'download_timeout', 'offline', 'url_cache_path', 'fetch_url', 'probe_hub', 'hub_download']

TIMEOUT_ENV = 'ZOO_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT = 30.0


def download_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f'{TIMEOUT_ENV}={value!r} is not a number of seconds.') from None


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


def hub_download(repo_id: str, filename: str, revision: Optional[str] = None, cache_dir=None) -> str:
    """``hf_hub_download`` that fails within the timeout when the Hub does not answer (cached files still load)."""
    from zoo.hub import WeightsError
    if not offline():
        ok, why = probe_hub(repo_id, filename, revision)
        if not ok:
            try:  # as huggingface_hub does when the Hub is down: use the cached copy
                return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
            except LocalEntryNotFoundError:
                raise WeightsError(
                    f'{why}{repo_id}/{filename} is not in the Hugging Face cache either. Where there is internet, run '
                    f'`hf download {repo_id}` and bring that cache here (or point HF_HUB_CACHE at it), or save the '
                    f'model folder and load it with local-dir:PATH.') from None
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, etag_timeout=download_timeout())
