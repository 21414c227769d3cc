"""The one checkpoint reader (issue 17): zoo.hub.read_state_dict serves the hub loaders, the converters,
fine-tuning and hub_upload.py, with one EMA rule and one error type."""
import pytest
import torch

import zoo
from lightning_modules.finetune import load_backbone_weights
from zoo.converters import unwrap_checkpoint
from zoo.hub import WeightsError, read_state_dict


def _lightning_checkpoint(path, with_ema=True):
    """A zoo LightningModule's layout: the model under ``model.``, its EMA copy under ``ema.module.``."""
    raw = zoo.create_model('resnet20_wsbcn').state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    state_dict = {f'model.{k}': v for k, v in raw.items()}
    if with_ema:
        state_dict.update({f'ema.module.{k}': v for k, v in ema.items()})
    torch.save({'state_dict': state_dict, 'epoch': 3, 'acc': torch.tensor(0.5),
                'hyper_parameters': {'model_name': 'resnet20_wsbcn'}}, path)
    return raw, ema


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_rule_is_the_same_for_every_loader(tmp_path):
    raw, ema = _lightning_checkpoint(tmp_path / 'run.ckpt')
    keys = raw.keys()
    assert _equal(read_state_dict(tmp_path / 'run.ckpt'), ema)
    assert _equal(read_state_dict(tmp_path / 'run.ckpt', model_keys=keys), ema)
    assert _equal(read_state_dict(tmp_path / 'run.ckpt', model_keys=keys, use_ema=False), raw)
    assert _equal(read_state_dict(tmp_path / 'run.ckpt', use_ema=False), raw)
    assert _equal(zoo.load_model(tmp_path / 'run.ckpt').state_dict(), ema)
    fine_tuned = zoo.create_model('resnet20_wsbcn')
    load_backbone_weights(fine_tuned, tmp_path / 'run.ckpt')  # fine-tuning took the raw weights before
    assert _equal(fine_tuned.state_dict(), ema)
    load_backbone_weights(fine_tuned, tmp_path / 'run.ckpt', use_ema=False)
    assert _equal(fine_tuned.state_dict(), raw)
    raw, _ = _lightning_checkpoint(tmp_path / 'no_ema.ckpt', with_ema=False)
    assert _equal(read_state_dict(tmp_path / 'no_ema.ckpt'), raw)


def test_one_error_type_that_names_the_file(tmp_path):
    _lightning_checkpoint(tmp_path / 'run.ckpt')
    cut = tmp_path / 'cut.ckpt'
    cut.write_bytes((tmp_path / 'run.ckpt').read_bytes()[:2000])
    with pytest.raises(WeightsError, match=r'Cannot read checkpoint .*cut\.ckpt.*truncated or corrupted') as info:
        read_state_dict(cut)
    assert isinstance(info.value, ValueError)  # what fine-tuning raised before
    with pytest.raises(WeightsError, match=r'missing\.ckpt does not exist'):
        load_backbone_weights(zoo.create_model('resnet20'), tmp_path / 'missing.ckpt')
    with pytest.raises(WeightsError, match='No state dict found'):
        unwrap_checkpoint({'state_dict': {}})


def _fit_loop(epochs_started: int, epochs_processed: int, batches_ready: int, batches_processed: int, last: bool):
    return {'loops': {'fit_loop': {
        'epoch_progress': {'current': {'ready': epochs_started, 'started': epochs_started,
                                       'processed': epochs_processed, 'completed': epochs_processed}},
        'epoch_loop.batch_progress': {'current': {'ready': batches_ready, 'processed': batches_processed},
                                      'is_last_batch': last}}}}


@pytest.mark.parametrize('state,epochs', [
    # every_n_train_steps landing on the run's last step (a CamVid run: 50 epochs of 46 steps, saved at step 2300)
    (_fit_loop(50, 49, 46, 46, True), 50),
    (_fit_loop(50, 49, 46, 20, False), 49),  # killed mid-epoch: 49 whole epochs
    (_fit_loop(50, 50, 46, 46, True), 50),  # saved after the epoch's end: counted once
    ({'epoch': 3}, None),  # no loop state: unknown (the card then falls back to epoch + 1)
])
def test_epochs_completed_counts_an_epoch_whose_last_batch_was_trained(state, epochs):
    from zoo.hub.lightning import _epochs_completed
    assert _epochs_completed(state) == epochs
