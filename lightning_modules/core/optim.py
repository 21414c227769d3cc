"""Optimizer and learning-rate schedule for the zoo's Lightning modules (image and video alike).

Built on timm: ``create_optimizer_v2`` (SGD / AdamW) and ``create_scheduler_v2`` (warm-up, then
cosine or step decay), stepped per optimizer update so that short runs and resumed runs follow the
same curve. Parameter groups:

- no weight decay on norm weights and biases (every parameter with ``ndim <= 1``: BN / GN / BCN
  affines, conv and linear biases) nor on names in ``model.no_weight_decay()``;
- under FSDP every parameter is a flat 1-D shard by the time the optimizer is built, so the ``ndim``
  rule needs the shapes from before wrapping: :func:`param_ndims` records them (the Lightning
  modules do so when they build their model) and :func:`param_groups` takes the record, matching
  names without FSDP's / activation checkpointing's / ``torch.compile``'s wrapper prefixes;
- an ``lr_scale`` per group (timm's schedulers multiply the scheduled lr by it), used to give a
  fine-tuned backbone a lower learning rate than its new head;
- parameters with ``requires_grad=False`` (a frozen backbone) are left out.
"""
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

__all__ = ['OptimConfig', 'OPTIMIZERS', 'SCHEDULES', 'param_groups', 'param_ndims', 'unwrapped_name',
           'create_optimizer', 'create_scheduler', 'head_parameters']

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'step', 'multistep', 'poly', 'constant')


@dataclass
class OptimConfig:
    """The optimizer and its schedule: one nested argument of every task's module (``optim:`` in YAML).

    Epochs may be fractional (converted to optimizer steps). Warm-up is given in epochs
    (``warmup_epochs``) or in steps (``warmup_steps``, the detection recipes' unit), and starts
    from ``warmup_lr`` or, when set, ``lr * warmup_factor``. ``milestones`` count from the start
    of training, warm-up included (mmdet's 2x: 24 epochs, milestones 16 and 22).
    ``backbone_lr_scale`` multiplies the learning rate of every parameter outside the head.
    """
    optimizer: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: Sequence[float] = (0.9, 0.999)
    schedule: str = 'cosine'
    warmup_epochs: float = 0.
    warmup_steps: int = 0
    warmup_lr: float = 1e-5
    warmup_factor: Optional[float] = None
    min_lr: float = 0.
    decay_epochs: float = 30.  # 'step': decay every this many epochs
    milestones: Sequence[float] = (30., 60., 90.)  # 'multistep', in epochs from the start
    decay_rate: float = 0.1  # 'step' / 'multistep': the factor; 'poly': the power (0.9 for DeepLab)
    backbone_lr_scale: float = 1.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f'Unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}.')
        if self.schedule not in SCHEDULES:
            raise ValueError(f'Unknown schedule {self.schedule!r}; choose one of {SCHEDULES}.')
        if self.lr <= 0:
            raise ValueError(f'lr must be positive, got {self.lr}')
        if self.warmup_epochs and self.warmup_steps:
            raise ValueError(f'Give the warm-up in epochs or in steps, not both (warmup_epochs={self.warmup_epochs}, '
                             f'warmup_steps={self.warmup_steps})')
        self.betas, self.milestones = tuple(self.betas), tuple(float(m) for m in self.milestones)

    def in_epochs(self, steps_per_epoch: int) -> 'OptimConfig':
        """This config with the warm-up in epochs and its start as ``warmup_lr``, what the scheduler takes."""
        warmup = self.warmup_steps / steps_per_epoch if self.warmup_steps else self.warmup_epochs
        if self.schedule == 'multistep' and any(m <= warmup for m in self.milestones) and warmup:
            raise ValueError(f'milestones {[m for m in self.milestones if m <= warmup]} (epochs) fall inside the '
                             f'warm-up of {warmup:.3g} epochs ({steps_per_epoch} steps per epoch)')
        return replace(self, warmup_epochs=warmup, warmup_steps=0, warmup_factor=None,
                       warmup_lr=self.lr * self.warmup_factor if self.warmup_factor is not None else self.warmup_lr)

    def as_dict(self) -> Dict[str, Any]:
        """Plain values (lists, not tuples) for checkpoint hyper-parameters and YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def head_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The classifier's parameters (timm models name it through ``get_classifier``)."""
    get = getattr(model, 'get_classifier', None)
    head = get() if callable(get) else None
    return list(head.parameters()) if isinstance(head, nn.Module) else []


# Module names that wrappers insert into parameter names: FSDP, activation checkpointing, torch.compile.
_WRAPPER_PREFIXES = re.compile(r'(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.')


def unwrapped_name(name: str) -> str:
    """A parameter name as it was before FSDP / checkpointing / compile wrapped its modules."""
    return _WRAPPER_PREFIXES.sub(r'\1', name)


def param_ndims(model: nn.Module) -> Dict[str, int]:
    """``{parameter name: ndim}`` of an unwrapped model; record it before FSDP flattens the parameters."""
    return {unwrapped_name(name): p.ndim for name, p in model.named_parameters()}


def param_groups(
        model: nn.Module,
        weight_decay: float,
        backbone_lr_scale: float = 1.0,
        ndims: Optional[Dict[str, int]] = None,
) -> List[Dict[str, Any]]:
    """Groups by (head or backbone) x (decayed or not); trainable parameters only.

    ``ndims``: :func:`param_ndims` of the model before it was wrapped (needed under FSDP).
    """
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    head_ids = {id(p) for p in head_parameters(model)}
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = unwrapped_name(name)
        decay = not (_ndim(name, p, ndims) <= 1 or name.endswith('.bias') or name in no_decay_names)
        is_head = id(p) in head_ids
        key = (is_head, decay)
        if key not in groups:
            groups[key] = {
                'params': [], 'weight_decay': weight_decay if decay else 0.,
                'lr_scale': 1.0 if is_head else backbone_lr_scale,
                'name': f'{"head" if is_head else "backbone"}_{"decay" if decay else "no_decay"}'}
        groups[key]['params'].append(p)
    if not groups:
        raise ValueError('The model has no trainable parameters (is everything frozen?)')
    return list(groups.values())


def _ndim(name: str, p: torch.Tensor, ndims: Optional[Dict[str, int]]) -> int:
    if ndims is not None and name in ndims:
        return ndims[name]
    if getattr(p, '_fsdp_flattened', False):  # FSDP's mark on the parameters it flattened (torch's FSDP_FLATTENED)
        raise ValueError(
            f'Parameter {name!r} is an FSDP-flattened shard: its ndim says nothing about weight decay. Pass '
            f'ndims=param_ndims(model) recorded before the model was wrapped (FSDP with use_orig_params=True, '
            f'so that parameters keep their names).')
    return p.ndim


def create_optimizer(
        model: nn.Module,
        cfg: OptimConfig,
        ndims: Optional[Dict[str, int]] = None,
) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`param_groups` (``ndims``: see there)."""
    groups = param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale, ndims)
    if cfg.optimizer == 'sgd':
        return create_optimizer_v2(groups, opt='sgd', lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return create_optimizer_v2(groups, opt='adamw', lr=cfg.lr, betas=tuple(cfg.betas))


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, num_epochs: float, steps_per_epoch: int):
    """A timm scheduler in optimizer steps: call ``step_update(global_step)`` after each update."""
    cfg = cfg.in_epochs(max(1, steps_per_epoch))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.schedule,
        num_epochs=max(num_epochs - cfg.warmup_epochs, 1. / max(1, steps_per_epoch)),
        warmup_prefix=True,  # decay starts from the peak lr once warm-up ends; total stays num_epochs
        decay_epochs=cfg.decay_epochs,
        # Milestones count from the start; timm counts them after the warm-up (warmup_prefix), and its
        # multistep decays when t + 1 reaches one: shift by both so the decay starts exactly at the
        # milestone's first step.
        decay_milestones=[m - cfg.warmup_epochs + 1. / max(1, steps_per_epoch) for m in cfg.milestones],
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=max(1, steps_per_epoch),
    )
    scheduler.step_update(0)  # apply warm-up / lr_scale before the first step
    return scheduler
