"""Run (or resume) the CamVid segmentation runs with ``zoo-train``: :mod:`cifar_runs`' queue, for
``test/miou``.

Everything of ``cifar_runs.py`` holds (one schedule from ``--epochs``, ``--seeds``, skip finished
runs, resume from ``last.ckpt``, the thread count in each start's ``train.log``); the differences:

- a run is finished when its logs hold ``test/miou`` (``--test_after_fit``, on the 233 test frames);
- after it finishes, its final weights predict a few fixed test frames (:data:`PICTURE_FRAMES`)
  through ``zoo-train predict`` and its ``SegmentationWriter``; the class-index PNGs are kept with
  the logs, for ``camvid_results.py``'s picture;
- finished runs' logs go to ``benchmarks/results/camvid_runs/<run>/``, to be committed.

    OMP_NUM_THREADS=1 python benchmarks/camvid_runs.py --epochs 50 --jobs 2 --threads 1 \\
        configs/segmentation/camvid_r18_wsbcn.yaml configs/segmentation/camvid_r18_bn_b8.yaml --seeds 0 1 2
"""
import os
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from cifar_runs import Queue, main as queue_main  # a sibling script: on the path when run as one

CAMVID = Path('../shared/data/camvid')
DEFAULT_CONFIGS = [f'configs/segmentation/camvid_r18_{name}.yaml' for name in ('wsbcn', 'bn_b8', 'bn', 'wsgn', 'gn', 'bgn')]
PICTURE_FRAMES = ('0001TP_008550', '0001TP_010320', 'Seq05VD_f01710', 'Seq05VD_f03510')  # test frames 0, 60, 120, 180
PICTURES = 'pictures'  # in the run folder: masks/<frame>.png (class indices, CamVid colours in the picture)


def picture_frames_dir(root: Optional[Path] = None, frames: Sequence[str] = PICTURE_FRAMES) -> Path:
    """A folder of links to the picture frames (predict reads a folder), in ``runs/camvid/``."""
    root = root or CAMVID
    folder = Path('runs/camvid/picture_frames')
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        link, target = folder / f'{frame}.jpg', (root / 'test' / f'{frame}.jpg').resolve()
        if not target.is_file():
            raise FileNotFoundError(f'{target}: a picture frame is missing from the CamVid test split')
        if not link.is_symlink():
            link.symlink_to(target)
    return folder.resolve()


def predict_command(config: Path, run_dir: Path, override: Optional[Path], frames_dir: Path) -> list:
    """``zoo-train predict`` of the run's final weights on ``frames_dir``, masks into ``run_dir/pictures``."""
    cmd = ['zoo-train', 'predict', '-c', str(config)] + (['-c', str(override)] if override else [])
    return cmd + ['--ckpt_path', str(run_dir / 'checkpoints' / 'last.ckpt'),
                  '--data.init_args.predict_images', str(frames_dir), '--trainer.enable_progress_bar', 'false',
                  '--trainer.logger', 'false',
                  '--trainer.callbacks+=lightning_modules.segmentation.SegmentationWriter',
                  '--trainer.callbacks.output_dir', str(run_dir / PICTURES)]


def predict_pictures(config: Path, run_dir: Path, override: Optional[Path], threads: int) -> None:
    """The picture frames' predicted masks, unless the run folder already has them all."""
    masks = run_dir / PICTURES / 'masks'
    if all((masks / f'{f}.png').is_file() for f in PICTURE_FRAMES):
        return
    cmd = predict_command(config, run_dir, override, picture_frames_dir())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / 'train.log', 'a') as log:
        log.write(f'[camvid_runs] pictures: {" ".join(cmd)}\n')
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f'{run_dir}: predicting the picture frames failed (rc={rc}); see {run_dir / "train.log"}')


QUEUE = Queue(metric='test/miou', archive_dir=Path('benchmarks/results/camvid_runs'),
              extra=(f'{PICTURES}/masks/*.png',), after=predict_pictures)


if __name__ == '__main__':
    raise SystemExit(queue_main(default_configs=DEFAULT_CONFIGS, queue=QUEUE, description=__doc__))
