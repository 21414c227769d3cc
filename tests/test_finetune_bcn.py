"""Fine-tuning large-batch BCN weights (the authors' BCN+WS release) at 1-2 images per device."""
import logging

import lightning.pytorch as pl
import pytest
import torch

from lightning_modules import Cifar10DataModule, ImageClassifier
from lightning_modules.finetune import choose_bcn_batch_stage, describe_pretrained
from zoo.layers import BatchChannelNorm2d, EstimatedBatchNorm2d


def _large_batch_bcn_classifier(**kwargs) -> ImageClassifier:
    """resnet20 WS+BCN built as the authors' ImageNet weights are: batch stage 'batch', trained statistics."""
    model = ImageClassifier('resnet20_wsbcn', num_classes=10,
                            model_kwargs=dict(norm_kwargs=dict(batch_stage='batch')), **kwargs, optim=dict(lr=0.01))
    g = torch.Generator().manual_seed(0)
    for m in model.model.modules():
        if isinstance(m, BatchChannelNorm2d):
            m.bn.running_mean.copy_(torch.randn(m.num_channels, generator=g))
            m.bn.running_var.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
            m.bn.num_batches_tracked.fill_(450_000)
    return model


def _bcn_stages(model: ImageClassifier):
    return [m for m in model.model.modules() if isinstance(m, BatchChannelNorm2d)]


class _RecordAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.stages = {type(m.bn) for m in _bcn_stages(pl_module)}
        self.means = [m.bn.running_mean.clone() for m in _bcn_stages(pl_module)]


def _fit(model: ImageClassifier, batch_size: int) -> _RecordAtStart:
    record = _RecordAtStart()
    data = Cifar10DataModule(batch_size=batch_size, virtual_devices=1, train_per_class=4, num_workers=0)
    pl.Trainer(accelerator='cpu', max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[record]).fit(model, data)
    return record


def test_two_images_per_device_switch_to_estimated_stage_from_the_running_statistics(caplog):
    model = _large_batch_bcn_classifier(ema_decay=0.9)
    trained = [m.bn.running_mean.clone() for m in _bcn_stages(model)]
    with caplog.at_level(logging.INFO):
        record = _fit(model, batch_size=2)
    assert record.stages == {EstimatedBatchNorm2d}
    for start, before in zip(record.means, trained):
        assert torch.equal(start, before)  # estimates start from the weights' statistics
    for m, before in zip(_bcn_stages(model), trained):  # one update at rate 0.01, not a replacement
        assert (m.bn.running_mean - before).abs().max() < 0.1 * before.abs().max()
    assert {type(m.bn) for m in model.ema.module.modules() if isinstance(m, BatchChannelNorm2d)} == {EstimatedBatchNorm2d}
    assert any('batch -> estimated' in r.getMessage() and 'bcn_batch_stage: batch' in r.getMessage()
               for r in caplog.records)


def test_explicit_batch_stage_is_kept_at_two_images():
    record = _fit(_large_batch_bcn_classifier(bcn_batch_stage='batch'), batch_size=2)
    assert record.stages == {torch.nn.BatchNorm2d}


def test_large_batches_keep_the_weights_batch_stage():
    record = _fit(_large_batch_bcn_classifier(), batch_size=16)
    assert record.stages == {torch.nn.BatchNorm2d}


def test_unknown_stage_and_non_bcn_models():
    with pytest.raises(ValueError, match='bcn_batch_stage'):
        choose_bcn_batch_stage(torch.nn.Conv2d(1, 1, 1), 2, 'syncbn')
    assert choose_bcn_batch_stage(torch.nn.Conv2d(1, 1, 1), 2) is None


def test_pretrained_weights_are_described():
    import timm
    model = timm.create_model('resnet20_wsbcn.cifar10', pretrained=True, num_classes=5)
    line = describe_pretrained(model, 5)
    assert 'resnet20_wsbcn.cifar10' in line and 'model.safetensors' in line and 'new 5-class head' in line
    assert 'trained head kept' in describe_pretrained(timm.create_model('resnet20_wsbcn.cifar10', pretrained=True), 10)
