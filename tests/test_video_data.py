"""Video data pipeline on the real clips of ../shared/data/videos: decoding, sampling, errors, DataModule."""
import csv
import fractions
import logging
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lightning_modules.video_data import (
    EvalViews, SkippedVideo, VideoClipDataset, VideoDataModule, VideoDecodeError, VideoSample, collate_videos,
    decode_video, read_manifest, scan_class_folders, segment_indices, train_clip_transform, uniform_indices)

VIDEOS = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'videos'
MANIFEST = VIDEOS / 'labels.csv'
pytestmark = pytest.mark.skipif(not MANIFEST.is_file(), reason=f'shared video clips not found at {VIDEOS}')


def _manifest_rows():
    with open(MANIFEST, newline='') as f:
        return list(csv.DictReader(f))


def _codec_and_size(path):
    with av.open(str(path), metadata_errors='replace') as c:
        s = c.streams.video[0]
        return s.codec_context.name, (s.height, s.width)


@pytest.mark.parametrize('row', _manifest_rows() if MANIFEST.is_file() else [], ids=lambda r: r['path'])
def test_every_shared_clip_decodes_fully(row):
    frames = decode_video(VIDEOS / row['path'])
    assert len({id(f) for f in frames}) == int(row['frames'])  # every stored frame decoded
    with av.open(str(VIDEOS / row['path']), metadata_errors='replace') as c:
        assert len(frames) == c.streams.video[0].frames  # one frame on screen per tick the header declares
    rgb = frames[-1].to_ndarray(format='rgb24')
    assert rgb.shape == (int(row['height']), int(row['width']), 3) and rgb.std() > 0  # a real picture


def test_shared_clips_cover_both_containers_and_codecs():
    kinds = {(Path(r['path']).suffix, _codec_and_size(VIDEOS / r['path'])[0]) for r in _manifest_rows()}
    assert kinds == {('.avi', 'mpeg4'), ('.mp4', 'h264')}


def test_segment_sampling_takes_one_frame_per_segment():
    gen = torch.Generator().manual_seed(0)
    draws = [segment_indices(80, 8, gen) for _ in range(20)]
    for idx in draws:
        assert [i // 10 for i in idx] == list(range(8))  # frame i of segment i
    assert len({tuple(d) for d in draws}) > 1  # random in training
    short = segment_indices(3, 8, gen)
    assert len(short) == 8 and set(short) <= {0, 1, 2} and short == sorted(short)


def test_uniform_sampling_centres_and_spreads_clips():
    assert uniform_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    clips = [uniform_indices(80, 8, k, 2) for k in range(2)]
    assert clips == [[2, 12, 22, 32, 42, 52, 62, 72], [7, 17, 27, 37, 47, 57, 67, 77]]
    assert uniform_indices(1, 4) == [0, 0, 0, 0]


def test_manifest_unlabelled_rows_fail_or_are_counted(caplog):
    with pytest.raises(ValueError, match=r'R6llTwEh07w\.mp4.*no label.*skip_unlabelled'):
        read_manifest(MANIFEST)
    rows, skipped = read_manifest(MANIFEST, skip_unlabelled=True)
    assert skipped == 4 and len(rows) == 6
    assert {label for _, label in rows} == {'wave', 'cartwheel', 'soccer_juggling'}
    assert all(p.is_file() for p, _ in rows)
    assert 'skipped 4 unlabelled rows' in caplog.text


def test_manifest_without_label_column_is_rejected(tmp_path):
    bad = tmp_path / 'bad.csv'
    bad.write_text('file,class\na.mp4,x\n')
    with pytest.raises(ValueError, match='path and label'):
        read_manifest(bad)


def test_class_folder_tree(tmp_path):
    for row in _manifest_rows()[:6]:
        (tmp_path / row['label']).mkdir(exist_ok=True)
        (tmp_path / row['label'] / row['path']).symlink_to(VIDEOS / row['path'])
    (tmp_path / 'wave' / 'notes.txt').write_text('not a clip')
    rows = scan_class_folders(tmp_path)
    assert len(rows) == 6 and sorted({c for _, c in rows}) == ['cartwheel', 'soccer_juggling', 'wave']
    dm = VideoDataModule(train=str(tmp_path), num_segments=2, crop_size=64, num_workers=0)
    assert dm.classes == ['cartwheel', 'soccer_juggling', 'wave']


# --- corrupt clips -------------------------------------------------------------------------------

def _corrupt(tmp_path, name, how):
    data = (VIDEOS / name).read_bytes()
    if how == 'half':
        data = data[:len(data) // 2]
    elif how == 'zero_header':
        data = bytes(1024) + data[1024:]
    elif how == 'half_zero_header':
        data = bytes(1024) + data[1024:len(data) // 2]
    elif how == 'empty':
        data = b''
    out = tmp_path / f'{how}_{name}'
    out.write_bytes(data)
    return out


@pytest.mark.parametrize('name', ['v_SoccerJuggling_g23_c01.avi', 'R6llTwEh07w.mp4'])
@pytest.mark.parametrize('how,reason', [
    ('half', 'truncated|Invalid data'),
    ('zero_header', 'damaged header|Invalid data'),
    ('half_zero_header', 'damaged header|Invalid data'),
    ('empty', r'empty file \(0 bytes\)'),
])
def test_corrupt_copy_gives_a_clear_error_naming_the_file(tmp_path, name, how, reason):
    bad = _corrupt(tmp_path, name, how)
    with pytest.raises(VideoDecodeError, match=reason) as err:
        decode_video(bad)
    assert err.value.path == str(bad) and str(bad) in str(err.value)


def test_truncated_avi_is_caught_by_its_frame_count(tmp_path):
    # FFmpeg decodes half of a truncated AVI without complaint; only the header's count tells.
    with pytest.raises(VideoDecodeError, match=r'truncated: decoded \d+ of the 240 frames'):
        decode_video(_corrupt(tmp_path, 'v_SoccerJuggling_g23_c01.avi', 'half'))


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(VideoDecodeError, match='file not found'):
        decode_video(tmp_path / 'nope.mp4')
    text = tmp_path / 'text.mp4'
    text.write_text('not a video')
    with pytest.raises(VideoDecodeError, match='text.mp4'):
        decode_video(text)


def test_undecodable_clip_raises_in_the_dataset_or_is_skipped_and_counted(tmp_path, caplog):
    bad = _corrupt(tmp_path, 'TrumanShow_wave_f_nm_np1_fr_med_26.avi', 'half_zero_header')
    good = VIDEOS / 'TrumanShow_wave_f_nm_np1_fr_med_26.avi'
    samples = [VideoSample(good, 1), VideoSample(bad, 0), VideoSample(good, 2)]
    kw = dict(num_segments=2, transform=train_clip_transform(32))
    with pytest.raises(VideoDecodeError, match=bad.name):
        VideoClipDataset(samples, **kw)[1]
    ds = VideoClipDataset(samples, on_decode_error='skip', replace_undecodable=False, **kw)  # evaluation's way
    with caplog.at_level(logging.WARNING, logger='lightning_modules.video.data'):
        items = [ds[i] for i in range(3)] + [ds[1]]
    skips = [r.getMessage() for r in caplog.records if 'Skipping undecodable video' in r.getMessage()]
    assert len(skips) == 2 and all(str(bad) in m for m in skips)  # every skip, not once per process
    items = items[:3]
    assert isinstance(items[1], SkippedVideo) and items[1].path == str(bad)
    batch = collate_videos(items)
    assert batch['video'].shape == (2, 3, 2, 32, 32) and batch['label'].tolist() == [1, 2]
    assert int(batch['skipped']) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        empty = collate_videos([ds[1]])
    assert empty['video'].numel() == 0 and int(empty['skipped']) == 1
    # training's way: the next decodable clip takes its place (the batch keeps its size), counted
    train = VideoClipDataset(samples, on_decode_error='skip', **kw)
    video, label, skipped = train[(1, 0)]
    assert label == 2 and skipped == 1 and video.shape == (3, 2, 32, 32)
    batch = collate_videos([train[(i, 0)] for i in range(3)])
    assert batch['video'].shape == (3, 3, 2, 32, 32) and batch['label'].tolist() == [1, 2, 2]
    assert int(batch['skipped']) == 1


# --- views and the DataModule --------------------------------------------------------------------

def test_eval_views_three_crops_span_the_long_side():
    clip = torch.linspace(0, 255, 120).round().to(torch.uint8).expand(2, 3, 60, 120).contiguous()  # brighter to the right
    views = EvalViews(crop_size=32, resize=40, num_crops=3, mean=(0., 0., 0.), std=(1., 1., 1.))(clip)
    assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 3
    left, centre, right = (float(v.mean()) for v in views)
    assert left < 0.25 < centre < 0.75 < right
    assert EvalViews(32, 40, 3).crop_boxes(40, 80) == [(4, 0), (4, 24), (4, 48)]
    assert EvalViews(32, 40, 3).crop_boxes(80, 40) == [(0, 4), (24, 4), (48, 4)]
    assert EvalViews(32, 40, 1).crop_boxes(40, 80) == [(4, 24)]


def test_datamodule_batches_on_the_labelled_clips():
    dm = VideoDataModule(train=str(MANIFEST), val=str(MANIFEST), test=str(MANIFEST), skip_unlabelled=True,
                         num_segments=4, crop_size=64, batch_size=3, eval_batch_size=2, num_workers=0,
                         test_clips=2, test_crops=3)
    assert dm.classes == ['cartwheel', 'soccer_juggling', 'wave'] and dm.num_classes == 3
    train = next(iter(dm.train_dataloader()))
    assert train['video'].shape == (3, 3, 4, 64, 64) and train['video'].dtype == torch.float32
    assert int(train['skipped']) == 0
    test = next(iter(dm.test_dataloader()))
    assert test['video'].shape == (2, 6, 3, 4, 64, 64)  # 2 clips x 3 crops per video
    assert set(test['label'].tolist()) <= {0, 1, 2}
    val = next(iter(dm.val_dataloader()))
    assert val['video'].shape == (2, 1, 3, 4, 64, 64)
    # the two clips of a video come from different frames
    assert not torch.allclose(test['video'][0, 0], test['video'][0, 3])


def test_datamodule_draws_per_device_batches_and_resumes_mid_epoch():
    """The shared training loader: K x batch_size clips per batch (device by device), a seeded order and
    augmentation, and a resumed run draws exactly the uninterrupted run's remaining batches."""
    from lightning_modules.core.samplers import VirtualDeviceSampler
    kw = dict(train=str(MANIFEST), skip_unlabelled=True, num_segments=2, crop_size=32, batch_size=1,
              virtual_devices=2, num_workers=0, seed=3)
    dm = VideoDataModule(**kw)
    dm.setup('fit')
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, VirtualDeviceSampler) and loader.batch_size == 2
    loader.sampler.set_epoch(1)
    full = list(loader)
    assert len(full) == 3 and full[0]['video'].shape == (2, 3, 2, 32, 32)  # 6 labelled clips, 2 per step
    resumed = VideoDataModule(**kw)
    resumed.setup('fit')
    resumed.load_state_dict({'train_epoch': 1, 'train_batches_done': 1})  # as Lightning restores a checkpoint
    rest = list(resumed.train_dataloader())
    assert len(rest) == 2
    for a, b in zip(rest, full[1:]):
        assert torch.equal(a['label'], b['label']) and torch.equal(a['video'], b['video'])  # same clips, same crops


def _held_frames_avi(path: Path, ticks: int = 40, every: int = 4) -> Path:
    """An AVI that stores every ``every``-th frame (and the last) and marks the rest "repeat previous frame".

    Like OpenCV's sample ``tree.avi`` (Cinepak: 444 declared frames, 68 stored): the muxer writes
    an empty chunk for each held tick, so the header declares ``ticks`` frames at 10 fps.
    """
    out = av.open(str(path), 'w')
    stream = out.add_stream('mpeg4', rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
    for k in range(ticks):
        if k % every == 0 or k == ticks - 1:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (k * 6) % 256, np.uint8), format='rgb24')
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        else:
            packet = av.Packet(b'')
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, k, k, fractions.Fraction(1, 10)
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def test_held_frames_are_placed_by_time_not_mistaken_for_truncation(tmp_path):
    clip = _held_frames_avi(tmp_path / 'held.avi')
    frames = decode_video(clip)
    assert len(frames) == 40  # one per tick of the declared 4 s at 10 fps
    times = [round(float(f.time), 1) for f in frames]
    assert times[:9] == [0.0] * 4 + [0.4] * 4 + [0.8]  # each stored frame held until the next one
    assert times[-1] == 3.9
    # Sampling by index is sampling by time: the middle of segment 5 of 8 (t = 2.75 s) shows the 2.4 s frame.
    assert round(float(frames[uniform_indices(len(frames), 8)[5]].time), 1) == 2.4


def test_held_frames_clip_cut_in_half_is_still_truncated(tmp_path):
    clip = _held_frames_avi(tmp_path / 'held.avi', ticks=200)
    cut = tmp_path / 'cut.avi'
    cut.write_bytes(clip.read_bytes()[:clip.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match=r'truncated: decoded \d+ of the 200 frames .*timestamps stop at'):
        decode_video(cut)
