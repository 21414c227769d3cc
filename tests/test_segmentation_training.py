"""Segmentation through the CLI on coco-mini (fit with val mIoU, checkpoint round trip, predict
pictures), poly schedule, non-finite loss, and micro-batch: emulation == real DDP, BCN estimates
identical on every rank."""
import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import SHARED_DATA
from lightning_modules import NonFiniteLossError
from lightning_modules.cli import build_cli, main
from lightning_modules.segmentation import SegmentationDataModule, SemanticSegmenter
from zoo.layers import EstimatedBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / 'configs' / 'segmentation' / 'coco_mini_r18_wsbcn_cpu.yaml'
COCO_MINI = SHARED_DATA / 'coco-mini'
needs_coco_mini = pytest.mark.skipif(not COCO_MINI.is_dir(), reason='needs ../shared/data/coco-mini')

TINY = ['--data.init_args.crop_size', '64', '--data.init_args.base_size', '64', '--data.init_args.eval_size', '64',
        '--data.init_args.train_limit', '8', '--data.init_args.val_limit', '3', '--data.init_args.root', str(COCO_MINI)]


@needs_coco_mini
def test_cli_fit_reports_miou_checkpoint_round_trip_and_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config writes under runs/
    cli = build_cli(['fit', '-c', str(CPU_CONFIG), '--trainer.max_steps', '3', '--trainer.val_check_interval', '2',
                     '--trainer.log_every_n_steps', '1',
                     *TINY])
    out = capsys.readouterr().out
    assert 'Val mIoU:' in out and cli.trainer.global_step == 3
    run = tmp_path / 'runs' / 'segmentation' / 'coco_mini_r18_wsbcn'
    rows = list(csv.DictReader(open(next(run.rglob('metrics.csv')))))
    miou = [float(r['val/miou']) for r in rows if r.get('val/miou')]
    assert miou and 0 <= miou[0] <= 1
    lrs = [float(r['train/lr']) for r in rows if r.get('train/lr')]
    assert lrs and lrs[0] <= 0.02  # the poly schedule starts at lr and decays

    # Checkpoint round trip: same weights and BCN estimates, same eval logits.
    last = run / 'checkpoints' / 'last.ckpt'
    loaded = SemanticSegmenter.load_from_checkpoint(last, map_location='cpu').eval()
    model = cli.model.eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    est = [n for n, m in loaded.named_modules() if isinstance(m, EstimatedBatchNorm2d)]
    assert est and all(torch.equal(loaded.get_submodule(n).running_mean, model.get_submodule(n).running_mean)
                       for n in est)

    # predict writes a palette mask (class indices at the image's size) and an overlay per image.
    main(['predict', '-c', str(CPU_CONFIG), '--ckpt_path', str(last), *TINY,
          '--trainer.callbacks+=lightning_modules.segmentation.SegmentationWriter',
          f'--trainer.callbacks.output_dir={tmp_path / "pred"}'])
    with pytest.raises(ValueError, match='SegmentationWriter'):  # not the classifiers' top-k CSV
        main(['predict', '-c', str(CPU_CONFIG), '--ckpt_path', str(last), *TINY])
    masks = sorted((tmp_path / 'pred' / 'masks').glob('*.png'))
    overlays = sorted((tmp_path / 'pred' / 'overlays').glob('*.jpg'))
    assert len(masks) == len(overlays) == 3
    from PIL import Image
    first = sorted((COCO_MINI / 'val2017').glob('*.jpg'))[0]
    with Image.open(masks[0]) as m, Image.open(first) as img:
        assert masks[0].stem == first.stem and m.mode == 'P' and m.size == img.size


def _no_dropout(model):
    """ASPP's dropout draws differ between one process and two ranks: off for equivalence tests."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.
    return model


def _random_batch(n=4, size=32, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n, size, size), generator=g)
    y[:, :2] = 255
    y[0, :, :10] = 255  # devices see different numbers of labelled pixels
    return {'image': torch.randn(n, 3, size, size, generator=g), 'mask': y}


class _Data(pl.LightningDataModule):
    """The same 4-image batches on one process (emulated devices) or split over DDP ranks."""

    def __init__(self, virtual_devices=1, steps=3):
        super().__init__()
        self.virtual_devices = virtual_devices
        self.steps = steps

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batches = []
        for s in range(self.steps):
            b = _random_batch(4, seed=s)
            per = 4 // world
            batches.append({k: v[rank * per:(rank + 1) * per] for k, v in b.items()})
        return DataLoader(batches, batch_size=None)  # each item is a ready batch


def test_nonfinite_loss_stops_cleanly():
    model = SemanticSegmenter('deeplabv3_resnet18_wsgn', num_classes=5, model_kwargs=dict(output_stride=16), optim=dict(lr=1.0))
    batch = _random_batch(2)
    batch['image'][0, 0, 0, 0] = float('nan')
    trainer = pl.Trainer(accelerator='cpu', max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError, match='Non-finite training loss'):
        trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))


def test_crop_without_labelled_pixels_gives_zero_loss():
    model = SemanticSegmenter('deeplabv3_resnet18_wsgn', num_classes=5, model_kwargs=dict(output_stride=16))
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8))
    target[1] = 255
    loss = model._loss(logits, target, num_devices=2)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:1], target[:1]) / 2)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0


def test_poly_schedule_per_iteration():
    model = SemanticSegmenter('deeplabv3_resnet18_wsgn', num_classes=5, model_kwargs=dict(output_stride=16), optim=dict(lr=0.1))
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]['lr'])

    trainer = pl.Trainer(accelerator='cpu', max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(model, train_dataloaders=DataLoader([_random_batch(2, size=16, seed=s) for s in range(4)], batch_size=None))
    expected = [0.1 * (1 - t / 4) ** 0.9 for t in range(4)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected), rtol=1e-5, atol=1e-7)


class _SaveState(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({'state': pl_module.state_dict()}, f'{self.path}.{trainer.global_rank}')


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('name', ['deeplabv3_resnet18', 'deeplabv3_resnet18_wsbcn'])
def test_emulation_matches_real_ddp_and_bcn_estimates_identical_on_ranks(tmp_path, name):
    """2-process gloo DDP vs 2 emulated devices of 2 images: same weights and buffers after 3 steps."""
    pl.seed_everything(0)
    base = _no_dropout(SemanticSegmenter(name, num_classes=5, model_kwargs=dict(output_stride=16), optim=dict(lr=0.05, schedule='constant', weight_decay=1e-3)))
    ddp_model, emu_model = copy.deepcopy(base), copy.deepcopy(base)
    path = str(tmp_path / 'state')
    trainer = pl.Trainer(accelerator='cpu', devices=2, strategy='ddp_spawn', max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_SaveState(path)], deterministic=True, use_distributed_sampler=False)
    trainer.fit(ddp_model, _Data(virtual_devices=1))
    ranks = [torch.load(f'{path}.{r}', weights_only=True)['state'] for r in range(2)]

    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator='cpu', devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(emu_model, _Data(virtual_devices=2))
    emu = emu_model.state_dict()

    start = base.state_dict()
    assert any(not torch.equal(start[k], emu[k]) for k in start if k.endswith('weight'))
    estimated = [k for k in emu if '.bn.running_' in k]
    assert bool(estimated) == name.endswith('wsbcn')
    for key in estimated:  # BCN estimates: identical (bit for bit) on every rank
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for key, value in emu.items():
        torch.testing.assert_close(value.float(), ranks[0][key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_emulated_devices_split_bn_batches():
    """virtual_devices=2 over 4 images: BN normalizes each 2-image half on its own (differs from 4 at once)."""
    pl.seed_everything(0)
    model = _no_dropout(SemanticSegmenter('deeplabv3_resnet18', num_classes=5, model_kwargs=dict(output_stride=16)))
    batch = _random_batch(4)
    from lightning_modules.emulation import virtual_devices
    model.train()
    with torch.no_grad():
        with virtual_devices(model.model, 2):
            split = model.model(batch['image'])['out']
        halves = torch.cat([model.model(batch['image'][:2])['out'], model.model(batch['image'][2:])['out']])
        whole = model.model(batch['image'])['out']
    torch.testing.assert_close(split, halves, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(split, whole, atol=1e-3)
    assert math.isfinite(float(split.sum()))


def test_metrics_count_natively_under_deterministic_mode(monkeypatch):
    """deterministic=True made torchmetrics count a full-size COCO mask by a 37 GB one-hot (CI ran out
    of memory): the update counts with bincount and leaves the user's deterministic setting as it was."""
    from lightning_modules.segmentation.module import segmentation_metrics, update_metrics
    seen = []  # torchmetrics calls torch.bincount only on its native path
    real = torch.bincount
    monkeypatch.setattr(torch, 'bincount', lambda *a, **k: seen.append(a[0].numel()) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 133, (1, 96, 128), generator=g)
    target[0, :5] = 255
    preds = torch.where(torch.rand(target.shape, generator=g) < 0.7, target.clamp(max=132), torch.randint(0, 133, target.shape, generator=g))
    expected = segmentation_metrics(133, 'val/')
    expected.update(preds, target)
    metrics = segmentation_metrics(133, 'val/')
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    seen.clear()
    try:
        update_metrics(metrics, preds, target)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert seen
    for k, v in expected.compute().items():
        torch.testing.assert_close(metrics.compute()[k], v)
