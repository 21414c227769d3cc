"""VideoClassifier: fine-tuning TSM on the real clips, clip- vs video-level metrics, skipped clips, configs."""
import csv
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import EarlyStopping
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import zoo  # noqa: F401
from lightning_modules.finetune import read_state_dict
from lightning_modules.video import VideoClassifier
from lightning_modules.video_data import VideoDataModule

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / 'shared' / 'data' / 'videos'
MANIFEST = VIDEOS / 'labels.csv'
needs_clips = pytest.mark.skipif(not MANIFEST.is_file(), reason=f'shared video clips not found at {VIDEOS}')


def _trainer(**kw):
    kw = dict(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, **kw)
    return pl.Trainer(**kw)


@needs_clips
def test_finetune_tsm_resnet18_wsbcn_on_six_clips_to_100pct_training_accuracy(tmp_path):
    """From a 2D ResNet-18 WS+BCN checkpoint to 100% accuracy on the six labelled clips (3 classes)."""
    torch.set_num_threads(2)
    pl.seed_everything(0)
    start = time.time()
    ckpt = tmp_path / 'resnet18_wsbcn.safetensors'  # a 2D checkpoint: the TSM model loads it unchanged
    save_file(timm.create_model('resnet18_wsbcn').state_dict(), str(ckpt))
    model = VideoClassifier('tsm_resnet18_wsbcn', num_classes=3, num_segments=4, init_checkpoint=str(ckpt), optim=dict(optimizer='adamw', lr=2e-3, weight_decay=0., schedule='constant'))
    torch.testing.assert_close(model.model.layer3[0].conv1.weight, read_state_dict(ckpt)['layer3.0.conv1.weight'])

    # Training accuracy = eval-mode accuracy on the training clips, checked after every epoch.
    dm = VideoDataModule(train=str(MANIFEST), val=str(MANIFEST), test=str(MANIFEST), skip_unlabelled=True,
                         num_segments=4, crop_size=48, batch_size=6, eval_batch_size=6, num_workers=0,
                         test_clips=2, test_crops=3)
    max_epochs = 30
    stop = EarlyStopping('val/top1', mode='max', stopping_threshold=0.999, patience=max_epochs)
    trainer = _trainer(max_epochs=max_epochs, callbacks=[stop])
    trainer.fit(model, dm)
    assert trainer.current_epoch < max_epochs, f'training accuracy never reached 100%: {trainer.callback_metrics}'
    assert float(trainer.callback_metrics['train/loss']) < 1.0986  # below chance-level cross-entropy, ln(3)

    val = trainer.validate(model, dm, verbose=False)[0]
    assert val['val/top1'] == 1.0 and val['val/skipped_videos'] == 0
    test = trainer.test(model, dm, verbose=False)[0]  # 2 clips x 3 crops per video
    assert test['test/top1'] >= 5 / 6 and 0 < test['test/clip_top1'] <= 1
    print(f'fine-tune + eval took {time.time() - start:.1f}s, {trainer.current_epoch} epochs')


class _ViewLogits(nn.Module):
    """Stand-in model: the logits of a view are written in its first pixels."""

    def forward(self, x):
        return x.flatten(1)[:, :3]


def _view_batch():
    # One video of class 1, three views: two weakly for class 0, one strongly for class 1.
    logits = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    video = torch.zeros(1, 3, 3, 1, 2, 2)  # (B, V, C, T, H, W)
    video.view(1, 3, -1)[0, :, :3] = logits
    return {'video': video, 'label': torch.tensor([1]), 'skipped': torch.tensor(2)}


def test_video_level_scores_average_views_softmax():
    model = VideoClassifier('tsm_resnet18_bn', num_classes=3, num_segments=1)
    model.model = _ViewLogits()
    batch = _view_batch()
    scores = model.predict_step(batch, 0)
    torch.testing.assert_close(scores, torch.softmax(_view_batch()['video'].view(3, -1)[:, :3], -1).mean(0, keepdim=True))
    result = _trainer().test(model, DataLoader([batch], batch_size=None), verbose=False)[0]
    assert result['test/clip_top1'] == pytest.approx(1 / 3)  # 1 of 3 views right
    assert result['test/top1'] == 1.0  # the mean of the softmax scores is right
    assert result['test/skipped_videos'] == 2


@needs_clips
def test_undecodable_clips_are_skipped_and_counted_in_training_and_validation(tmp_path, caplog):
    bad = tmp_path / 'broken.avi'
    data = (VIDEOS / 'TrumanShow_wave_f_nm_np1_fr_med_26.avi').read_bytes()
    bad.write_bytes(bytes(1024) + data[1024:len(data) // 2])  # cut in half, header zeroed
    manifest = tmp_path / 'clips.csv'
    with open(manifest, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['path', 'label'])
        w.writerow([VIDEOS / 'TrumanShow_wave_f_nm_np1_fr_med_26.avi', 'wave'])
        w.writerow([bad, 'wave'])
        w.writerow([VIDEOS / 'v_SoccerJuggling_g23_c01.avi', 'soccer_juggling'])
    kw = dict(train=str(manifest), val=str(manifest), num_segments=2, crop_size=32, batch_size=1, num_workers=0)
    model = VideoClassifier('tsm_resnet18_wsbcn', num_classes=2, num_segments=2, optim=dict(lr=1e-3))
    with pytest.raises(Exception, match='broken.avi'):  # the default: a clear error naming the file
        _trainer(max_epochs=1).fit(model, VideoDataModule(**kw))
    with caplog.at_level(logging.WARNING, logger='lightning_modules.video.data'):
        trainer = _trainer(max_epochs=1)
        trainer.fit(model, VideoDataModule(on_decode_error='skip', **kw))
    assert sum('broken.avi' in r.getMessage() for r in caplog.records) == 2  # the train and the val pass
    assert trainer.callback_metrics['train/skipped_videos'] == 1
    assert trainer.callback_metrics['val/skipped_videos'] == 1
    empty = {'video': torch.empty(0), 'label': torch.empty(0, dtype=torch.long), 'skipped': torch.tensor(1)}
    model.log = lambda *args, **kwargs: None  # outside a Trainer loop
    assert model.training_step(empty, 0) is None  # a batch of only undecodable clips: no loss, no update


def test_wrong_evaluation_batch_shape_is_a_clear_error():
    model = VideoClassifier('tsm_resnet18_bn', num_classes=3, num_segments=2)
    with pytest.raises(ValueError, match=r'\(B, V, C, T, H, W\)'):
        model.video_scores(torch.zeros(1, 3, 2, 32, 32))


@pytest.mark.parametrize('config', sorted((REPO / 'configs' / 'video').glob('*.yaml')), ids=lambda p: p.name)
def test_video_configs_parse(config, capsys):
    from lightning_modules.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(['fit', '-c', str(config), '--print_config'])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert 'lightning_modules.video.VideoClassifier' in printed and 'lightning_modules.video.VideoDataModule' in printed
    assert 'num_segments: 8' in printed or config.name.startswith('smoke')


@needs_clips
def test_smoke_config_runs_through_zoo_train(tmp_path):
    from lightning_modules.cli import build_cli
    cli = build_cli(['fit', '-c', str(REPO / 'configs' / 'video' / 'smoke_shared_clips.yaml'),
                '--trainer.max_epochs=1', f'--trainer.default_root_dir={tmp_path}', '--trainer.logger=false',
                '--trainer.callbacks=[]', '--trainer.enable_checkpointing=false', '--test_after_fit=false',
                '--trainer.limit_train_batches=2', '--trainer.limit_val_batches=1'])
    assert cli.trainer.global_step > 0 and 'val/top1' in cli.trainer.callback_metrics
