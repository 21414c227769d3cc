"""Publish a zoo model to the Hugging Face Hub: a Hub-ready folder, checked, then pushed with HfApi.

The model card, the run's facts and the push; ``hub_upload.py`` at the repository root is its entry point.

    python hub_upload.py lightning_logs/version_0/checkpoints/best.ckpt --repo-id ORG/NAME --dry-run --out export/
    python hub_upload.py export/ --repo-id ORG/NAME --private --revision v1 --commit-message "CIFAR-10, 2 img/GPU"
    python hub_upload.py resnet50_wsbcn.in1k --weights rn50_bcn_ws.pth --repo-id ORG/resnet50_wsbcn.in1k

The source is a Lightning checkpoint (``.ckpt``), a model folder (``zoo.converters`` output or
an earlier export), or a timm / zoo model name with ``--weights`` (or its own pretrained weights).
The folder holds ``model.safetensors``, a ``config.json`` (a classifier's is timm's: architecture,
num_classes, label names, model args, pretrained_cfg with mean/std/input size, and the digests the
loaders check) and a model card (``README.md``). Before anything is pushed the folder is loaded
back and must give bit-identical outputs. ``--dry-run`` stops after writing the folder.

Every task publishes the same way; the task is read from the checkpoint (its LightningModule):

- segmenters (``SemanticSegmenter``, e.g. a CamVid DeepLabV3 run) and detectors (``DetectionModule``,
  Faster / Mask R-CNN): ``config.json`` is the zoo's task-model config (:mod:`zoo.hub.task_models`: task,
  model name, builder kwargs, label names, mean/std, eval size, digests); a detector records the sizes it
  resizes to and its COCO category names, and the mean/std/eval size it applies itself;
- video models (``VideoClassifier``, TSM): timm's config, with ``num_segments`` in its model args and
  ``"task": "video-classification"``; the input size is a frame's (the run's ``crop_size``).

The card states the task, its input and output, and the run's test metrics (validation ones for a run without
a test): top-1 / top-5 accuracy, mIoU and per-class IoU, box and mask mAP. The reload check feeds each
model its own input: images, a (1, C, T, H, W) clip, or a detector's list of images (every scored box kept,
so that its output is not empty); ``zoo.load_model`` loads every folder back.

The token is never a flag: HfApi reads ``HF_TOKEN`` or the login saved by ``hf auth login``;
this script never reads, prints or logs it.
"""
import argparse
import csv
import json
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from timm.models import model_entrypoint, split_model_name_tag

import zoo
from zoo.hub import CONFIG_NAME, WEIGHTS_NAME, WeightsError, load_hub_model, read_lightning_checkpoint
from zoo.hub.task_models import (
    CLASSIFICATION_TASK, DETECTION_TASK, SEGMENTATION_TASK, TASK_KINDS, VIDEO_TASK, clip_frames, is_task_model,
    model_task, save_hub_task_model)

PAPERS = {
    'ws_bcn': ('Micro-Batch Training with Batch-Channel Normalization and Weight Standardization', 'arXiv:1903.10520', """@article{qiao2019micro,
  title={Micro-Batch Training with Batch-Channel Normalization and Weight Standardization},
  author={Qiao, Siyuan and Wang, Huiyu and Liu, Chenxi and Shen, Wei and Yuille, Alan},
  journal={arXiv preprint arXiv:1903.10520},
  year={2019}
}"""),
    'bgn': ('Batch Group Normalization', 'arXiv:2012.02782', """@article{zhou2020batch,
  title={Batch Group Normalization},
  author={Zhou, Xiao-Yun and Sun, Jiacheng and Ye, Nanyang and Lan, Xu and Luo, Qijun and Lai, Bo-Lin and Esperanca, Pedro and Yang, Guang-Zhong and Li, Zhenguo},
  journal={arXiv preprint arXiv:2012.02782},
  year={2020}
}"""),
    'gn': ('Group Normalization', 'arXiv:1803.08494', """@inproceedings{wu2018group,
  title={Group Normalization},
  author={Wu, Yuxin and He, Kaiming},
  booktitle={ECCV},
  year={2018}
}"""),
    'resnet': ('Deep Residual Learning for Image Recognition', 'arXiv:1512.03385', """@inproceedings{he2016deep,
  title={Deep Residual Learning for Image Recognition},
  author={He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle={CVPR},
  year={2016}
}"""),
    'resnext': ('Aggregated Residual Transformations for Deep Neural Networks', 'arXiv:1611.05431', """@inproceedings{xie2017aggregated,
  title={Aggregated Residual Transformations for Deep Neural Networks},
  author={Xie, Saining and Girshick, Ross and Doll{\\'a}r, Piotr and Tu, Zhuowen and He, Kaiming},
  booktitle={CVPR},
  year={2017}
}"""),
    'deeplabv3': ('Rethinking Atrous Convolution for Semantic Image Segmentation', 'arXiv:1706.05587', """@article{chen2017rethinking,
  title={Rethinking Atrous Convolution for Semantic Image Segmentation},
  author={Chen, Liang-Chieh and Papandreou, George and Schroff, Florian and Adam, Hartwig},
  journal={arXiv preprint arXiv:1706.05587},
  year={2017}
}"""),
    'faster_rcnn': ('Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks', 'arXiv:1506.01497', """@inproceedings{ren2015faster,
  title={Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks},
  author={Ren, Shaoqing and He, Kaiming and Girshick, Ross and Sun, Jian},
  booktitle={NeurIPS},
  year={2015}
}"""),
    'mask_rcnn': ('Mask R-CNN', 'arXiv:1703.06870', """@inproceedings{he2017mask,
  title={Mask R-CNN},
  author={He, Kaiming and Gkioxari, Georgia and Doll{\\'a}r, Piotr and Girshick, Ross},
  booktitle={ICCV},
  year={2017}
}"""),
    'fpn': ('Feature Pyramid Networks for Object Detection', 'arXiv:1612.03144', """@inproceedings{lin2017feature,
  title={Feature Pyramid Networks for Object Detection},
  author={Lin, Tsung-Yi and Doll{\\'a}r, Piotr and Girshick, Ross and He, Kaiming and Hariharan, Bharath and Belongie, Serge},
  booktitle={CVPR},
  year={2017}
}"""),
    'tsm': ('TSM: Temporal Shift Module for Efficient Video Understanding', 'arXiv:1811.08383', """@inproceedings{lin2019tsm,
  title={TSM: Temporal Shift Module for Efficient Video Understanding},
  author={Lin, Ji and Gan, Chuang and Han, Song},
  booktitle={ICCV},
  year={2019}
}"""),
    'timm': ('PyTorch Image Models', 'github.com/huggingface/pytorch-image-models', """@misc{rw2019timm,
  author={Ross Wightman},
  title={PyTorch Image Models},
  year={2019},
  publisher={GitHub},
  howpublished={\\url{https://github.com/huggingface/pytorch-image-models}}
}"""),
}


@dataclass
class RunInfo:
    """What the model card says about the run that produced the weights."""
    source: str
    dataset: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    train_config: Optional[Dict[str, Any]] = None
    images_per_device: Optional[int] = None
    label_names: Optional[List[str]] = None
    license: Optional[str] = None
    data_config: Dict[str, Any] = field(default_factory=dict)  # the run's data settings (the CLI's flags win)


# ----------------------------------------------------------------------------------- run information

def _find_key(tree: Any, keys) -> Any:
    if isinstance(tree, dict):
        for k in keys:
            if k in tree and tree[k] is not None and not isinstance(tree[k], dict):
                return tree[k]
        for v in tree.values():
            found = _find_key(v, keys)
            if found is not None:
                return found
    return None


def read_metrics_file(path: Path) -> Dict[str, Any]:
    """A JSON dict, or a Lightning CSVLogger ``metrics.csv`` (last logged value of each column)."""
    if path.suffix == '.json':
        return dict(json.loads(path.read_text()))
    last: Dict[str, Any] = {}
    with path.open(newline='') as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ('', None) and k not in ('epoch', 'step'):
                    last[k] = float(v)
    return last


def _read_config_file(path: Path) -> Dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()) or {})


def _log_dir_file(ckpt_path: Path, names) -> Optional[Path]:
    """A file the Lightning loggers / CLI leave next to ``checkpoints/`` (metrics.csv, config.yaml)."""
    for d in (ckpt_path.parent, ckpt_path.parent.parent):
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _label_names(arg: Optional[str]) -> Optional[List[str]]:
    """From a text file (one per line), a JSON list, or an ImageFolder root (its sorted class folders)."""
    if not arg:
        return None
    p = Path(arg)
    if p.is_dir():
        return sorted(d.name for d in p.iterdir() if d.is_dir())
    text = p.read_text()
    return list(json.loads(text)) if p.suffix == '.json' else [line.strip() for line in text.splitlines() if line.strip()]


def _card_value(text: str) -> Any:
    """A metrics-table cell back as the number the card printed (int, float) or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_card_run_info(card_path: Path) -> RunInfo:
    """The run facts a card written by :func:`build_model_card` records (source, dataset, images per
    device, metrics table, training config, license), so that re-exporting or pushing a published
    folder keeps its measured results and ``model-index`` instead of replacing them by "(none recorded)"."""
    card = ModelCard.load(card_path)
    info = RunInfo(source=str(card_path.parent), dataset=(card.data.datasets or [None])[0], license=card.data.license)
    section = None
    config_lines: List[str] = []
    for line in card.text.splitlines():
        if line.startswith('## '):
            section = line[3:].strip()
        elif line.startswith('- **Weights from:** '):
            info.source = line.split(':** ', 1)[1].strip()
        elif line.startswith('- **Images per device:** ') and line.split(':** ', 1)[1].strip().isdigit():
            info.images_per_device = int(line.split(':** ', 1)[1])
        elif section == 'Metrics of the run' and line.startswith('| ') and not line.startswith('| metric |'):
            name, value = (cell.strip() for cell in line.strip().strip('|').split('|', 1))
            if name != '(none recorded)':
                info.metrics[name] = _card_value(value)
        elif section == 'Training config' and not line.startswith('```'):
            config_lines.append(line)
    config = yaml.safe_load('\n'.join(config_lines)) if config_lines else None
    info.train_config = config if isinstance(config, dict) else None  # "(not recorded)" is a plain string
    return info


# ----------------------------------------------------------------------------------- sources

def load_source(args) -> Tuple[torch.nn.Module, RunInfo]:
    """The model and what is known about its run, from a .ckpt, a folder or a model name."""
    src = Path(args.source)
    info = RunInfo(source=args.source)
    if src.is_file():
        ckpt = read_lightning_checkpoint(src)
        model = zoo.load_lightning_checkpoint(src, model_name=args.model_name)
        metrics_file = _log_dir_file(src, ('metrics.csv',))
        info.metrics = read_metrics_file(metrics_file) if metrics_file else {}
        if ckpt.best_score is not None:
            info.metrics.setdefault(f'best {ckpt.monitor}', ckpt.best_score)
        if ckpt.epochs_completed is not None:
            info.metrics.setdefault('epochs', ckpt.epochs_completed)
        elif ckpt.epoch is not None:
            info.metrics.setdefault('epochs', ckpt.epoch + 1)
        if ckpt.global_step:  # the steps too: epochs of different lengths (drop_last, padded devices) differ in steps
            info.metrics.setdefault('optimizer steps', ckpt.global_step)
        cfg_file = _log_dir_file(src, ('config.yaml', 'hparams.yaml'))
        info.train_config = _read_config_file(cfg_file) if cfg_file else ckpt.hparams
        for key in ('label_names', 'class_names', 'classes'):
            names = _find_key(ckpt.hparams, (key,))
            if isinstance(names, (list, tuple)):
                info.label_names = list(names)
                break
    elif src.is_dir():
        model = load_hub_model(str(src))
        config = json.loads((src / CONFIG_NAME).read_text())
        if (src / 'README.md').is_file():  # an earlier export: keep what its card recorded about the run
            info = read_card_run_info(src / 'README.md')
        info.label_names = config.get('label_names')
    else:
        kwargs = dict(pretrained_cfg_overlay=dict(file=args.weights)) if args.weights else {}
        model = zoo.create_model(args.source, pretrained=True, **kwargs)
        info.source = f'{args.source} ({args.weights or model.pretrained_cfg.get("url") or "its pretrained weights"})'
        if model.num_classes == 1000 and str(model.pretrained_cfg.get('tag') or '').endswith('in1k'):
            info.dataset = 'imagenet-1k'
            info.label_names = list(timm.data.ImageNetInfo().label_names())
        info.metrics = {n: v for n, v in (note.split(': ', 1) for note in model.pretrained_cfg.get('notes') or ()
                                          if ': ' in note and 'top-1' in note)}
        info.license = model.pretrained_cfg.get('license')
    if args.metrics:
        info.metrics.update(read_metrics_file(Path(args.metrics)))
    if args.train_config:
        info.train_config = _read_config_file(Path(args.train_config))
    info.dataset = args.dataset or info.dataset or _find_key(info.train_config, ('dataset', 'dataset_name'))
    ipd = args.images_per_device or _find_key(info.train_config, ('images_per_device', 'batch_size'))
    info.images_per_device = int(ipd) if ipd is not None else None
    info.label_names = _label_names(args.label_names) or info.label_names
    if src.is_file():
        _run_settings(model_task(model), info)
    if info.label_names is None and is_task_model(model):  # a detector's COCO categories, from its checkpoint
        info.label_names = model.pretrained_cfg.get('label_names')
    info.license = args.license or info.license or model.pretrained_cfg.get('license') or 'apache-2.0'
    return model.eval(), info


# The DataModule settings that say how a run's model sees its input (a video run's crop_size: the frame size).
RUN_DATA_SETTINGS = {SEGMENTATION_TASK: ('mean', 'std', 'eval_size'), VIDEO_TASK: ('mean', 'std', 'crop_size')}


def _run_settings(task: str, info: RunInfo) -> None:
    """The data settings (:data:`RUN_DATA_SETTINGS`) and class names of a segmentation or video run, from its
    training config (the DataModule's; ``class_names``: a list, or a file relative to its ``root``)."""
    if task not in RUN_DATA_SETTINGS:
        return
    cfg = info.train_config or {}
    for key in RUN_DATA_SETTINGS[task]:
        value = _find_key(cfg, (key,))
        if key == 'crop_size' and value is not None:
            info.data_config['input_size'] = (3, int(value), int(value))
        elif value is not None:
            info.data_config[key] = tuple(value) if isinstance(value, list) else value
    names = _find_key(cfg, ('class_names',))
    if info.label_names is None and isinstance(names, list):
        info.label_names = [str(n) for n in names]
    elif info.label_names is None and isinstance(names, str):
        path = Path(str(_find_key(cfg, ('root',)) or '.')) / names
        if path.is_file():
            info.label_names = _label_names(str(path))


# ----------------------------------------------------------------------------------- model card

ARCH_PAPERS = {'deeplabv3': ('deeplabv3',), 'maskrcnn': ('mask_rcnn', 'faster_rcnn', 'fpn'),
               'fasterrcnn': ('faster_rcnn', 'fpn'), 'tsm': ('tsm',)}  # by the name's first word


def _papers_for(arch: str) -> List[str]:
    keys = ['ws_bcn', *ARCH_PAPERS.get(arch.split('_')[0], ()), 'resnext' if 'resnext' in arch else 'resnet']
    if arch.endswith(('_bgn', '_wsbgn')):
        keys.append('bgn')
    if arch.endswith(('_gn', '_wsgn')):
        keys.append('gn')
    return keys + ['timm']


def _architecture(model: torch.nn.Module, default: str = '') -> str:
    """A task model's registry name, or a timm model's name without its tag."""
    cfg = model.pretrained_cfg
    return cfg['architecture'] if is_task_model(model) else split_model_name_tag(cfg.get('architecture') or default)[0]


def _describe(arch: str, task: Optional[str] = None) -> str:
    """The first line of the builder's docstring (a task model's, up to its "(see ...)")."""
    if task in TASK_KINDS:
        doc = (TASK_KINDS[task].registry().builder(arch).__doc__ or '').split(' (see')[0].strip().splitlines()
    else:
        doc = (model_entrypoint(arch).__doc__ or '').strip().splitlines()
    return doc[0].rstrip('.') if doc else arch


@dataclass(frozen=True)
class CardTask:
    """What the card of a task's model declares: the Hub's pipeline tag and library, tags, and the metrics of its
    ``model-index`` (logged as fractions, without their ``test/`` / ``val/`` prefix -> metric type and name)."""
    pipeline_tag: str
    library: str
    tags: Tuple[str, ...]
    metrics: Dict[str, Tuple[str, str]]


_ACCURACY = {'top1': ('accuracy', 'top-1 accuracy'), 'top5': ('accuracy', 'top-5 accuracy')}
CARD_TASKS = {
    CLASSIFICATION_TASK: CardTask('image-classification', 'timm', ('timm',), _ACCURACY),
    VIDEO_TASK: CardTask('video-classification', 'timm', ('timm', 'tsm'), _ACCURACY),  # video-level accuracy
    SEGMENTATION_TASK: CardTask('image-segmentation', 'pytorch', ('deeplabv3', 'semantic-segmentation'),
                                {'miou': ('mean_iou', 'mIoU'), 'pixel_acc': ('accuracy', 'pixel accuracy')}),
    DETECTION_TASK: CardTask('object-detection', 'pytorch', ('torchvision', 'fpn'),
                             {'bbox_map': ('mean_average_precision', 'box mAP'),
                              'segm_map': ('mean_average_precision', 'mask mAP')}),
}
_SPLITS = (('test', 'test/'), ('validation', 'val/'))  # the test metrics, else (a run without a test) validation's


def eval_results(repo_id: str, info: RunInfo, task: Optional[str] = None) -> Optional[List[EvalResult]]:
    """The run's test metrics of the task (:data:`CARD_TASKS`, in %) as the card's ``model-index``, which the Hub
    displays and parses; a run that logged none has its validation metrics there instead."""
    card_task = CARD_TASKS[task or CLASSIFICATION_TASK]
    for split, prefix in _SPLITS:
        found = [(prefix + k, kind, name) for k, (kind, name) in card_task.metrics.items()
                 if isinstance(info.metrics.get(prefix + k), float)]
        if found:
            break
    if not info.dataset or not found:
        return None
    return [EvalResult(task_type=card_task.pipeline_tag, dataset_type=info.dataset, dataset_name=info.dataset,
                       dataset_split=split, metric_type=kind, metric_name=name,
                       metric_value=round(100 * info.metrics[k], 2)) for k, kind, name in found]


def _class_iou_table(info: RunInfo) -> str:
    """The run's test IoU of each class (``test/iou_<index>``), named by the label names, as a card section."""
    rows = []
    for c, name in enumerate(info.label_names or []):
        value = info.metrics.get(f'test/iou_{c}')
        if isinstance(value, (int, float)):
            rows.append(f'| {c} | {name} | {100 * value:.2f} |')
    if not rows:
        rows = [f'| {k.split("_", 1)[1]} | | {100 * v:.2f} |' for k, v in info.metrics.items()
                if k.startswith('test/iou_') and isinstance(v, (int, float))]
    if not rows:
        return ''
    return '## Test IoU per class (%)\n| index | class | IoU |\n|---|---|---|\n' + '\n'.join(rows) + '\n\n'


def _registry_entry(repo_id: str):
    """The weights' registry entry (zoo/hub/registry.py), or None for weights the registry does not list."""
    from zoo.hub.registry import ENTRIES
    return next((e for e in ENTRIES if e.name == repo_id.split('/')[-1]), None)


def _seed_of(info: RunInfo) -> Optional[int]:
    seed = (info.train_config or {}).get('seed_everything')
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


ZOO_BLURB = ('wsbcn-zoo, the micro-batch training zoo (Weight\nStandardization, Batch-Channel Normalization, '
             'Batch Group Normalization)')
_OFFLINE = 'Offline: `HF_HUB_OFFLINE=1` loads from the Hugging Face cache'


def _zoo_usage(repo_id: str, lines: str, extra: str = '') -> str:
    """A usage block that loads with ``zoo.load_model`` (every check) and runs the model as ``lines`` say."""
    return f"""```python
import torch, zoo
model = zoo.load_model('{repo_id}').eval()   # checks the weights against the digest in config.json
{lines}
```
{_OFFLINE}; a downloaded folder loads with `zoo.load_model(PATH)`.{extra}"""


def _classifier_text(model, arch: str, description: str, repo_id: str, info: RunInfo) -> Tuple[str, str, str]:
    """Intro, input/output lines and usage of an image classifier's card (timm loads it)."""
    cfg = model.pretrained_cfg
    intro = f'{description}: a `{arch}` from {ZOO_BLURB} for timm.'
    io = (f'- **Classes:** {model.num_classes}\n'
          f"- **Input:** {tuple(cfg['input_size'])}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}, "
          f"crop_pct {cfg.get('crop_pct')}, {cfg.get('interpolation')} interpolation")
    usage = f"""```python
import timm, zoo  # importing zoo registers the architecture in timm
model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_cfg = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**data_cfg)
```
{_OFFLINE}; `zoo.load_model('{repo_id}')` also checks
the weights against the digest in `config.json`."""
    return intro, io, usage


def _video_text(model, arch: str, description: str, repo_id: str, info: RunInfo) -> Tuple[str, str, str]:
    """A video classifier's card: a timm model whose input is a clip of T frames."""
    cfg, t = model.pretrained_cfg, clip_frames(model)
    c, h, w = cfg['input_size']
    labels = f' ({", ".join(info.label_names)})' if info.label_names else ''
    intro = f'{description}: a `{arch}` video classifier from {ZOO_BLURB} for timm.'
    io = (f'- **Task:** video classification, a video model taking T = {t} frames: `model(x)` with clips x of shape '
          f'(N, {c}, {t}, {h}, {w}) gives logits (N, {model.num_classes}); the run scored a video by the mean '
          f'softmax of its clips\n'
          f'- **Classes:** {model.num_classes}{labels}\n'
          f"- **Input:** {t} frames of ({c}, {h}, {w}), each normalized with mean {tuple(cfg['mean'])}, "
          f"std {tuple(cfg['std'])}")
    usage = _zoo_usage(repo_id, f"""clip = torch.randn(1, {c}, {t}, {h}, {w})   # (N, C, T, H, W): {t} frames, normalized with the mean / std above
with torch.no_grad():
    probs = model(clip).softmax(-1)""", f"\n`timm.create_model('hf-hub:{repo_id}', pretrained=True)` builds it "
                                          f"too (with `num_segments={t}` from `config.json`).")
    return intro, io, usage


def _segmenter_text(model, arch: str, description: str, repo_id: str, info: RunInfo) -> Tuple[str, str, str]:
    cfg = model.pretrained_cfg
    intro = f'{description}: `{arch}` (`zoo.create_segmenter`), a semantic segmenter from {ZOO_BLURB}.'
    labels = f' ({", ".join(info.label_names)})' if info.label_names else ''
    eval_size = cfg.get('eval_size')
    size = f'shorter side resized to {eval_size}' if eval_size else 'full size'
    io = (f'- **Task:** semantic segmentation (`model(x)[\'out\']`: logits (N, {model.num_classes}, H, W) '
          f'at the input size)\n'
          f'- **Classes:** {model.num_classes}{labels}\n'
          f'- **Input:** RGB, {size} at evaluation, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}')
    side = eval_size or 128
    usage = _zoo_usage(repo_id, f"""with torch.no_grad():
    logits = model(torch.randn(1, 3, {side}, {side}))['out']   # normalized with the mean / std above
labels = logits.argmax(1)""")
    return intro, io, usage


def _detector_text(model, arch: str, description: str, repo_id: str, info: RunInfo) -> Tuple[str, str, str]:
    cfg = model.pretrained_cfg
    masks = model.roi_heads.has_mask()
    what = 'an instance segmenter (boxes and masks)' if masks else 'an object detector'
    intro = f'{description}: `{arch}` (`zoo.create_detector`), {what} from {ZOO_BLURB}.'
    labels = f' ({", ".join(info.label_names)})' if info.label_names else ''
    mask_out = ', `masks` (n, 1, H, W) probabilities' if masks else ''
    io = (f'- **Task:** {"instance segmentation" if masks else "object detection"} (`model(images)`: for each '
          f'image a dict of `boxes` (n, 4) as (x1, y1, x2, y2) in its pixels, `labels`, `scores`{mask_out})\n'
          f'- **Classes:** {model.num_classes} including the background, label 0{labels}\n'
          f'- **Input:** a list of RGB images, float (3, H, W) in [0, 1], any size: the model normalizes them '
          f'(mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}) and resizes them (shorter side '
          f'{cfg["eval_size"]}, longer side at most {cfg["max_size"]}) itself')
    usage = _zoo_usage(repo_id, f"""image = torch.rand(3, 480, 640)             # RGB in [0, 1]; normalized and resized by the model
with torch.no_grad():
    detections = model([image])[0]          # boxes, labels, scores{', masks' if masks else ''}""")
    return intro, io, usage


CARD_TEXTS = {CLASSIFICATION_TASK: _classifier_text, VIDEO_TASK: _video_text, SEGMENTATION_TASK: _segmenter_text,
              DETECTION_TASK: _detector_text}


def build_model_card(model: torch.nn.Module, repo_id: str, info: RunInfo) -> ModelCard:
    """The card: what the weights are (description, license, recipe, notes) from their registry entry,
    so card and ``zoo.list_pretrained`` cannot disagree; what the run measured from the run."""
    task = model_task(model)
    card_task = CARD_TASKS[task]
    arch = _architecture(model, repo_id.split('/')[-1])
    papers = _papers_for(arch)
    results = eval_results(repo_id, info, task)
    entry = _registry_entry(repo_id)
    license_ = entry.license if entry else info.license
    description = entry.description if entry else _describe(arch, task)
    seed = _seed_of(info)
    extra = (f'\n- **Recipe:** {entry.recipe}' if entry else '') + (
        f'\n- **Seed:** {seed} (`seed_everything` of the run)' if seed is not None else '')
    notes = ''.join(f'\n- {n}' for n in entry.notes) if entry and entry.notes else ''
    data = ModelCardData(
        library_name=card_task.library, license=license_, pipeline_tag=card_task.pipeline_tag,
        tags=[card_task.pipeline_tag, *card_task.tags, 'wsbcn-zoo', 'micro-batch-training'],
        datasets=[info.dataset] if info.dataset else None,
        model_name=repo_id.split('/')[-1] if results else None, eval_results=results)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = '\n'.join(f'| {k} | {v:.4g} |' if isinstance(v, float) else f'| {k} | {v} |'
                        for k, v in info.metrics.items()) or '| (none recorded) | |'
    train_cfg = yaml.safe_dump(info.train_config, sort_keys=False).strip() if info.train_config else '(not recorded)'
    model_args = json.dumps(getattr(model, '_model_args', {}), sort_keys=True)
    citations = '\n'.join(f'```bibtex\n{PAPERS[k][2]}\n```' for k in papers)
    intro, io, usage = CARD_TEXTS[task](model, arch, description, repo_id, info)
    class_iou = _class_iou_table(info) if task == SEGMENTATION_TASK else ''
    content = f"""---
{data.to_yaml()}
---
# Model card for {repo_id.split('/')[-1]}

{intro}

## Model details
- **Architecture:** `{arch}` (model args `{model_args}`)
- **Parameters:** {n_params / 1e6:.2f}M
{io}
- **Dataset:** {info.dataset or '(not recorded)'}
- **Images per device:** {info.images_per_device if info.images_per_device is not None else '(not recorded)'}
- **Weights from:** {info.source}{extra}
- **License:** {license_}
- **Papers:** {'; '.join(f'{PAPERS[k][0]} ({PAPERS[k][1]})' for k in papers)}

{'## Notes' + notes + chr(10) + chr(10) if notes else ''}{class_iou}## Metrics of the run
| metric | value |
|---|---|
{metrics}

## Training config
```yaml
{train_cfg}
```

## Usage
{usage}

## Citation
{citations}
"""
    return ModelCard(content)


# ----------------------------------------------------------------------------------- folder and push

def write_folder(model: torch.nn.Module, info: RunInfo, folder: Path, repo_id: str, data_config=None) -> Path:
    """Weights + config.json (zoo.save_hub_folder, or the task-model config), the model card, then a bit-exact
    reload check. ``data_config`` (the command line's mean, std, sizes) wins over the run's (``info.data_config``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_config = dict(info.data_config, **(data_config or {})) or None
    description = f'{_describe(_architecture(model), model_task(model))}' + (
        f', trained on {info.dataset}' if info.dataset else '') + (
        f', {info.images_per_device} images per device' if info.images_per_device else '')
    save = save_hub_task_model if is_task_model(model) else zoo.save_hub_folder
    save(model, folder, label_names=info.label_names, data_config=data_config, pretrained_cfg=dict(description=description))
    model.pretrained_cfg.update(data_config or {})  # the card states what the folder records
    build_model_card(model, repo_id, info).save(folder / 'README.md')
    check_round_trip(model, folder)
    return folder


def _outputs_equal(a: Any, b: Any) -> bool:
    """Bit-identical outputs: tensors, and dicts and lists of them (a segmenter's ``{'out'[, 'aux']}``, a detector's
    ``[{'boxes', 'labels', 'scores'[, 'masks']}, ...]``)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_outputs_equal, a, b))
    return torch.equal(a, b)


def example_input(model: torch.nn.Module, size: Tuple[int, ...]) -> Any:
    """A fixed input of the folder's ``input_size`` as the model takes it: two images (2, C, H, W), a video model's
    clip (1, C, T, H, W), or a detector's list of one image in [0, 1] (it normalizes and resizes it itself)."""
    g = torch.Generator().manual_seed(0)
    task = model_task(model)
    if task == DETECTION_TASK:
        return [torch.rand(size, generator=g)]
    if task == VIDEO_TASK:
        return torch.randn((1, size[0], clip_frames(model)) + tuple(size[1:]), generator=g)
    return torch.randn((2,) + tuple(size), generator=g)


@contextmanager
def every_detection(*models: torch.nn.Module):
    """Detectors keep every scored box (score threshold 0): a trained detector may find nothing in noise, and
    two empty outputs would prove nothing."""
    heads = [m.roi_heads for m in models if hasattr(m, 'roi_heads')]
    thresholds = [h.score_thresh for h in heads]
    for h in heads:
        h.score_thresh = 0.0
    try:
        yield
    finally:
        for h, t in zip(heads, thresholds):
            h.score_thresh = t


def check_round_trip(model: torch.nn.Module, folder: Path) -> None:
    """The folder loaded back (with every check) must give the source model's outputs bit for bit on a fixed input
    (:func:`example_input` of the folder's ``input_size``)."""
    reloaded = load_hub_model(str(folder)).eval()
    x = example_input(model, tuple(reloaded.pretrained_cfg['input_size']))
    with torch.no_grad(), every_detection(model, reloaded):
        if not _outputs_equal(model.eval()(x), reloaded(x)):
            raise RuntimeError(f'{folder}: the saved model does not reproduce the source model; not publishing.')


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                commit_message: str = 'Upload model', api: Optional[HfApi] = None):
    """Create the repo (and branch) if needed and upload the folder in one commit."""
    api = api or HfApi()  # token: HF_TOKEN or the saved `hf auth login`, never passed around here
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != 'main':
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)


def _data_config(args) -> Optional[Dict[str, Any]]:
    cfg = {k: v for k, v in dict(
        mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
        input_size=tuple(args.input_size) if args.input_size else None, crop_pct=args.crop_pct,
        interpolation=args.interpolation, eval_size=args.eval_size).items() if v is not None}
    return cfg or None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='Lightning .ckpt, a model folder, or a timm/zoo model name (with --weights)')
    p.add_argument('--repo-id', required=True, help='ORG/NAME on the Hub')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing; default main)')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--dry-run', action='store_true', help='only write (and check) the folder; push nothing')
    p.add_argument('--out', default=None, help='folder to write (default: a temporary one, or ./hub_export/NAME with --dry-run)')
    p.add_argument('--model-name', default=None, help='architecture, when the checkpoint does not record it')
    p.add_argument('--weights', default=None, help='weights file for a model-name source (converted if the tag needs it)')
    p.add_argument('--dataset', default=None, help='dataset name for the card, e.g. cifar10')
    p.add_argument('--metrics', default=None, help='JSON dict or Lightning metrics.csv (found next to the checkpoint if not given)')
    p.add_argument('--train-config', default=None, help='YAML/JSON training config (config.yaml/hparams.yaml found if not given)')
    p.add_argument('--images-per-device', type=int, default=None, help='images per device in training (default: batch_size of the config)')
    p.add_argument('--label-names', default=None, help='text file (one per line), JSON list, or an ImageFolder root')
    p.add_argument('--license', default=None, help='license of the weights (default: the model cfg, else apache-2.0)')
    p.add_argument('--mean', type=float, nargs=3, default=None)
    p.add_argument('--std', type=float, nargs=3, default=None)
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--interpolation', default=None)
    p.add_argument('--eval-size', type=int, default=None,
                   help='segmenters: shorter side of evaluation images (default: eval_size of the training config)')
    # video models: --input-size is a frame's (default: crop_size of the training config); detectors take none of these
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, info = load_source(args)
    except (WeightsError, FileNotFoundError, zoo.UnknownModelError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    flags = _data_config(args) or {}
    if flags and model_task(model) == DETECTION_TASK:
        print(f'error: {", ".join(sorted(flags))} do not apply to a detector: it normalizes and resizes its images '
              f'itself (its image_mean, image_std, min_size, max_size model args, recorded in config.json)',
              file=sys.stderr)
        return 2
    name = args.repo_id.split('/')[-1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or (f'hub_export/{name}' if args.dry_run else Path(tmp) / name))
        write_folder(model, info, folder, args.repo_id, data_config=flags)
        print(f'wrote {folder}: {WEIGHTS_NAME}, {CONFIG_NAME}, README.md (reload check passed)')
        if args.dry_run:
            print('dry run: nothing pushed')
            return 0
        message = args.commit_message or f'Upload {name} from {Path(info.source).name}'
        commit = push_folder(folder, args.repo_id, private=args.private, revision=args.revision, commit_message=message)
        print(f'pushed to {args.repo_id}' + (f'@{args.revision}' if args.revision else '') + f': {commit.commit_url}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
