"""``python -m lightning_modules``: the same program as ``zoo-train``."""
from .core.cli import main

if __name__ == '__main__':
    main()
