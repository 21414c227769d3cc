"""Where the time goes: per-op self time of one training step and one inference batch, side by side.

Runs ``torch.profiler`` on each model (after warm-up) and prints the ops that cost most, one
column per model, so the extra cost of WS / BCN / BGN over BatchNorm shows op by op. Self times
leave out the Python between ops, so the totals are below wall-clock time (the difference is the
per-layer Python and dispatch overhead, which matters at small batches). Also writes the tables to
``benchmarks/results/profile_<device>.md``.

Usage (from the repository root)::

    python benchmarks/profile_norms.py                      # resnet50 vs resnet50_wsbcn, batch 8, 128 px
    python benchmarks/profile_norms.py --models resnet50 resnet50_wsgn --threads 1
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]

import timm  # noqa: E402
import zoo  # noqa: E402,F401


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=['resnet50', 'resnet50_wsbcn'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--iters', type=int, default=3, help='profiled calls per model and mode (averaged)')
    p.add_argument('--rows', type=int, default=20)
    p.add_argument('--threads', type=int)
    return p.parse_args(argv)


def op_times(model, x, y, train, iters, device):
    """{op name: (self ms per call of the model, op calls per call of the model)}."""
    model.train(train)

    def run():
        if train:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.inference_mode():
                model(x)
    for _ in range(2):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            run()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return {e.key: (getattr(e, attr) / 1e3 / iters, e.count // iters) for e in prof.key_averages()}


def table(title, times, rows):
    names = list(times)
    keys = sorted(set().union(*times.values()), key=lambda k: -max(t.get(k, (0, 0))[0] for t in times.values()))
    lines = [f'### {title}', '', '| op | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for k in keys[:rows]:
        cells = [f'{times[n].get(k, (0, 0))[0]:.1f} ms x{times[n].get(k, (0, 0))[1]}' for n in names]
        lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
    lines.append('| **total self time** | ' + ' | '.join(f'{sum(v[0] for v in times[n].values()):.1f} ms' for n in names) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    models = {n: timm.create_model(n).to(device) for n in args.models}
    head = (f'{device.type}, batch {args.batch_size}, {args.img_size} px, {torch.get_num_threads()} threads, '
            f'torch {torch.__version__}; self time per model call')
    out = [head]
    for train in (True, False):
        times = {n: op_times(m, x, y, train, args.iters, device) for n, m in models.items()}
        out.append(table('training step (forward + backward)' if train else 'inference (eval, inference_mode)',
                         times, args.rows))
    report = '\n\n'.join(out)
    print(report)
    path = REPO_ROOT / 'benchmarks' / 'results' / f'profile_{device.type}.md'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report + '\n')
    print(f'\nwrote {path}')


if __name__ == '__main__':
    main()
