"""The micro-batch reproduction table and plot, read from the runs' own logs.

Each run is a ``zoo-train`` output folder (``runs/cifar10/<name>``) with LightningCLI's
``logs/version_*/config.yaml`` and the CSVLogger's ``metrics.csv``. From them this script takes
the model (its normalization), the images per device (``data.init_args.batch_size``), the
emulated or real device count and the final test top-1 (``test/top1``, logged by
``--test_after_fit``), and writes a markdown table and a plot of test accuracy against images per
device, one line per architecture and normalization (like Figure 1 of the BCN paper).

    python benchmarks/cifar_results.py runs/cifar10/* --out benchmarks/results/cifar10_microbatch
"""
import argparse
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.hub.registry import cifar10_tag, shipped_weights  # noqa: E402

NORM_LABELS = {
    'wsbcn': 'WS+BCN', 'bcn': 'BCN', 'wsgn': 'WS+GN', 'gn': 'GN', 'bgn': 'BGN', 'wsbgn': 'WS+BGN',
    'wsbn': 'WS+BN', '': 'BN',
}


@dataclass
class RunResult:
    run: str
    model: str
    norm: str
    images_per_device: int
    devices: int
    epochs: Optional[int]
    test_top1: float
    log_dir: Path  # the logs/version_* folder the test result comes from
    test_step: int  # the global step the test ran at (publishing checks the checkpoint against it)


def norm_of(model_name: str) -> str:
    """Normalization label from a zoo model name (``resnet20_wsbcn`` -> ``WS+BCN``)."""
    arch, _, suffix = model_name.partition('_')
    return NORM_LABELS.get(suffix, suffix.upper())


def _versions(run_dir: Path) -> List[Path]:
    return sorted(run_dir.glob('**/version_*'), key=lambda p: int(p.name.split('_')[-1]))


def _last_test_top1(metrics_csv: Path) -> Optional[Tuple[float, int]]:
    """The last logged ``test/top1`` and its step, or None."""
    found = None
    with open(metrics_csv, newline='') as f:
        for row in csv.DictReader(f):
            if row.get('test/top1'):
                found = float(row['test/top1']), int(row['step'])
    return found


def read_run(run_dir: Path) -> RunResult:
    """The final test top-1 of a run (its newest log version that has one) and its settings."""
    versions = _versions(run_dir)
    if not versions:
        raise FileNotFoundError(f'{run_dir}: no logs/version_* folder (is it a zoo-train run folder?)')
    for version in reversed(versions):
        metrics, config = version / 'metrics.csv', version / 'config.yaml'
        if metrics.is_file() and config.is_file():
            test = _last_test_top1(metrics)
            if test is not None:
                cfg = yaml.safe_load(config.read_text())
                model = cfg['model']['init_args']['model_name']
                data = cfg['data']['init_args']
                devices = data.get('virtual_devices') or cfg['trainer'].get('devices') or 1
                return RunResult(
                    run=run_dir.name, model=model, norm=norm_of(model), images_per_device=int(data['batch_size']),
                    devices=int(devices) if str(devices).isdigit() else 1,
                    epochs=cfg['trainer'].get('max_epochs'), test_top1=100 * test[0], log_dir=version,
                    test_step=test[1])
    raise ValueError(f'{run_dir}: no test/top1 in any metrics.csv: did the run finish (test_after_fit)?')


def tag_for(model: str, norm: str, images_per_device: int) -> str:
    """The pretrained tag a run's weights are published under (the registry's rule,
    :func:`zoo.hub.registry.cifar10_tag`; ``norm`` is the one the model name implies)."""
    return cifar10_tag(model, images_per_device)


def shipped_tag(r: RunResult) -> str:
    """The tag, if its weights are shipped in ``zoo/pretrained`` (else '-')."""
    tag = tag_for(r.model, r.norm, r.images_per_device)
    return tag if shipped_weights(tag) else '-'


def baseline_of(results: Sequence[RunResult], arch: str) -> Optional[RunResult]:
    """The large-batch BN run of an architecture (BN at the most images per device), if any."""
    bn = [r for r in results if r.norm == 'BN' and r.model.partition('_')[0] == arch]
    return max(bn, key=lambda r: r.images_per_device) if bn else None


def markdown_table(results: Sequence[RunResult]) -> str:
    lines = ['| run | model | norm | images / device | devices | epochs | test top-1 (%) | vs. large-batch BN | weights |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in sorted(results, key=lambda r: (r.model.partition('_')[0], r.norm != 'BN', -r.images_per_device, r.norm)):
        base = baseline_of(results, r.model.partition('_')[0])
        if base is None or base is r:
            gap = '(baseline)' if base is r else '-'
        else:
            gap = f'{r.test_top1 - base.test_top1:+.2f}'
        lines.append(f'| {r.run} | {r.model} | {r.norm} | {r.images_per_device} | {r.devices} | {r.epochs} | '
                     f'{r.test_top1:.2f} | {gap} | {shipped_tag(r)} |')
    return '\n'.join(lines) + '\n'


README_START, README_END = '<!-- cifar10-results:start -->', '<!-- cifar10-results:end -->'


def update_readme(readme: Path, block: str) -> None:
    """Replace what lies between the README's result markers with ``block``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f'{readme}: add the markers {README_START} and {README_END} where the table goes')
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f'{head}{README_START}\n{block.strip()}\n{README_END}{tail}')


def plot(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = sorted({(r.model.partition('_')[0], r.norm) for r in results})
    for arch, norm in lines:  # one line per architecture and normalization
        points = sorted((r.images_per_device, r.test_top1) for r in results
                        if r.norm == norm and r.model.partition('_')[0] == arch)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker='o', label=f'{arch} {norm}')
    for arch in sorted({r.model.partition('_')[0] for r in results}):
        base = baseline_of(results, arch)
        if base is not None:  # the large-batch BN result as a reference line
            ax.axhline(base.test_top1, color='gray', linestyle='--', linewidth=1)
            ax.annotate(f'{arch} BN @ {base.images_per_device}', (1, base.test_top1), xycoords=('axes fraction', 'data'),
                        ha='right', va='bottom', fontsize=8, color='gray')
    ax.set_xscale('log', base=2)
    ax.margins(x=0.15)
    sizes = sorted({r.images_per_device for r in results})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel('images per device')
    ax.set_ylabel('CIFAR-10 test top-1 (%)')
    ax.set_title('Test accuracy vs. images per device')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', type=Path, help='zoo-train run folders')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results/cifar10_microbatch'),
                        help='output stem: writes STEM.md and STEM.png')
    parser.add_argument('--readme', type=Path, default=None,
                        help='also put the table and plot into this README, between its cifar10-results markers')
    args = parser.parse_args(argv)
    results = [read_run(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    args.out.with_suffix('.md').write_text(table)
    plot(results, args.out.with_suffix('.png'))
    print(table, end='')
    print(f'wrote {args.out.with_suffix(".md")} and {args.out.with_suffix(".png")}')
    if args.readme:
        png = os.path.relpath(args.out.with_suffix('.png').resolve(), args.readme.resolve().parent)
        update_readme(args.readme, f'{table}\n![test accuracy against images per device]({png})\n')
        print(f'updated {args.readme}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
