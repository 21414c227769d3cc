"""Device emulation: K virtual devices in one process == a real K-process DDP run (gloo, CPU)."""
import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

import zoo
from lightning_modules import ImageClassifier, ImageFolderDataModule, VirtualDeviceNorm, virtual_devices
from lightning_modules.emulation import is_batch_dependent
from zoo.layers import BatchGroupNorm2d, EstimatedBatchNorm2d
from test_data import make_image_folder


@pytest.mark.parametrize('norm', [nn.BatchNorm2d(4), BatchGroupNorm2d(4, num_groups=2)])
def test_virtual_device_norm_matches_per_device_norms(norm):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    devices = [copy.deepcopy(norm) for _ in range(3)]
    expected = torch.cat([d(c) for d, c in zip(devices, x.chunk(3))])
    out = VirtualDeviceNorm(norm, 3)(x)
    torch.testing.assert_close(out, expected)
    # Running statistics: device 0's (what DDP's buffer broadcast keeps).
    for name, buf in norm.named_buffers():
        torch.testing.assert_close(buf, dict(devices[0].named_buffers())[name])


def test_virtual_devices_context_keeps_keys_and_layers():
    model = zoo.create_model('resnet20_wsbcn', norm_kwargs=dict(batch_stage='batch'))
    keys = list(model.state_dict())
    bns = [m for m in model.modules() if is_batch_dependent(m)]
    assert bns and not any(isinstance(m, EstimatedBatchNorm2d) for m in bns)
    with virtual_devices(model, 2):
        assert sum(isinstance(m, VirtualDeviceNorm) for m in model.modules()) == len(bns)
        model(torch.randn(4, 3, 16, 16))
        with pytest.raises(ValueError, match='virtual devices'):
            model(torch.randn(3, 3, 16, 16))
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, VirtualDeviceNorm) for m in model.modules())
    # EstimatedBatchNorm2d (all-reduced under DDP) is never split.
    ebn = zoo.create_model('resnet20_wsbcn')
    with virtual_devices(ebn, 2):
        assert not any(isinstance(m, VirtualDeviceNorm) for m in ebn.modules())


class RecordLosses(pl.Callback):
    """Writes each rank's per-step training loss to ``out/losses_rank{r}.json``."""

    def __init__(self, out: str):
        self.out = out
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs['loss']))

    def on_train_end(self, trainer, pl_module):
        Path(self.out, f'losses_rank{trainer.global_rank}.json').write_text(json.dumps(self.losses))


def _fit(model, root, out: Path, devices: int, k: int, steps: int, emulate: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    if not emulate:
        # Same batches of k x 2 images, but the norms see the whole batch at once.
        model.virtual_devices = 1
        model.setup = lambda stage: None
    dm = ImageFolderDataModule(str(root), input_size=16, scale=(0.5, 1.0), batch_size=2, virtual_devices=k,
                               num_workers=0, seed=0)
    trainer = pl.Trainer(
        accelerator='cpu', devices=devices, strategy='ddp_spawn' if devices > 1 else 'auto', max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[RecordLosses(str(out))], deterministic=True)
    trainer.fit(model, dm)
    return [json.loads(Path(out, f'losses_rank{r}.json').read_text()) for r in range(devices)]


@pytest.mark.parametrize('model_name', ['resnet20', 'resnet20_wsbcn'])
def test_emulation_matches_real_ddp(tmp_path, model_name):
    """Same data, seed and init: 2-process DDP (gloo) vs 2 emulated devices, 4 SGD steps."""
    root = make_image_folder(tmp_path / 'data', per_class=6)
    pl.seed_everything(0)
    base = ImageClassifier(model_name, num_classes=3, optim=dict(lr=0.2, momentum=0.9, weight_decay=1e-3, schedule='constant'))
    ddp_model, emu_model = copy.deepcopy(base), copy.deepcopy(base)

    ddp_losses = _fit(ddp_model, root, tmp_path / 'ddp', devices=2, k=1, steps=4)
    pl.seed_everything(0)
    (emu_losses,) = _fit(emu_model, root, tmp_path / 'emu', devices=1, k=2, steps=4)

    global_ddp = [sum(l) / 2 for l in zip(*ddp_losses)]
    assert len(emu_losses) == 4
    torch.testing.assert_close(torch.tensor(emu_losses), torch.tensor(global_ddp), rtol=1e-5, atol=1e-5)
    assert ddp_losses[0] != ddp_losses[1]  # the two ranks really saw different images
    ddp_state, emu_state = ddp_model.model.state_dict(), emu_model.model.state_dict()
    start = base.model.state_dict()
    assert any(not torch.equal(start[k], ddp_state[k]) for k in start)  # training moved the weights
    for key in ddp_state:  # weights, and buffers (BN: rank 0's; estimated BN: all-reduced)
        torch.testing.assert_close(emu_state[key].float(), ddp_state[key].float(), rtol=1e-4, atol=1e-5, msg=key)

    if model_name == 'resnet20':
        # Control: the same 4 images per step in one process *without* emulation (BN sees all 4) differ.
        pl.seed_everything(0)
        (plain_losses,) = _fit(copy.deepcopy(base), root, tmp_path / 'plain', devices=1, k=2, steps=4, emulate=False)
        assert not torch.allclose(torch.tensor(plain_losses), torch.tensor(global_ddp), rtol=1e-3, atol=1e-3)
