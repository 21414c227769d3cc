"""The CamVid table, plot and picture, read from the runs' own logs (``benchmarks/camvid_runs.py``).

From each run folder (or its archived logs in ``benchmarks/results/camvid_runs/<run>``) it takes
the model's normalization, the images per device and the device count from the logged
``config.yaml``, and from ``metrics.csv`` the final test mIoU over CamVid's 11 classes (void
ignored) and each class's IoU (``test/iou_<c>``). Runs of one configuration with different seeds
are one row (mean ± sample standard deviation); the gap to large-batch BN carries its standard
error and Welch's p where both sides have several seeds: :mod:`cifar_results` computes all of it.

Writes ``STEM.md`` (the mIoU table and the per-class table), ``STEM.png`` (mIoU against images per
device) and ``STEM_pictures.png`` (the picture frames: image, ground truth and each configuration's
prediction, in CamVid's usual colours), and with ``--readme`` puts them between the README's
``camvid-results`` markers.

    python benchmarks/camvid_results.py benchmarks/results/camvid_runs/* --readme README.md
"""
import argparse
import csv
import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from camvid_runs import CAMVID, PICTURE_FRAMES, PICTURES
from cifar_results import (NORM_LABELS, ConfigResult, RunResult, _plot_sizes, _table_order, baseline_of, gap_cell,
                           group_by_config, read_run, update_readme)

METRIC = 'test/miou'
README_START, README_END = '<!-- camvid-results:start -->', '<!-- camvid-results:end -->'
# SegNet's CamVid colours (SegNet-Tutorial), in classes.txt's order; void (255) black.
CAMVID_COLOURS = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)], dtype=np.uint8)


def class_names(root: Path = CAMVID) -> List[str]:
    return [line.strip() for line in (root / 'classes.txt').read_text().splitlines() if line.strip()]


def segmenter_norm(model: str) -> str:
    """``deeplabv3_resnet18_wsbcn`` -> ``WS+BCN``; no variant suffix -> ``BN``."""
    return NORM_LABELS.get(model.rsplit('_', 1)[-1], 'BN')


def read_camvid_run(run_dir: Path) -> RunResult:
    """The run's test mIoU (in %, in ``test_top1``), with the normalization read from the segmenter's name."""
    r = read_run(run_dir, METRIC)
    return dataclasses.replace(r, norm=segmenter_norm(r.model))


def class_ious(r: RunResult) -> Dict[int, float]:
    """``{class index: test IoU in %}`` from the row of the run's final test."""
    with open(r.log_dir / 'metrics.csv', newline='') as f:
        rows = [row for row in csv.DictReader(f) if row.get(METRIC)]
    row = rows[-1]
    return {int(k.rsplit('_', 1)[1]): 100 * float(v) for k, v in row.items() if k.startswith('test/iou_') and v}


def _miou_cell(c: ConfigResult) -> str:
    if len(c.runs) == 1:
        return f'{c.mean:.2f}'
    return f'{c.mean:.2f} ± {c.std:.2f} (seeds {", ".join(str(r.seed) for r in c.runs)}: ' \
           f'{", ".join(f"{t:.2f}" for t in c.top1s)})'


def markdown_tables(results: Sequence[RunResult], names: Sequence[str]) -> str:
    configs = sorted(group_by_config(results), key=_table_order)
    lines = ['| configuration | images / device | devices | epochs | test mIoU (%) | vs. large-batch BN | runs |',
             '|---|---|---|---|---|---|---|']
    for c in configs:
        lines.append(f'| {c.label} | {c.images_per_device} | {c.devices} | {c.epochs} | {_miou_cell(c)} | '
                     f'{gap_cell(c, baseline_of(configs, c.arch))} | {", ".join(r.run for r in c.runs)} |')
    lines += ['', 'Per-class test IoU (%), mean over the seeds:', '',
              '| configuration | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for c in configs:
        per_run = [class_ious(r) for r in c.runs]
        means = [np.mean([ious.get(i, float('nan')) for ious in per_run]) for i in range(len(names))]
        lines.append(f'| {c.label} @ {c.images_per_device} | ' + ' | '.join(f'{m:.1f}' for m in means) + ' |')
    return '\n'.join(lines) + '\n'


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Test mIoU against images per device, one line per normalization (BN's reference dashed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    _plot_sizes(ax, group_by_config(results), ylabel='CamVid test mIoU (%), 11 classes')
    ax.set_title('DeepLabV3 R-18 on CamVid: mIoU vs. images per device\n(several seeds: mean ± 1 std, dots: each seed)',
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def colourize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) CamVid colours; void and unknown labels black."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    known = labels < len(CAMVID_COLOURS)
    out[known] = CAMVID_COLOURS[labels[known]]
    return out


def picture(results: Sequence[RunResult], path: Path, root: Path = CAMVID,
            frames: Sequence[str] = PICTURE_FRAMES) -> None:
    """One row per frame: the image, the ground truth, then each configuration's prediction (its
    lowest seed), in CamVid's colours, with a legend of the classes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    configs = sorted(group_by_config(results), key=_table_order)
    shown = [(c, c.runs[0]) for c in configs if (c.runs[0].log_dir.parents[1] / PICTURES / 'masks').is_dir()]
    cols = 2 + len(shown)
    fig, axes = plt.subplots(len(frames), cols, figsize=(2.6 * cols, 2.1 * len(frames) + 0.8), squeeze=False)
    for row, frame in enumerate(frames):
        panels = [('frame', np.asarray(Image.open(root / 'test' / f'{frame}.jpg').convert('RGB'))),
                  ('ground truth', colourize(np.asarray(Image.open(root / 'testannot' / f'{frame}.png'))))]
        for c, r in shown:
            mask = r.log_dir.parents[1] / PICTURES / 'masks' / f'{frame}.png'
            panels.append((f'{c.label} @ {c.images_per_device}' + (f' (seed {r.seed})' if len(c.runs) > 1 else ''),
                           colourize(np.asarray(Image.open(mask)))))
        for col, (title, img) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][0].set_ylabel(frame, fontsize=7)
    names = class_names(root)
    fig.legend(handles=[Patch(color=CAMVID_COLOURS[i] / 255, label=n) for i, n in enumerate(names)],
               loc='lower center', ncol=min(len(names), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', type=Path, help='run folders or their archived logs')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results/camvid'),
                        help='output stem: writes STEM.md, STEM.png and STEM_pictures.png')
    parser.add_argument('--root', type=Path, default=CAMVID, help='the CamVid folder (for class names and the picture)')
    parser.add_argument('--readme', type=Path, default=None, help="also put them between this README's markers")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs if r.is_dir()]
    results = [read_camvid_run(r) for r in runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables = markdown_tables(results, class_names(args.root))
    stem = args.out
    stem.with_suffix('.md').write_text(tables)
    plot(results, stem.with_suffix('.png'))
    pictures = stem.with_name(stem.name + '_pictures.png')
    picture(results, pictures, args.root)
    print(tables, end='')
    print(f'wrote {stem.with_suffix(".md")}, {stem.with_suffix(".png")} and {pictures}')
    if args.readme:
        rel = lambda p: os.path.relpath(p.resolve(), args.readme.resolve().parent)  # noqa: E731
        update_readme(args.readme, f'{tables}\n![test mIoU against images per device]({rel(stem.with_suffix(".png"))})\n\n'
                                   f'![test frames, ground truth and predictions]({rel(pictures)})\n',
                      README_START, README_END)
        print(f'updated {args.readme}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
