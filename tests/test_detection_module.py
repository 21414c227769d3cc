"""DetectionModule: fit + COCO AP through zoo-train, exact resume, predict files, device emulation, DDP, NaN stop."""
import copy
import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import zoo
from lightning_modules import NonFiniteLossError
from lightning_modules.cli import build_cli
from lightning_modules.detection import DetectionModule, detector_virtual_devices
from lightning_modules.emulation import is_batch_dependent
from test_detection_data import COCO_MINI, make_coco, needs_coco_mini
from zoo.layers import EstimatedBatchNorm2d
from test_distributed import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = 'maskrcnn_resnet18_fpn_wsbcn'
# Few anchors and regions: the 4-conv heads cost ~100 MFLOPs per region.
SMALL = dict(rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=40,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
             box_detections_per_img=10, box_score_thresh=0.0)


def _config(tmp: Path, root: Path, run: Path, max_steps: int, train='images', train_ann='instances.json',
            val='images', val_ann='instances.json', num_classes=3, extra_trainer='', logger='false') -> Path:
    cfg = tmp / f'{run.name}.yaml'
    cfg.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {max_steps}
  logger: {logger}
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {run}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, save_last: true, every_n_train_steps: 2, save_top_k: -1}}
{extra_trainer}
model:
  class_path: lightning_modules.detection.DetectionModule
  init_args:
    model_name: {MODEL}
    num_classes: {num_classes}
    optim: {{lr: 0.01, warmup_steps: 2, milestones: [1.0]}}
    model_kwargs: {json.dumps(SMALL)}
data:
  class_path: lightning_modules.detection.CocoDetectionDataModule
  init_args:
    root: {root}
    train_images: {train}
    train_annotations: {train_ann}
    val_images: {val}
    val_annotations: {val_ann}
    min_size: 64
    max_size: 96
    batch_size: 1
    virtual_devices: 2
    eval_batch_size: 2
    num_workers: 0
""")
    return cfg


@needs_coco_mini
def test_fit_reports_box_and_mask_ap_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, COCO_MINI, tmp_path / 'run', max_steps=2, train='train2017',
                  train_ann='annotations/instances_train2017.json', val='val2017',
                  val_ann='annotations/instances_val2017.json', num_classes=81,
                  extra_trainer='  limit_val_batches: 2\n  limit_test_batches: 0.02\n  val_check_interval: 2\n  log_every_n_steps: 1',
                  logger=f'{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: logs}}}}')
    cli = build_cli(['fit', '-c', str(cfg), '--test_after_fit', 'true'])
    assert cli.trainer.global_step == 2
    with open(tmp_path / 'logs' / 'version_0' / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r.get('val/bbox_map')]
    assert len(val) == 1 and -1 <= float(val[0]['val/bbox_map']) <= 1
    for key in ('val/bbox_map_50', 'val/segm_map', 'val/segm_map_50'):
        assert val[0][key] != '', key
    assert any(r.get('train/loss_mask') for r in rows) and any(r.get('train/loss_classifier') for r in rows)
    out = capsys.readouterr().out  # the end-of-fit summary (--test_after_fit)
    # limit_test_batches 0.02 of 100 images: 2 were scored, and the line says so (it used to say 100)
    assert 'Test on 2 images of the test split: ' in out and 'test/bbox_map ' in out and 'test/segm_map ' in out
    assert (tmp_path / 'run' / 'checkpoints' / 'last.ckpt').is_file()
    ckpt = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert len(ckpt['coco_categories']) == 80 and ckpt['coco_categories'][-1]['id'] == 90
    loaded = DetectionModule.load_from_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last.ckpt')
    assert loaded.categories.category_id(80) == 90 and loaded.categories.name(1) == 'person'
    assert loaded.model.transform.min_size == (64,) and loaded.model.transform.max_size == 96  # as trained


def _six_images(root: Path) -> Path:
    """Six 60x40 images: with batch 1 x 2 virtual devices, 3 steps per epoch."""
    images = [{'id': i, 'file_name': f'{i}.jpg', 'width': 60, 'height': 40} for i in range(1, 7)]
    from test_detection_data import _ann
    anns = [_ann(10 + i, i, (5 + i, 4, 20 + 2 * i, 12 + i), category_id=1 + (i % 2) * 4) for i in range(1, 7)]
    anns.append(_ann(30, 2, (30, 20, 25, 15), category_id=5))
    return make_coco(root, anns, images=images)


def test_resume_mid_epoch_from_a_checkpoint_is_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _six_images(tmp_path / 'data')
    ref = _config(tmp_path, tmp_path / 'data', tmp_path / 'ref', max_steps=4, extra_trainer='  limit_val_batches: 0')
    build_cli(['fit', '-c', str(ref)])
    mid = tmp_path / 'ref' / 'checkpoints' / 'epoch=0-step=2.ckpt'  # 2 of 3 batches of epoch 0 done
    assert mid.is_file(), list((tmp_path / 'ref' / 'checkpoints').iterdir())
    run = _config(tmp_path, tmp_path / 'data', tmp_path / 'run', max_steps=4, extra_trainer='  limit_val_batches: 0')
    build_cli(['fit', '-c', str(run), '--ckpt_path', str(mid)])
    a = torch.load(tmp_path / 'ref' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    b = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert a['global_step'] == b['global_step'] == 4  # steps 3 and 4: the end of epoch 0, the start of epoch 1
    start = torch.load(mid, map_location='cpu', weights_only=True)['state_dict']
    for key, value in a['state_dict'].items():
        assert torch.equal(b['state_dict'][key], value), key  # bit-identical
    moved = [k for k, v in a['state_dict'].items() if v.is_floating_point() and not torch.equal(start[k], v)]
    assert any('running_mean' in k for k in moved) and any(k.endswith('weight') for k in moved)


@needs_coco_mini
def test_predict_writes_coco_results_and_drawn_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'photos'
    folder.mkdir()
    for name in ('000000000139.jpg', '000000000285.jpg'):
        (folder / name).write_bytes((COCO_MINI / 'val2017' / name).read_bytes())
    cfg = _config(tmp_path, COCO_MINI, tmp_path / 'run', max_steps=1, train='train2017',
                  train_ann='annotations/instances_train2017.json', val='val2017',
                  val_ann='annotations/instances_val2017.json', num_classes=81)
    build_cli(['predict', '-c', str(cfg), '--data.predict_images', str(folder),
               '--trainer.callbacks+=lightning_modules.detection.DetectionWriter',
               '--trainer.callbacks.output_dir', str(tmp_path / 'out'),
               '--trainer.callbacks.score_threshold', '0.0'])  # random weights: low scores; draw them all
    assert 'Wrote detections of 2 image(s)' in capsys.readouterr().out
    coco_ids = {c['id'] for c in json.loads((COCO_MINI / 'annotations/instances_val2017.json').read_text())['categories']}
    gt = COCO(str(COCO_MINI / 'annotations/instances_val2017.json'))
    for name, image_id in (('000000000139', 139), ('000000000285', 285)):
        results = json.loads((tmp_path / 'out' / f'{name}.json').read_text())
        assert len(results) == 10  # box_detections_per_img, score threshold 0
        width, height = Image.open(folder / f'{name}.jpg').size
        for r in results:
            assert r['image_id'] == image_id and r['category_id'] in coco_ids and len(r['bbox']) == 4
            assert 0 <= r['score'] <= 1 and r['bbox'][2] >= 0
            assert mask_utils.decode({'size': r['segmentation']['size'],
                                      'counts': r['segmentation']['counts'].encode()}).shape == (height, width)
        assert len(gt.loadRes(results).anns) == 10  # the COCO API reads it as results
        with Image.open(tmp_path / 'out' / f'{name}.png') as png:
            assert png.size == (width, height)
            drawn = np.asarray(png)
        assert not np.array_equal(drawn, np.asarray(Image.open(folder / f'{name}.jpg')))  # something was drawn


def test_bcn_detector_evaluates_an_image_without_detections():
    model = DetectionModule(MODEL, num_classes=3, model_kwargs=dict(SMALL, box_score_thresh=1.0)).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert len(out[0]['boxes']) == 0 and out[0]['masks'].shape[0] == 0


def test_schedule_warms_up_by_iterations_and_decays_at_the_milestone_epochs():
    from lightning_modules.core.optim import OptimConfig, create_optimizer, create_scheduler
    cfg = OptimConfig(lr=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=20, warmup_factor=0.001,
                      schedule='multistep', milestones=(0.6, 0.7), decay_rate=0.1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    opt = create_optimizer(net, cfg)
    sched = create_scheduler(opt, cfg, num_epochs=40 / 50, steps_per_epoch=50)
    lrs = {}
    for step in (0, 10, 20, 29, 30, 34, 35, 39):
        sched.step_update(num_updates=step)
        lrs[step] = opt.param_groups[0]['lr']
    assert lrs[0] == pytest.approx(2e-5) and lrs[10] == pytest.approx(0.01001, rel=1e-3)
    assert lrs[20] == lrs[29] == pytest.approx(0.02)
    assert lrs[30] == lrs[34] == pytest.approx(0.002) and lrs[35] == lrs[39] == pytest.approx(0.0002)
    decay = {g['name']: g['weight_decay'] for g in opt.param_groups}
    assert decay == {'backbone_decay': 1e-4, 'backbone_no_decay': 0.}  # norms and biases undecayed
    with pytest.raises(ValueError, match='inside the warm-up'):
        OptimConfig(lr=0.02, warmup_steps=500, warmup_factor=0.001, schedule='multistep', milestones=(0.5,)).in_epochs(100)


# -- device emulation ------------------------------------------------------------------------------------

def _record_batch_sizes(model):
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if is_batch_dependent(module):
                hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].shape[0]) and None))
    return seen, hooks


def test_emulation_splits_backbone_and_roi_head_norms_by_device():
    """With BN everywhere (WS+BN), each norm sees one device's images or one device's regions."""
    torch.manual_seed(0)
    model = zoo.create_detector('maskrcnn_resnet18_fpn_wsbn', num_classes=3, min_size=64, max_size=64, **SMALL)
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(4)]  # 2 devices x 2 images, one size (no padding difference)
    targets = [{'boxes': torch.tensor([[4., 4., 30. + i, 40.]]), 'labels': torch.tensor([1 + i % 2]),
                'masks': torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(4, 40), 1)}
               for i in range(4)]
    proposals = {}

    def count(key):
        def hook(module, args):
            proposals[key] = [len(p) for p in args[1]]
        return hook

    hook = model.roi_heads.box_roi_pool.register_forward_pre_hook(count('box'))
    hook_m = model.roi_heads.mask_roi_pool.register_forward_pre_hook(count('mask'))
    seen, hooks = _record_batch_sizes(model)
    with detector_virtual_devices(model, 2):
        model(images, targets)
    for h in hooks + [hook, hook_m]:
        h.remove()
    box = [sum(proposals['box'][:2]), sum(proposals['box'][2:])]
    mask = [sum(proposals['mask'][:2]), sum(proposals['mask'][2:])]
    backbone = [n for n in seen if n.startswith('backbone.')]
    assert backbone and all(seen[n] == [2, 2] for n in backbone)  # per-device chunks of 2 images
    assert all(seen[n] == box for n in seen if n.startswith('roi_heads.box_head'))
    assert all(seen[n] == mask for n in seen if n.startswith('roi_heads.mask_head'))
    assert any(n.startswith('roi_heads.mask_head') for n in seen)
    # ... and the backbone's output equals running each device on its own (train-mode BN)
    x = torch.stack(images)
    ref = copy.deepcopy(model.backbone)
    with detector_virtual_devices(model, 2):
        emulated = model.backbone(x)
    separate = [ref(x[:2]), ref(x[2:])]
    for key, value in emulated.items():
        torch.testing.assert_close(value, torch.cat([separate[0][key], separate[1][key]]), rtol=1e-4, atol=1e-5)
    assert not any(is_batch_dependent(m) and type(m).__name__ == 'VirtualDeviceNorm' for m in model.modules())


def test_non_finite_loss_stops_cleanly(tmp_path, monkeypatch):
    _six_images(tmp_path / 'data')
    from lightning_modules.detection import CocoDetectionDataModule
    dm = CocoDetectionDataModule(root=str(tmp_path / 'data'), train_images='images', train_annotations='instances.json',
                                 val_annotations=None, min_size=48, max_size=64, batch_size=1, num_workers=0)
    module = DetectionModule(MODEL, num_classes=3, model_kwargs=SMALL, optim=dict(warmup_steps=0))
    real_forward = module.model.forward

    def nan_at_step_2(images, targets=None):
        losses = real_forward(images, targets)
        if module.global_step == 2:
            losses['loss_mask'] = losses['loss_mask'] * float('nan')
        return losses

    monkeypatch.setattr(module.model, 'forward', nan_at_step_2)
    trainer = pl.Trainer(accelerator='cpu', max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r'loss_mask=nan.*global step 2'):
        trainer.fit(module, dm)
    assert trainer.global_step == 2


# -- real DDP (gloo, 2 processes) ------------------------------------------------------------------------

# Every proposal becomes a sampled region (no random subset), so the heads see the same regions in
# both runs and their estimates can be compared.
DDP_SIZES = dict(SMALL, rpn_post_nms_top_n_train=20, box_batch_size_per_image=512)


def _ddp_images(rank):
    g = torch.Generator().manual_seed(10 + rank)
    image = torch.rand(3, 64, 64, generator=g)
    target = {'boxes': torch.tensor([[8., 8., 40., 50.]]) + rank, 'labels': torch.tensor([1 + rank]),
              'masks': torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(8, 50), 1)}
    return [image], [target]


def _estimates(model):
    module = getattr(model, 'module', model)
    names = [n for n, m in module.named_modules() if isinstance(m, EstimatedBatchNorm2d)]
    state = module.state_dict()
    return {f'{n}.{b}': state[f'{n}.{b}'].clone() for n in names for b in ('running_mean', 'running_var')}


def _ddp_worker(rank, port, out):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = zoo.create_detector(MODEL, num_classes=3, min_size=64, max_size=64, **DDP_SIZES)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        images, targets = _ddp_images(rank)
        states = []
        for _ in range(2):
            torch.manual_seed(1)
            loss = sum(ddp(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            states.append(_estimates(model))
        torch.save(states, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)  # two processes building and training a detector: ~30 s on 2 idle cores
def test_bcn_estimates_identical_on_both_ddp_ranks_and_match_emulation(tmp_path):
    out = str(tmp_path / 'rank')
    mp.spawn(_ddp_worker, args=(free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f'{out}.{r}', weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    single = zoo.create_detector(MODEL, num_classes=3, min_size=64, max_size=64, **DDP_SIZES)
    single.train()
    init = _estimates(single)
    per_rank = [_ddp_images(r) for r in range(2)]
    images, targets = [x[0][0] for x in per_rank], [x[1][0] for x in per_rank]
    with detector_virtual_devices(single, 2):
        single(images, targets)  # first step of both devices in one process
    first = _estimates(single)
    assert len(init) > 40
    for key in init:
        for step in range(2):
            assert torch.equal(ranks[0][step][key], ranks[1][step][key]), (step, key)  # bit for bit
        assert not torch.equal(ranks[0][0][key], init[key]), key  # every estimate moved
        # the statistics of both ranks' images: what one process emulating 2 devices computes
        # (float sums in another order: tolerance relative to the layer's largest estimate)
        scale = float(first[key].abs().max())
        torch.testing.assert_close(ranks[0][0][key], first[key], rtol=1e-4, atol=1e-5 * max(scale, 1.), msg=key)
