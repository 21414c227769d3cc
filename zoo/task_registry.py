"""Name registries for task models (detectors, segmenters), like timm's registry for classifiers.

Each task has one :class:`TaskRegistry`; a family module registers its builders on import::

    DETECTORS = TaskRegistry('detector', 'zoo.list_detectors()')

    @DETECTORS.register('maskrcnn_resnet50_fpn_wsgn')
    def _build(**kwargs): ...

    DETECTORS.create('maskrcnn_resnet50_fpn_wsgn', num_classes=81)

An unknown name raises :class:`zoo.UnknownModelError` with close matches, as ``zoo.create_model`` does.
"""
import difflib
import fnmatch
from typing import Callable, Dict, List, Optional, Union

import torch.nn as nn

from .factory import UnknownModelError

__all__ = ['TaskRegistry']


class TaskRegistry:
    """Builders of one task's models by name.

    Args:
        task: what the models are, for messages (``'detector'``).
        list_hint: the public call that lists the names, for the unknown-name error.
    """

    def __init__(self, task: str, list_hint: str = ''):
        self.task = task
        self.list_hint = list_hint
        self._builders: Dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str, builder: Optional[Callable[..., nn.Module]] = None):
        """Register ``builder(**kwargs) -> model`` as ``name``; without ``builder``, a decorator."""
        def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            if name in self._builders and self._builders[name] is not fn:
                raise ValueError(f'{self.task} {name!r} is already registered')
            self._builders[name] = fn
            return fn
        return add if builder is None else add(builder)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def __len__(self) -> int:
        return len(self._builders)

    def builder(self, name: str) -> Callable[..., nn.Module]:
        """The builder of ``name``; an unknown name raises :class:`UnknownModelError` with close matches."""
        if name not in self._builders:
            close = difflib.get_close_matches(name, list(self._builders), n=5, cutoff=0.6)
            hint = f' Close matches: {", ".join(close)}.' if close else ''
            where = f' See {self.list_hint} for all names.' if self.list_hint else ''
            raise UnknownModelError(f'Unknown {self.task} {name!r}.{hint}{where}')
        return self._builders[name]

    def create(self, name: str, **kwargs) -> nn.Module:
        """Build the model registered as ``name`` with ``kwargs``."""
        return self.builder(name)(**kwargs)

    def list(self, filter: Union[str, List[str]] = '') -> List[str]:
        """Sorted names, optionally only those matching a wildcard (or any of several), as timm's."""
        patterns = [filter] if isinstance(filter, str) else list(filter)
        names = sorted(self._builders)
        if not any(patterns):
            return names
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns if p)]
