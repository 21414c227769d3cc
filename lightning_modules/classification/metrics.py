"""Top-1 / top-5 accuracy as torchmetrics, micro-averaged (the ImageNet convention).

``MulticlassAccuracy`` defaults to *macro* averaging; ``average='micro'`` is set explicitly.
"""
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ['accuracy_metrics']


def accuracy_metrics(num_classes: int, prefix: str = '') -> MetricCollection:
    """``{prefix}top1`` and, with at least 5 classes, ``{prefix}top5``."""
    metrics = {'top1': MulticlassAccuracy(num_classes=num_classes, top_k=1, average='micro')}
    if num_classes >= 5:
        metrics['top5'] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average='micro')
    return MetricCollection(metrics, prefix=prefix)
