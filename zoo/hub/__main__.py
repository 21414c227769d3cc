"""``python -m zoo.hub record-digest FOLDER...``."""
from zoo.hub import main

raise SystemExit(main())
