"""FX: the zoo's norm layers stay one ``call_module`` node under every tracer, as torch's own norms do.

FX traces into every module outside ``torch.nn``. timm's tracer keeps its registered notrace
modules whole, but ``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` and
``quantize_fx`` do not know timm's registry. Traced into, a norm with running statistics would
freeze the train / eval switch into the graph, and its data-dependent fast paths would not trace.

So the layers call :func:`fx_leaf_call` first in ``forward``: while a tracer runs it, the layer is
recorded as one ``call_module`` node, exactly what FX does for a leaf module (torch's BatchNorm),
and the graph runs the layer's own forward on real tensors: mode switch, statistics updates
and fast paths included, outputs and gradients as in eager.
"""
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
from torch.fx.proxy import TraceError

__all__ = ['fx_leaf_call']


def fx_leaf_call(module: nn.Module, x) -> Optional[torch.fx.Proxy]:
    """``module(x)`` as one FX ``call_module`` node when ``x`` is traced by an FX tracer, else None."""
    if isinstance(x, torch.fx.Proxy) and isinstance(x.tracer, torch.fx.Tracer):
        tracer = x.tracer
        path = tracer.path_of_module(module)
        if not path:  # the traced root itself: a graph cannot call itself as a module
            raise TraceError(f'{type(module).__name__} becomes one node of the graph of a module that holds it: '
                             f'trace that module, e.g. torch.fx.symbolic_trace(nn.Sequential(layer))')
        return tracer.create_proxy('call_module', path, (x,), {})
    return None
