"""Peak training memory, measured: one real training step, and how many images per device fit a budget.

Measuring (shared by ``benchmarks/bench_norms.py``, ``bench_detection.py`` and ``bench_memory.py``):

- :func:`step_peak_bytes`: the peak of live tensor bytes during one training step (forward,
  backward, SGD step), after warm-up steps (optimizer state exists, lazy init done). CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: every allocation and free that PyTorch's allocator
  reports to ``torch.profiler`` (``profile_memory=True``) during the step, added to the tensors
  alive when it starts (parameters, buffers, gradients, optimizer state, the batch). Exact and
  repeatable: no sampling of RSS, no allocator caching.
- :class:`TrainStep`: a model, its SGD optimizer, a fixed batch and a loss; optionally under
  autocast and with the zoo's memory-lean switch set for its steps (so one process can time the
  lean and the plain path round-robin).
- :func:`in_fresh_process`: runs a function in a new (spawned) Python process, so that no model,
  allocator or cache state carries over between measurements.

The batch-size helper, :func:`max_images_per_device`, measures the peak of one real step at
increasing images per device (1, 2, then guesses from the measured points, bracketing and
shrinking until it has measured a count that fits and the next one that does not); it never
extrapolates. The command line runs it for a model and a list of options::

    python -m zoo.memory --model resnet50_wsbcn --img-size 512 --budget 4GiB
    python -m zoo.memory --model resnet50_wsbcn --baseline resnet50 --img-size 224 --budget 4GiB --out fit.json
    python -m zoo.memory --task detect --model maskrcnn_resnet50_fpn_wsbcn --baseline tv_frozen_bn \\
        --img-size 800 --budget 8GiB --options lean checkpoint-heads checkpoint frozen
    python -m zoo.memory --task segment --model deeplabv3_resnet50_wsbcn --img-size 512 --budget 6GiB

``--baseline NAME`` adds a reference model measured as built (no option), ``--min-images 2`` starts
at two images (a BN segmenter cannot train on one), ``--out PATH.json`` also writes the results
and the table (``.md``), ``--in-process`` measures without a fresh process per count.

Options (one row each):

- ``plain``: the memory-lean path off (``zoo.layers.set_memory_lean(False)``);
- ``lean``: the memory-lean path on (the zoo's default);
- ``checkpoint``: lean plus every activation checkpointing the task has (classification: backbone
  stages; detection: box and mask heads and backbone stages; segmentation: head and backbone stages);
- ``checkpoint-heads``: lean plus checkpointing of the heads only (detection, segmentation);
- ``frozen``: the same architecture (lean) with every norm replaced by a frozen per-channel affine
  (:func:`zoo.layers.frozen_affine.freeze_norms`): what it would cost without normalization.

An option the installed zoo does not have (a model that does not take the checkpointing flag, or
takes it but recomputes nothing in backward) is reported as unavailable, never measured as
something else.
"""
import argparse
import difflib
import math
import multiprocessing
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'MiB', 'GiB', 'OPTIONS', 'TASKS', 'Fit', 'OptionUnavailable', 'Setup', 'TrainStep', 'build_model',
    'check_model_name', 'classification_loss', 'current_rss_bytes', 'detection_loss', 'format_bytes', 'in_fresh_process',
    'live_tensor_bytes', 'make_batch', 'make_train_step', 'max_images_per_device', 'max_rss_bytes',
    'measure_peak', 'measure_setup', 'median_seconds', 'parse_bytes', 'profiled_peak_bytes', 'segmentation_loss',
    'setup_measurer', 'step_peak_bytes', 'task_loss', 'verify_step',
]

MiB, GiB = 2 ** 20, 2 ** 30
TASKS = ('classify', 'detect', 'segment')
OPTIONS = ('plain', 'lean', 'checkpoint', 'checkpoint-heads', 'frozen')
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# torchvision's Mask R-CNN design with frozen BN (the reference of the zoo's detector benchmarks):
# 'tv_frozen_bn' is R-50-FPN, 'tv_frozen_bn_<arch>' another torchvision ResNet.
TV_DETECTOR = 'tv_frozen_bn'
TV_ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / 'shared' / 'data' / 'coco-mini'


class OptionUnavailable(RuntimeError):
    """The installed zoo cannot build or run this option (e.g. no activation checkpointing yet)."""


# --------------------------------------------------------------------------------------------
# Measuring primitives
# --------------------------------------------------------------------------------------------

def tensors_in(obj) -> List[torch.Tensor]:
    """Every tensor in ``obj`` (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def live_tensor_bytes(model: nn.Module, opt: torch.optim.Optimizer, batch) -> int:
    """Bytes of the distinct storages of parameters, buffers, gradients, optimizer state and the batch."""
    tensors = [*model.parameters(), *model.buffers(), *tensors_in(batch)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == 'cpu'}
    return sum(storages.values())


def profiled_peak_bytes(prof) -> int:
    """Peak of the running sum of the CPU allocator's allocation (+) and free (-) events in ``prof``."""
    from torch._C._profiler import _EventType
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def sync(device) -> None:
    """Wait for the device (CUDA); nothing on CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    """Median wall seconds of ``iters`` calls of ``fn``, ``sync()`` (wait for the device) around each."""
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


_KINETO_NOISE = re.compile(r'^[A-Z]+:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\]')


@contextmanager
def _quiet_profiler():
    """Drop the profiler library's (kineto's) status lines from stderr; everything else is written through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors='replace').splitlines(keepends=True)
            kept = ''.join(line for line in lines if not _KINETO_NOISE.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def step_peak_bytes(run_step: Callable[[], Any], model: nn.Module, opt: torch.optim.Optimizer, batch,
                    device='cpu', warmup: int = 1) -> Dict[str, Any]:
    """Peak live tensor bytes of one call of ``run_step`` (a training step of ``model`` with ``opt``).

    ``warmup`` steps first (optimizer state, lazy init), then gradients are dropped
    (``zero_grad(set_to_none=True)``: the step starts as a training loop's step does) and one step
    is measured. Returns ``peak_bytes`` (and, on CPU, ``live_at_step_start_bytes``) and ``loss``
    (the measured step's, as a float, when ``run_step`` returns it).
    """
    device = torch.device(device)
    for _ in range(warmup):
        run_step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    out: Dict[str, Any] = {}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        loss = run_step()
        sync(device)
        out['peak_bytes'] = torch.cuda.max_memory_allocated(device)
    else:
        from torch.profiler import ProfilerActivity, profile
        live = live_tensor_bytes(model, opt, batch)
        with _quiet_profiler():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = run_step()
            out['peak_bytes'] = live + profiled_peak_bytes(prof)
        out['live_at_step_start_bytes'] = live
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        out['loss'] = float(loss)
    return out


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def in_fresh_process(fn: Callable, *args, env: Optional[Dict[str, str]] = None, **kwargs):
    """``fn(*args, **kwargs)`` in a new spawned Python process; its result (or its exception) comes back.

    ``fn`` and the arguments must be picklable (module-level functions, ``functools.partial`` of
    them, plain data). ``env``: environment variables set for the new process only. A process that
    dies (killed for memory) raises ``concurrent.futures.process.BrokenProcessPool``.
    """
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
            future = pool.submit(_call, fn, *args, **kwargs)
            return future.result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# Losses and the training step
# --------------------------------------------------------------------------------------------

def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` for a batch ``(x, y)`` (labels taken modulo the model's classes)."""
    x, y = batch
    logits = model(x).float()
    return F.cross_entropy(logits, y % logits.shape[-1])


def detection_loss(model: nn.Module, batch) -> torch.Tensor:
    """Sum of a torchvision detector's training losses for a batch ``(images, targets)``."""
    images, targets = batch
    return sum(model(images, targets).values())


def segmentation_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of a DeepLabV3's ``'out'`` (plus 0.5 x its ``'aux'``, if any) for ``(x, mask)``."""
    x, y = batch
    out = model(x)
    logits = out['out'].float()
    y = y % logits.shape[1]
    loss = F.cross_entropy(logits, y)
    if out.get('aux') is not None:
        loss = loss + 0.5 * F.cross_entropy(out['aux'].float(), y)
    return loss


_TASK_LOSSES = {'classify': classification_loss, 'detect': detection_loss, 'segment': segmentation_loss}


def task_loss(task: str, model: nn.Module, batch) -> torch.Tensor:
    """The training loss of ``task`` (``partial(task_loss, task)`` is a picklable loss function)."""
    return _TASK_LOSSES[task](model, batch)


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _lean_switch(lean: Optional[bool]):
    """A context manager setting the zoo's memory-lean switch (``None``: leave it)."""
    if lean is None:
        return nullcontext()
    try:
        from zoo.layers import memory_lean
    except ImportError as e:
        raise OptionUnavailable(f'this zoo has no memory-lean switch (zoo.layers.memory_lean): {e}') from None
    return memory_lean(lean)


class TrainStep:
    """One model, its SGD optimizer (trainable parameters only) and a fixed batch: ``step()`` trains once.

    Args:
        model: moved to ``device`` and put in training mode.
        batch: anything ``loss_fn`` takes (tensors are moved to ``device``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        amp: autocast dtype (``'bf16'``, ``'fp16'``, a ``torch.dtype``) or None.
        lean: the zoo's memory-lean switch for this step's forward and backward (None: as set).
        seed: the RNG is seeded with it before every step (a detector's RoI sampling draws the same).
    """

    def __init__(self, model: nn.Module, batch, loss_fn: Callable = classification_loss, device='cpu',
                 amp=None, lean: Optional[bool] = None, lr: float = 1e-4, seed: Optional[int] = 0):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        self.batch = _to_device(batch, self.device)
        self.loss_fn = loss_fn
        self.amp = AMP_DTYPES[amp] if isinstance(amp, str) else amp
        self.lean, self.seed = lean, seed
        _lean_switch(lean)  # fails now, not in the middle of a run, if the switch is missing
        self._in_backward = False

    def sync(self) -> None:
        sync(self.device)

    def __call__(self) -> torch.Tensor:
        if self.seed is not None:
            torch.manual_seed(self.seed)
        with _lean_switch(self.lean):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
                loss = self.loss_fn(self.model, self.batch)
            self._in_backward = True
            try:
                loss.backward()
            finally:
                self._in_backward = False
            self.opt.step()
        return loss.detach()

    def timed(self, iters: int) -> float:
        """Median seconds of ``iters`` steps."""
        return median_seconds(self, iters, self.sync)

    def peak_bytes(self, warmup: int = 1) -> Dict[str, Any]:
        """:func:`step_peak_bytes` of this step."""
        return step_peak_bytes(self, self.model, self.opt, self.batch, self.device, warmup)

    def backward_recomputations(self) -> Tuple[int, torch.Tensor]:
        """One step, counting module forwards that run during backward (activation checkpointing
        recomputes them there; without it there are none). Returns ``(count, loss)``."""
        count = 0

        def hook(module, args, output):
            nonlocal count
            count += self._in_backward

        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            loss = self()
        finally:
            handle.remove()
        return count, loss


# --------------------------------------------------------------------------------------------
# Models, batches and options by name
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What to build and feed, by name (picklable: it travels to the measuring processes).

    ``img_size`` (height, width) is the input of a classifier or segmenter; a detector gets real
    coco-mini images (``data``; random images with boxes and masks where it is missing), resized
    by its own transform to ``min_size`` / ``max_size``.
    """
    task: str = 'classify'
    model: str = 'resnet50_wsbcn'
    option: Optional[str] = None  # one of OPTIONS; None: the model as built, the lean switch as set
    img_size: Tuple[int, int] = (224, 224)
    min_size: int = 800
    max_size: int = 1333
    device: str = 'cpu'
    amp: Optional[str] = None
    num_classes: Optional[int] = None  # default: the model's (classify), 91 (detect), 21 (segment)
    trainable_backbone_layers: int = 3
    data: Optional[str] = None
    extra: Tuple[Tuple[str, Any], ...] = field(default=())  # more build kwargs, as (key, value) pairs

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f'task must be one of {TASKS}, got {self.task!r}')
        if self.option is not None and self.option not in OPTIONS:
            raise ValueError(f'option must be one of {OPTIONS}, got {self.option!r}')
        if self.option == 'checkpoint-heads' and self.task == 'classify':
            raise ValueError("option 'checkpoint-heads' is for detectors and segmenters; a classifier has "
                             "'checkpoint' (backbone stages)")

    @property
    def lean(self) -> Optional[bool]:
        """The memory-lean switch the option runs with (None, no option: leave it as set).

        ``frozen`` runs lean: its WS convs then cost what they cost in the ``lean`` option, so the
        difference between the two is the normalization's."""
        return None if self.option is None else self.option != 'plain'

    @property
    def checkpoints(self) -> bool:
        return self.option in ('checkpoint', 'checkpoint-heads')


def check_model_name(task: str, name: str) -> None:
    """Raise :class:`zoo.UnknownModelError` (with close matches) if ``name`` is no ``task`` model; builds nothing."""
    import zoo
    if task == 'classify':
        from timm.models import is_model, split_model_name_tag
        if not is_model(split_model_name_tag(name)[0]):
            zoo.create_model(name)  # raises the zoo's error, with close matches
    elif task == 'detect':
        if name != TV_DETECTOR and not (name.startswith(TV_DETECTOR + '_') and name[len(TV_DETECTOR) + 1:] in TV_ARCHS):
            from zoo.detection.models import DETECTORS
            try:
                DETECTORS.builder(name)
            except zoo.UnknownModelError as e:
                tv = [TV_DETECTOR] + [f'{TV_DETECTOR}_{a}' for a in TV_ARCHS]
                close = difflib.get_close_matches(name, tv, n=2, cutoff=0.6)
                raise zoo.UnknownModelError(str(e) + (f' torchvision designs: {", ".join(close)}.' if close else '')) \
                    from None
    else:
        from zoo.segmentation.deeplabv3 import SEGMENTERS
        SEGMENTERS.builder(name)


def _tv_detector(name: str, setup: Setup) -> nn.Module:
    """torchvision's Mask R-CNN with a frozen-BN ResNet-FPN (random weights: the cost is the same)."""
    import torchvision.models as tvm
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    arch = name[len(TV_DETECTOR) + 1:] or 'resnet50'
    body = getattr(tvm, arch)(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, trainable_layers=setup.trainable_backbone_layers)
    return MaskRCNN(backbone, num_classes=setup.num_classes or 91, min_size=setup.min_size, max_size=setup.max_size)


def _build_unfrozen(setup: Setup) -> nn.Module:
    import zoo
    kw = dict(setup.extra)
    option = setup.option
    if setup.task == 'classify':
        if option == 'checkpoint':
            kw['checkpoint_stages'] = True
        if setup.num_classes:
            kw['num_classes'] = setup.num_classes
        build, flags = partial(zoo.create_model, setup.model), 'checkpoint_stages'
    elif setup.task == 'detect':
        if option in ('checkpoint', 'checkpoint-heads'):
            kw['checkpoint_heads'] = True
        if option == 'checkpoint':
            kw['backbone_kwargs'] = dict(kw.get('backbone_kwargs') or {}, checkpoint_stages=True)
        if setup.model == TV_DETECTOR or setup.model.startswith(TV_DETECTOR + '_'):
            if kw:
                raise OptionUnavailable(f'{setup.model} is built as torchvision builds it: no {option} option')
            return _tv_detector(setup.model, setup)
        build = partial(zoo.create_detector, setup.model, num_classes=setup.num_classes or 91,
                        trainable_backbone_layers=setup.trainable_backbone_layers,
                        min_size=setup.min_size, max_size=setup.max_size)
        flags = 'checkpoint_heads / backbone checkpoint_stages'
    else:
        if option in ('checkpoint', 'checkpoint-heads'):
            kw['checkpoint_head'] = True
        if option == 'checkpoint':
            kw['backbone_kwargs'] = dict(kw.get('backbone_kwargs') or {}, checkpoint_stages=True)
        build = partial(zoo.create_segmenter, setup.model, num_classes=setup.num_classes or 21)
        flags = 'checkpoint_head / backbone checkpoint_stages'
    try:
        return build(**kw)
    except TypeError as e:
        if 'checkpoint' in str(e) and setup.checkpoints:
            raise OptionUnavailable(f'{setup.model}: this zoo has no activation checkpointing option '
                                    f'({flags}): {e}') from None
        raise


def build_model(setup: Setup) -> nn.Module:
    """The model of ``setup`` (its option applied), in training mode, on ``setup.device``.

    ``frozen``: :func:`~zoo.layers.frozen_affine.freeze_norms`, calibrated on a one-image batch
    (training-mode forward), so activations keep the scale the norms gave them.
    """
    model = _build_unfrozen(setup).train().to(setup.device)
    if setup.option == 'frozen':
        from zoo.layers.frozen_affine import freeze_norms
        batch = _to_device(make_batch(setup, 1), torch.device(setup.device))
        freeze_norms(model, calibrate=lambda m: task_loss(setup.task, m, batch))
    return model


@lru_cache(maxsize=4)
def _coco_samples(root: str, count: int):
    """The first ``count`` coco-mini train images with at least one object: ``(image, target)`` pairs."""
    from lightning_modules.detection.data import CocoDetectionDataset
    ds = CocoDetectionDataset(Path(root) / 'train2017', Path(root) / 'annotations' / 'instances_train2017.json')
    out = []
    for i in range(len(ds)):
        x, t = ds[i]
        if len(t['boxes']):
            out.append((x, {'boxes': t['boxes'], 'labels': t['labels'], 'masks': t['masks']}))
        if len(out) == count:
            break
    return out


def _synthetic_detection(images: int, seed: int = 0):
    """Random 480x640 images with three boxes each and their box-shaped masks."""
    g = torch.Generator().manual_seed(seed)
    xs, ts = [], []
    for _ in range(images):
        h, w = 480, 640
        xs.append(torch.rand(3, h, w, generator=g))
        x1 = torch.randint(0, w // 2, (3,), generator=g)
        y1 = torch.randint(0, h // 2, (3,), generator=g)
        x2 = x1 + torch.randint(32, w // 2, (3,), generator=g)
        y2 = y1 + torch.randint(32, h // 2, (3,), generator=g)
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for k in range(3):
            masks[k, y1[k]:y2[k], x1[k]:x2[k]] = 1
        ts.append({'boxes': torch.stack([x1, y1, x2, y2], 1).float(),
                   'labels': torch.randint(1, 81, (3,), generator=g), 'masks': masks})
    return xs, ts


def detection_data_available(data: Optional[str] = None) -> bool:
    root = Path(data or COCO_MINI)
    if not (root / 'annotations' / 'instances_train2017.json').is_file():
        return False
    try:
        import lightning_modules.detection.data  # noqa: F401
    except ImportError:
        return False
    return True


def make_batch(setup: Setup, images: int):
    """A batch of ``images`` for ``setup``'s task (CPU tensors; the same for every call).

    classify: ``(x, y)`` random normal images and labels; segment: ``(x, mask)``; detect: real
    coco-mini train images (original size) with their boxes, labels and masks, or random ones with
    box masks where coco-mini (or ``lightning_modules``) is missing. More images than coco-mini's
    train images with objects (about 100) repeat them in order.
    """
    g = torch.Generator().manual_seed(0)
    if setup.task == 'detect':
        if detection_data_available(setup.data):
            samples = _coco_samples(str(setup.data or COCO_MINI), images)
            if not samples:
                raise ValueError(f'{setup.data or COCO_MINI}: no train images with objects')
            samples = [samples[i % len(samples)] for i in range(images)]
            return [x for x, _ in samples], [t for _, t in samples]
        return _synthetic_detection(images)
    x = torch.randn(images, 3, *setup.img_size, generator=g)
    if setup.task == 'classify':
        return x, torch.randint(0, 1000, (images,), generator=g)
    return x, torch.randint(0, 1000, (images, *setup.img_size), generator=g)


def make_train_step(setup: Setup, images: int, verify: bool = True, lr: float = 1e-4) -> TrainStep:
    """The :class:`TrainStep` of ``setup`` at ``images`` per device.

    ``verify``: run one step now; for a checkpointing option, one that recomputes nothing in
    backward (the flag was accepted but ignored) raises :class:`OptionUnavailable`.
    """
    step = TrainStep(build_model(setup), make_batch(setup, images), partial(task_loss, setup.task),
                     device=setup.device, amp=setup.amp, lean=setup.lean, lr=lr)
    if verify:
        verify_step(step, setup.checkpoints, f'{setup.model} {setup.option}')
    return step


def verify_step(step: TrainStep, checkpoints: bool, what: str) -> int:
    """One step; with ``checkpoints``, raise :class:`OptionUnavailable` if backward recomputed nothing."""
    count, _ = step.backward_recomputations()
    if checkpoints and not count:
        raise OptionUnavailable(f'{what}: the checkpointing flag was accepted but nothing is recomputed in '
                                f'backward (not implemented by this zoo)')
    return count


def measure_peak(build_model: Callable[[], nn.Module], make_batch: Callable[[int], Any], images: int, *,
                 loss_fn: Callable = classification_loss, device='cpu', amp=None, lean: Optional[bool] = None,
                 expect_recompute: bool = False, warmup: int = 1, threads: Optional[int] = None) -> Dict[str, Any]:
    """Peak bytes of one training step of ``build_model()`` on ``make_batch(images)`` (see :func:`step_peak_bytes`).

    The first warm-up step counts the modules recomputed in backward (``recomputed_modules``);
    ``expect_recompute`` with none raises :class:`OptionUnavailable`. ``loss_finite`` says whether
    the measured step's loss was finite (a non-finite loss can change the work a detector does).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = TrainStep(build_model(), make_batch(images), loss_fn, device=device, amp=amp, lean=lean)
    recomputed = verify_step(step, expect_recompute, 'this model')
    out = step.peak_bytes(warmup=max(warmup - 1, 0))
    out['recomputed_modules'] = recomputed
    out['loss_finite'] = math.isfinite(out.get('loss', 0.0))
    out['images'] = images
    return out


def setup_measurer(setup: Setup, warmup: int = 1, threads: Optional[int] = None):
    """``(build_model, make_batch, measure_kwargs)`` of ``setup`` for :func:`measure_peak` / :func:`max_images_per_device`."""
    kwargs = dict(loss_fn=partial(task_loss, setup.task), device=setup.device, amp=setup.amp, lean=setup.lean,
                  expect_recompute=setup.checkpoints, warmup=warmup, threads=threads)
    return partial(build_model, setup), partial(make_batch, setup), kwargs


def measure_setup(setup: Setup, images: int, fresh_process: bool = True, warmup: int = 1,
                  threads: Optional[int] = None) -> Dict[str, Any]:
    """:func:`measure_peak` of ``setup`` at ``images``, in a fresh process by default."""
    build, batch, kwargs = setup_measurer(setup, warmup, threads)
    run = in_fresh_process if fresh_process else _call
    return run(measure_peak, build, batch, images, **kwargs)


# --------------------------------------------------------------------------------------------
# The batch-size helper
# --------------------------------------------------------------------------------------------

@dataclass
class Fit:
    """The answer of :func:`max_images_per_device`.

    ``images``: the largest measured count whose peak fits the budget (0: not even one image);
    ``peak_bytes``: its measured peak; ``next_peak_bytes``: the measured peak at ``images + 1``
    (over the budget), None when the search stopped at ``max_images`` (``capped``);
    ``measurements``: every measured count and its peak bytes.
    """
    images: int
    peak_bytes: Optional[int]
    next_peak_bytes: Optional[int]
    budget_bytes: int
    measurements: Dict[int, int]
    capped: bool = False


def _next_count(peaks: Dict[int, int], budget: int, lo: int, hi: Optional[int], max_images: int,
                bisect: bool = False) -> int:
    """The next count to measure: the linear guess through the measured points nearest the budget
    (the bracket's ends once there is one), strictly inside the bracket; its middle with ``bisect``
    (the guess moved the same end twice: the curve is bent and guesses would crawl)."""
    if hi is not None and bisect:
        return (lo + hi) // 2
    fits = sorted(n for n in peaks if peaks[n] <= budget)
    x2 = hi if hi is not None else (fits[-2] if len(fits) > 1 else None)
    if x2 is None or peaks[x2] == peaks[lo]:
        guess = 2 * lo
    else:
        slope = (peaks[x2] - peaks[lo]) / (x2 - lo)
        guess = 2 * lo if slope <= 0 else lo + int((budget - peaks[lo]) // slope)
    if hi is None:
        return max(lo + 1, min(guess, 8 * lo, max_images))
    return min(max(guess, lo + 1), hi - 1)


def max_images_per_device(build_model: Callable[[], nn.Module], make_batch: Callable[[int], Any], budget_bytes: int,
                          *, min_images: int = 1, max_images: int = 256, fresh_process: bool = False,
                          progress: Optional[Callable[[str], None]] = print, **measure_kwargs) -> Fit:
    """The most images per device whose training step's measured peak memory fits ``budget_bytes``.

    Measures :func:`measure_peak` (one real training step of ``build_model()`` on
    ``make_batch(n)``, ``loss_fn`` etc. in ``measure_kwargs``) at 1 (``min_images``), 2, then at counts guessed
    from the measured points, until it has measured a count ``n`` that fits and ``n + 1`` that does
    not (or ``max_images`` fits). The answer is always a measured count, never an extrapolation;
    the search assumes the peak grows with the count, as it does.

    Args:
        min_images: the first count measured (a model that cannot train on fewer, e.g. a BatchNorm
            that sees a single value per channel at one image); 0 images in the answer then means
            that not even ``min_images`` fit.
        max_images: the search stops when this count fits (the answer is then ``capped``).
        fresh_process: each measurement in a new process (then ``build_model``, ``make_batch`` and
            the loss must be picklable: module-level functions or partials of them).
        progress: called with a line per measurement (None: quiet).
    """
    if budget_bytes <= 0:
        raise ValueError(f'budget_bytes must be positive, got {budget_bytes}')
    if not 1 <= min_images <= max_images:
        raise ValueError(f'need 1 <= min_images <= max_images, got {min_images} and {max_images}')
    peaks: Dict[int, int] = {}
    run = in_fresh_process if fresh_process else _call

    def fits(n: int) -> bool:
        if n not in peaks:
            start = time.time()
            peaks[n] = run(measure_peak, build_model, make_batch, n, **measure_kwargs)['peak_bytes']
            if progress:
                verdict = 'fits' if peaks[n] <= budget_bytes else 'over budget'
                progress(f'  {n:>3} image(s): peak {peaks[n] / MiB:,.0f} MiB, {verdict} ({time.time() - start:.0f} s)')
        return peaks[n] <= budget_bytes

    lo, hi = 0, None
    n, moved = min_images, []  # moved: which end of the bracket each measurement inside it moved
    while True:
        if fits(n):
            lo = n
            if lo >= max_images:
                break
        else:
            hi = n
        if hi is not None:
            moved.append('lo' if n == lo else 'hi')
        if lo == 0 or (hi is not None and hi - lo == 1):
            break
        n = _next_count(peaks, budget_bytes, lo, hi, max_images, bisect=moved[-2:] in (['lo', 'lo'], ['hi', 'hi']))
    return Fit(lo, peaks.get(lo), peaks.get(lo + 1), budget_bytes, dict(sorted(peaks.items())),
               capped=hi is None and lo >= max_images)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_UNITS = {'': 1, 'b': 1, 'k': 2 ** 10, 'kib': 2 ** 10, 'kb': 10 ** 3, 'm': MiB, 'mib': MiB, 'mb': 10 ** 6,
          'g': GiB, 'gib': GiB, 'gb': 10 ** 9, 't': 2 ** 40, 'tib': 2 ** 40, 'tb': 10 ** 12}


def parse_bytes(text: str) -> int:
    """``'4GiB'`` -> 4294967296; KiB / MiB / GiB (and K / M / G) are binary, KB / MB / GB decimal."""
    m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f'not a size: {text!r} (examples: 4GiB, 512MiB, 8G, 2.5GB)')
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: Optional[int]) -> str:
    return '-' if n is None else f'{n / MiB:,.0f}'


def _parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog='python -m zoo.memory',
        description='How many images per device fit a memory budget, for each option: measured peak memory of '
                    'one real training step (SGD with momentum) at increasing counts, never extrapolated.',
        epilog='Options: plain (memory-lean path off), lean (on, the default), checkpoint (lean + all activation '
               'checkpointing of the task), checkpoint-heads (lean + heads only; detect / segment), frozen (every '
               'norm a frozen per-channel affine: the cost without normalization).')
    p.add_argument('--model', nargs='+', required=True, help='model name(s) of the task; detect also takes '
                   f'{TV_DETECTOR} (torchvision\'s frozen-BN Mask R-CNN R-50-FPN)')
    p.add_argument('--baseline', help='a reference model measured as built, without options (e.g. resnet50, '
                   f'{TV_DETECTOR}, deeplabv3_resnet50): the first row')
    p.add_argument('--task', choices=TASKS, default='classify')
    p.add_argument('--img-size', type=int, nargs='+', required=True,
                   help='SIZE or HEIGHT WIDTH (classify, segment); detect: the shorter side (min_size)')
    p.add_argument('--max-size', type=int, help='detect: the longer side at most (default SIZE * 1333 / 800)')
    p.add_argument('--budget', required=True, help='memory per device: 4GiB, 512MiB, 16G, 2.5GB')
    p.add_argument('--options', nargs='+', choices=OPTIONS, help='default: plain lean checkpoint frozen')
    p.add_argument('--device', default='cpu', help='cpu (allocator events; default) or cuda')
    p.add_argument('--amp', choices=sorted(AMP_DTYPES), default='none', help='autocast dtype')
    p.add_argument('--min-images', type=int, default=1, help='the first count measured (default 1; 2 for a '
                   'model that cannot train on one image)')
    p.add_argument('--max-images', type=int, default=64, help='stop searching at this count (default 64)')
    p.add_argument('--num-classes', type=int, help='default: the model\'s (classify), 91 (detect), 21 (segment)')
    p.add_argument('--data', help=f'detect: coco-mini root (default {COCO_MINI})')
    p.add_argument('--threads', type=int, help='torch threads of the measuring processes')
    p.add_argument('--out', type=Path, help='also write the results to this JSON file and the table next to it (.md)')
    p.add_argument('--in-process', action='store_true', help='measure in this process (faster; default: a fresh '
                   'process per measurement)')
    args = p.parse_args(argv)
    if len(args.img_size) > 2:
        p.error('--img-size takes SIZE or HEIGHT WIDTH')
    try:
        args.budget_bytes = parse_bytes(args.budget)
    except ValueError as e:
        p.error(str(e))
    args.options = args.options or (['plain', 'lean', 'checkpoint', 'frozen'])
    if args.task == 'classify' and 'checkpoint-heads' in args.options:
        p.error("--options checkpoint-heads is for --task detect / segment")
    import zoo
    for name in args.model + ([args.baseline] if args.baseline else []):
        try:
            check_model_name(args.task, name)
        except zoo.UnknownModelError as e:
            other = [t for t in TASKS if t != args.task and _is_task_model(t, name)]
            p.error(str(e) + (f' ({name} is a {other[0]} model: --task {other[0]})' if other else ''))
    return args


def _is_task_model(task: str, name: str) -> bool:
    import zoo
    try:
        check_model_name(task, name)
        return True
    except zoo.UnknownModelError:
        return False


def main(argv=None) -> Dict[Tuple[str, str], Any]:
    args = _parse_args(argv)
    h, w = args.img_size[0], args.img_size[-1]
    max_size = args.max_size or round(h * 1333 / 800)
    size = f'min {h} / max {max_size} px' if args.task == 'detect' else (f'{h} px' if h == w else f'{h}x{w} px')
    print(f'{args.task}, {size}, budget {args.budget} ({args.budget_bytes / MiB:,.0f} MiB), {args.device}, '
          f'amp {args.amp}; peak of one training step (SGD, momentum) measured at each count', flush=True)
    if args.task == 'detect' and not detection_data_available(args.data):
        print(f'  coco-mini not found ({args.data or COCO_MINI}): random images with boxes and masks', flush=True)
    results: Dict[Tuple[str, str], Any] = {}
    started = time.time()
    runs = [(args.baseline, None)] if args.baseline else []
    runs += [(name, option) for name in args.model for option in args.options]
    for name, option in runs:
        setup = Setup(task=args.task, model=name, option=option, img_size=(h, w), min_size=h, max_size=max_size,
                      device=args.device, amp=None if args.amp == 'none' else args.amp,
                      num_classes=args.num_classes, data=args.data)
        print(f'{name} {option or "(as built)"}:', flush=True)
        build, batch, kwargs = setup_measurer(setup, threads=args.threads)
        try:
            results[name, option] = max_images_per_device(
                build, batch, args.budget_bytes, min_images=args.min_images, max_images=args.max_images,
                fresh_process=not args.in_process,
                progress=lambda line: print(line, flush=True), **kwargs)
        except OptionUnavailable as e:
            results[name, option] = f'unavailable: {e}'
            print(f'  {results[name, option]}', flush=True)
        except Exception as e:  # noqa: BLE001 (one option failing, e.g. BN at one image, is a result)
            results[name, option] = f'error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            print(f'  {results[name, option]}', flush=True)
    table = fit_table(results)
    header = (f'{args.task}, {size}, budget {args.budget} ({args.budget_bytes / MiB:,.0f} MiB), {args.device}, '
              f'amp {args.amp}, torch {torch.__version__}, {torch.get_num_threads()} threads')
    print()
    print(table)
    print(f'\n({time.time() - started:.0f} s)')
    if args.out:
        import json
        rows = [dict(model=name, option=option, **({'images': fit.images, 'peak_bytes': fit.peak_bytes,
                                                    'next_peak_bytes': fit.next_peak_bytes, 'capped': fit.capped,
                                                    'measurements': fit.measurements}
                                                   if isinstance(fit, Fit) else {'status': fit}))
                for (name, option), fit in results.items()]
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({'settings': settings, 'header': header, 'results': rows,
                                        'seconds': time.time() - started}, indent=1))
        args.out.with_suffix('.md').write_text(header + '\n\n' + table + '\n')
        print(f'wrote {args.out} and {args.out.with_suffix(".md")}')
    return results


def fit_table(results: Dict[Tuple[str, str], Any]) -> str:
    """A markdown table of :func:`main`'s results: model, option, images per device, peaks."""
    lines = ['| model | option | images / device | peak MiB | peak MiB at one more | measured counts |',
             '|---|---|---|---|---|---|']
    for (name, option), fit in results.items():
        if isinstance(fit, Fit):
            images = f'>= {fit.images}' if fit.capped else str(fit.images)
            counts = ', '.join(str(n) for n in fit.measurements)
            lines.append(f'| {name} | {option or "as built"} | {images} | {format_bytes(fit.peak_bytes)} | '
                         f'{format_bytes(fit.next_peak_bytes)} | {counts} |')
        else:
            lines.append(f'| {name} | {option or "as built"} | {fit} | - | - | - |')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
