"""The converters of the authors' ImageNet checkpoints live in :mod:`zoo.hub.converters`; this module keeps
``zoo.converters`` and ``python -m zoo.converters SRC OUT --model ARCH.TAG`` working."""
import sys

from zoo.hub.converters import (  # noqa: F401
    CONVERTERS, convert_bcn_ws, convert_gn_ws, main, strip_prefixes, unwrap_checkpoint)

__all__ = ['unwrap_checkpoint', 'strip_prefixes', 'convert_gn_ws', 'convert_bcn_ws', 'CONVERTERS', 'main']

if __name__ == '__main__':
    sys.exit(main())
