"""TSM models: registration, 2D checkpoint compatibility, the shift itself, input errors, BCN statistics."""
import os
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import zoo
from zoo.hub import WeightsError
from zoo.layers import EstimatedBatchNorm2d
from zoo.layers.temporal_shift import TemporalShift, temporal_shift
from zoo.models.tsm import TSM_ARCHS, TSM_VARIANTS, TSMResNet

torch.set_num_threads(2)


def _clip(b=2, t=4, size=32, seed=0):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_all_tsm_names_registered_and_listed():
    expected = {f'tsm_{a}_{v}' for a in ('resnet18', 'resnet50', 'resnet101') for v in ('wsbcn', 'wsgn', 'bn')}
    assert set(TSM_ARCHS) == {'resnet18', 'resnet50', 'resnet101'} and set(TSM_VARIANTS) == {'wsbcn', 'wsgn', 'bn'}
    assert expected <= set(timm.list_models('tsm_*'))
    assert expected <= set(zoo.ZOO_MODELS)
    assert expected <= set(zoo.list_models('tsm_*'))


@pytest.mark.parametrize('variant', ['wsbcn', 'wsgn', 'bn'])
def test_2d_checkpoint_loads_with_no_missing_or_unexpected_keys(variant):
    name_2d = 'resnet18' if variant == 'bn' else f'resnet18_{variant}'
    model_2d = timm.create_model(name_2d)
    tsm = timm.create_model(f'tsm_resnet18_{variant}', num_segments=8, num_classes=1000)
    result = tsm.load_state_dict(model_2d.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sum(isinstance(m, TemporalShift) for m in tsm.modules()) == 8  # one per residual block


def test_bn_form_is_plain_conv_and_batchnorm():
    model = timm.create_model('tsm_resnet18_bn')
    convs = [type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [type(m) for m in model.modules() if 'Norm' in type(m).__name__]
    assert set(convs) == {torch.nn.Conv2d} and set(norms) == {torch.nn.BatchNorm2d}
    wsbcn = timm.create_model('tsm_resnet18_wsbcn')
    assert any(type(m).__name__ == 'WSConv2d' for m in wsbcn.modules())
    assert any(type(m).__name__ == 'BatchChannelNorm2d' for m in wsbcn.modules())


@pytest.mark.parametrize('variant', ['wsbcn', 'bn'])
def test_one_segment_has_no_shift_and_equals_the_2d_model(variant):
    torch.manual_seed(0)
    # zero_init_last=False: residual branches must not start as zeros, or any shift would go unseen.
    model_2d = timm.create_model('resnet18' if variant == 'bn' else f'resnet18_{variant}', num_classes=5,
                                 zero_init_last=False).eval()
    tsm = timm.create_model(f'tsm_resnet18_{variant}', num_segments=1, num_classes=5, zero_init_last=False).eval()
    tsm.load_state_dict(model_2d.state_dict())
    assert not any(isinstance(m, TemporalShift) for m in tsm.modules())
    clip = _clip(b=2, t=1)
    with torch.no_grad():
        torch.testing.assert_close(tsm(clip), model_2d(clip[:, :, 0]))


def test_temporal_shift_moves_two_channel_groups_with_zero_padding():
    b, t, c = 2, 4, 16
    x = torch.arange(1., b * t * c + 1).view(b, t, c, 1, 1).expand(b, t, c, 3, 3).contiguous()
    out = temporal_shift(x.view(b * t, c, 3, 3), t, shift_div=8).view(b, t, c, 3, 3)
    fold = c // 8
    assert torch.equal(out[:, :-1, :fold], x[:, 1:, :fold])  # back: frame t sees t + 1
    assert torch.equal(out[:, -1, :fold], torch.zeros_like(out[:, -1, :fold]))
    assert torch.equal(out[:, 1:, fold:2 * fold], x[:, :-1, fold:2 * fold])  # forward: frame t sees t - 1
    assert torch.equal(out[:, 0, fold:2 * fold], torch.zeros_like(out[:, 0, fold:2 * fold]))
    assert torch.equal(out[:, :, 2 * fold:], x[:, :, 2 * fold:])
    with pytest.raises(ValueError, match='whole number'):
        temporal_shift(torch.zeros(6, c, 1, 1), 4)


def test_shift_mixes_frames_and_keeps_clips_apart():
    torch.manual_seed(0)
    model = timm.create_model('tsm_resnet18_wsgn', num_segments=4, num_classes=3, zero_init_last=False).eval()
    clip = _clip(b=2, t=4)
    changed = clip.clone()
    changed[0, :, 3] += 1.  # only the last frame of the first clip
    with torch.no_grad():
        f, g = model.forward_features(clip), model.forward_features(changed)
    assert f.shape[0] == 2 * 4  # frames folded into the batch
    assert not torch.allclose(f[0], g[0])  # frame 0 sees frame 3 through the shifts
    torch.testing.assert_close(f[4:], g[4:])  # the second clip is untouched


def test_batch_stage_sees_batch_times_frames_samples():
    model = timm.create_model('tsm_resnet18_wsbcn', num_segments=4, num_classes=3).train()
    seen = []
    for m in model.modules():
        if isinstance(m, EstimatedBatchNorm2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    model(_clip(b=2, t=4))
    assert seen and set(seen) == {8}


def test_clear_errors_for_wrong_clip_layouts():
    model = timm.create_model('tsm_resnet18_bn', num_segments=4, num_classes=3)
    with pytest.raises(ValueError, match=r'5-D \(B, C, T, H, W\).*unsqueeze'):
        model(torch.zeros(3, 4, 32, 32))
    with pytest.raises(ValueError, match=r'permute\(0, 2, 1, 3, 4\)'):
        model(torch.zeros(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match='num_segments=6'):
        model(torch.zeros(1, 3, 6, 32, 32))


def test_pretrained_2d_file_loads_through_timm(tmp_path):
    model_2d = timm.create_model('resnet18_wsbcn')  # 1000 classes
    path = tmp_path / 'resnet18_wsbcn.safetensors'
    save_file(model_2d.state_dict(), str(path))
    tsm = timm.create_model('tsm_resnet18_wsbcn', pretrained=True, num_classes=3, num_segments=8,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert isinstance(tsm, TSMResNet) and tsm.fc.out_features == 3
    torch.testing.assert_close(tsm.layer4[1].conv2.weight, model_2d.layer4[1].conv2.weight)
    torch.testing.assert_close(tsm.layer2[0].bn1.bn.running_var, model_2d.layer2[0].bn1.bn.running_var)


def test_pretrained_2d_file_with_its_class_count_gets_a_new_head(tmp_path):
    """The docstring's form: the overlay names the file's 1000 classes, the model gets 5."""
    model_2d = timm.create_model('resnet18_wsbcn')
    path = tmp_path / 'resnet18_wsbcn.safetensors'
    save_file(model_2d.state_dict(), str(path))
    tsm = timm.create_model('tsm_resnet18_wsbcn', pretrained=True, num_classes=5, num_segments=2,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=1000))
    assert tsm.fc.out_features == 5
    torch.testing.assert_close(tsm.conv1.weight, model_2d.conv1.weight)


def test_pretrained_file_that_does_not_fit_raises_weights_error(tmp_path):
    path = tmp_path / 'resnet18_wsbcn.safetensors'
    save_file(timm.create_model('resnet18_wsbcn').state_dict(), str(path))  # 1000-class head
    with pytest.raises(WeightsError, match=r'fc\.weight'):  # the cfg says 400 classes, the file has 1000
        timm.create_model('tsm_resnet18_wsbcn', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match='truncated or corrupted'):
        timm.create_model('tsm_resnet18_wsbcn', pretrained=True, num_classes=3,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=1000))


def _build_for_sync():
    torch.manual_seed(0)
    return timm.create_model('tsm_resnet18_wsbcn', num_segments=2, num_classes=3, zero_init_last=False).train()


def _bcn_estimates(model):
    return torch.cat([m.running_mean for m in model.modules() if isinstance(m, EstimatedBatchNorm2d)] +
                     [m.running_var for m in model.modules() if isinstance(m, EstimatedBatchNorm2d)])


def _sync_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        model = _build_for_sync()
        clips = _clip(b=2, t=2, seed=1)
        model(clips[rank:rank + 1])  # each process its own clip
        torch.save(_bcn_estimates(model), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_bcn_estimates_stay_in_sync_across_processes():
    """Two gloo processes, one clip each, end with the estimates of one process on both clips."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, 'init')
        mp.spawn(_sync_worker, args=(2, init_file, out_dir), nprocs=2, join=True)
        rank0 = torch.load(os.path.join(out_dir, 'rank0.pt'), weights_only=True)
        rank1 = torch.load(os.path.join(out_dir, 'rank1.pt'), weights_only=True)
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    both, own = _build_for_sync(), _build_for_sync()
    both(_clip(b=2, t=2, seed=1))
    own(_clip(b=2, t=2, seed=1)[:1])
    torch.testing.assert_close(rank0, _bcn_estimates(both), rtol=1e-3, atol=2e-4)
    assert not torch.allclose(rank0, _bcn_estimates(own), rtol=1e-3, atol=2e-4)  # not rank 0's clip alone
