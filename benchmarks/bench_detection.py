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
method is reused: peak live tensor bytes of one step, each model in a fresh process (CPU: the
allocator's events seen by ``torch.profiler``; CUDA: ``max_memory_allocated``).

Usage (from the repository root)::

    python benchmarks/bench_detection.py                  # CPU, ~15 minutes on 2 cores
    python benchmarks/bench_detection.py --device cuda    # GPU: 800 x 1333
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench_norms import live_tensor_bytes, median_seconds, profiled_peak_bytes

REPO = Path(__file__).resolve().parents[1]
BASELINE = 'tv_frozen_bn'
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
    p.add_argument('--memory-worker', nargs=2, metavar=('MODEL', 'IMAGES'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith('cuda')
    args.min_size = args.min_size or (800 if cuda else 320)
    args.max_size = args.max_size or (1333 if cuda else 512)
    args.out = Path(args.out or REPO / 'benchmarks' / 'results' / f'bench_detection_{"cuda" if cuda else "cpu"}.json')
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build(name: str, args) -> torch.nn.Module:
    size = dict(min_size=args.min_size, max_size=args.max_size)
    if name == BASELINE:
        from torchvision.models import resnet50
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), trainable_layers=3)
        return MaskRCNN(backbone, num_classes=91, **size)
    import zoo
    return zoo.create_detector(name, num_classes=91, trainable_backbone_layers=3, **size)


def real_batch(args, images: int, device):
    """The first ``images`` coco-mini train images with at least one object, at their original size."""
    from lightning_modules.detection.data import CocoDetectionDataset
    root = Path(args.data)
    ds = CocoDetectionDataset(root / 'train2017', root / 'annotations' / 'instances_train2017.json')
    xs, ts = [], []
    for i in range(len(ds)):
        x, t = ds[i]
        if len(t['boxes']):
            xs.append(x.to(device))
            ts.append({'boxes': t['boxes'].to(device), 'labels': t['labels'].to(device),
                       'masks': t['masks'].to(device)})
        if len(xs) == images:
            return xs, ts
    raise ValueError(f'{root}: fewer than {images} train images with objects')


class Step:
    """One detector, its SGD optimizer and a fixed real batch."""

    def __init__(self, name, images, args):
        self.name, self.images, self.device = name, images, torch.device(args.device)
        torch.manual_seed(0)
        self.model = build(name, args).to(self.device).train()
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        self.x, self.targets = real_batch(args, images, self.device)

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def __call__(self):
        torch.manual_seed(0)  # the same RoI sampling draws for every model
        self.opt.zero_grad(set_to_none=True)
        loss = sum(self.model(self.x, self.targets).values())
        loss.backward()
        self.opt.step()

    def timed(self, iters):
        return median_seconds(self, iters, self.sync)


def measure_memory(name, images, args) -> int:
    step = Step(name, images, args)
    step()  # optimizer state exists, lazy init done
    step.opt.zero_grad(set_to_none=True)
    step.sync()
    if step.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(step.device)
        step()
        step.sync()
        return torch.cuda.max_memory_allocated(step.device)
    from torch.profiler import ProfilerActivity, profile
    batch = [*step.x, *(v for t in step.targets for v in t.values())]
    live = live_tensor_bytes(step.model, step.opt, batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return live + profiled_peak_bytes(prof)


def memory_in_fresh_processes(args):
    out = {}
    for images in args.images:
        for name in MODELS:
            cmd = [sys.executable, str(Path(__file__).resolve()), '--memory-worker', name, str(images),
                   '--device', args.device, '--min-size', str(args.min_size), '--max-size', str(args.max_size),
                   '--data', args.data] + (['--threads', str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                raise RuntimeError(f'memory worker {name} x{images} failed:\n{proc.stderr[-3000:]}')
            out[f'{name}@{images}'] = int(proc.stdout.strip().splitlines()[-1])
            print(f'  peak memory {name} at {images} image(s): {out[f"{name}@{images}"] / 2 ** 20:.0f} MiB', flush=True)
    return out


def time_round_robin(args):
    from tqdm import tqdm
    steps = [Step(n, i, args) for i in args.images for n in MODELS]
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
    if args.memory_worker:
        name, images = args.memory_worker
        print(measure_memory(name, int(images), args))
        return
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
