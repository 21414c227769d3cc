"""``python -m zoo.hub record-digest FOLDER...``."""
from zoo.hub.folders import main

raise SystemExit(main())
