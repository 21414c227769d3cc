"""Video data: decoding with PyAV, TSN segment sampling, multi-clip / multi-crop evaluation.

Sources: a CSV manifest with ``path`` and ``label`` columns (paths relative to ``root``, by
default the CSV's folder; other columns are ignored), or a ``class_name/clip.ext`` folder tree.

Decoding: PyAV (its wheels bundle FFmpeg). Every frame is decoded and only the sampled ones are
converted to RGB, which also checks the whole file: container headers often miscount frames
(the AVI clips of HMDB51 declare one frame more than they hold), so indices come from the frames
actually decoded. Videos are expected short (Kinetics 10 s, Something-Something 2-6 s) and
pre-resized to a 256-340 pixel side, as in the TSM recipes; decoding 1080p originals works but
holds the decoded clip in memory.

A clip that cannot be decoded (missing, truncated, damaged header, no video stream, zero frames)
raises :class:`VideoDecodeError`, naming the file and the reason. With
``on_decode_error='skip'`` it is skipped instead, with a warning naming the file and the reason,
and counted, as every task does with its bad inputs (:mod:`lightning_modules.core.datasets`):
in training the next decodable clip takes its place (batches keep their size, and each emulated
device its share); in evaluation it is dropped from its batch (a batch of undecodable clips only
is an empty batch); in predict its row says why. Batches carry ``skipped``, which
:class:`~lightning_modules.video.VideoClassifier` logs as a running total.

Sampling (TSN, arXiv:1608.00859): the T frames of a clip come from T equal segments of the video,
a random frame per segment in training, the centre of each segment in evaluation. With K clips
per video, clip k takes the frames at ``(k + 0.5) / K`` of each segment. Each clip is then cut
into 1 (centre) or 3 (both ends and centre of the long side) crops, and the video-level score is
the mean of the softmax scores of its K x crops views.

Batches are dicts: ``video`` of shape (B, C, T, H, W) in training and (B, V, C, T, H, W) in
evaluation (V = clips x crops views of a video), ``label`` (B,), ``skipped`` (how many clips of
this batch were undecodable: replaced in training, dropped in evaluation). Predict batches are
:class:`~lightning_modules.core.datasets.PredictBatch` es of (B, V, C, T, H, W) views.

Training order and augmentation are exactly resumable mid-epoch, with per-device batches and
device emulation as for images: the loader is :class:`~lightning_modules.core.data.ImageDataModule`'s
(``batch_size`` clips per device, ``virtual_devices``, ``seed``), and each clip's frames, crop and
flip are drawn from a seed of ``(seed, epoch, index)``.
"""
import bisect
import csv
import logging
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import av
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..core.data import ImageDataModule, resolve_path
from ..core.datasets import (MAX_CONSECUTIVE_SKIPS, PredictInputs, SkippedInput, UnreadableInputError, sample_seed,
                             seeded)
from ..core.predict import list_inputs
from ..core.writer import PredictionWriter, TopKWriter

__all__ = [
    'VIDEO_EXTENSIONS', 'VideoDecodeError', 'VideoSample', 'decode_video', 'video_num_frames', 'segment_indices',
    'uniform_indices', 'read_manifest', 'scan_class_folders', 'train_clip_transform', 'EvalViews',
    'VideoClipDataset', 'SkippedVideo', 'collate_videos', 'VideoDataModule']

_logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg')
# Containers FFmpeg must recognise for a file with this extension. A file whose header was lost
# can still be probed as a raw stream (an AVI read as raw MPEG-4, 'm4v'): that is damage, not a video.
_CONTAINER_FOR_EXTENSION = {
    '.avi': 'avi', '.mp4': 'mp4', '.m4v': 'mp4', '.mov': 'mov', '.mkv': 'matroska', '.webm': 'webm'}
DECODE_ERROR_MODES = ('raise', 'skip')


class VideoDecodeError(UnreadableInputError, RuntimeError):
    """A clip that cannot be decoded; names the file and the reason."""

    def __init__(self, path: Union[str, Path], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f'Cannot decode video {self.path}: {reason}')

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class VideoSample(NamedTuple):
    path: Path
    label: int


def _allowed_missing_frames(declared: int) -> int:
    # Headers commonly over-count by a frame or two (HMDB51's AVIs); a truncated file loses far more.
    return max(2, declared // 20)


def _frames_on_screen(frames: List[av.VideoFrame], start: float, end: float, rate: float) -> List[av.VideoFrame]:
    """The frame on screen at each tick of the stream's nominal ``rate`` from ``start`` to ``end`` (seconds)."""
    frames = sorted(frames, key=lambda f: f.time)
    times = [f.time for f in frames]
    ticks = max(1, round((end - start) * rate))
    return [frames[max(0, bisect.bisect_right(times, start + (k + 0.5) / rate) - 1)] for k in range(ticks)]


def decode_video(path: Union[str, Path]) -> List[av.VideoFrame]:
    """The frame on screen at every tick of the first video stream's frame rate, in the codec's pixel format.

    Frames are placed by their timestamps: where a file stores a frame once and holds it (AVI
    "repeat the previous frame" entries, as in Cinepak clips with long static stretches; other
    variable-rate files), the held frame fills the ticks in between, so index-based sampling is
    sampling by time. A file is truncated when its timestamps stop well before the length its
    header declares, however few frames it really stores.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, 'file not found')
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, 'empty file (0 bytes)')
    try:
        # Some HMDB51 AVIs carry metadata that is not UTF-8: replace, don't fail.
        with av.open(str(path), metadata_errors='replace') as container:
            expected = _CONTAINER_FOR_EXTENSION.get(path.suffix.lower())
            if expected and expected not in container.format.name.split(','):
                raise VideoDecodeError(
                    path, f'damaged header or wrong container: a {path.suffix} file that FFmpeg can only read '
                          f'as {container.format.name!r}')
            if not container.streams.video:
                raise VideoDecodeError(path, 'no video stream')
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            declared = stream.frames
            rate = stream.average_rate or stream.guessed_rate
            frames, end = [], None
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    packet_end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                    end = packet_end if end is None else max(end, packet_end)
                frames.extend(packet.decode())
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f'{type(e).__name__}: {e}') from e
    if not frames:
        raise VideoDecodeError(path, 'zero frames decoded')
    if rate and end is not None and all(f.time is not None for f in frames):
        start = min(f.time for f in frames)
        frames = _frames_on_screen(frames, start, max(end, max(f.time for f in frames)), float(rate))
    if declared and len(frames) < declared - _allowed_missing_frames(declared):
        when = f' (its timestamps stop at {end:.1f} s of {declared / float(rate):.1f} s)' if rate and end else ''
        raise VideoDecodeError(
            path, f'truncated: decoded {len(frames)} of the {declared} frames its header declares{when}')
    return frames


def video_num_frames(path: Union[str, Path]) -> int:
    """Frames actually decodable from ``path`` (raises :class:`VideoDecodeError` like decoding)."""
    return len(decode_video(path))


def frames_to_tensor(frames: Sequence[av.VideoFrame]) -> torch.Tensor:
    """Selected frames as a uint8 (T, C, H, W) RGB tensor."""
    return torch.stack([torch.from_numpy(f.to_ndarray(format='rgb24')) for f in frames]).permute(0, 3, 1, 2)


def segment_indices(num_frames: int, num_segments: int, generator: Optional[torch.Generator] = None) -> List[int]:
    """TSN training sampling: one random frame from each of ``num_segments`` equal segments.

    Videos shorter than ``num_segments`` frames repeat frames, in order.
    """
    seg_len = num_frames / num_segments
    offsets = torch.rand(num_segments, generator=generator)
    return [min(int(seg_len * (i + float(offsets[i]))), num_frames - 1) for i in range(num_segments)]


def uniform_indices(num_frames: int, num_segments: int, clip_index: int = 0, num_clips: int = 1) -> List[int]:
    """Evaluation sampling: frame ``(clip_index + 0.5) / num_clips`` into each segment."""
    seg_len = num_frames / num_segments
    pos = (clip_index + 0.5) / num_clips
    return [min(int(seg_len * (i + pos)), num_frames - 1) for i in range(num_segments)]


def _resolve_label(label: str, classes: Optional[Sequence[str]], where: str) -> None:
    if classes is not None and label not in classes:
        raise ValueError(f'{where}: label {label!r} is not one of the {len(classes)} classes {list(classes)[:10]}...')


def read_manifest(
        csv_path: Union[str, Path],
        root: Optional[Union[str, Path]] = None,
        classes: Optional[Sequence[str]] = None,
        skip_unlabelled: bool = False,
) -> Tuple[List[Tuple[Path, str]], int]:
    """``(path, label name)`` pairs of a CSV manifest, and the number of unlabelled rows skipped.

    Paths are relative to ``root`` (default: the CSV's folder). A row with an empty label is an
    error, or is skipped (and counted, with a warning) with ``skip_unlabelled=True``.
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f)
        missing = {'path', 'label'} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f'{csv_path}: manifest needs the columns path and label, missing {sorted(missing)} '
                             f'(header: {reader.fieldnames})')
        rows, unlabelled = [], 0
        for line, row in enumerate(reader, start=2):
            label = (row['label'] or '').strip()
            if not label:
                if not skip_unlabelled:
                    raise ValueError(f'{csv_path} line {line}: {row["path"]!r} has no label '
                                     f'(set skip_unlabelled=True to skip unlabelled rows)')
                unlabelled += 1
                continue
            _resolve_label(label, classes, f'{csv_path} line {line}')
            rows.append((root / row['path'].strip(), label))
    if unlabelled:
        _logger.warning('%s: skipped %d unlabelled rows, kept %d', csv_path, unlabelled, len(rows))
    if not rows:
        raise ValueError(f'{csv_path}: no labelled clips')
    return rows, unlabelled


def scan_class_folders(root: Union[str, Path], classes: Optional[Sequence[str]] = None) -> List[Tuple[Path, str]]:
    """``(path, class name)`` pairs of a ``class_name/clip.ext`` tree (extensions in :data:`VIDEO_EXTENSIONS`)."""
    root = Path(root)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for clip in sorted(class_dir.iterdir()):
            if clip.is_file() and clip.suffix.lower() in VIDEO_EXTENSIONS:
                _resolve_label(class_dir.name, classes, str(clip))
                rows.append((clip, class_dir.name))
    if not rows:
        raise ValueError(f'{root}: no clips found in class_name/clip.ext folders (extensions {VIDEO_EXTENSIONS})')
    return rows


def read_split(source: Union[str, Path], root=None, classes=None, skip_unlabelled: bool = False) -> List[Tuple[Path, str]]:
    """A split from a CSV manifest (a ``.csv`` file) or a class-folder tree (a folder)."""
    source = Path(source)
    if source.is_dir():
        return scan_class_folders(source, classes)
    if source.suffix.lower() == '.csv' and source.is_file():
        return read_manifest(source, root, classes, skip_unlabelled)[0]
    raise FileNotFoundError(f'{source}: expected a CSV manifest (path,label) or a class_name/clip.ext folder')


def train_clip_transform(
        crop_size: int = 224,
        scale: Tuple[float, float] = (0.25, 1.0),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One random crop and flip for all frames of a clip (uint8 (T, C, H, W) -> float (T, C, H, W)).

    ``scale`` close to TSM's multi-scale crop; ``flip=False`` for Something-Something, where
    left and right change the label.
    """
    ops = [v2.RandomResizedCrop(crop_size, scale=scale, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class EvalViews:
    """Resize a clip's short side, cut 1 (centre) or 3 (ends and centre of the long side) crops."""

    def __init__(self, crop_size: int = 224, resize: Optional[int] = None, num_crops: int = 1,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        if num_crops not in (1, 3):
            raise ValueError(f'num_crops must be 1 or 3, got {num_crops}')
        self.crop_size = crop_size
        self.resize = resize or round(crop_size / 0.875)
        self.num_crops = num_crops
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def crop_boxes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(top, left) of each crop."""
        s = self.crop_size
        centre = ((height - s) // 2, (width - s) // 2)
        if self.num_crops == 1:
            return [centre]
        if width >= height:
            return [(centre[0], 0), centre, (centre[0], width - s)]
        return [(0, centre[1]), centre, (height - s, centre[1])]

    def __call__(self, clip: torch.Tensor) -> List[torch.Tensor]:
        clip = TF.resize(tv_tensors.Video(clip), [self.resize], antialias=True)
        h, w = clip.shape[-2:]
        if min(h, w) < self.crop_size:
            raise ValueError(f'crop {self.crop_size} is larger than the resized clip {h}x{w}; raise resize')
        return [self.normalize(TF.crop(clip, top, left, self.crop_size, self.crop_size))
                for top, left in self.crop_boxes(h, w)]


SkippedVideo = SkippedInput  # an undecodable clip (``on_decode_error='skip'``); dropped by :func:`collate_videos`


class VideoClipDataset(Dataset):
    """Clips of labelled videos: one random TSN clip each in training, all views in evaluation.

    Items: ``(video, label)`` with ``video`` (C, T, H, W) in training and (V, C, T, H, W) in
    evaluation. Keys are an index or ``(index, epoch)`` (from
    :class:`~lightning_modules.core.samplers.VirtualDeviceSampler`): the latter seeds the clip's
    frames, crop and flip from ``(seed, epoch, index)``, so a resumed run draws the same clips.

    With ``on_decode_error='skip'`` an undecodable clip is logged (path and reason) and either
    replaced by the next decodable one (``replace_undecodable``, the default in training; items are
    then ``(video, label, skipped)``) or returned as a :class:`SkippedVideo` that
    :func:`collate_videos` drops and counts (the default in evaluation).
    """

    def __init__(
            self,
            samples: Sequence[VideoSample],
            num_segments: int = 8,
            train: bool = True,
            transform: Optional[Callable] = None,
            eval_views: Optional[EvalViews] = None,
            num_clips: int = 1,
            on_decode_error: str = 'raise',
            replace_undecodable: Optional[bool] = None,
            seed: int = 0,
    ):
        if on_decode_error not in DECODE_ERROR_MODES:
            raise ValueError(f'on_decode_error must be one of {DECODE_ERROR_MODES}, got {on_decode_error!r}')
        self.samples = list(samples)
        self.num_segments = num_segments
        self.train = train
        self.transform = transform if transform is not None else train_clip_transform()
        self.eval_views = eval_views if eval_views is not None else EvalViews()
        self.num_clips = num_clips
        self.on_decode_error = on_decode_error
        self.replace_undecodable = train if replace_undecodable is None else replace_undecodable
        self.seed = seed

    @property
    def skip_corrupt(self) -> bool:
        return self.on_decode_error == 'skip'

    def __len__(self) -> int:
        return len(self.samples)

    def _train_clip(self, frames) -> torch.Tensor:
        clip = frames_to_tensor([frames[i] for i in segment_indices(len(frames), self.num_segments)])
        return self.transform(tv_tensors.Video(clip)).transpose(0, 1).as_subclass(torch.Tensor)  # (C, T, H, W)

    def _eval_views(self, frames) -> torch.Tensor:
        views = []
        for k in range(self.num_clips):
            clip = frames_to_tensor([frames[i] for i in uniform_indices(len(frames), self.num_segments, k, self.num_clips)])
            views += [v.transpose(0, 1).as_subclass(torch.Tensor) for v in self.eval_views(clip)]
        return torch.stack(views)  # (V, C, T, H, W)

    def load_views(self, path: Union[str, Path]) -> torch.Tensor:
        """The evaluation views (V, C, T, H, W) of the clip at ``path`` (predict); raises :class:`VideoDecodeError`."""
        return self._eval_views(decode_video(path))

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        skipped = 0
        while True:
            path, label = self.samples[index]
            try:
                frames = decode_video(path)
                break
            except VideoDecodeError as e:
                if self.on_decode_error == 'raise':
                    raise
                # Logged every time (a warning would be shown once per process), naming the file.
                _logger.warning('Skipping undecodable video %s (counted in skipped_videos): %s', e.path, e.reason)
                if not self.replace_undecodable:
                    return SkippedVideo(e.path, e.reason)
                skipped += 1
                if skipped >= min(MAX_CONSECUTIVE_SKIPS, len(self.samples)):
                    raise VideoDecodeError(path, f'{skipped} consecutive undecodable clips up to this one; are the '
                                                 f'clips intact?') from e
                index = (index + 1) % len(self.samples)
        if self.train:
            seed = None if epoch is None else sample_seed(self.seed, epoch, index)
            video = seeded(self._train_clip, seed, frames)
        else:
            video = self._eval_views(frames)
        if self.on_decode_error == 'skip' and self.replace_undecodable:
            return video, label, skipped
        return video, label


def collate_videos(items: Sequence) -> dict:
    """Stack decoded items; drop and count :class:`SkippedVideo` ones (and count the replaced ones)."""
    kept = [it for it in items if not isinstance(it, SkippedInput)]
    skipped = len(items) - len(kept) + sum(int(it[2]) for it in kept if len(it) > 2)
    if kept:
        video = torch.stack([it[0] for it in kept])
        label = torch.tensor([it[1] for it in kept], dtype=torch.long)
    else:
        video, label = torch.empty(0), torch.empty(0, dtype=torch.long)
    return {'video': video, 'label': label, 'skipped': torch.tensor(skipped)}


def empty_video_batch() -> dict:
    return {'video': torch.empty(0), 'label': torch.empty(0, dtype=torch.long)}


class VideoDataModule(ImageDataModule):
    """Labelled clips from CSV manifests or class-folder trees, for :class:`~lightning_modules.video.VideoClassifier`.

    The loaders are :class:`~lightning_modules.core.data.ImageDataModule`'s: ``batch_size`` clips per
    device, ``virtual_devices`` emulated devices per process, a seeded order that resumes exactly
    mid-epoch, the shared rules for bad inputs and streamed predictions.

    Args:
        train, val, test: a CSV manifest (``path,label``) or a ``class_name/clip.ext`` folder, per split
            (relative to the working directory, else to the repository root).
        root: folder the manifests' paths are relative to (default: each CSV's folder).
        classes: class names in label order (default: sorted labels of the train split, else val, else test).
        skip_unlabelled: skip (and count) manifest rows with an empty label instead of failing.
        num_segments: frames per clip, T (= the model's ``num_segments``).
        crop_size: frame size fed to the model.
        train_scale: area range of the training random-resized crop.
        flip: random horizontal flip in training (``False`` for Something-Something).
        eval_resize: short side before evaluation crops (default ``crop_size / 0.875``).
        val_clips, val_crops, test_clips, test_crops: views per video in validation and test.
        batch_size: training clips per device (per virtual device when emulating);
            eval_batch_size: videos per evaluation / predict batch.
        on_decode_error: ``'raise'`` or ``'skip'`` (warn with the reason, count; training: the next
            decodable clip instead; evaluation: dropped from its batch; predict: a row with the reason).
        predict: unlabeled clips for ``zoo-train predict``: a folder, a list file or a CSV with a
            ``path`` column; evaluated with the test views (``test_clips`` x ``test_crops``).
        virtual_devices: K devices emulated by each process (the module splits each batch in K).
        seed: order and augmentation seed; None: ``seed_everything``'s.
    """

    def __init__(
            self,
            train: Optional[str] = None,
            val: Optional[str] = None,
            test: Optional[str] = None,
            root: Optional[str] = None,
            classes: Optional[List[str]] = None,
            skip_unlabelled: bool = False,
            num_segments: int = 8,
            crop_size: int = 224,
            train_scale: Tuple[float, float] = (0.25, 1.0),
            flip: bool = True,
            eval_resize: Optional[int] = None,
            val_clips: int = 1,
            val_crops: int = 1,
            test_clips: int = 10,
            test_crops: int = 3,
            batch_size: int = 2,
            eval_batch_size: int = 1,
            num_workers: int = 4,
            on_decode_error: str = 'raise',
            mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
            std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD,
            predict: Optional[str] = None,
            virtual_devices: int = 1,
            seed: Optional[int] = None,
    ):
        if not (train or val or test or predict):
            raise ValueError('VideoDataModule needs at least one of train, val, test, predict')
        if on_decode_error not in DECODE_ERROR_MODES:
            raise ValueError(f'on_decode_error must be one of {DECODE_ERROR_MODES}, got {on_decode_error!r}')
        super().__init__(batch_size=batch_size, virtual_devices=virtual_devices, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, skip_corrupt=on_decode_error == 'skip',
                         pin_memory=torch.cuda.is_available(), predict=predict)
        self.save_hyperparameters()
        self._rows = {}
        self._classes = list(classes) if classes else None

    train_collate_fn = staticmethod(collate_videos)
    collate_fn = staticmethod(collate_videos)
    empty_batch = staticmethod(empty_video_batch)

    def _split_rows(self, split: str) -> List[Tuple[Path, str]]:
        if split not in self._rows:
            source = getattr(self.hparams, split)
            if source is None:
                raise ValueError(f'VideoDataModule: no {split} split configured')
            root = resolve_path(self.hparams.root) if self.hparams.root else None
            self._rows[split] = read_split(resolve_path(source), root, None, self.hparams.skip_unlabelled)
        return self._rows[split]

    @property
    def classes(self) -> List[str]:
        if self._classes is None:
            first = next((s for s in ('train', 'val', 'test') if getattr(self.hparams, s)), None)
            if first is None:
                raise ValueError('VideoDataModule: no labelled split (train, val, test) and no classes given: the '
                                 'class names are unknown')
            self._classes = sorted({label for _, label in self._split_rows(first)})
        return self._classes

    @property
    def class_names(self) -> Optional[List[str]]:
        """``classes``, or None for predict-only data without ``classes``."""
        if self._classes is None and not any(getattr(self.hparams, s) for s in ('train', 'val', 'test')):
            return None
        return list(self.classes)

    @property
    def num_classes(self) -> Optional[int]:
        names = self.class_names
        return len(names) if names is not None else None

    def samples(self, split: str) -> List[VideoSample]:
        index = {c: i for i, c in enumerate(self.classes)}
        rows = self._split_rows(split)
        unknown = sorted({label for _, label in rows} - set(index))
        if unknown:
            raise ValueError(f'{split} split has labels outside the {len(index)} classes: {unknown[:10]}')
        return [VideoSample(path, index[label]) for path, label in rows]

    def _views(self, split: str) -> Tuple[EvalViews, int]:
        hp = self.hparams
        clips, crops = (hp.val_clips, hp.val_crops) if split == 'val' else (hp.test_clips, hp.test_crops)
        return EvalViews(hp.crop_size, hp.eval_resize, crops, hp.mean, hp.std), clips

    def dataset(self, split: str) -> VideoClipDataset:
        hp = self.hparams
        if split == 'train':
            transform = train_clip_transform(hp.crop_size, tuple(hp.train_scale), hp.flip, hp.mean, hp.std)
            return VideoClipDataset(self.samples(split), hp.num_segments, True, transform=transform,
                                    on_decode_error=hp.on_decode_error, seed=self.resolved_seed())
        views, clips = self._views(split)
        return VideoClipDataset(self.samples(split), hp.num_segments, False, eval_views=views, num_clips=clips,
                                on_decode_error=hp.on_decode_error)

    def build_predict_set(self) -> PredictInputs:
        """The ``predict`` clips with the test views; items are ``PredictItem({'index', 'path'}, views)``."""
        hp = self.hparams
        if hp.predict is None:
            raise ValueError('zoo-train predict needs the inputs: --data.init_args.predict <folder, list or CSV>')
        paths = list_inputs(resolve_path(hp.predict), VIDEO_EXTENSIONS)
        views, clips = self._views('test')
        loader = VideoClipDataset([], hp.num_segments, False, eval_views=views, num_clips=clips)
        return PredictInputs(paths, loader.load_views, skip=self.skip_corrupt, what='clip')

    def predict_dataset(self) -> PredictInputs:  # the name it had
        return self.build_predict_set()

    def default_prediction_writer(self, output: str, top_k: int = 5, resume: bool = False) -> PredictionWriter:
        return TopKWriter(output, top_k, resume=resume)

    def _ensure(self, split: str):
        """The dataset of ``split``, built once (``train_set``, ``val_set``, ``test_set``)."""
        if getattr(self, f'{split}_set', None) is None:
            setattr(self, f'{split}_set', self.dataset(split))
        dataset = getattr(self, f'{split}_set')
        if split == 'train':
            dataset.seed = self.resolved_seed()
        return dataset

    def setup(self, stage: str) -> None:
        """Build the datasets a stage needs once (``train_set``, ``val_set``, ``test_set``, ``predict_set``)."""
        if stage == 'predict':
            self.predict_set = self.build_predict_set()
            return
        splits = {'fit': ('train', 'val'), 'validate': ('val',), 'test': ('test',)}.get(stage, ())
        for split in splits:
            if getattr(self.hparams, split) is not None:
                self._ensure(split)

    def predict_collate(self):
        return default_collate  # predict samples are view tensors: stacked to (B, V, C, T, H, W)

    def eval_collate(self, dataset):
        return collate_videos  # drops and counts the undecodable clips itself

    def train_dataloader(self) -> DataLoader:
        self._ensure('train')
        return super().train_dataloader()

    def val_dataloader(self):
        if self.hparams.val is None:
            return []  # no validation split: Lightning skips validation
        return self._eval_loader(self._ensure('val'))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._ensure('test'))
