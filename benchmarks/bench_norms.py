"""What WS, BCN and BGN cost against BatchNorm: training-step and inference throughput, peak memory.

One run measures every model at the same batch size, resolution and precision and reports each
as a ratio against timm's ``resnet50`` (BN); timm's GN+WS ``resnetv2_50x1_bit`` is the other
reference. Prints a markdown table and writes JSON (and the table) to ``benchmarks/results/``.

Timing: the models are interleaved (round-robin repetitions), each repetition times a few training
steps (forward, backward, SGD step) and inference batches (eval, ``torch.inference_mode``) per
model and keeps the median; the table shows the median over repetitions and, for ratios, the range
of the per-repetition ratios, so a machine that is busy now and then slows every model alike and
the spread says how noisy the run was. The first call after a train/eval switch is not timed.

Peak memory: live tensor bytes at the peak of one training step (parameters, gradients, SGD
momentum, activations, temporaries), each model in a fresh process. CUDA:
``torch.cuda.max_memory_allocated``. CPU: every allocation and free that PyTorch's allocator
reports to ``torch.profiler`` (``profile_memory=True``) during the step, added to the tensors alive
when it starts. The process's peak RSS above its RSS before the model was built goes to the JSON
as a cross-check (it also counts allocator caching and library workspaces).

Usage (from the repository root)::

    python benchmarks/bench_norms.py                        # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_norms.py --device cuda          # GPU defaults: batch 64, 224 px, bf16 autocast
    python benchmarks/bench_norms.py --channels-last --compile
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]

import timm  # noqa: E402
import zoo  # noqa: E402,F401  (registers the zoo models in timm)
# The measuring code, shared with bench_detection.py and bench_memory.py (also importable from here).
from zoo.memory import (current_rss_bytes, in_fresh_process, live_tensor_bytes, max_rss_bytes,  # noqa: E402,F401
                        median_seconds, profiled_peak_bytes, step_peak_bytes)

BASELINE = 'resnet50'
EXPORT_SUFFIX = ':export'  # inference only: the model after zoo.export_for_inference
DEFAULT_MODELS = (BASELINE, 'resnet50_wsbcn', 'resnet50_wsgn', 'resnet50_bgn', 'resnetv2_50x1_bit',
                  'resnet50_wsbcn' + EXPORT_SUFFIX)
# (batch size, image size, repetitions, train steps and inference batches per repetition, autocast dtype)
DEVICE_DEFAULTS = {
    'cpu': dict(batch_size=8, img_size=128, reps=5, train_iters=2, infer_iters=3, amp='none'),
    'cuda': dict(batch_size=64, img_size=224, reps=10, train_iters=10, infer_iters=20, amp='bf16'),
}
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS),
                   help=f'the baseline {BASELINE} is always first; NAME{EXPORT_SUFFIX}: the exported model, inference only')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int)
    p.add_argument('--img-size', type=int, nargs='+', help='SIZE, or HEIGHT WIDTH (detection-size inputs: 800 1333)')
    p.add_argument('--reps', type=int, help='round-robin repetitions')
    p.add_argument('--train-iters', type=int, help='timed training steps per model and repetition')
    p.add_argument('--infer-iters', type=int, help='timed inference batches per model and repetition')
    p.add_argument('--amp', choices=sorted(AMP_DTYPES), help='autocast dtype (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile every model (default inductor backend)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory processes')
    p.add_argument('--memory-only', action='store_true', help='only the peak-memory processes (no timing)')
    p.add_argument('--infer-only', action='store_true', help='time inference only (no training steps, no memory)')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch default)')
    p.add_argument('--out', type=Path, help='JSON path (default benchmarks/results/bench_norms_<device>.json)')
    p.add_argument('--render', type=Path, help='only rewrite the markdown table of this JSON report (no measuring)')
    args = p.parse_args(argv)
    for k, v in DEVICE_DEFAULTS['cuda' if args.device.startswith('cuda') else 'cpu'].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    size = args.img_size if isinstance(args.img_size, list) else [args.img_size]
    if len(size) > 2:
        p.error('--img-size takes SIZE or HEIGHT WIDTH')
    args.img_size = (size[0], size[-1])
    if args.infer_only:
        args.no_memory = True
    if args.models[0] != BASELINE:
        args.models.insert(0, BASELINE)
    return args


class Bench:
    """One model, its optimizer and a fixed batch; timed training steps and inference calls."""

    def __init__(self, name, args):
        self.name, self.device = name, torch.device(args.device)
        self.inference_only = name.endswith(EXPORT_SUFFIX)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = timm.create_model(name[:-len(EXPORT_SUFFIX)] if self.inference_only else name)
        if self.inference_only:
            model = zoo.export_for_inference(model)
        self.model = model.to(self.device, memory_format=fmt)
        self.opt = None if self.inference_only else torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.x = torch.randn(args.batch_size, 3, *args.img_size, device=self.device)
        self.x = self.x.contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch_size,), device=self.device)
        amp = AMP_DTYPES[args.amp]
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else nullcontext
        self.forward = torch.compile(self.model) if args.compile else self.model

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def train_step(self):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.forward(self.x).float(), self.y)
        loss.backward()
        self.opt.step()

    @torch.inference_mode()
    def infer(self):
        with self.autocast():
            return self.forward(self.x)

    def timed(self, fn, iters):
        """Median seconds per call over ``iters`` calls, after one untimed call."""
        fn()
        return median_seconds(fn, iters, self.sync)

    def time_train(self, iters):
        if self.inference_only or iters == 0:
            return None
        self.model.train()
        return self.timed(self.train_step, iters)

    def time_infer(self, iters):
        self.model.eval()
        return self.timed(self.infer, iters)


def measure_memory(name, args):
    """Peak training-step memory of one model (run in a fresh process): a dict of byte counts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_before = current_rss_bytes() if args.device == 'cpu' else None
    bench = Bench(name, args)
    bench.model.train()
    out = step_peak_bytes(bench.train_step, bench.model, bench.opt, (bench.x, bench.y), bench.device, warmup=2)
    out.pop('loss', None)
    if rss_before is not None:
        out['rss_peak_delta_bytes'] = max_rss_bytes() - rss_before
    return out


def run_memory_workers(args):
    """Each model's memory in its own process, so no allocator state carries over between models."""
    results = {}
    env = dict(MALLOC_MMAP_THRESHOLD_='65536')  # freed tensors leave RSS at once
    for name in args.models:
        if name.endswith(EXPORT_SUFFIX):
            continue
        results[name] = in_fresh_process(measure_memory, name, args, env=env)
        print(f'  peak memory {name}: {results[name]["peak_bytes"] / 2 ** 20:.0f} MiB', flush=True)
    return results


def run_timing(args):
    from tqdm import tqdm
    benches = [Bench(name, args) for name in args.models]
    for b in benches:  # warm-up (and compilation)
        b.time_train(1)
        b.time_infer(1)
    times = {b.name: {'train': [], 'infer': []} for b in benches}
    for _ in tqdm(range(args.reps), desc='round-robin repetitions'):
        for b in benches:
            times[b.name]['train'].append(b.time_train(args.train_iters))
            times[b.name]['infer'].append(b.time_infer(args.infer_iters))
    return times


def summarize(args, times, memory):
    rows = {}
    base = times[BASELINE]
    for name, t in times.items():
        row = {}
        for kind in ('train', 'infer') if t else ():
            if t[kind][0] is None:  # inference-only model
                continue
            per_rep_ratio = [b / m for m, b in zip(t[kind], base[kind])]  # throughput ratio
            med = statistics.median(t[kind])
            row[kind] = {
                'img_per_s': args.batch_size / med,
                'seconds_per_batch_reps': t[kind],
                'ratio_vs_bn': statistics.median(base[kind]) / med,
                'ratio_range': [min(per_rep_ratio), max(per_rep_ratio)],
                'rep_spread': (max(t[kind]) - min(t[kind])) / med,
            }
        if memory and name in memory:
            row['memory'] = dict(memory[name], ratio_vs_bn=memory[name]['peak_bytes'] / memory[BASELINE]['peak_bytes'])
        rows[name] = row
    return rows


def markdown_table(args, rows, threads=None):
    height, width = args.img_size
    size = f'{height} px' if height == width else f'{height}x{width} px'
    head = (f'{args.device}, batch {args.batch_size}, {size}, amp {args.amp}, {threads or torch.get_num_threads()} threads'
            f'{", channels_last" if args.channels_last else ""}{", compiled" if args.compile else ""}; '
            f'ratios vs timm {BASELINE} (BN)'
            + ('' if args.memory_only else f', median of {args.reps} interleaved repetitions [min-max]'))
    lines = [head, '',
             '| model | train img/s | train ratio | infer img/s | infer ratio | peak train MiB | memory ratio |',
             '|---|---|---|---|---|---|---|']
    for name, r in rows.items():
        cells = [name]
        for kind in ('train', 'infer'):
            if kind not in r:
                cells += ['-', '-']
                continue
            k = r[kind]
            cells += [f'{k["img_per_s"]:.3g}', f'{k["ratio_vs_bn"]:.2f} [{k["ratio_range"][0]:.2f}-{k["ratio_range"][1]:.2f}]']
        if 'memory' in r:
            cells += [f'{r["memory"]["peak_bytes"] / 2 ** 20:.0f}', f'{r["memory"]["ratio_vs_bn"]:.2f}']
        else:
            cells += ['-', '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _git_commit(folder: Path) -> str:
    """The commit of the zoo code measured, with '+changes' when its checkout has uncommitted changes."""
    try:
        run = lambda *cmd: subprocess.run(['git', '-C', str(folder), *cmd], capture_output=True, text=True, check=True).stdout
        return run('rev-parse', '--short', 'HEAD').strip() + ('+changes' if run('status', '--porcelain', '.').strip() else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def environment(args):
    return {
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'device_name': torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or platform.machine(),
        'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
        'zoo': str(Path(zoo.__file__).parent), 'zoo_commit': _git_commit(Path(zoo.__file__).parent),
        'load_average': os.getloadavg(),
    }


def render(report_path: Path) -> str:
    """The markdown table of a JSON report, written next to it (as a run writes it)."""
    report = json.loads(report_path.read_text())
    args = argparse.Namespace(**report['settings'])
    args.img_size = tuple(args.img_size) if isinstance(args.img_size, (list, tuple)) else (args.img_size,) * 2
    table = markdown_table(args, report['results'], threads=report['environment']['threads'])
    report_path.with_suffix('.md').write_text(table + '\n')
    return table


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        print(render(args.render))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env_before = environment(args)
    start = time.time()
    memory = None if args.no_memory else run_memory_workers(args)
    if args.infer_only:
        args.train_iters = 0
    times = {n: None for n in args.models} if args.memory_only else run_timing(args)
    rows = summarize(args, times, memory)
    table = markdown_table(args, rows)
    print('\n' + table)
    out = args.out or REPO_ROOT / 'benchmarks' / 'results' / f'bench_norms_{args.device.split(":")[0]}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ('out',)}
    report = {'settings': settings, 'environment': env_before, 'load_average_after': os.getloadavg(),
              'wall_seconds': time.time() - start, 'results': rows, 'table': table}
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix('.md').write_text(table + '\n')
    print(f'\nwrote {out} and {out.with_suffix(".md")} ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
