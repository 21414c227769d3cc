"""Activation checkpointing (zoo.layers.activation_checkpoint): backbone stages (``checkpoint_stages``),
detector heads (``checkpoint_heads``), DeepLabV3's head (``checkpoint_head``).

With it on, a training step gives the gradients of a step without it, updates every running
statistic and BCN estimate exactly once (and all-reduces once), replays the random draws, keeps
the state-dict keys, and a run killed and resumed through zoo-train ends bit-identical.
"""
import copy
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel

import zoo
from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d
from zoo.layers.activation_checkpoint import (
    CheckpointedSequential, activation_checkpointing, checkpoint_module, recomputing, set_activation_checkpointing)

SHALLOW = dict(layers=(1, 1, 1, 1))  # ImageNet ResNets with one block per stage: fast on CPU
DETECTOR_SMALL = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_train=32, rpn_post_nms_top_n_train=8,
                      box_batch_size_per_image=8, rpn_batch_size_per_image=16)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_step(plain, ckpt, rtol=1e-10, atol=1e-12):
    """Same gradients, the same buffers (statistics updated once) and the same keys."""
    (g_plain, s_plain, rng_plain), (g_ckpt, s_ckpt, rng_ckpt) = plain, ckpt
    assert s_plain.keys() == s_ckpt.keys()
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=rtol, atol=atol, msg=k)
    for k in s_plain:  # parameters, running statistics, estimates, num_batches_tracked
        assert torch.equal(s_ckpt[k], s_plain[k]), k
    assert torch.equal(rng_ckpt, rng_plain)  # the global generator ends where it would without checkpointing


class _Calls:
    """Counts forward calls of a module (twice per step when checkpointed: forward and recomputation)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


# ---------------------------------------------------------------- the building block


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), BatchChannelNorm2d(64), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), EstimatedBatchNorm2d(64), BatchGroupNorm2d(64, 8),
        BatchChannelNorm2d(64, batch_stage='batch'), nn.Conv2d(64, 4, 1)).double()


def _toy_step(model, run):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    for _ in range(2):  # two steps: the second normalizes with estimates the first updated
        run(model, x).square().sum().backward()
    return _grads(model), _state(model), torch.get_rng_state()


def test_checkpoint_module_updates_statistics_once_and_replays_dropout():
    plain = _toy_step(_toy(), lambda m, x: m(x))
    model = _toy()
    calls = _Calls(model[6])
    ckpt = _toy_step(model, lambda m, x: checkpoint_module(m, x))
    assert calls.n == 4  # recomputed: the test runs what it checks
    _assert_same_step(plain, ckpt)
    assert int(model[6].num_batches_tracked) == int(model[1].bn.num_batches_tracked) == 2
    assert int(model[5].num_batches_tracked) == int(model[8].bn.num_batches_tracked) == 2


def test_plain_torch_checkpoint_would_update_statistics_twice():
    """The pitfall the zoo's checkpointing removes (so the test above has teeth)."""
    plain = _toy_step(_toy(), lambda m, x: m(x))
    ckpt = _toy_step(_toy(), lambda m, x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False))
    assert int(ckpt[1]['6.num_batches_tracked']) == 4 and int(plain[1]['6.num_batches_tracked']) == 2
    assert not torch.equal(ckpt[1]['5.running_mean'], plain[1]['5.running_mean'])


def test_recomputing_flag_and_plain_calls():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(recomputing())
            return x * x  # saves x for backward: recomputed

    probe = Probe()
    x = torch.ones(3, requires_grad=True)
    checkpoint_module(probe, x).sum().backward()
    assert seen == [False, True] and not recomputing()
    seen.clear()
    with torch.no_grad():
        checkpoint_module(probe, x)
    checkpoint_module(probe, x.detach())  # nothing needs a gradient: a plain call
    checkpoint_module(probe.eval(), x).sum().backward()  # eval: a plain call
    assert seen == [False, False, False]


def test_checkpointed_sequential_keeps_object_keys_class_and_round_trips():
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    head = FastRCNNConvFCHead((8, 7, 7), [8, 8], [16], norm_layer=nn.BatchNorm2d)
    keys = list(head.state_dict())
    assert set_activation_checkpointing(head) is head and activation_checkpointing(head)
    assert isinstance(head, FastRCNNConvFCHead) and isinstance(head, CheckpointedSequential)
    assert list(head.state_dict()) == keys
    for other in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert type(other) is type(head) and list(other.state_dict()) == keys
    set_activation_checkpointing(head, False)
    assert type(head) is FastRCNNConvFCHead
    with pytest.raises(TypeError, match='checkpoint_module'):
        set_activation_checkpointing(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------- backbones


def _model(name, ckpt, **kwargs):
    torch.manual_seed(0)
    if name.startswith('resnet20'):
        return timm.create_model(name, checkpoint_stages=ckpt, **kwargs).double()
    return timm.create_model(name, checkpoint_stages=ckpt, num_classes=5, **SHALLOW, **kwargs).double()


def _classifier_step(model, size, images=2):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(7)
    for _ in range(2):  # two batches: the second is normalized with estimates the first updated
        x = torch.randn(images, 3, size, size, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (images,), generator=g)
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else sum(f.mean() for f in out)  # features_only: a list
        (F.cross_entropy(out, y) if out.ndim == 2 else out).backward()
    return _grads(model), _state(model), torch.get_rng_state()


@pytest.mark.parametrize('name', ['resnet18_wsbcn', 'resnet18_wsgn', 'resnet18_wsbgn', 'resnet18_wsbn', 'resnet18_bcn',
                                  'resnet20_wsbcn', 'resnet20'])
def test_checkpointed_stages_match_unchecked_run(name):
    size = 32 if name.startswith('resnet20') else 64
    kw = dict(drop_path_rate=0.2, drop_rate=0.3)  # random draws inside and after the checkpointed stages
    plain = _classifier_step(_model(name, False, **kw), size)
    model = _model(name, True, **kw)
    assert model.grad_checkpointing and all(activation_checkpointing(s) for s in (model.layer1, model.layer2))
    calls = _Calls(model.layer2[0])
    ckpt = _classifier_step(model, size)
    assert calls.n == 4
    _assert_same_step(plain, ckpt)


@pytest.mark.parametrize('name', ['tsm_resnet18_wsbcn', 'tsm_resnet18_wsgn'])
def test_checkpointed_video_stages_match_unchecked_run(name):
    """TSM runs ZooResNet's forward on folded frames: each stage is checkpointed once (timm's checkpoint_seq
    on top of it updated every estimate twice)."""
    def step(ckpt):
        torch.manual_seed(0)
        model = timm.create_model(name, num_segments=2, num_classes=3, checkpoint_stages=ckpt, **SHALLOW).double()
        calls = _Calls(model.layer2[0])
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            model(torch.randn(1, 3, 2, 32, 32, generator=g, dtype=torch.float64)).square().sum().backward()
        return (_grads(model), _state(model), torch.get_rng_state()), calls.n

    plain, plain_calls = step(False)
    ckpt, ckpt_calls = step(True)
    assert (plain_calls, ckpt_calls) == (2, 4)
    _assert_same_step(plain, ckpt)


def test_set_grad_checkpointing_switches_and_features_only_checkpoints():
    model = _model('resnet18_wsbcn', False)
    keys = list(model.state_dict())
    model.set_grad_checkpointing(True)
    assert all(activation_checkpointing(getattr(model, f'layer{i}')) for i in range(1, 5))
    assert list(model.state_dict()) == keys
    model.set_grad_checkpointing(False)
    assert type(model.layer1) is nn.Sequential and not model.grad_checkpointing

    # timm's features_only wrapper runs the stages itself (not forward_features): they still checkpoint.
    plain = _classifier_step(_model('resnet18_wsbcn', False, features_only=True, out_indices=(1, 2, 3, 4)), 64)
    feats = _model('resnet18_wsbcn', True, features_only=True, out_indices=(1, 2, 3, 4))
    calls = _Calls(feats.layer3[0])
    ckpt = _classifier_step(feats, 64)
    assert calls.n == 4
    _assert_same_step(plain, ckpt)


def test_checkpointed_model_scripts_traces_and_compiles():
    model = _model('resnet20_wsbcn', True).float()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)  # scripted: stages run plainly (no folding)
    traced = torch.fx.symbolic_trace(model.train())  # the stages trace as plain sequences
    assert not any('checkpoint' in str(n.target) for n in traced.graph.nodes)

    # torch.compile: a checkpointed stage is a graph break and runs eagerly (with checkpointing).
    plain = _classifier_step(_model('resnet20_wsbcn', False), 16)
    compiled = _model('resnet20_wsbcn', True)
    calls = _Calls(compiled.layer1[0])
    torch._dynamo.reset()
    ckpt = _classifier_step(torch.compile(compiled, backend='eager'), 16)
    assert calls.n == 4
    _assert_same_step(plain, ({k.replace('_orig_mod.', ''): v for k, v in ckpt[0].items()},
                              {k.replace('_orig_mod.', ''): v for k, v in ckpt[1].items()}, ckpt[2]))


def test_device_emulation_norms_are_there_in_the_recomputation():
    """virtual_devices swaps BN / BGN for chunking wrappers during the forward only: the recomputation
    in backward (after the context) must run the same wrappers, or its statistics would differ."""
    from lightning_modules.core.emulation import virtual_devices

    def step(model):
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        torch.manual_seed(7)
        with virtual_devices(model, 2):
            out = model(x)
        out.square().mean().backward()
        return _grads(model), _state(model), torch.get_rng_state()

    for name in ('resnet20', 'resnet20_wsbgn'):
        _assert_same_step(step(_model(name, False)), step(_model(name, True)))


# ---------------------------------------------------------------- detectors and DeepLabV3


def _detection_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, 64, generator=g, dtype=torch.float64) for h in (64, 56)]
    targets = [dict(boxes=torch.tensor([[5., 5., 40., 50.]], dtype=torch.float64), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[10., 8., 30., 30.], [0., 0., 20., 50.]], dtype=torch.float64),
                    labels=torch.tensor([2, 1]))]
    for img, t in zip(images, targets):
        m = torch.zeros(len(t['boxes']), *img.shape[1:], dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(t['boxes'].int().tolist()):
            m[i, y1:y2, x1:x2] = 1
        t['masks'] = m
    return images, targets


@pytest.mark.parametrize('name', ['maskrcnn_resnet18_fpn_wsbcn', 'maskrcnn_resnet18_fpn_bgn'])
def test_detector_checkpointed_heads_and_stages_match_unchecked_run(name):
    def build(ckpt):
        torch.manual_seed(0)
        return zoo.create_detector(name, num_classes=3, checkpoint_heads=ckpt,
                                   backbone_kwargs=dict(SHALLOW, checkpoint_stages=ckpt), **DETECTOR_SMALL).double()

    def step(model):
        images, targets = _detection_batch()
        torch.manual_seed(7)  # RPN / RoI sampling draws
        sum(model(images, targets).values()).backward()
        return _grads(model), _state(model), torch.get_rng_state()

    plain = step(build(False))
    model = build(True)
    heads = model.roi_heads.box_head, model.roi_heads.mask_head
    blocks = [b for h in heads for b in h if isinstance(b, torch.nn.Sequential)]
    assert len(blocks) == 8 and all(activation_checkpointing(b) for b in blocks)  # one segment per conv block
    assert not any(activation_checkpointing(h) for h in heads)
    calls = [_Calls(m) for m in (heads[0][0][0], heads[1][3][0], model.backbone.body.layer2[0])]  # convs in blocks
    ckpt = step(model)
    assert [c.n for c in calls] == [2, 2, 2]
    _assert_same_step(plain, ckpt)


def test_detector_baseline_accepts_checkpoint_heads_and_stages():
    model = zoo.create_detector('maskrcnn_resnet18_fpn', num_classes=3, checkpoint_heads=True,
                                backbone_kwargs=dict(checkpoint_stages=True))  # timm's own ResNet-18 backbone
    assert all(activation_checkpointing(block) for block in model.roi_heads.mask_head)  # 4 conv blocks
    assert not any(activation_checkpointing(m) for m in model.roi_heads.box_head.modules())  # torchvision's two-fc head
    assert all(activation_checkpointing(getattr(model.backbone.body, f'layer{i}')) for i in range(1, 5))
    assert list(model.state_dict()) == list(zoo.create_detector('maskrcnn_resnet18_fpn', num_classes=3).state_dict())


@pytest.mark.parametrize('name,images', [('deeplabv3_resnet18_wsbcn', 1), ('deeplabv3_resnet18', 2)])
def test_deeplabv3_checkpointed_head_matches_unchecked_run(name, images):
    def build(ckpt):
        torch.manual_seed(0)
        return zoo.create_segmenter(name, num_classes=3, output_stride=16, aux_loss=True, checkpoint_head=ckpt,
                                    backbone_kwargs=dict(SHALLOW, checkpoint_stages=ckpt)).double()

    def step(model):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(images, 3, 64, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (images, 64, 64), generator=g)
        out = model(x)
        (F.cross_entropy(out['out'], y) + 0.4 * F.cross_entropy(out['aux'], y)).backward()
        return _grads(model), _state(model), torch.get_rng_state()

    plain = step(build(False))
    model = build(True)
    assert activation_checkpointing(model.classifier) and activation_checkpointing(model.aux_classifier)
    calls = _Calls(model.classifier[0])
    ckpt = step(model)
    assert calls.n == 2
    _assert_same_step(plain, ckpt)


# ---------------------------------------------------------------- two processes: one all-reduce per update

WORLD = 2


def _dist_worker(rank, port, out_path):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # the estimated stages' own all-reduce (DDP's go through C++)
        calls.append(recomputing())
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        results = {}
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = DistributedDataParallel(zoo.create_model('resnet20_wsbcn', checkpoint_stages=ckpt))
            g = torch.Generator().manual_seed(10 + rank)
            calls.clear()
            for _ in range(2):
                x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)
                F.cross_entropy(model(x), y).backward()
            results[ckpt] = dict(calls=list(calls), state=_state(model.module), grads=_grads(model.module))
        torch.save(results, f'{out_path}.{rank}')
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_estimated_stages_all_reduce_once_per_update_across_two_processes(tmp_path):
    from test_distributed import free_port
    out = str(tmp_path / 'rank')
    mp.spawn(_dist_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    layers = sum(isinstance(m, EstimatedBatchNorm2d) for m in zoo.create_model('resnet20_wsbcn').modules())
    ranks = [torch.load(f'{out}.{r}', weights_only=True) for r in range(WORLD)]
    for r in ranks:
        assert r[True]['calls'] == r[False]['calls'] == [False] * (2 * layers)  # none during recomputation
        assert r[True]['state'].keys() == r[False]['state'].keys()
        for k, v in r[False]['state'].items():
            assert torch.equal(r[True]['state'][k], v), k
        for k, v in r[False]['grads'].items():
            torch.testing.assert_close(r[True]['grads'][k], v, rtol=1e-5, atol=1e-7, msg=k)
    for k, v in ranks[0][True]['state'].items():  # estimates identical on both ranks
        assert torch.equal(ranks[1][True]['state'][k], v), k


# ---------------------------------------------------------------- exact resume through zoo-train

RESUME_STEPS = 8
KILL_AT = 3


def _resume_config(tmp: Path, data: Path, name: str) -> Path:
    cfg = tmp / f'{name}.yaml'
    cfg.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {RESUME_STEPS}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
model:
  class_path: lightning_modules.classification.ImageClassifier
  init_args: {{model_name: resnet20_wsbcn, num_classes: 3, ema_decay: 0.9, optim: {{lr: 0.2, warmup_epochs: 0.5}}}}
data:
  class_path: lightning_modules.classification.ImageFolderDataModule
  init_args: {{root: {data}, input_size: 16, scale: [0.3, 1.0], batch_size: 2, virtual_devices: 2, num_workers: 0}}
""")
    return cfg


def _resume_args(cfg: Path, checkpoint_stages: bool) -> list:
    kwargs = '{drop_path_rate: 0.2, drop_rate: 0.2' + (', checkpoint_stages: true}' if checkpoint_stages else '}')
    return ['-c', cfg, '--model.init_args.model_kwargs', kwargs]


def test_checkpointed_run_killed_and_resumed_through_zoo_train_is_bit_identical(tmp_path):
    """``model_kwargs: {checkpoint_stages: true}`` through the CLI, drop-path and dropout on: a run killed
    (SIGKILL after a checkpoint) and resumed ends as the uninterrupted one, and as a run without checkpointing."""
    from test_data import make_image_folder
    from resume_helpers import assert_same_training_state, interrupted_run, uninterrupted_run
    data = make_image_folder(tmp_path / 'data', per_class=4)  # 12 images, 4 per step: 3 steps per epoch
    cfg = _resume_config(tmp_path, data, 'run')
    resumed, _, _ = interrupted_run(tmp_path / 'run', *_resume_args(cfg, True), kills=(KILL_AT,))
    uninterrupted = uninterrupted_run(tmp_path / 'ref', *_resume_args(cfg, True))
    unchecked = uninterrupted_run(tmp_path / 'plain', *_resume_args(cfg, False))
    assert uninterrupted['global_step'] == RESUME_STEPS
    assert 'checkpoint_stages' in str(uninterrupted['hyper_parameters']) and 'checkpoint_stages' not in str(
        unchecked['hyper_parameters'])
    assert_same_training_state(resumed, uninterrupted)
    assert_same_training_state(uninterrupted, unchecked)
