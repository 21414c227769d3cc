"""Every registered zoo model: forward, backward, safetensors round trip, features_only, cfgs."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load, save

import zoo
from zoo.layers import WSConv2d
from zoo.models import ZOO_CIFAR_MODELS, ZOO_IMAGENET_MODELS

IMAGE_MODELS = ZOO_IMAGENET_MODELS + ZOO_CIFAR_MODELS  # the 2-D families (video models have their own tests)

# Expected feature pyramids, written out from the architectures' definitions.
BASIC_CHANNELS = [64, 64, 128, 256, 512]
BOTTLENECK_CHANNELS = [64, 256, 512, 1024, 2048]
IMAGENET_REDUCTIONS = [2, 4, 8, 16, 32]
CIFAR_CHANNELS = [16, 16, 32, 64]
CIFAR_REDUCTIONS = [1, 1, 2, 4]


def expected_features(name):
    if name in ZOO_CIFAR_MODELS:
        return CIFAR_CHANNELS, CIFAR_REDUCTIONS
    basic = name.startswith(('resnet18_', 'resnet34_'))
    return (BASIC_CHANNELS if basic else BOTTLENECK_CHANNELS), IMAGENET_REDUCTIONS


def test_registry_lists_all_zoo_models():
    assert len(ZOO_IMAGENET_MODELS) == 8 * 7 and len(ZOO_CIFAR_MODELS) == 5 * 8
    registered = set(timm.list_models())
    assert set(IMAGE_MODELS) <= set(zoo.ZOO_MODELS) <= registered
    assert sorted(zoo.list_models('*wsbcn*')) == sorted(timm.list_models('*wsbcn*'))
    assert len([n for n in IMAGE_MODELS if n.endswith('_wsbcn')]) == 8 + 5


@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_model_forward_backward_round_trip(name):
    model = timm.create_model(name)
    num_classes = model.num_classes
    x = torch.randn(2, 3, 32, 32)

    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, f'{name}: no gradient for {pname}'
        assert torch.isfinite(p.grad).all(), f'{name}: non-finite gradient for {pname}'

    model.eval()
    with torch.no_grad():
        logits = model(x[:1])
    assert logits.shape == (1, num_classes) and torch.isfinite(logits).all()

    restored = timm.create_model(name)
    restored.load_state_dict(load(save(model.state_dict())), strict=True)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x[:1]), logits)


@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_features_only_channels_and_strides(name):
    channels, reductions = expected_features(name)
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == reductions
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels
    assert [64 // f.shape[-1] for f in feats] == reductions


@pytest.mark.parametrize('name', IMAGE_MODELS)
def test_default_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier', 'license'):
        assert cfg.get(key) is not None, f'{name}: default_cfg lacks {key}'
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert isinstance(model.get_submodule(cfg['classifier']), nn.Linear)
    if cfg.get('hf_hub_id'):
        org, _, repo = cfg['hf_hub_id'].partition('/')
        assert org and repo, f'{name}: hf_hub_id must be a full org/name, got {cfg["hf_hub_id"]!r}'


@pytest.mark.parametrize('name', ['resnet50_wsbcn', 'resnet20_wsgn', 'resnext50_32x4d_bcn', 'resnet20'])
def test_ws_reaches_every_conv_and_only_in_ws_variants(name):
    model = timm.create_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    is_ws = '_ws' in name
    assert all(isinstance(m, WSConv2d) == is_ws for m in convs)
    assert isinstance(model.conv1, WSConv2d) == is_ws  # stem
    assert isinstance(model.layer2[0].downsample[0], WSConv2d) == is_ws  # shortcut
    assert type(model.fc) is nn.Linear


@pytest.mark.parametrize('zoo_name, timm_name', [
    ('resnet50_wsbn', 'resnet50'), ('resnext50_32x4d_wsbn', 'resnext50_32x4d'),
    ('resnet18_wsbn', 'resnet18'), ('resnet101_wsgn', None), ('resnet50_wsgn', 'resnet50_gn')])
def test_state_dict_keys_match_timm(zoo_name, timm_name):
    """WS keeps timm/torchvision keys, so timm's BN / GN weights load unchanged."""
    zoo_model = timm.create_model(zoo_name)
    if timm_name is None:  # GN: BN keys minus the running statistics
        timm_keys = {k for k in timm.create_model('resnet101').state_dict()
                     if not k.split('.')[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}
        assert set(zoo_model.state_dict()) == timm_keys
        return
    timm_state = timm.create_model(timm_name).state_dict()
    assert list(zoo_model.state_dict()) == list(timm_state)
    zoo_model.load_state_dict(timm_state, strict=True)


@pytest.mark.parametrize('name', ['resnet18_wsbcn', 'resnet20_wsbgn'])
def test_timm_kwargs(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, drop_path_rate=0.2, global_pool='max').eval()
    assert model.fc.out_features == 7 and model.global_pool.pool_type == 'max'
    assert any(type(m).__name__ == 'DropPath' for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    headless = timm.create_model(name, num_classes=0)
    assert headless(torch.randn(2, 3, 32, 32)).shape == (2, headless.num_features)


COMPILE_BACKENDS = [
    pytest.param('aot_eager', 1e-6, id='aot_eager'),  # dynamo + AOT autograd: graph capture, in seconds
    pytest.param('inductor', 1e-3, id='inductor', marks=pytest.mark.slow),  # minutes of C++ codegen on 2 cores
]


@pytest.mark.parametrize('backend, tol', COMPILE_BACKENDS)
@pytest.mark.parametrize('name, size', [
    pytest.param('resnet18_wsbcn', 64, marks=pytest.mark.slow),  # ~40 s of graph capture each on 2 cores:
    ('resnet20_wsbcn', 16),                                       # one BCN model in the default run
])
def test_torch_compile(name, size, backend, tol):
    """One model per family compiles as one graph; training updates the estimates as in eager mode."""
    model = timm.create_model(name)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, size, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_train = model(x)
    eager_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    compiled_train = compiled(x)
    compiled_train.sum().backward()
    torch.testing.assert_close(compiled_train, eager_train, rtol=tol, atol=tol)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, eager_state[k], rtol=tol, atol=tol, msg=k)
    assert model.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)


@pytest.mark.slow  # ~35 s of graph capture on 2 cores
def test_torch_compile_video_family():
    """The TSM family (frames folded into the batch, temporal shift) compiles as one graph too."""
    model = timm.create_model('tsm_resnet18_wsbcn', num_segments=2, num_classes=3)
    clips = torch.randn(1, 3, 2, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = model(clips)
    model.load_state_dict(state)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)(clips)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_unknown_model_name_lists_close_matches():
    with pytest.raises(zoo.UnknownModelError, match=r"Unknown model 'resnet50_wsbnc'.*resnet50_wsbcn"):
        zoo.create_model('resnet50_wsbnc')
    with pytest.raises(RuntimeError):  # still timm's exception family
        zoo.create_model('no_such_net_at_all')


@pytest.mark.parametrize('name', ['resnet18_wsbcn', 'resnet20_bgn'])
def test_wrong_input_channels_is_a_clear_error(name):
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=r'expects 3 input channels, got 4.*in_chans=4'):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize('name', ['resnet18_wsbcn', 'resnet20_gn'])
def test_3d_tensor_is_a_clear_error(name):
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=r'4-D \(N, C, H, W\).*unsqueeze\(0\)'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r'4-D'):
        model.forward_intermediates(torch.randn(3, 32, 32))
