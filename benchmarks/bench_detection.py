"""What WS+GN and WS+BCN cost in Mask R-CNN R-50-FPN against torchvision's frozen-BN design.

One run times the training step (forward with targets, backward, SGD step) and measures its peak
memory at 1 and 2 images per device, for:

- ``tv_frozen_bn``: torchvision's ``maskrcnn_resnet50_fpn`` design (the reference): ResNet-50 with
  ``FrozenBatchNorm2d``, FPN without norm, two-fc box head, plain mask head; built here with
  random weights (no download), which does not change its cost;
- ``maskrcnn_resnet50_fpn_wsgn`` and ``maskrcnn_resnet50_fpn_wsbcn``: the zoo's "WS + norm
  everywhere" detectors (backbone, FPN, 4conv1fc box head, mask head), BCN in its estimated
  (micro-batch) stage.

All with stem and layer1 frozen (Detectron's and torchvision's default of 3 trainable stages) and
torchvision's default sampling (512 RoIs per image, 2000 proposals). The batch is real coco-mini
train images with their boxes and masks; the detector's own transform resizes them to
``--min-size`` / ``--max-size`` (CPU default 320 / 512, GPU default 800 / 1333, COCO's).

Timing is round-robin over models (median per repetition, then median over repetitions; the range
of per-repetition ratios says how noisy the machine was), as in ``bench_norms.py``, whose memory
method is reused (``zoo.memory``): peak live tensor bytes of one step, each model in a fresh process
(CPU: the allocator's events seen by ``torch.profiler``; CUDA: ``max_memory_allocated``).

Usage (from the repository root)::

    python benchmarks/bench_detection.py                  # CPU, ~15 minutes on 2 cores
    python benchmarks/bench_detection.py --device cuda    # GPU: 800 x 1333
"""
import argparse
import json
import platform
import statistics
from functools import partial
from pathlib import Path

import torch

from zoo.memory import (TV_DETECTOR, Setup, TrainStep, build_model, detection_data_available, in_fresh_process,
                        make_batch, task_loss)

REPO = Path(__file__).resolve().parents[1]
BASELINE = TV_DETECTOR  # built by zoo.memory as torchvision builds maskrcnn_resnet50_fpn (random weights)
MODELS = (BASELINE, 'maskrcnn_resnet50_fpn_wsgn', 'maskrcnn_resnet50_fpn_wsbcn')
COCO_MINI = REPO.parent / 'shared' / 'data' / 'coco-mini'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--images', type=int, nargs='+', default=[1, 2], help='images per device')
    p.add_argument('--min-size', type=int, default=None)
    p.add_argument('--max-size', type=int, default=None)
    p.add_argument('--reps', type=int, default=3, help='round-robin repetitions')
    p.add_argument('--iters', type=int, default=1, help='timed steps per repetition')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--data', default=str(COCO_MINI))
    p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/bench_detection_<device>.json)')
    args = p.parse_args(argv)
    cuda = args.device.startswith('cuda')
    args.min_size = args.min_size or (800 if cuda else 320)
    args.max_size = args.max_size or (1333 if cuda else 512)
    args.out = Path(args.out or REPO / 'benchmarks' / 'results' / f'bench_detection_{"cuda" if cuda else "cpu"}.json')
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def setup(name: str, args) -> Setup:
    """The detector ``name`` (stem and layer1 frozen), real coco-mini batches, as ``zoo.memory`` builds them."""
    return Setup(task='detect', model=name, min_size=args.min_size, max_size=args.max_size, device=args.device,
                 num_classes=91, trainable_backbone_layers=3, data=args.data)


def make_step(name, images, args) -> TrainStep:
    """One detector, its SGD optimizer and a fixed real batch (the first ``images`` coco-mini train
    images with objects, original size); each step reseeds the RNG (the same RoI sampling draws)."""
    s = setup(name, args)
    torch.manual_seed(0)
    step = TrainStep(build_model(s), make_batch(s, images), partial(task_loss, 'detect'), device=args.device)
    step.name, step.images = name, images
    return step


def measure_memory(name, images, args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    return make_step(name, images, args).peak_bytes(warmup=1)['peak_bytes']


def memory_in_fresh_processes(args):
    out = {}
    for images in args.images:
        for name in MODELS:
            out[f'{name}@{images}'] = in_fresh_process(measure_memory, name, images, args)
            print(f'  peak memory {name} at {images} image(s): {out[f"{name}@{images}"] / 2 ** 20:.0f} MiB', flush=True)
    return out


def time_round_robin(args):
    from tqdm import tqdm
    steps = [make_step(n, i, args) for i in args.images for n in MODELS]
    for s in steps:  # warm-up
        s()
    times = {f'{s.name}@{s.images}': [] for s in steps}
    for _ in tqdm(range(args.reps), desc='round-robin repetitions'):
        for s in steps:
            times[f'{s.name}@{s.images}'].append(s.timed(args.iters))
    return times


def table(args, times, memory) -> str:
    lines = [f'Mask R-CNN R-50-FPN training step on {args.device} ({platform.processor() or platform.machine()}, '
             f'{torch.get_num_threads()} threads), real coco-mini images resized to {args.min_size} / {args.max_size}, '
             f'torch {torch.__version__}. Ratios against torchvision\'s frozen-BN design at the same images per '
             f'device; in brackets the range over {args.reps} round-robin repetitions.', '',
             '| model | images / device | step (s) | step ratio | peak memory (MiB) | memory ratio |',
             '|---|---|---|---|---|---|']
    for images in args.images:
        base_t = times[f'{BASELINE}@{images}']
        for name in MODELS:
            key = f'{name}@{images}'
            t = times[key]
            ratios = [a / b for a, b in zip(t, base_t)]
            mem, base_mem = memory[key], memory[f'{BASELINE}@{images}']  # every model is measured
            lines.append(f'| {name} | {images} | {statistics.median(t):.2f} | {statistics.median(ratios):.2f} '
                         f'[{min(ratios):.2f}-{max(ratios):.2f}] | {mem / 2 ** 20:.0f} | {mem / base_mem:.2f} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    if not detection_data_available(args.data):
        print(f'{args.data}: no coco-mini (or no lightning_modules): random images with boxes and masks', flush=True)
    print(f'peak memory, each model in a fresh process ({args.device})', flush=True)
    memory = memory_in_fresh_processes(args)
    times = time_round_robin(args)
    md = table(args, times, memory)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({'args': {k: str(v) for k, v in vars(args).items()}, 'seconds': times,
                                    'peak_bytes': memory, 'threads': torch.get_num_threads(),
                                    'torch': torch.__version__}, indent=1))
    args.out.with_suffix('.md').write_text(md)
    print(f'wrote {args.out} and {args.out.with_suffix(".md")}')


if __name__ == '__main__':
    main()
