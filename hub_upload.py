"""Publish a zoo model to the Hugging Face Hub: ``python hub_upload.py SOURCE --repo-id ORG/NAME [--dry-run]``.

SOURCE: a Lightning checkpoint of any task (classifier, TSM ``VideoClassifier``, DeepLabV3 ``SemanticSegmenter``,
Faster / Mask R-CNN ``DetectionModule``), a folder, or a model name. A thin entry point; the code, its options
and documentation are in :mod:`zoo.hub.publish` (also ``python -m zoo.hub.publish``).
"""
import sys

from zoo.hub.publish import main, push_folder, write_folder  # noqa: F401 (the entry point's API)

if __name__ == '__main__':
    sys.exit(main())
