"""The authors' GN+WS and BCN+WS ImageNet checkpoints convert to zoo models with the same logits.

The real files cannot be downloaded here, so each test writes a checkpoint in the published
layout from an independent plain-torch reference written below with the authors' formulas
(torchvision key names, ``module.`` prefix, GN norms or BCN norms with ``pbn`` and a (1, G, 1)
group affine, un-standardized conv weights), loads it through the registered ``.in1k`` tag and
compares logits.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.converters import convert_bcn_ws, main as convert_main
from zoo.hub import WeightsError

G = 32


class RefGNWSConv(nn.Conv2d):
    """Authors' WS code (GN+WS release): s = unbiased std + 1e-5, eps outside the root."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, (w - mean) / std, None, self.stride, self.padding, self.dilation, self.groups)


class RefBCNWSConv(nn.Conv2d):
    """Authors' BCN ImageNet code: centre, then divide by sqrt(unbiased var + 1e-5)."""

    def forward(self, x):
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        std = (w.view(w.size(0), -1).var(dim=1) + 1e-5).pow(0.5).view(-1, 1, 1, 1)
        return F.conv2d(x, w / std, None, self.stride, self.padding, self.dilation, self.groups)


class RefBCN(nn.Module):
    """Authors' BCN norm: BatchNorm2d ``pbn``, per-sample group normalization, (1, G, 1) affine."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, G, 1))
        self.bias = nn.Parameter(torch.zeros(1, G, 1))
        self.pbn = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.pbn(x)
        n = x.size(0)
        out = out.view(1, n * G, -1)
        out = F.batch_norm(out, None, None, training=True, momentum=0., eps=1e-5)
        out = out.view(n, G, -1)
        return (self.weight * out + self.bias).view_as(x)


class RefBottleneck(nn.Module):
    def __init__(self, conv, norm, inplanes, planes, stride, groups, base_width, downsample):
        super().__init__()
        width = int(math.floor(planes * base_width / 64)) * groups
        self.conv1 = conv(inplanes, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class RefResNet(nn.Module):
    """torchvision-layout ResNet / ResNeXt with the authors' WS conv and norm."""

    def __init__(self, layers, conv, norm, groups=1, base_width=64, num_classes=1000):
        super().__init__()
        self.conv1 = conv(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                ds = None
                if b == 0 and (stride != 1 or inplanes != planes * 4):
                    ds = nn.Sequential(conv(inplanes, planes * 4, 1, stride=stride, bias=False), norm(planes * 4))
                blocks.append(RefBottleneck(conv, norm, inplanes, planes, stride if b == 0 else 1, groups, base_width, ds))
                inplanes = planes * 4
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        return self.fc(x.mean((2, 3)))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values everywhere (norm affines, BN running statistics), as in trained weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                t.fill_(1000)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                scale = 0.2 if name.endswith(('bias', 'running_mean')) else 0.02 if name.startswith('fc') else 1.
                t.copy_(torch.randn(t.shape, generator=g) * scale + (1. if name.endswith('weight') and t.ndim != 4 else 0.))
    return model


ARCHS = {
    'resnet50': dict(layers=(3, 4, 6, 3)),
    'resnet101': dict(layers=(3, 4, 23, 3)),
    'resnext50_32x4d': dict(layers=(3, 4, 6, 3), groups=32, base_width=4),
    'resnext101_32x4d': dict(layers=(3, 4, 23, 3), groups=32, base_width=4),
}


def _authors_checkpoint(arch: str, kind: str, seed: int = 0) -> nn.Module:
    conv, norm = (RefGNWSConv, lambda c: nn.GroupNorm(G, c)) if kind == 'gn' else (RefBCNWSConv, RefBCN)
    return _randomize(RefResNet(conv=conv, norm=norm, **ARCHS[arch]), seed).eval()


def _save_release(ref: nn.Module, path, layout: str = 'authors'):
    sd = ref.state_dict()
    if layout == 'authors':  # DataParallel-saved flat state dict
        obj = {f'module.{k}': v for k, v in sd.items()}
    elif layout == 'training':  # pytorch-classification save_checkpoint dict
        obj = {'epoch': 90, 'arch': 'resnet', 'best_prec1': 76.3, 'state_dict': {f'module.{k}': v for k, v in sd.items()}}
    elif layout == 'training_0dim':  # the authors' training script: 0-dim tensor metrics next to state_dict
        obj = {'epoch': 90, 'acc': torch.tensor(76.3), 'best_acc': torch.tensor(76.5),
               'state_dict': {f'module.{k}': v for k, v in sd.items()}}
    else:  # mmcv: nested state_dict, backbone. prefix, gnX norm names
        renamed = {f'backbone.{k}'.replace('.bn', '.gn').replace('backbone.bn1', 'backbone.gn1'): v for k, v in sd.items()}
        obj = {'meta': {'mmcv_version': '1.x'}, 'state_dict': renamed}
    torch.save(obj, path)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('arch,kind', [('resnet50', 'gn'), ('resnext50_32x4d', 'bcn')])
def test_in1k_tag_converts_release_to_same_logits(tmp_path, arch, kind):
    ref = _authors_checkpoint(arch, kind)
    path = tmp_path / 'release.pth'
    _save_release(ref, path)
    model = timm.create_model(f'{arch}_ws{kind}.in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        expected, got = ref(X), model(X)
    assert 0.1 < expected.std() < 100  # a real, non-degenerate output at a scale the tolerance means something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layout', ['training', 'mmcv'])
def test_in1k_tag_reads_other_release_layouts(tmp_path, layout):
    """pytorch-classification training checkpoints and mmcv mirrors load to the same tensors."""
    ref = _authors_checkpoint('resnext50_32x4d', 'gn')
    _save_release(ref, tmp_path / 'release.pth', layout)
    model = timm.create_model('resnext50_32x4d_wsgn.in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'release.pth')))
    got, expected = model.state_dict(), ref.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_url_download_of_a_training_checkpoint_with_0dim_metrics(tmp_path, monkeypatch):
    """The default route for URL-hosted releases (download, torch.hub cache, converter), from a local server."""
    import functools
    import http.server
    import threading
    ref = _authors_checkpoint('resnet50', 'bcn')
    (tmp_path / 'www').mkdir()
    _save_release(ref, tmp_path / 'www' / 'rn50_bcn_ws.pth', 'training_0dim')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / 'www'))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/rn50_bcn_ws.pth'
        model = timm.create_model('resnet50_wsbcn.in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url)).eval()
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / 'torch' / 'hub' / 'checkpoints' / 'rn50_bcn_ws.pth').is_file()
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-4)


def test_bcn_release_matches_in_training_mode_too(tmp_path):
    """The batch stage of the authors' BCN (per-GPU BatchNorm) is the zoo's 'batch' stage."""
    ref = _authors_checkpoint('resnet50', 'bcn').train()
    _save_release(ref, tmp_path / 'rn50_bcn_ws.pth')
    model = timm.create_model('resnet50_wsbcn.in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'rn50_bcn_ws.pth'))).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.bn1.bn.running_mean, ref.bn1.pbn.running_mean)


def test_wrong_ws_formula_changes_logits(tmp_path):
    """The tag's WS formula matters: the zoo default formula does not reproduce the BCN release.

    (Behind GN a formula's uniform per-conv scale cancels, so GN+WS releases are nearly formula-blind;
    BCN's batch stage, an affine map with running statistics, is not.)
    """
    ref = _authors_checkpoint('resnet50', 'bcn')
    _save_release(ref, tmp_path / 'r50.pth')
    model = timm.create_model('resnet50_wsbcn.in1k', pretrained=True, ws_formula='zoo',
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'r50.pth'))).eval()
    with torch.no_grad():
        assert not torch.allclose(model(X), ref(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('arch,kind', [
    pytest.param('resnet101', 'gn', marks=pytest.mark.slow), ('resnext101_32x4d', 'gn'), ('resnet101', 'bcn')])
def test_deep_releases_convert_key_for_key(arch, kind):
    """ResNet-101 / ResNeXt-101 releases: every converted tensor lands on a zoo tensor of its shape."""
    ref = _authors_checkpoint(arch, kind)
    sd = {f'module.{k}': v for k, v in ref.state_dict().items()}
    model = timm.create_model(f'{arch}_ws{kind}.in1k')
    converted = zoo.converters.CONVERTERS[f'{kind}_ws'](sd)
    zoo.hub.load_weights(model, converted)  # strict: raises on any missing/unexpected key or shape
    assert torch.equal(model.layer3[22].conv2.weight, ref.layer3[22].conv2.weight)


def test_bcn_converter_maps_group_affine_and_batch_stage():
    sd = {'module.bn1.weight': torch.arange(32.).view(1, 32, 1), 'module.bn1.bias': torch.zeros(1, 32, 1),
          'module.bn1.pbn.running_mean': torch.ones(64)}
    out = convert_bcn_ws(sd)
    assert out['bn1.weight'].shape == (32,) and out['bn1.weight'][5] == 5
    assert 'bn1.bn.running_mean' in out and not any(k.startswith('module.') for k in out)


def test_in1k_tag_build_args_and_untagged_defaults():
    gn = timm.create_model('resnet50_wsgn.in1k')
    assert gn.conv1.ws_formula == zoo.layers.WS_FORMULAS['ws']
    bcn = timm.create_model('resnet50_wsbcn.in1k')
    assert bcn.conv1.ws_formula == zoo.layers.WS_FORMULAS['bcn'] and bcn.bn1.batch_stage == 'batch'
    plain = timm.create_model('resnet50_wsbcn')  # untagged, not pretrained: zoo defaults
    assert plain.conv1.ws_formula == zoo.layers.WS_FORMULAS['zoo'] and plain.bn1.batch_stage == 'estimated'
    assert timm.create_model('resnet18_wsbcn').bn1.batch_stage == 'estimated'
    assert 'resnet50_wsbcn.in1k' in timm.list_models(pretrained=True)
    # switch a converted BCN model to micro-batch fine-tuning
    zoo.set_bcn_batch_stage(bcn, 'estimated')
    assert bcn.bn1.batch_stage == 'estimated'


def test_truncated_release_gives_clear_error(tmp_path):
    ref = _authors_checkpoint('resnet50', 'gn')
    path = tmp_path / 'R-50-GN-WS.pth.tar'
    _save_release(ref, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightsError, match='R-50-GN-WS.pth.tar'):
        timm.create_model('resnet50_wsgn.in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_release_for_wrong_architecture_gives_clear_error(tmp_path):
    ref = _authors_checkpoint('resnet50', 'gn')
    _save_release(ref, tmp_path / 'r50.pth')
    with pytest.raises(WeightsError, match='do not fit'):
        timm.create_model('resnext50_32x4d_wsgn.in1k', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'r50.pth')))


def test_cli_converts_local_file_to_loadable_folder(tmp_path, capsys):
    ref = _authors_checkpoint('resnet50', 'bcn')
    _save_release(ref, tmp_path / 'rn50_bcn_ws.pth')
    out = tmp_path / 'converted'
    assert convert_main([str(tmp_path / 'rn50_bcn_ws.pth'), str(out), '--model', 'resnet50_wsbcn.in1k']) == 0
    assert (out / 'model.safetensors').is_file() and (out / 'config.json').is_file()
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.bn1.batch_stage == 'batch' and model.conv1.ws_formula == zoo.layers.WS_FORMULAS['bcn']
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-4)
    again = zoo.load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert convert_main([str(tmp_path / 'rn50_bcn_ws.pth'), str(tmp_path / 'x'), '--model', 'resnet50_wsgn.in1k']) == 1
    assert 'do not fit' in capsys.readouterr().err
