"""The zoo's pretrained weights: one entry per ``arch.tag``, the single list everything else reads.

The model families build their timm ``default_cfgs`` from it (:func:`pretrained_cfgs`), the loaders
take a tag's build args and converter from it, the benchmarks name their runs' tags with it, and
:func:`list_pretrained` prints it with the metrics.

Adding weights: one :class:`PretrainedEntry` in ``ENTRIES`` below, plus its folder in
``zoo/pretrained/`` (shipped: ``benchmarks/publish_cifar_weights.py`` writes it) or its URLs.
``tests/test_weights_registry.py`` checks that every entry has its weights and every shipped folder
its entry. A shipped tag exists exactly when its folder does: without the folder it is not
registered in timm at all.
"""
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ['Metric', 'PretrainedEntry', 'ENTRIES', 'SHIPPED_WEIGHTS_DIR', 'HUB_ORG', 'shipped_weights',
           'get_entry', 'entries', 'pretrained_cfgs', 'cifar10_tag', 'list_pretrained']

# Hub-ready folders (``hub_upload.py --dry-run --out``) of weights the zoo trained itself and ships
# inside the package, one per ``arch.tag``: pretrained=True loads them with no network.
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / 'pretrained'
HUB_ORG = 'wsbcn-zoo'  # where shipped folders are (to be) pushed: hub_upload.py --repo-id wsbcn-zoo/<arch.tag>
WEIGHTS_FILE = 'model.safetensors'


@dataclass(frozen=True)
class Metric:
    name: str  # 'top-1 accuracy', 'top-1 error'
    value: float  # percent
    dataset: str  # 'cifar10', 'imagenet-1k'
    split: str  # 'test', 'val'
    recipe: str  # how the weights were trained: a config in this repo, or the release they come from


@dataclass(frozen=True)
class PretrainedEntry:
    """One set of weights. Sources are tried in order: the shipped ``folder``, then ``urls`` (the
    authors' first, then mirrors; ``sha256`` holds each one's digest or hash prefix, None if unknown).
    ``hf_hub_id`` is where a shipped folder is (to be) pushed; timm uses it only when the shipped file
    is overridden (``pretrained_cfg_overlay=dict(file=None)``)."""
    name: str  # 'arch.tag'
    description: str
    dataset: str
    recipe: str
    license: str = 'apache-2.0'
    folder: Optional[str] = None
    hf_hub_id: Optional[str] = None
    urls: Tuple[str, ...] = ()
    sha256: Tuple[Optional[str], ...] = ()
    model_args: Mapping[str, Any] = field(default_factory=dict)  # build args the weights need
    converter: Optional[str] = None  # name in zoo.hub.converters.CONVERTERS: fn(state_dict, model) for a published layout
    published_metrics: Tuple[Metric, ...] = ()  # numbers published with remote weights
    notes: Tuple[str, ...] = ()

    @property
    def architecture(self) -> str:
        return self.name.split('.', 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split('.', 1)[1]

    @property
    def shipped(self) -> Optional[Path]:
        """The shipped weights file, or None."""
        return shipped_weights(self.folder) if self.folder else None

    @property
    def available(self) -> bool:
        """Weights exist somewhere: shipped in the package, or at a listed URL."""
        return bool(self.shipped or self.urls)

    def metrics(self) -> Tuple[Metric, ...]:
        """The published metrics, or for shipped weights the test metrics of their model card (which
        ``hub_upload.py`` wrote from the run's own log)."""
        if not self.shipped:
            return self.published_metrics
        from huggingface_hub import ModelCard
        card = ModelCard.load(self.shipped.parent / 'README.md').data
        return tuple(Metric(r.metric_name, r.metric_value, r.dataset_type, r.dataset_split, self.recipe)
                     for r in card.eval_results or ())

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The fields of timm's pretrained cfg that say where the weights are and what they are."""
        cfg: Dict[str, Any] = dict(description=self.description, license=self.license)
        if self.hf_hub_id:
            cfg['hf_hub_id'] = self.hf_hub_id
        if self.shipped:
            cfg['file'] = str(self.shipped)  # the zoo's own weights, inside the package: no download
        if self.urls:
            cfg.update(url=self.urls[0], origin_url=self.urls[0].rsplit('/', 1)[0] + '/')
        if self.notes:
            cfg['notes'] = self.notes
        return cfg


def shipped_weights(name_with_tag: str) -> Optional[Path]:
    """The shipped ``model.safetensors`` of ``arch.tag``, or None if the package has none."""
    path = SHIPPED_WEIGHTS_DIR / name_with_tag.split('/')[-1] / WEIGHTS_FILE
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------- the entries

def _cifar10(name: str, setting: str, config: str, notes: Tuple[str, ...] = ()) -> PretrainedEntry:
    """Weights the zoo trained on CIFAR-10 (the micro-batch reproduction), shipped in the package."""
    return PretrainedEntry(
        name=name, description=f'{name.split(".")[0]} trained on CIFAR-10, {setting}', dataset='cifar10',
        recipe=f'configs/cifar10/{config}.yaml, 15 epochs (benchmarks/cifar_runs.py)',
        folder=name, hf_hub_id=f'{HUB_ORG}/{name}', notes=notes)


# What the README's BGN runs at 2 images per device say about the number of groups (zoo.layers.batch_group_norm).
# No ': ' with 'top-1' in a note: hub_upload reads such notes as published metrics.
_BGN_GROUPS_NOTE = (
    'Groups G = 8 (the default), the zoo\'s recommendation for BGN at micro-batches. At 2 images per device '
    'fewer groups were worse (test accuracy G = 8 78.47%, G = 2 76.80%, G = 1 75.69%; one seed each, same '
    'schedule), unlike the few groups the BGN paper picks for small batches: with fewer groups one statistic '
    'pools more channels. WS+BCN reached 84.4-84.8% (four seeds) in the same setting.')


_GN_WS_URL = 'http://cs.jhu.edu/~syqiao/WeightStandardization/'
_GN_WS_MIRROR = 'https://download.openmmlab.com/pretrain/third_party/'
_BCN_WS_URL = 'https://cs.jhu.edu/~syqiao/BatchChannelNormalization/'
_AUTHORS_RECIPE = "the authors' ImageNet-1k release (arXiv:1903.10520)"
_WS_ARGS = dict(ws_formula='ws')
_BCN_ARGS = dict(ws_formula='bcn', norm_kwargs=dict(batch_stage='batch'))


def _authors_in1k(name: str, url: str, mirror: Optional[str] = None, top1_err: Optional[float] = None,
                  ) -> PretrainedEntry:
    """The authors' ImageNet releases (Qiao et al.), converted on load. The OpenMMLab mirror's file name
    carries the first 8 hex digits of its SHA-256 (torch.hub's convention); the authors' files have no
    published digest."""
    wsgn = name.split('.')[0].endswith('_wsgn')
    notes = ["Authors' ImageNet-1k release, converted on load (zoo.converters)."]
    if mirror:
        notes.append(f'OpenMMLab mirror: {mirror}')
    if top1_err is not None:
        notes.append(f'Published top-1 error: {top1_err}%')
    urls = (url,) + ((mirror,) if mirror else ())
    sha256 = (None,) + ((mirror.rsplit('-', 1)[1].split('.')[0],) if mirror else ())
    metrics = (Metric('top-1 error', top1_err, 'imagenet-1k', 'val', _AUTHORS_RECIPE),) if top1_err is not None else ()
    return PretrainedEntry(
        name=name, description=f'{name.split(".")[0]} trained on ImageNet-1k by the authors of '
                               f'arXiv:1903.10520',
        dataset='imagenet-1k', recipe=_AUTHORS_RECIPE, license='unknown', urls=urls, sha256=sha256,
        model_args=_WS_ARGS if wsgn else _BCN_ARGS, converter='gn_ws' if wsgn else 'bcn_ws',
        published_metrics=metrics, notes=tuple(notes))


ENTRIES: Tuple[PretrainedEntry, ...] = (
    # CIFAR-10, shipped (README table; the first entry of an architecture is its default tag)
    _cifar10('resnet20.cifar10', 'BN, 128 images per device', 'resnet20_b128'),
    _cifar10('resnet20.cifar10_b2', 'BN, 2 images per device', 'resnet20'),
    _cifar10('resnet20_gn.cifar10', 'GN, 2 images per device', 'resnet20_gn'),
    _cifar10('resnet20_wsgn.cifar10', 'WS+GN, 2 images per device', 'resnet20_wsgn'),
    _cifar10('resnet20_wsbcn.cifar10', 'WS+BCN, 2 images per device', 'resnet20_wsbcn'),
    _cifar10('resnet20_bgn.cifar10', 'BGN, 2 images per device', 'resnet20_bgn', notes=(_BGN_GROUPS_NOTE,)),
    _cifar10('resnet56.cifar10', 'BN, 128 images per device', 'resnet56_b128'),
    _cifar10('resnet56_wsbcn.cifar10', 'WS+BCN, 2 images per device', 'resnet56_wsbcn'),
    # ImageNet-1k, the authors' releases (docs/hub.md)
    _authors_in1k('resnet50_wsgn.in1k', _GN_WS_URL + 'R-50-GN-WS.pth.tar',
                  _GN_WS_MIRROR + 'resnet50_gn_ws-15beedd8.pth', 23.72),
    _authors_in1k('resnet101_wsgn.in1k', _GN_WS_URL + 'R-101-GN-WS.pth.tar',
                  _GN_WS_MIRROR + 'resnet101_gn_ws-3e3c308c.pth', 22.10),
    _authors_in1k('resnext50_32x4d_wsgn.in1k', _GN_WS_URL + 'X-50-GN-WS.pth.tar',
                  _GN_WS_MIRROR + 'resnext50_32x4d_gn_ws-0d87ac85.pth', 22.71),
    _authors_in1k('resnext101_32x4d_wsgn.in1k', _GN_WS_URL + 'X-101-GN-WS.pth.tar',
                  _GN_WS_MIRROR + 'resnext101_32x4d_gn_ws-34ac1a9e.pth', 21.80),
    _authors_in1k('resnet50_wsbcn.in1k', _BCN_WS_URL + 'rn50_bcn_ws.pth'),
    _authors_in1k('resnet101_wsbcn.in1k', _BCN_WS_URL + 'rn101_bcn_ws.pth'),
    _authors_in1k('resnext50_32x4d_wsbcn.in1k', _BCN_WS_URL + 'rx50_bcn_ws.pth'),
)


# ----------------------------------------------------------------------------------- queries

def get_entry(name_with_tag: str) -> Optional[PretrainedEntry]:
    """The entry of ``arch.tag`` if it is registered (its weights exist), else None."""
    return next((e for e in entries() if e.name == name_with_tag), None)


def entries(pattern: str = '*', architecture: Optional[str] = None, dataset: Optional[str] = None,
            ) -> List[PretrainedEntry]:
    """The registered entries (those whose weights exist), in registry order."""
    return [e for e in ENTRIES if e.available and fnmatch.fnmatch(e.name, pattern)
            and architecture in (None, e.architecture) and dataset in (None, e.dataset)]


def pretrained_cfgs(architecture: str) -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': cfg fields}`` for a family's ``default_cfgs`` (first: the default tag); empty if none."""
    return {e.name: e.pretrained_cfg() for e in entries(architecture=architecture)}


def cifar10_tag(model: str, images_per_device: int) -> str:
    """The tag a CIFAR-10 run is published under: ``cifar10``, or ``cifar10_b<N>`` for BN (a plain
    architecture name) with few images per device, so that the plain ``resnet20.cifar10`` is the
    large-batch BN baseline."""
    bn = '_' not in model
    return f'{model}.cifar10_b{images_per_device}' if bn and images_per_device < 16 else f'{model}.cifar10'


def list_pretrained(pattern: str = '*', file=None) -> List[str]:
    """Print the registered weights with their metrics (dataset, split, recipe); returns their names."""
    file = file or sys.stdout
    found = entries(pattern)
    for e in found:
        where = 'shipped' if e.shipped else e.urls[0] + ''.join(f', then {u}' for u in e.urls[1:])
        metrics = '; '.join(f'{m.name} {m.value:g}% ({m.dataset} {m.split})' for m in e.metrics()) or 'no metrics'
        print(f'{e.name}: {metrics}. Recipe: {e.recipe}. License: {e.license}. Weights: {where}.', file=file)
    return [e.name for e in found]
