"""Before / after table of eval folding, from ``bench_norms.py`` reports of the two code versions.

Each setting was measured twice with the same script, in one run each: ``before_<setting>.json``
with the zoo before eval folding, ``after_<setting>.json`` with it (each report records the zoo
folder and commit it measured). Where ``after2_<setting>.json`` exists, a later version of folding
(less per-layer bookkeeping) was measured again, in a longer run (more repetitions). Prints a
markdown table of ``resnet50_wsbcn``'s eval throughput as a ratio to timm's ``resnet50`` (BN) in both, next to the exported model and WS+GN of the
after run, and the training-step ratio where the setting timed training.

    python benchmarks/eval_folding_summary.py benchmarks/results/eval_folding
"""
import argparse
import json
from pathlib import Path

MODEL = 'resnet50_wsbcn'
SETTINGS = ('b8_128', 'b1_224', 'b1_800x1333', 'b2_800x1333', 'b8_128_2threads', 'b1_224_2threads')


def _ratio(report: dict, model: str, kind: str = 'infer') -> str:
    row = report['results'].get(model, {}).get(kind)
    if not row:
        return '-'
    low, high = row['ratio_range']
    return f'{row["ratio_vs_bn"]:.2f} [{low:.2f}-{high:.2f}]'


def summary(folder: Path) -> str:
    lines = ['| setting | eval before | eval after | exported (after run) | WS+GN (after run) | eval after2 | exported (after2 run) | train step before / after |',
             '|---|---|---|---|---|---|---|---|']
    commits = set()
    for setting in SETTINGS:
        before_path, after_path = folder / f'before_{setting}.json', folder / f'after_{setting}.json'
        if not (before_path.is_file() and after_path.is_file()):
            continue
        before, after = (json.loads(p.read_text()) for p in (before_path, after_path))
        commits.add(('before', before['environment'].get('zoo_commit')))
        commits.add(('after', after['environment'].get('zoo_commit')))
        after2_path = folder / f'after2_{setting}.json'
        after2 = json.loads(after2_path.read_text()) if after2_path.is_file() else None
        if after2:
            commits.add(('after2', after2['environment'].get('zoo_commit')))
            later = f'{_ratio(after2, MODEL)} | {_ratio(after2, MODEL + ":export")}'
        else:
            later = '- | -'
        s = after['settings']
        height, width = s['img_size']
        size = f'{height} px' if height == width else f'{height}x{width} px'
        train = (f'{_ratio(before, MODEL, "train")} / {_ratio(after, MODEL, "train")}'
                 if 'train' in after['results'].get(MODEL, {}) else '-')
        lines.append(f'| batch {s["batch_size"]}, {size}, {after["environment"]["threads"]} thread(s) | '
                     f'{_ratio(before, MODEL)} | {_ratio(after, MODEL)} | {_ratio(after, MODEL + ":export")} | '
                     f'{_ratio(after, "resnet50_wsgn")} | {later} | {train} |')
    versions = ', '.join(f'{run}: zoo {", ".join(sorted(c for r, c in commits if r == run))}'
                         for run in ('before', 'after', 'after2') if any(r == run for r, _ in commits))
    return '\n'.join(lines) + f'\n\n{MODEL} throughput / timm resnet50 (BN) throughput, median [range over repetitions] ({versions}).\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', type=Path, nargs='?', default=Path('benchmarks/results/eval_folding'))
    args = parser.parse_args(argv)
    text = summary(args.folder)
    (args.folder / 'summary.md').write_text(text)
    print(text, end='')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
