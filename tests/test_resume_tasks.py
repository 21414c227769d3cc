"""Exact resume through ``zoo-train fit`` on the real configs of the dense and video tasks.

Each test runs a task's real config on its real data (``../shared/data``) through the CLI, made
small by overrides only (fewer steps, a smaller input, a training subset of a few steps per epoch,
no validation or test, no logger, checkpoints into the test's folder), and checks:

1. the run killed (SIGKILL) right after a checkpoint in the middle of an epoch (the last time in its
   second epoch) and resumed with ``--ckpt_path last`` restarted from that checkpoint (its first
   batch is the checkpoint's step, epoch and batch), crossed the next epoch boundary, and
2. ended bit-identical to the uninterrupted run of the same steps: every weight and buffer (BCN's
   estimated statistics, BN running statistics, ``num_batches_tracked``), the optimizer state,
   the scheduler state and the RNG states (:func:`resume_helpers.assert_same_training_state`).

- segmentation: ``configs/segmentation/camvid_r18_wsbcn.yaml`` (the CamVid runs are resumed across
  sessions): CamVid frames, 4 emulated devices x 2 crops, random-scale crops, warm-up then poly;
  killed once inside the warm-up epoch and once after it.
- detection: ``configs/coco/coco_mini_maskrcnn_r50_wsbcn_cpu.yaml`` (docs/detection.md's CPU run):
  Mask R-CNN R-50-FPN WS+BCN on coco-mini images, one loader worker, warm-up then a step decay.
- video: ``configs/video/smoke_shared_clips.yaml`` (docs/video.md's CPU run): TSM R-18 WS+BCN on
  the six labelled shared clips, AdamW.
"""
import json
from pathlib import Path
from typing import Sequence

import pytest
import torch

from resume_helpers import REPO, assert_same_training_state, interrupted_run, uninterrupted_run

DATA = REPO.parent / 'shared' / 'data'
CAMVID, COCO_MINI, VIDEOS = DATA / 'camvid', DATA / 'coco-mini', DATA / 'videos'

# Every run: no validation, no test, no logger, no progress bar (checkpoints: resume_helpers).
QUIET = ['--trainer.logger', 'false', '--trainer.enable_progress_bar', 'false',
         '--trainer.enable_model_summary', 'false', '--trainer.limit_val_batches', '0',
         '--trainer.num_sanity_val_steps', '0', '--test_after_fit', 'false']


def _check_exact_resume(tmp_path: Path, args: Sequence[str], steps: int, per_epoch: int, kills: Sequence[int],
                        datamodule: str, every: int = 1) -> dict:
    """Kill ``zoo-train fit ARGS`` after each step of ``kills``, resume, and compare with an uninterrupted run
    (both write ``last.ckpt`` every ``every`` steps, which must include the kills, and at the end)."""
    assert all(k % per_epoch and k % every == 0 for k in kills) and steps > max(kills)
    assert steps // per_epoch > max(kills) // per_epoch  # the last restart crosses an epoch boundary
    resumed, resumed_from, starts = interrupted_run(tmp_path / 'run', *args, kills=kills, every=every)
    ref = uninterrupted_run(tmp_path / 'ref', *args, every=every)

    # The restarts resumed mid-epoch, from the checkpoint of the step they were killed at.
    assert starts[0] == {'global_step': 0, 'epoch': 0, 'batch_idx': 0}
    for kill_at, ckpt, start in zip(kills, resumed_from, starts[1:]):
        epoch, done = divmod(kill_at, per_epoch)
        assert ckpt['global_step'] == kill_at and ckpt['epoch'] == epoch
        assert ckpt[datamodule] == {'train_epoch': epoch, 'train_batches_done': done}
        assert start == {'global_step': kill_at, 'epoch': epoch, 'batch_idx': done}

    assert ref['global_step'] == resumed['global_step'] == steps
    state = ref['state_dict']
    assert any(k.endswith('num_batches_tracked') for k in state) and any(k.endswith('running_var') for k in state)
    assert_same_training_state(resumed, ref)
    # ... and training went on after the last restart: weights and BCN estimates moved.
    last_ckpt = resumed_from[-1]['state_dict']
    moved = [k for k, v in state.items() if not torch.equal(last_ckpt[k], v)]
    assert any(k.endswith('running_mean') for k in moved) and any(k.endswith('.weight') for k in moved)
    assert any(k.endswith('num_batches_tracked') for k in moved)
    return ref


@pytest.mark.skipif(not CAMVID.is_dir(), reason='../shared/data/camvid is not here')
def test_camvid_config_killed_in_two_epochs_resumes_bit_identical(tmp_path):
    """The CamVid config as it is (DeepLabV3 R-18 WS+BCN, 4 virtual devices x 2 random-scale crops, 1 warm-up
    epoch then poly), on 24 CamVid frames (3 steps per epoch) with 64x64 crops: killed at step 2 (inside the
    warm-up epoch) and step 4 (epoch 1), 8 steps in all."""
    args = ['-c', REPO / 'configs/segmentation/camvid_r18_wsbcn.yaml', *QUIET, '--trainer.max_steps', '8',
            '--data.init_args.train_limit', '24', '--data.init_args.crop_size', '64',
            '--data.init_args.base_size', '60']
    ref = _check_exact_resume(tmp_path, args, steps=8, per_epoch=3, kills=(2, 4), datamodule='SegmentationDataModule')
    assert ref['optimizer_states'][0]['param_groups'][0]['lr'] == 0  # poly over the 8 steps: 0 after the last


def _coco_subset(path: Path, images: int) -> Path:
    """coco-mini's training annotations for its first ``images`` images (the files stay in train2017/)."""
    coco = json.loads((COCO_MINI / 'annotations' / 'instances_train2017.json').read_text())
    ids = sorted(i['id'] for i in coco['images'])[:images]
    coco['images'] = [i for i in coco['images'] if i['id'] in ids]
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in ids]
    assert coco['annotations']
    path.write_text(json.dumps(coco))
    return path


# slow: the longest of the three (366 MB Mask R-CNN R-50 checkpoints); the default run keeps the module-level
# detection resume test (tests/test_detection_module.py) and the shared core this one exercises.
@pytest.mark.slow
@pytest.mark.skipif(not (COCO_MINI / 'annotations').is_dir(), reason='../shared/data/coco-mini is not here')
def test_coco_mini_detection_config_killed_mid_epoch_resumes_bit_identical(tmp_path):
    """The coco-mini Mask R-CNN R-50-FPN WS+BCN config (1 loader worker, random region sampling) on its first 4
    training images (2 steps per epoch) at 64-96 pixels: killed at step 3 (epoch 1), 5 steps in all. Its schedule
    is shortened to fit: 2 warm-up steps, then x0.1 from epoch 2 (step 4, after the restart)."""
    args = ['-c', REPO / 'configs/coco/coco_mini_maskrcnn_r50_wsbcn_cpu.yaml', *QUIET, '--trainer.max_steps', '5',
            '--data.init_args.train_annotations', _coco_subset(tmp_path / 'train4.json', 4),
            '--data.init_args.min_size', '64', '--data.init_args.max_size', '96',
            '--model.init_args.optim.warmup_steps', '2', '--model.init_args.optim.milestones', '[2.0]']
    ref = _check_exact_resume(tmp_path, args, steps=5, per_epoch=2, kills=(3,), datamodule='CocoDetectionDataModule',
                              every=3)  # checkpoints of 366 MB: only those needed
    assert all(g['lr'] == pytest.approx(0.001) for g in ref['optimizer_states'][0]['param_groups'])  # decayed


@pytest.mark.skipif(not (VIDEOS / 'labels.csv').is_file(), reason='../shared/data/videos is not here')
def test_shared_clips_video_config_killed_mid_epoch_resumes_bit_identical(tmp_path):
    """The video smoke config as it is (TSM R-18 WS+BCN, 4 segments of 64x64, AdamW) on the six labelled shared
    clips (3 steps per epoch): killed at step 4 (epoch 1), 8 steps in all."""
    args = ['-c', REPO / 'configs/video/smoke_shared_clips.yaml', *QUIET, '--trainer.max_steps', '8']
    _check_exact_resume(tmp_path, args, steps=8, per_epoch=3, kills=(4,), datamodule='VideoDataModule')
