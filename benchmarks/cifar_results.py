"""The micro-batch reproduction table and plot, read from the runs' own logs.

Each run is a ``zoo-train`` output folder (``runs/cifar10/<name>``) with LightningCLI's
``logs/version_*/config.yaml`` and the CSVLogger's ``metrics.csv``. From them this script takes
the model (its normalization), the images per device (``data.init_args.batch_size``), the
emulated or real device count and the final test top-1 (``test/top1``, logged by
``--test_after_fit``), and writes a markdown table and a plot of test accuracy against images per
device, one line per architecture and normalization (like Figure 1 of the BCN paper).

Runs of one configuration with different seeds (``benchmarks/cifar_runs.py --seeds``) are one row:
the mean ± sample standard deviation of their test top-1, with each seed's result; the plot shows
the mean with an error bar of one standard deviation and each seed as a faint point. Where a
configuration and its large-batch BN baseline both have several seeds, the gap carries its standard
error and the p-value of Welch's t-test (:func:`welch_test`). Runs are the
same configuration when every setting both logged configs have agrees, apart from the seed, the
run folder's paths and settings that do not change the result (:data:`NOT_THE_SETUP`); settings
only one of them logs (options added to the zoo after the older run) are not compared.

    python benchmarks/cifar_results.py runs/cifar10/* --out benchmarks/results/cifar10_microbatch
"""
import argparse
import csv
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from zoo.hub.registry import ENTRIES, cifar10_tag, shipped_weights

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
    seed: Optional[int] = None  # seed_everything (it also seeds the data order and augmentation)
    groups: Optional[int] = None  # norm groups set in model_kwargs.norm_groups (None: the model's default)
    settings: Dict[str, Any] = field(default_factory=dict, repr=False)  # the logged config, flattened

    @property
    def label(self) -> str:
        """The normalization, with its groups when the config sets them (``BGN (G=1)``)."""
        return self.norm if self.groups is None else f'{self.norm} (G={self.groups})'


def norm_of(model_name: str) -> str:
    """Normalization label from a zoo model name (``resnet20_wsbcn`` -> ``WS+BCN``)."""
    arch, _, suffix = model_name.partition('_')
    return NORM_LABELS.get(suffix, suffix.upper())


# Logged settings that do not change what a run computes (or name its folder, which is handled apart).
NOT_THE_SETUP = frozenset({
    'seed_everything', 'ckpt_path', 'trainer.enable_progress_bar', 'data.init_args.num_workers',
    'data.init_args.data_path', 'data.init_args.cache_dir', 'data.init_args.pin_memory'})


def _flatten(cfg: Any, prefix: str = '') -> Dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix.rstrip('.'): cfg}
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flatten(v, f'{prefix}{k}.'))
    return out


def _setup_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The flattened config that defines the experiment: without :data:`NOT_THE_SETUP`, and with
    the run folder (``trainer.default_root_dir``) written as ``<run>`` wherever a path names it."""
    root = str((cfg.get('trainer') or {}).get('default_root_dir') or '')

    def unrooted(v):
        if isinstance(v, list):
            return [unrooted(x) for x in v]
        if isinstance(v, dict):
            return {k: unrooted(x) for k, x in v.items()}
        if root and isinstance(v, str) and (v == root or v.startswith(root + '/')):
            return '<run>' + v[len(root):]
        return v
    return {k: unrooted(v) for k, v in _flatten(cfg).items() if k not in NOT_THE_SETUP}


def setup_differences(a: RunResult, b: RunResult) -> List[str]:
    """The settings that both runs log with different values (empty: the same configuration). A
    setting that is a value in one run and a section in the other (``model_kwargs: null`` against
    ``model_kwargs: {norm_groups: 1}``) differs too."""
    differ = {k for k in set(a.settings) & set(b.settings) if a.settings[k] != b.settings[k]}
    for one, other in ((a.settings, b.settings), (b.settings, a.settings)):
        differ |= {k for k in set(one) - set(other) if any(o.startswith(k + '.') for o in other)}
    return sorted(differ)


def _seed_of(cfg: Dict[str, Any]) -> Optional[int]:
    seed = cfg.get('seed_everything')
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _versions(run_dir: Path) -> List[Path]:
    return sorted(run_dir.glob('**/version_*'), key=lambda p: int(p.name.split('_')[-1]))


def _last_test_top1(metrics_csv: Path, metric: str = 'test/top1') -> Optional[Tuple[float, int]]:
    """The last logged ``metric`` (default ``test/top1``) and its step, or None."""
    found = None
    with open(metrics_csv, newline='') as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                found = float(row[metric]), int(row['step'])
    return found


def _run_result(run: str, cfg: Dict[str, Any], test_top1: float, log_dir: Path, test_step: int) -> RunResult:
    model = cfg['model']['init_args']['model_name']
    data = cfg['data']['init_args']
    devices = data.get('virtual_devices') or cfg['trainer'].get('devices') or 1
    groups = (cfg['model']['init_args'].get('model_kwargs') or {}).get('norm_groups')
    return RunResult(
        run=run, model=model, norm=norm_of(model), images_per_device=int(data['batch_size']),
        devices=int(devices) if str(devices).isdigit() else 1, epochs=cfg['trainer'].get('max_epochs'),
        test_top1=100 * test_top1, log_dir=log_dir, test_step=test_step, seed=_seed_of(cfg),
        groups=None if groups is None else int(groups), settings=_setup_settings(cfg))


CARD = 'README.md'


def read_card_run(folder: Path) -> RunResult:
    """The run behind a published weights folder (``zoo/pretrained/<tag>``), from its model card: the
    run's logged config (*Training config*) and its test top-1 (*Metrics of the run*), both written by
    ``hub_upload.py`` from the run's own logs. For runs whose log folders are gone (they lived on a
    machine of an earlier session); ``test_step`` is unknown (-1), so such a run cannot be published."""
    text = (folder / CARD).read_text()
    config = re.search(r'## Training config\n```yaml\n(.*?)\n```', text, re.S)
    top1 = re.search(r'^\| test/top1 \| ([0-9.]+) \|$', text, re.M)
    if not config or not top1:
        raise ValueError(f'{folder / CARD}: no training config or test/top1 of the run in the model card')
    cfg = yaml.safe_load(config.group(1))
    run = Path(cfg['trainer']['default_root_dir']).name
    return _run_result(run, cfg, float(top1.group(1)), folder / CARD, -1)


def read_run(run_dir: Path, metric: str = 'test/top1') -> RunResult:
    """The final test top-1 (or another test ``metric``, e.g. ``test/miou``, kept in ``test_top1``
    as a percentage) of a run, from its newest log version that has one, and its settings; a
    published weights folder is read from its model card (:func:`read_card_run`)."""
    if (run_dir / CARD).is_file() and not (run_dir / 'logs').is_dir():
        return read_card_run(run_dir)
    versions = _versions(run_dir)
    if not versions:
        raise FileNotFoundError(f'{run_dir}: no logs/version_* folder (is it a zoo-train run folder?)')
    for version in reversed(versions):
        metrics, config = version / 'metrics.csv', version / 'config.yaml'
        if metrics.is_file() and config.is_file():
            test = _last_test_top1(metrics, metric)
            if test is not None:
                return _run_result(run_dir.name, yaml.safe_load(config.read_text()), test[0], version, test[1])
    raise ValueError(f'{run_dir}: no {metric} in any metrics.csv: did the run finish (test_after_fit)?')


def prefer_logs(results: Sequence[RunResult]) -> List[RunResult]:
    """One result per run: where a run is given both as its logs and as its published card, the logs."""
    kept: Dict[str, RunResult] = {}
    for r in results:
        if r.run not in kept or kept[r.run].test_step == -1:
            kept[r.run] = r
    return list(kept.values())


def tag_for(model: str, norm: str, images_per_device: int) -> str:
    """The pretrained tag a run's weights are published under (the registry's rule,
    :func:`zoo.hub.registry.cifar10_tag`; ``norm`` is the one the model name implies)."""
    return cifar10_tag(model, images_per_device)


def shipped_tag(r: RunResult) -> str:
    """The tag, if its weights are shipped in ``zoo/pretrained`` and come from this run, else '-'.

    The registry's recipe names the config the weights were trained with, whose run folder is
    ``runs/cifar10/<config>``: other seeds (``<config>_seed1``) or variants of it (BGN with other
    groups) map to the same tag name but are not the shipped weights."""
    tag = tag_for(r.model, r.norm, r.images_per_device)
    return tag if shipped_weights(tag) and credits_run(tag, r.run) else '-'


def recipe_of(tag: str) -> Optional[str]:
    """The recipe of ``tag``'s registry entry (shipped yet or not), or None when it has none."""
    return next((e.recipe for e in ENTRIES if e.name == tag), None)


def credits_run(tag: str, run: str) -> Optional[bool]:
    """Whether the registry's recipe for ``tag`` is the run folder ``run`` (``runs/cifar10/<config>``
    of the config it names); None when ``tag`` has no registry entry."""
    recipe = recipe_of(tag)
    return None if recipe is None else f'configs/cifar10/{run}.yaml' in recipe


@dataclass
class ConfigResult:
    """The runs of one configuration, one per seed (ordered by seed)."""
    runs: List[RunResult]

    # What the table shows of a configuration: the same in each of its runs.
    model = property(lambda self: self.runs[0].model)
    norm = property(lambda self: self.runs[0].norm)
    label = property(lambda self: self.runs[0].label)
    images_per_device = property(lambda self: self.runs[0].images_per_device)
    devices = property(lambda self: self.runs[0].devices)
    epochs = property(lambda self: self.runs[0].epochs)

    @property
    def arch(self) -> str:
        return self.model.partition('_')[0]

    @property
    def top1s(self) -> List[float]:
        return [r.test_top1 for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.mean(self.top1s)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1) over the seeds; 0 for a single run."""
        return statistics.stdev(self.top1s) if len(self.runs) > 1 else 0.

    @property
    def weights(self) -> str:
        """The shipped tag and, for several seeds, which seed it is."""
        shipped = [(r, shipped_tag(r)) for r in self.runs if shipped_tag(r) != '-']
        if not shipped:
            return '-'
        return ', '.join(tag if len(self.runs) == 1 else f'{tag} (seed {r.seed})' for r, tag in shipped)


def _seed_order(r: RunResult) -> Tuple[bool, int, str]:
    return r.seed is None, r.seed or 0, r.run


def group_by_config(results: Sequence[RunResult]) -> List[ConfigResult]:
    """One :class:`ConfigResult` per configuration: runs that differ only in their seed (and folder)."""
    groups: List[List[RunResult]] = []
    for r in sorted(results, key=lambda r: r.run):
        shown = (r.model, r.label, r.images_per_device, r.devices, r.epochs)
        group = next((g for g in groups if all(
            (o.model, o.label, o.images_per_device, o.devices, o.epochs) == shown and not setup_differences(o, r)
            for o in g)), None)
        if group is None:
            groups.append([r])
            continue
        twin = next((o for o in group if o.seed == r.seed), None)
        if twin is not None:
            raise ValueError(f'{twin.log_dir} and {r.log_dir}: the same configuration with the same seed '
                             f'({r.seed}); pass only one of these runs')
        group.append(r)
    return [ConfigResult(sorted(g, key=_seed_order)) for g in groups]


def baseline_of(configs: Sequence[ConfigResult], arch: str) -> Optional[ConfigResult]:
    """The large-batch BN configuration of an architecture (BN at the most images per device), if any."""
    bn = [c for c in configs if c.norm == 'BN' and c.arch == arch]
    return max(bn, key=lambda c: c.images_per_device) if bn else None


def _top1_cell(c: ConfigResult) -> str:
    if len(c.runs) == 1:
        return f'{c.mean:.2f}'
    seeds = ', '.join(str(r.seed) for r in c.runs)
    return f'{c.mean:.2f} ± {c.std:.2f} (seeds {seeds}: {", ".join(f"{t:.2f}" for t in c.top1s)})'


SEEDS_NOTE = ('With several seeds: mean ± sample standard deviation (n - 1) of the test top-1 over the seeds '
              'listed, each seed\'s result in brackets; *vs. large-batch BN* compares the means, ± the standard '
              'error of that difference where both sides have several seeds, and p, the two-sided p-value of '
              'Welch\'s t-test: how often seed-to-seed variation alone would give a gap at least that large.')


def _mean_variance(c: ConfigResult) -> float:
    """The variance of a configuration's mean over its seeds, ``s^2 / n``."""
    return c.std ** 2 / len(c.runs)


def difference_std_error(a: ConfigResult, b: ConfigResult) -> float:
    """Standard error of ``a.mean - b.mean`` from the two seed spreads: ``sqrt(sa^2 / na + sb^2 / nb)``.

    How many standard errors seed-to-seed variation alone can give depends on the seed counts:
    :func:`welch_test` turns the ratio into a p-value.
    """
    return (_mean_variance(a) + _mean_variance(b)) ** 0.5


def student_t_two_sided_p(t: float, df: float, intervals: int = 2000) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom (a real number, as Welch's are).

    The standard library has no incomplete beta function, so the density is integrated. With
    ``t = sqrt(df) tan(phi)`` it becomes ``c * cos(phi)^(df - 1)`` on ``[0, pi/2)``, bounded and smooth
    for ``df >= 1`` (Welch's df is at least the smaller seed count minus one), where Simpson's rule is
    accurate to far below the two decimals the table shows.
    """
    if df < 1:
        raise ValueError(f'student_t_two_sided_p: df must be at least 1, got {df}')
    phi_t = math.atan(abs(t) / math.sqrt(df))
    c = 2 * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    h = phi_t / intervals
    f = [math.cos(i * h) ** (df - 1) for i in range(intervals + 1)]
    inside = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return min(1., max(0., 1 - c * inside))


@dataclass(frozen=True)
class WelchTest:
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # two-sided


def welch_test(a: ConfigResult, b: ConfigResult) -> Optional[WelchTest]:
    """Welch's t-test (unequal variances) of ``a.mean - b.mean`` over the seeds: how often seed-to-seed
    variation alone gives a gap this large. None unless both have several seeds and some spread."""
    if len(a.runs) < 2 or len(b.runs) < 2:
        return None
    va, vb = _mean_variance(a), _mean_variance(b)
    if va + vb == 0:
        return None
    t = (a.mean - b.mean) / difference_std_error(a, b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a.runs) - 1) + vb ** 2 / (len(b.runs) - 1))
    return WelchTest(t, df, student_t_two_sided_p(t, df))


def _p_cell(p: float) -> str:
    return f'p = {p:.2f}' if p >= 0.01 else f'p = {p:.3f}' if p >= 0.001 else 'p < 0.001'


def gap_cell(c: ConfigResult, base: Optional[ConfigResult]) -> str:
    """``c``'s gap to the large-batch BN ``base``: the difference of means, ± its standard error and Welch's p
    where both have several seeds; ``(baseline)`` for the baseline itself, ``-`` without one."""
    if base is None or base is c:
        return '(baseline)' if base is c else '-'
    gap = f'{c.mean - base.mean:+.2f}'
    if len(c.runs) > 1 and len(base.runs) > 1:
        gap += f' ± {difference_std_error(c, base):.2f}'
        test = welch_test(c, base)
        if test is not None:
            gap += f' ({_p_cell(test.p)})'
    return gap


def _table_order(c: ConfigResult) -> Tuple[str, bool, int, str]:
    """By architecture; its BN first, then by images per device, largest first."""
    return c.arch, c.norm != 'BN', -c.images_per_device, c.label


def markdown_table(results: Sequence[RunResult]) -> str:
    configs = group_by_config(results)
    lines = ['| run | model | norm | images / device | devices | epochs | test top-1 (%) | vs. large-batch BN | weights |',
             '|---|---|---|---|---|---|---|---|---|']
    for c in sorted(configs, key=_table_order):
        gap = gap_cell(c, baseline_of(configs, c.arch))
        lines.append(f'| {", ".join(r.run for r in c.runs)} | {c.model} | {c.label} | {c.images_per_device} | '
                     f'{c.devices} | {c.epochs} | {_top1_cell(c)} | {gap} | {c.weights} |')
    if any(len(c.runs) > 1 for c in configs):
        lines += ['', SEEDS_NOTE]
    return '\n'.join(lines) + '\n'


README_START, README_END = '<!-- cifar10-results:start -->', '<!-- cifar10-results:end -->'


def update_readme(readme: Path, block: str, start: str = README_START, end: str = README_END) -> None:
    """Replace what lies between the README's result markers (``start``, ``end``) with ``block``."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f'{readme}: add the markers {start} and {end} where the table goes')
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f'{head}{start}\n{block.strip()}\n{end}{tail}')


def _plot_sizes(ax, configs: Sequence[ConfigResult], ylabel: str = 'CIFAR-10 test top-1 (%)') -> Dict[Tuple[str, str], Any]:
    """Test top-1 against images per device, one line per architecture and normalization; returns their colours."""
    colors = {}
    for arch, label in sorted({(c.arch, c.label) for c in configs}):
        line = sorted((c for c in configs if c.arch == arch and c.label == label), key=lambda c: c.images_per_device)
        xs = [c.images_per_device for c in line]
        bars = ax.errorbar(xs, [c.mean for c in line], yerr=[c.std for c in line], marker='o', capsize=3,
                           label=f'{arch} {label}')
        colors[arch, label] = bars[0].get_color()
        for c in line:  # each seed of a configuration with several, as a faint point
            if len(c.runs) > 1:
                ax.scatter([c.images_per_device] * len(c.runs), c.top1s, s=12, alpha=0.4, color=colors[arch, label],
                           zorder=3)
    for arch in sorted({c.arch for c in configs}):
        base = baseline_of(configs, arch)
        if base is not None:  # the large-batch BN result as a reference line (and its spread over seeds)
            ax.axhline(base.mean, color='gray', linestyle='--', linewidth=1)
            if len(base.runs) > 1:
                ax.axhspan(base.mean - base.std, base.mean + base.std, color='gray', alpha=0.15, linewidth=0)
            ax.annotate(f'{arch} BN @ {base.images_per_device}', (0.01, base.mean), xycoords=('axes fraction', 'data'),
                        ha='left', va='bottom', fontsize=8, color='gray')
    ax.set_xscale('log', base=2)
    ax.margins(x=0.15)
    sizes = sorted({c.images_per_device for c in configs})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel('images per device')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return colors


def _plot_seeds(ax, configs: Sequence[ConfigResult], colors: Dict[Tuple[str, str], Any]) -> None:
    """The configurations with several seeds side by side, at a scale where their spread shows: each
    seed a point (equal results side by side), the mean ± 1 std as a bar."""
    several = sorted((c for c in configs if len(c.runs) > 1), key=_table_order)
    for i, c in enumerate(several):
        color = colors[c.arch, c.label]
        offsets = [(k - (len(c.runs) - 1) / 2) * 0.12 for k in range(len(c.runs))]
        ax.scatter([i + o for o in offsets], c.top1s, s=22, color=color, alpha=0.7, zorder=3)
        ax.errorbar([i], [c.mean], yerr=[c.std], fmt='_', markersize=22, capsize=5, color=color, zorder=4)
        ax.annotate(f'{c.mean:.2f}', (i + 0.3, c.mean), va='center', fontsize=8, color=color)
    ax.set_xticks(range(len(several)), [f'{c.arch}\n{c.label} @ {c.images_per_device}' for c in several], fontsize=8)
    ax.set_xlim(-0.6, len(several) - 0.1)
    ax.set_title('configurations with several seeds', fontsize=10)
    ax.grid(True, axis='y', alpha=0.3)


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Test top-1 against images per device (like Figure 1 of the BCN paper); where some configurations
    have several seeds, a second panel shows just those, per seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    configs = group_by_config(results)
    several = any(len(c.runs) > 1 for c in configs)
    if several:
        fig, (ax, seeds_ax) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw=dict(width_ratios=(2.2, 1)))
    else:
        fig, ax = plt.subplots(figsize=(7, 5.2))
    colors = _plot_sizes(ax, configs)
    ax.set_title('Test accuracy vs. images per device' + ('\n(several seeds: mean ± 1 std, dots: each seed)'
                                                          if several else ''), fontsize=10)
    # below the axes: the points crowd at 1-2 images per device
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    if several:
        _plot_seeds(seeds_ax, configs, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', type=Path,
                        help='zoo-train run folders, their archived logs (benchmarks/results/cifar10_runs/*) or '
                             'published weights folders (zoo/pretrained/*.cifar10*, read from the model card)')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results/cifar10_microbatch'),
                        help='output stem: writes STEM.md and STEM.png')
    parser.add_argument('--readme', type=Path, default=None,
                        help='also put the table and plot into this README, between its cifar10-results markers')
    args = parser.parse_args(argv)
    unmatched = [r for r in args.runs if any(c in str(r) for c in '*?[') and not r.exists()]
    for r in unmatched:  # a shell glob that matched nothing (no archived runs yet, say)
        print(f'no folder matches {r}: skipped')
    results = prefer_logs([read_run(r) for r in args.runs if r not in unmatched])
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
