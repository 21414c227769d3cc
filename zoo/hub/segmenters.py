"""The segmenter names of :mod:`zoo.hub.task_models`, which serves segmenters and detectors alike (kept for code
that imports them from here)."""
from functools import partial

from .task_models import (
    SEGMENTATION_TASK, annotate_task_model, checkpoint_task, is_segmenter, load_hub_task_model, save_hub_task_model,
    task_build_kwargs, task_model_from_checkpoint)

__all__ = ['SEGMENTATION_TASK', 'checkpoint_task', 'segmenter_build_kwargs', 'segmenter_from_checkpoint',
           'annotate_segmenter', 'save_hub_segmenter', 'load_hub_segmenter', 'is_segmenter']

segmenter_build_kwargs = partial(task_build_kwargs, task=SEGMENTATION_TASK)
segmenter_from_checkpoint = partial(task_model_from_checkpoint, task=SEGMENTATION_TASK)
annotate_segmenter = partial(annotate_task_model, task=SEGMENTATION_TASK)
save_hub_segmenter = save_hub_task_model
load_hub_segmenter = load_hub_task_model
