"""ImageClassifier pieces: parameter groups, schedules, metrics, fine-tuning, Mixup per device, EMA."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning_modules import ImageClassifier, OptimConfig, accuracy_metrics, create_optimizer, create_scheduler, param_groups


def test_no_weight_decay_on_norms_and_biases():
    model = ImageClassifier('resnet20_wsbcn', num_classes=10).model
    groups = {g['name']: g for g in param_groups(model, weight_decay=5e-4, backbone_lr_scale=0.1)}
    decayed = {id(p) for g in groups.values() if g['weight_decay'] > 0 for p in g['params']}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters() if p.ndim > 1}
    assert any('bn1.bn.weight' in names[id(p)] for p in groups['backbone_no_decay']['params'])  # BCN batch stage
    assert groups['backbone_decay']['lr_scale'] == 0.1 and groups['head_decay']['lr_scale'] == 1.0
    assert {names[id(p)] for g in ('head_decay', 'head_no_decay') for p in groups[g]['params']} == {'fc.weight', 'fc.bias'}


def _lrs(cfg, epochs, steps_per_epoch):
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer(model, cfg)
    sched = create_scheduler(opt, cfg, epochs, steps_per_epoch)
    lrs = []
    for step in range(int(epochs * steps_per_epoch)):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step_update(step + 1)
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs(OptimConfig(lr=0.1, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0), epochs=4, steps_per_epoch=10)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.05)  # linear warm-up over the first epoch
    assert lrs[10] == pytest.approx(0.1, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays
    assert lrs[-1] < 0.002


def test_step_schedules():
    lrs = _lrs(OptimConfig(lr=0.1, schedule='multistep', milestones=(1, 2), decay_rate=0.1), epochs=3, steps_per_epoch=4)
    assert lrs[:4] == pytest.approx([0.1] * 4) and lrs[4:8] == pytest.approx([0.01] * 4)
    assert lrs[8:] == pytest.approx([0.001] * 4)
    lrs = _lrs(OptimConfig(lr=0.1, schedule='step', decay_epochs=2), epochs=4, steps_per_epoch=2)
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 4)
    with pytest.raises(ValueError, match='Unknown schedule'):
        OptimConfig(schedule='linear-ish')


def test_adamw_and_lr_scale_applied_from_first_step():
    model = ImageClassifier('resnet20', optim=dict(backbone_lr_scale=0.1, optimizer='adamw', lr=1e-3)).model
    cfg = OptimConfig(optimizer='adamw', lr=1e-3, schedule='constant', backbone_lr_scale=0.1)
    opt = create_optimizer(model, cfg)
    create_scheduler(opt, cfg, 1, 10)
    assert type(opt).__name__ == 'AdamW'
    assert sorted({g['lr'] for g in opt.param_groups}) == pytest.approx([1e-4, 1e-3])


def test_accuracy_is_micro_averaged():
    m = accuracy_metrics(10, 'val/')
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([0, 0, 0, 5])] = 1  # 3 right of class 0, one wrong of class 1
    out = m(logits, torch.tensor([0, 0, 0, 1]))
    assert out['val/top1'].item() == pytest.approx(0.75)  # macro would give (1 + 0) / 2
    assert 'val/top5' in out and 'top5' not in accuracy_metrics(3)


def test_finetune_new_head_frozen_backbone(tmp_path):
    src = ImageClassifier('resnet20_wsgn', num_classes=10)
    path = tmp_path / 'src.ckpt'
    torch.save({'state_dict': src.state_dict()}, path)
    ft = ImageClassifier('resnet20_wsgn', num_classes=3, init_checkpoint=str(path), freeze_backbone=True)
    for k, v in src.model.state_dict().items():
        if not k.startswith('fc.'):
            assert torch.equal(v, ft.model.state_dict()[k]), k
    assert ft.model.fc.weight.shape == (3, 64)
    assert [n for n, p in ft.model.named_parameters() if p.requires_grad] == ['fc.weight', 'fc.bias']
    # The frozen backbone really stays put through training.
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))), batch_size=4)
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    pl.Trainer(accelerator='cpu', max_steps=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False).fit(ft, loader)
    after = ft.model.state_dict()
    assert torch.equal(before['conv1.weight'], after['conv1.weight'])
    assert not torch.equal(before['fc.weight'], after['fc.weight'])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / 'truncated.ckpt'
    torch.save({'state_dict': ImageClassifier('resnet20').state_dict()}, bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(ValueError, match='Cannot read checkpoint'):
        ImageClassifier('resnet20', init_checkpoint=str(bad))
    other = tmp_path / 'other.ckpt'
    torch.save(ImageClassifier('resnet32').model.state_dict(), other)
    with pytest.raises(ValueError, match='does not fit'):
        ImageClassifier('resnet20', init_checkpoint=str(other))


def test_mixup_per_virtual_device_uses_shared_draws():
    model = ImageClassifier('resnet20', num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    model.virtual_devices = 2
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    np.random.seed(0)
    xm, ym = model._mix(x.clone(), y)
    # Each device mixes only its own two images, with the draws a DDP rank seeded alike would make.
    for k in range(2):
        np.random.seed(0)
        xk, yk = model.mixup(x[2 * k:2 * k + 2].clone(), y[2 * k:2 * k + 2])
        torch.testing.assert_close(xm[2 * k:2 * k + 2], xk)
        torch.testing.assert_close(ym[2 * k:2 * k + 2], yk)
    assert ym[:2, 3:5].sum() == pytest.approx(4 * 0.1 / 10, abs=1e-6)  # other device's classes: smoothing only


def test_ema_is_updated_and_used_for_eval():
    pl.seed_everything(0)
    model = ImageClassifier('resnet20_gn', num_classes=3, ema_decay=0.5, optim=dict(lr=0.1))
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))), batch_size=4)
    start = model.ema.module.fc.weight.clone()
    # timm's EMA copies the weights on its first update(s), then averages.
    pl.Trainer(accelerator='cpu', max_steps=4, logger=False, enable_checkpointing=False,
               enable_progress_bar=False).fit(model, loader)
    ema_w, w = model.ema.module.fc.weight, model.model.fc.weight
    assert not torch.equal(ema_w, start) and not torch.equal(ema_w, w)
    assert model.eval_model() is model.ema.module
    assert not any(p.requires_grad for p in model.ema.parameters())
