"""``zoo.create_model``: timm's ``create_model`` with an error that names close matches."""
import difflib

import timm
from timm.models import is_model, split_model_name_tag

from .layers import name_stat_layers
from .models import ZOO_MODELS

__all__ = ['UnknownModelError', 'create_model', 'list_models']


class UnknownModelError(RuntimeError, ValueError):
    """The model name is registered neither in the zoo nor in timm."""


def list_models(filter: str = '', pretrained: bool = False) -> list:
    """The zoo's model names (optionally a timm-style wildcard filter)."""
    names = timm.list_models(filter or '*', pretrained=pretrained)
    zoo_names = set(ZOO_MODELS)
    return [n for n in names if n.split('.')[0] in zoo_names]


def _refuse_task_model(name: str) -> None:
    """A segmenter's or detector's name passed to ``create_model``: say which function builds it."""
    from .hub.task_models import registry_listing  # imported here: zoo.hub imports this module
    registry = registry_listing(name)
    if registry is not None:
        raise UnknownModelError(f'{name!r} is a {registry.task}, not a timm model: build it with '
                                f'zoo.create_{registry.task}({name!r}, num_classes=...), or load trained weights '
                                f'with zoo.load_model(PATH_OR_HUB_ID)')


def create_model(model_name: str, pretrained: bool = False, **kwargs):
    """Create any zoo or timm model; an unknown name raises :class:`UnknownModelError`.

    Norm layers with running statistics get their names, for their warnings (see
    :func:`zoo.layers.name_stat_layers`).
    """
    if not isinstance(model_name, str):
        raise TypeError(f'model_name must be a model name (str), e.g. {ZOO_MODELS[0]!r}, got {model_name!r} '
                        f'({type(model_name).__name__}); see zoo.list_models()')
    if not model_name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        arch, _ = split_model_name_tag(model_name)
        if not is_model(arch):
            _refuse_task_model(arch)
            close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
            hint = f' Close matches: {", ".join(close)}.' if close else ''
            raise UnknownModelError(
                f'Unknown model {model_name!r}.{hint} See zoo.list_models() or timm.list_models() for all names.')
    return name_stat_layers(timm.create_model(model_name, pretrained=pretrained, **kwargs))
