"""What WS+BCN training costs in memory and time: against BN, and against its own architecture with frozen norms.

One run measures, at the same images per device (default 1 and 2, and batch 8 for classification):

Classification (``--cls-model`` ``resnet50_wsbcn`` against timm's ``resnet50``, BN):

- ``bn``: timm ``resnet50`` (the reference);
- ``lean``: ``resnet50_wsbcn`` with the memory-lean path (the zoo's default);
- ``plain``: the same with the lean path off (``zoo.layers.set_memory_lean(False)``);
- ``checkpoint``: lean plus activation checkpointing of the backbone stages (``checkpoint_stages=True``);
- ``frozen``: the same architecture with every norm a frozen per-channel affine
  (``zoo.layers.frozen_affine.freeze_norms``; WS convs kept): what the normalization itself costs
  is the difference to it.

Detection (Mask R-CNN R-50-FPN, ``--det-model`` ``maskrcnn_resnet50_fpn_wsbcn``):

- ``bn``: torchvision's frozen-BN design (``tv_frozen_bn``, built as ``bench_detection.py`` builds it);
- ``lean``, ``plain``, ``frozen``: as above, for the zoo detector;
- ``checkpoint-heads``: lean plus checkpointing of the 4-conv box head and the mask head
  (``checkpoint_heads=True``);
- ``checkpoint``: that plus the backbone stages (``backbone_kwargs=dict(checkpoint_stages=True)``).

Stem and layer1 frozen in every detector (3 trainable stages), torchvision's default sampling; the
batch is real coco-mini train images with their boxes and masks, resized by the detector to
``--min-size`` / ``--max-size``.

Peak memory: live tensor bytes at the peak of one training step (forward, backward, SGD with
momentum), each configuration in a fresh process (``zoo.memory``: CPU, the allocator's events seen
by ``torch.profiler`` plus the tensors alive at the step's start; CUDA, ``max_memory_allocated``).
Step time: the configurations of one task and image count are interleaved (round-robin
repetitions; each keeps the median of ``--iters`` steps), and the table gives the median over
repetitions with, for ratios, the range of the per-repetition ratios (how noisy the machine was).
Ratios are step time and peak memory over the reference's (``vs BN``) and over the frozen-affine
configuration (``vs frozen``): above 1 costs more. A checkpointing configuration whose flag the zoo
does not have (or accepts but recomputes nothing in backward) is listed as unavailable.

Writes ``benchmarks/results/bench_memory_<device>.json`` and ``.md`` (``--quick``: ``..._quick``).

Usage (from the repository root)::

    python benchmarks/bench_memory.py                           # CPU: 128 px, 320 / 512 detection
    python benchmarks/bench_memory.py --tasks classify --img-size 224
    python benchmarks/bench_memory.py --device cuda --amp bf16  # GPU: 224 px, 800 / 1333 detection
    python benchmarks/bench_memory.py --quick                   # smoke run, tiny sizes
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_norms import environment  # noqa: E402
from zoo.memory import (MiB, TV_DETECTOR, OptionUnavailable, Setup, detection_data_available,  # noqa: E402
                        make_train_step, measure_setup)

REPO = Path(__file__).resolve().parents[1]
TASKS = ('classify', 'detect')
# (key, option) per task; 'bn' is the reference model, the rest the zoo model with that option.
CONFIGS = {
    'classify': (('bn', None), ('lean', 'lean'), ('plain', 'plain'), ('checkpoint', 'checkpoint'),
                 ('frozen', 'frozen')),
    'detect': (('bn', None), ('lean', 'lean'), ('plain', 'plain'), ('checkpoint-heads', 'checkpoint-heads'),
               ('checkpoint', 'checkpoint'), ('frozen', 'frozen')),
}
DESCRIPTIONS = {
    ('classify', 'lean'): 'lean', ('classify', 'plain'): 'plain (lean off)',
    ('classify', 'checkpoint'): 'lean + checkpoint_stages', ('classify', 'frozen'): 'frozen affine norms',
    ('detect', 'lean'): 'lean', ('detect', 'plain'): 'plain (lean off)',
    ('detect', 'checkpoint-heads'): 'lean + checkpoint_heads',
    ('detect', 'checkpoint'): 'lean + checkpoint_heads + checkpoint_stages',
    ('detect', 'frozen'): 'frozen affine norms',
}
DEVICE_DEFAULTS = {
    'cpu': dict(img_size=128, min_size=320, max_size=512, cls_images=[1, 2, 8], det_images=[1, 2]),
    'cuda': dict(img_size=224, min_size=800, max_size=1333, cls_images=[1, 2, 8], det_images=[1, 2]),
}
QUICK = dict(img_size=64, min_size=160, max_size=256, cls_images=[1, 2], det_images=[1], reps=1, iters=1)
TASK_DEFAULTS = {'classify': dict(reps=5, iters=2, warmup=2), 'detect': dict(reps=3, iters=1, warmup=1)}
# The goals: (task, images, config, against, what, at most).
GOALS = (
    ('classify', 8, 'lean', 'bn', 'memory', 1.00), ('classify', 8, 'lean', 'bn', 'time', 1.10),
    ('classify', 2, 'lean', 'bn', 'memory', 1.00), ('classify', 2, 'lean', 'bn', 'time', 1.10),
    ('detect', 1, 'lean', 'frozen', 'time', 1.10), ('detect', 2, 'lean', 'frozen', 'time', 1.10),
    ('detect', 1, 'checkpoint-heads', 'bn', 'memory', 1.30), ('detect', 2, 'checkpoint-heads', 'bn', 'memory', 1.30),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--tasks', nargs='+', choices=TASKS, default=list(TASKS))
    p.add_argument('--cls-model', default='resnet50_wsbcn')
    p.add_argument('--cls-baseline', default='resnet50', help='the BN reference classifier')
    p.add_argument('--det-model', default='maskrcnn_resnet50_fpn_wsbcn')
    p.add_argument('--det-baseline', default=TV_DETECTOR,
                   help=f'the reference detector ({TV_DETECTOR}: torchvision\'s frozen-BN R-50-FPN; '
                        f'{TV_DETECTOR}_resnet18 etc.)')
    p.add_argument('--cls-images', type=int, nargs='+', help='classification images per device (default 1 2 8)')
    p.add_argument('--det-images', type=int, nargs='+', help='detection images per device (default 1 2)')
    p.add_argument('--img-size', type=int, nargs='+', help='classification SIZE or HEIGHT WIDTH (CPU 128, CUDA 224)')
    p.add_argument('--min-size', type=int, help='detection shorter side (CPU 320, CUDA 800)')
    p.add_argument('--max-size', type=int, help='detection longer side at most (CPU 512, CUDA 1333)')
    p.add_argument('--reps', type=int, help='round-robin repetitions (classification 5, detection 3)')
    p.add_argument('--iters', type=int, help='timed steps per configuration and repetition (classification 2, '
                   'detection 1)')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none', help='autocast dtype (default none)')
    p.add_argument('--threads', type=int, help='torch threads (default: torch default)')
    p.add_argument('--data', help='coco-mini root (default ../shared/data/coco-mini)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory processes')
    p.add_argument('--no-timing', action='store_true', help='skip the timing')
    p.add_argument('--quick', action='store_true', help='smoke run: 64 px, 160 / 256 detection, images 1 2 '
                   '(detection 1), one repetition of one step; writes ..._quick.{json,md}')
    p.add_argument('--out', type=Path, help='JSON path (default benchmarks/results/bench_memory_<device>[_quick].json)')
    p.add_argument('--render', type=Path, help='only rewrite the markdown of this JSON report (no measuring)')
    args = p.parse_args(argv)
    defaults = dict(DEVICE_DEFAULTS['cuda' if args.device.startswith('cuda') else 'cpu'])
    if args.quick:
        defaults.update(QUICK)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    size = args.img_size if isinstance(args.img_size, list) else [args.img_size]
    if len(size) > 2:
        p.error('--img-size takes SIZE or HEIGHT WIDTH')
    args.img_size = (size[0], size[-1])
    if args.out is None:
        device = args.device.split(':')[0]
        args.out = REPO / 'benchmarks' / 'results' / f'bench_memory_{device}{"_quick" if args.quick else ""}.json'
    return args


def task_setting(args, task, name):
    """``--reps`` / ``--iters`` when given, else the task's default."""
    value = getattr(args, name, None)
    return value if value is not None else TASK_DEFAULTS[task][name]


def setups(args, task):
    """``{key: Setup}`` of the task's configurations, in table order."""
    common = dict(task=task, device=args.device, amp=None if args.amp == 'none' else args.amp, data=args.data)
    if task == 'classify':
        common.update(img_size=args.img_size)
        base, model = args.cls_baseline, args.cls_model
    else:
        common.update(min_size=args.min_size, max_size=args.max_size, trainable_backbone_layers=3, num_classes=91)
        base, model = args.det_baseline, args.det_model
    return {key: Setup(model=base if key == 'bn' else model, option=option, **common)
            for key, option in CONFIGS[task]}


def images_of(args, task):
    return args.cls_images if task == 'classify' else args.det_images


def label(task, key, setup):
    if key == 'bn':
        return f'{setup.model} ({"BN" if task == "classify" else "torchvision, frozen BN"}; reference)'
    return f'{setup.model} {DESCRIPTIONS[task, key]}'


def measure_memory(args):
    """``{task: {images: {key: result dict}}}``, each configuration in a fresh process."""
    out = {}
    for task in args.tasks:
        out[task] = {}
        for images in images_of(args, task):
            out[task][images] = {}
            for key, setup in setups(args, task).items():
                start = time.time()
                try:
                    r = measure_setup(setup, images, fresh_process=True, warmup=TASK_DEFAULTS[task]['warmup'],
                                      threads=args.threads)
                    msg = f'{r["peak_bytes"] / MiB:,.0f} MiB' + ('' if r['loss_finite'] else ' (loss not finite!)')
                except OptionUnavailable as e:
                    r = {'unavailable': str(e)}
                    msg = f'unavailable: {e}'
                out[task][images][key] = r
                print(f'  peak memory {task} {label(task, key, setup)} at {images} image(s): {msg} '
                      f'({time.time() - start:.0f} s)', flush=True)
    return out


def measure_time(args):
    """``{task: {images: {key: [median seconds per repetition] or {'unavailable': why}}}}``, round-robin."""
    from tqdm import tqdm
    out = {}
    for task in args.tasks:
        out[task] = {}
        reps, iters = task_setting(args, task, 'reps'), task_setting(args, task, 'iters')
        for images in images_of(args, task):
            steps, row = {}, {}
            for key, setup in setups(args, task).items():
                try:
                    steps[key] = make_train_step(setup, images, verify=True)  # its first step: a warm-up
                except OptionUnavailable as e:
                    row[key] = {'unavailable': str(e)}
                    print(f'  timing {task} {label(task, key, setup)}: unavailable: {e}', flush=True)
            for step in steps.values():  # second warm-up: the verify step ran with a global hook
                step()
            times = {key: [] for key in steps}
            for _ in tqdm(range(reps), desc=f'{task}, {images} image(s): round-robin repetitions'):
                for key, step in steps.items():
                    times[key].append(step.timed(iters))
            row.update(times)
            out[task][images] = row
            del steps
            gc.collect()
    return out


def _ratio(values, base):
    """Median ratio and [min, max] of the per-repetition ratios of two timing lists."""
    per_rep = [a / b for a, b in zip(values, base)]
    return statistics.median(values) / statistics.median(base), [min(per_rep), max(per_rep)]


def summarize(args, memory, times):
    """``{task: {images: {key: row}}}`` with seconds, peak bytes and ratios vs ``bn`` and vs ``frozen``."""
    results = {}
    for task in args.tasks:
        results[task] = {}
        task_setups = setups(args, task)
        for images in images_of(args, task):
            mem = (memory or {}).get(task, {}).get(images, {})
            tim = (times or {}).get(task, {}).get(images, {})
            rows = {}
            for key, setup in task_setups.items():
                row = {'label': label(task, key, setup), 'model': setup.model, 'option': setup.option}
                m, t = mem.get(key), tim.get(key)
                for part in (m, t):
                    if isinstance(part, dict) and 'unavailable' in part:
                        row['unavailable'] = part['unavailable']
                if isinstance(t, list):
                    row['seconds_reps'] = t
                    row['seconds'] = statistics.median(t)
                    for ref in ('bn', 'frozen'):
                        if ref != key and isinstance(tim.get(ref), list):
                            row[f'time_vs_{ref}'], row[f'time_vs_{ref}_range'] = _ratio(t, tim[ref])
                if isinstance(m, dict) and 'peak_bytes' in m:
                    row['memory'] = m
                    row['peak_bytes'] = m['peak_bytes']
                    for ref in ('bn', 'frozen'):
                        if ref != key and isinstance(mem.get(ref), dict) and 'peak_bytes' in mem[ref]:
                            row[f'memory_vs_{ref}'] = m['peak_bytes'] / mem[ref]['peak_bytes']
                rows[key] = row
            results[task][str(images)] = rows
    return results


def check_goals(results):
    """The issue's goals that this run measured: one dict per goal, with the measured ratio and verdict."""
    out = []
    for task, images, key, ref, what, limit in GOALS:
        row = results.get(task, {}).get(str(images), {}).get(key)
        value = row.get(f'{what}_vs_{ref}') if row else None
        if value is None:
            continue
        out.append({'task': task, 'images': images, 'config': key, 'against': ref, 'what': what, 'limit': limit,
                    'ratio': value, 'met': value <= limit, 'label': row['label']})
    return out


def _fmt_ratio(row, what, ref):
    value = row.get(f'{what}_vs_{ref}')
    if value is None:
        return '-'
    rng = row.get(f'{what}_vs_{ref}_range')
    return f'{value:.2f}' + (f' [{rng[0]:.2f}-{rng[1]:.2f}]' if rng else '')


def markdown(report):
    s, env = report['settings'], report['environment']
    lines = []
    titles = {'classify': 'Classification', 'detect': 'Detection (Mask R-CNN)'}
    for task, per_images in report['results'].items():
        if task == 'classify':
            h, w = s['img_size']
            size = f'{h} px' if h == w else f'{h}x{w} px'
        else:
            size = f'{s.get("detection_data", "real coco-mini images")} resized to {s["min_size"]} / {s["max_size"]}'
        reps, iters = s.get('reps') or TASK_DEFAULTS[task]['reps'], s.get('iters') or TASK_DEFAULTS[task]['iters']
        lines += [f'**{titles[task]}**: training step (forward, backward, SGD with momentum) on {s["device"]} '
                  f'({env["device_name"]}, {env["threads"]} threads), {size}, amp {s["amp"]}, torch {env["torch"]}. '
                  f'Step time: median of {reps} round-robin repetitions of {iters} step(s) each; ratios are time '
                  f'and peak memory over the reference\'s (vs BN) and over the frozen-affine architecture\'s '
                  f'(vs frozen), at the same images per device (above 1: costs more), [range of per-repetition '
                  f'ratios].', '',
                  '| configuration | images / device | step (s) | time vs BN | time vs frozen | peak MiB | '
                  'memory vs BN | memory vs frozen |',
                  '|---|---|---|---|---|---|---|---|']
        for images, rows in per_images.items():
            for key, row in rows.items():
                if 'unavailable' in row and 'seconds' not in row and 'peak_bytes' not in row:
                    lines.append(f'| {row["label"]} | {images} | unavailable: {row["unavailable"]} | - | - | - | - | - |')
                    continue
                seconds = f'{row["seconds"]:.3g}' if 'seconds' in row else '-'
                peak = f'{row["peak_bytes"] / MiB:,.0f}' if 'peak_bytes' in row else '-'
                if 'memory' in row and not row['memory'].get('loss_finite', True):
                    peak += ' (loss not finite)'
                lines.append(f'| {row["label"]} | {images} | {seconds} | {_fmt_ratio(row, "time", "bn")} | '
                             f'{_fmt_ratio(row, "time", "frozen")} | {peak} | {_fmt_ratio(row, "memory", "bn")} | '
                             f'{_fmt_ratio(row, "memory", "frozen")} |')
        lines.append('')
    if report.get('goals'):
        lines.append('Goals (ratios of this run):')
        for g in report['goals']:
            what = 'peak memory' if g['what'] == 'memory' else 'step time'
            ref = 'the reference (BN)' if g['against'] == 'bn' else 'the frozen-affine architecture'
            lines.append(f'- {titles[g["task"]]}, {g["images"]} image(s) / device, {g["label"]}: {what} '
                         f'{g["ratio"]:.3f}x {ref} (goal <= {g["limit"]:.2f}): **{"met" if g["met"] else "missed"}**')
    return '\n'.join(lines).rstrip() + '\n'


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    md = markdown(report)
    path.with_suffix('.md').write_text(md)
    return md


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        print(render(args.render))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.detection_data = 'real coco-mini train images'
    if 'detect' in args.tasks and not detection_data_available(args.data):
        args.detection_data = 'random images with box masks (no coco-mini found)'
        print('coco-mini (or lightning_modules) not found: detection uses random images with boxes and masks',
              flush=True)
    torch.manual_seed(0)
    env = environment(args)
    start = time.time()
    memory = None
    if not args.no_memory:
        print(f'peak memory, each configuration in a fresh process ({args.device})', flush=True)
        memory = measure_memory(args)
    times = None if args.no_timing else measure_time(args)
    results = summarize(args, memory, times)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ('render',)}
    report = {'settings': settings, 'environment': env, 'load_average_after': os.getloadavg(),
              'wall_seconds': time.time() - start, 'results': results, 'goals': check_goals(results)}
    md = markdown(report)
    report['table'] = md
    print('\n' + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    args.out.with_suffix('.md').write_text(md)
    print(f'wrote {args.out} and {args.out.with_suffix(".md")} ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
