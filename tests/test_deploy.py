"""Deployment: ONNX in onnxruntime per model family, and the ``zoo-export`` command (checked exports).

Real inputs: CIFAR-10 test JPEGs from the shared data (extracted once into ``$ZOO_CACHE_DIR``).
"""
from pathlib import Path

import pytest
import timm
import torch

import zoo
from lightning_modules import deploy
from lightning_modules.deploy import ExportMismatchError, export_checked, main, real_batch
from zoo.layers import BatchGroupNorm2d, EstimatedBatchNorm2d

from conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / 'cifar10-jpeg.tar.gz').is_file(), reason='needs the shared CIFAR-10 data')


SMALL = dict(input_size=(3, 64, 64))  # ImageNet preprocessing at 64 px: fast enough for a test


def _with_statistics(model):
    """Norm affines and running statistics off their init, so folding them is tested."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, (EstimatedBatchNorm2d, BatchGroupNorm2d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize('name, kwargs', [  # the CIFAR family: test_zoo_export_command_writes_a_checked_export
    ('resnet18_wsbgn', dict(pretrained_cfg_overlay=SMALL)),  # ImageNet family
    pytest.param('resnet20_wsbcn.cifar10', {}, marks=pytest.mark.slow),
    pytest.param('tsm_resnet18_wsbcn', dict(num_segments=4, num_classes=5, pretrained_cfg_overlay=SMALL),
                 marks=pytest.mark.slow),  # video family: ~20 s to export with a dynamic batch (symbolic shapes)
])
def test_onnx_runtime_gives_pytorch_logits_on_real_images(name, kwargs, tmp_path):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model = zoo.create_model(name, pretrained='.' in name, **kwargs).eval()
    if '.' not in name:
        _with_statistics(model)
    x = real_batch(model)  # CIFAR-10 test images, preprocessed with the model's config
    diff = export_checked(model, x, 'onnx', tmp_path / 'model.onnx')
    assert (tmp_path / 'model.onnx').is_file() and diff <= 1e-4 * max(1., model(x).abs().max().item())
    # The file on its own, in a fresh session, at another batch size than the export's example.
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
    (logits,) = session.run(None, {'input': x[:1].numpy()})
    with torch.no_grad():
        expected = model(x[:1])
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4 * max(1., expected.abs().max().item()))
    if '.' in name:  # trained weights: the export predicts the classes PyTorch predicts
        assert torch.equal(torch.from_numpy(session.run(None, {'input': x.numpy()})[0]).argmax(1), model(x).argmax(1))


@pytest.mark.parametrize('fmt', deploy.FORMATS)
def test_zoo_export_command_writes_a_checked_export(fmt, tmp_path, capsys):
    if fmt == 'onnx':
        pytest.importorskip('onnxruntime')
        pytest.importorskip('onnxscript')
    out = tmp_path / f'resnet20.{fmt}'
    assert main(['resnet20_wsbcn.cifar10', '--format', fmt, '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'written to {out}' in printed and 'max |difference| from PyTorch on (4, 3, 32, 32) real input' in printed
    assert printed.startswith(f'{deploy.FORMAT_NAMES[fmt]} of resnet20_wsbcn.cifar10 written to'), printed
    assert 'export export' not in printed and 'exported export' not in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left
    model = zoo.create_model('resnet20_wsbcn.cifar10', pretrained=True).eval()
    x = real_batch(model)
    if fmt == 'exported':
        loaded = torch.export.load(str(out)).module()
    elif fmt == 'torchscript':
        loaded = torch.jit.load(str(out))
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
        loaded = lambda t: torch.from_numpy(session.run(None, {'input': t.numpy()})[0])  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_zoo_export_takes_a_saved_model_and_user_images(tmp_path, capsys):
    """A Hub-style folder of a trained model, checked on a user's own images (any size: the model's preprocessing)."""
    images = sorted((SHARED_DATA / 'coco-mini' / 'val2017').glob('*.jpg'))[:2]
    model = zoo.create_model('resnet20_bgn.cifar10', pretrained=True).eval()  # the zoo's trained BGN weights
    folder = tmp_path / 'hub'
    zoo.save_hub_folder(model, folder)
    out = tmp_path / 'model.pt2'
    assert main([f'local-dir:{folder}', '--format', 'exported', '--out', str(out), '--image', *map(str, images)]) == 0
    assert 'on (2, 3, 32, 32) real input' in capsys.readouterr().out
    x = real_batch(model, [str(p) for p in images])
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_video_models_are_checked_on_clips_of_the_images():
    model = timm.create_model('tsm_resnet18_wsgn', num_segments=3, pretrained_cfg_overlay=dict(input_size=(3, 40, 40)))
    clips = real_batch(model)
    frames = real_batch(timm.create_model('resnet18_wsgn', pretrained_cfg_overlay=dict(input_size=(3, 40, 40))))
    assert clips.shape == (2, 3, 3, 40, 40) and frames.shape == (4, 3, 40, 40)
    assert torch.equal(clips[0, :, 1], frames[1]) and torch.equal(clips[1, :, 0], frames[1])  # frames: the images in turn


def test_zoo_export_refuses_an_export_that_does_not_match(tmp_path, monkeypatch, capsys):
    """A wrong export (here: a deployable form with one weight off) is reported and not written."""
    fold = zoo.export_for_inference

    def broken_fold(model):
        deployable = fold(model)
        with torch.no_grad():
            deployable.fc.bias.add_(0.5)
        return deployable

    monkeypatch.setattr(zoo, 'export_for_inference', broken_fold)
    out = tmp_path / 'model.pt2'
    assert main(['resnet20_wsbcn.cifar10', '--format', 'exported', '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'the torch.export program differs from the PyTorch model: max |difference| 0.5' in err and 'was not written' in err
    assert list(tmp_path.iterdir()) == []
    model = zoo.create_model('resnet20_wsbcn.cifar10', pretrained=True)
    with pytest.raises(ExportMismatchError):
        export_checked(model, real_batch(model), 'torchscript', tmp_path / 'model.ts')
    assert list(tmp_path.iterdir()) == []


def test_zoo_export_bad_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / 'nope.jpg'
    assert main(['resnet20_wsbcn', '--format', 'exported', '--out', str(tmp_path / 'm.pt2'), '--image', str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(['resnet20_nosuchnorm', '--format', 'exported', '--out', str(tmp_path / 'm.pt2')]) == 1
    assert "Unknown model 'resnet20_nosuchnorm'" in capsys.readouterr().err
    assert main(['last.ckpt', '--format', 'onnx', '--out', str(tmp_path / 'm.onnx')]) == 1
    assert 'checkpoint last.ckpt does not exist' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- issue 26: errors that name --out

class _Untouchable(torch.nn.Module):
    """A model that must not be run: the output path is checked first."""

    def forward(self, x):
        raise AssertionError('the model ran before the output path was checked')


def test_out_that_is_a_directory_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError('the model was loaded before the output path was checked')
    monkeypatch.setattr(deploy, 'load_source', no_load)
    assert main(['resnet20_wsbcn.cifar10', '--format', 'onnx', '--out', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f'zoo-export: error: {tmp_path} is a directory: --out takes the path of the file to write' in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IsADirectoryError, match='is a directory'):
        export_checked(_Untouchable(), torch.zeros(2, 3, 8, 8), 'torchscript', tmp_path)


@pytest.mark.parametrize('where', ['under-a-file', 'proc'])
def test_out_that_cannot_be_written_is_named_not_the_temporary_file(tmp_path, monkeypatch, capsys, where):
    if where == 'proc':
        if not Path('/proc/self').is_dir():
            pytest.skip('no /proc here')
        out = Path('/proc/x.onnx')  # the example: no file can be created in /proc
    else:
        (tmp_path / 'afile').write_text('')
        out = tmp_path / 'afile' / 'x.onnx'
    monkeypatch.setattr(deploy, 'load_source', lambda *a, **k: (_ for _ in ()).throw(AssertionError('loaded')))
    assert main(['resnet20_wsbcn.cifar10', '--format', 'onnx', '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert f'zoo-export: error: cannot write {out}: ' in err and '.partial' not in err, err
    with pytest.raises(OSError, match=f'cannot write {out}') as info:
        export_checked(_Untouchable(), torch.zeros(2, 3, 8, 8), 'onnx', out)
    assert '.partial' not in str(info.value)


def test_exporter_errors_name_the_out_path(tmp_path, monkeypatch, capsys):
    """A failure while the export is written (a full disk, say) names --out, not the file written next to it."""
    def failing_save(model, x, path):
        raise RuntimeError(f'File {path} cannot be opened.')
    monkeypatch.setitem(deploy._EXPORTERS, 'torchscript', failing_save)
    out = tmp_path / 'model.pt'
    assert main(['resnet20_wsbcn.cifar10', '--format', 'torchscript', '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert f'zoo-export: error: File {out} cannot be opened.' in err and '.partial' not in err, err
    assert list(tmp_path.iterdir()) == []


def test_help_has_no_rest_markup(capsys):
    with pytest.raises(SystemExit):
        main(['--help'])
    text = capsys.readouterr().out
    assert 'zoo-export: a zoo model as ONNX, TorchScript or a torch.export program' in text and '``' not in text
