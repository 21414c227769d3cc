"""BCN under real multi-process DDP (gloo, CPU): estimates identical on every rank and equal to a
one-process run on the whole batch."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import zoo  # noqa: F401
from zoo.layers import EstimatedBatchNorm2d

STEPS = 4
GLOBAL_BATCH = 4
WORLD = 2


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g) * 2 + 0.5
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    return x, y


def _model():
    torch.manual_seed(0)
    return zoo.create_model('resnet20_wsbcn', norm_kwargs=dict(momentum=0.3))


def _train(model, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _snapshot(model):
    module = getattr(model, 'module', model)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    estimated = [n for n, m in module.named_modules() if isinstance(m, EstimatedBatchNorm2d)]
    assert estimated, 'the model has no estimated batch stage'
    return state, estimated


def _worker(rank, port, out_path):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = DistributedDataParallel(_model())
        losses = _train(model, rank, WORLD)
        dist.all_reduce(losses)  # the global mean loss of each step
        state, _ = _snapshot(model)
        torch.save({'state': state, 'losses': losses / WORLD}, f'{out_path}.{rank}')
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_bcn_estimates_synced_across_processes_and_match_single_process(tmp_path):
    out = str(tmp_path / 'rank')
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f'{out}.{r}', weights_only=True) for r in range(WORLD)]

    single = _model()
    single_losses = _train(single)
    single_state, estimated = _snapshot(single)

    for name in estimated:
        for buf in ('running_mean', 'running_var', 'num_batches_tracked'):
            key = f'{name}.{buf}'
            # identical on every rank (bit for bit), and equal to the one-process run on the whole batch
            assert torch.equal(ranks[0]['state'][key], ranks[1]['state'][key]), key
            torch.testing.assert_close(ranks[0]['state'][key], single_state[key], rtol=1e-4, atol=1e-5)
        # the estimates moved: the test would notice a layer that never updates
        assert not torch.allclose(single_state[f'{name}.running_mean'], torch.zeros_like(single_state[f'{name}.running_mean']))
    for key, value in single_state.items():
        torch.testing.assert_close(ranks[0]['state'][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(ranks[0]['losses'], single_losses, rtol=1e-4, atol=1e-5)
