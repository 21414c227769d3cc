"""``zoo-export`` of dense models: a published segmenter folder (a real ``SemanticSegmenter`` checkpoint through
``hub_upload.py --dry-run``) exported as ``images -> logits at the input's size`` and checked on real CamVid
frames; detectors, segmenter names with ``--pretrained`` and check images of different sizes refused, naming why."""
import collections

import pytest
import torch

import zoo
from lightning_modules.deploy import SegmentationLogits, main, real_batch
from test_hub_segmenter import exported, run  # noqa: F401 (fixtures: the real checkpoint and its Hub folder)

from conftest import SHARED_DATA

pytestmark = pytest.mark.filterwarnings('ignore::zoo.hub.UnverifiedWeightsWarning')

CAMVID_TEST = SHARED_DATA / 'camvid' / 'test'
COCO_VAL = SHARED_DATA / 'coco-mini' / 'val2017'


def _frames(n=2):
    if not CAMVID_TEST.is_dir():
        pytest.skip('needs the shared CamVid data')
    return [str(p) for p in sorted(CAMVID_TEST.glob('*.jpg'))[:n]]


def test_a_published_segmenter_exports_as_logits_at_the_input_size(exported, tmp_path, capsys):  # noqa: F811
    frames = _frames()
    out = tmp_path / 'seg.pt2'
    assert main([str(exported), '--format', 'exported', '--out', str(out), '--image', *frames]) == 0
    # eval preprocessing of the folder: shorter side to its eval_size (48), no crop: 480x360 -> 64x48
    assert 'on (2, 3, 48, 64) real input' in capsys.readouterr().out
    model = zoo.load_model(exported).eval()
    x = real_batch(model, frames)
    assert x.shape == (2, 3, 48, 64)
    assert x.min() < 0 < x.max()  # normalized with the folder's mean and std, not [0, 1] pixels
    program = torch.export.load(str(out)).module()
    with torch.no_grad():
        expected = model(x)['out']  # the folder's model has an aux head: the export keeps 'out' only
        assert expected.shape == (2, 3, 48, 64)
        torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-4 * max(1., expected.abs().max().item()))
        torch.testing.assert_close(program(x[1:]), expected[1:], rtol=1e-4, atol=1e-4 * max(1., expected.abs().max().item()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['seg.pt2']


def test_the_deployable_segmenter_has_no_batch_stage_left(exported):  # noqa: F811
    """Every BCN batch stage folds into its conv, the one in ASPP's image-pooling branch included."""
    model = zoo.load_model(exported).eval()
    deployable = zoo.export_for_inference(model)
    kinds = collections.Counter(type(m).__name__ for m in deployable.modules())
    assert kinds['BatchChannelNorm2d'] == kinds['EstimatedBatchNorm2d'] == kinds['WSConv2d'] == 0, kinds
    assert kinds['GroupNorm'] == collections.Counter(type(m).__name__ for m in model.modules())['BatchChannelNorm2d']
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)['out']
        torch.testing.assert_close(SegmentationLogits(deployable)(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fmt', ['onnx', 'torchscript'])
def test_a_published_segmenter_exports_to_onnx_and_torchscript(exported, fmt, tmp_path):  # noqa: F811
    if fmt == 'onnx':
        pytest.importorskip('onnxruntime')
        pytest.importorskip('onnxscript')
    frames = _frames()
    assert main([str(exported), '--format', fmt, '--out', str(tmp_path / f'seg.{fmt}'), '--image', *frames]) == 0


def test_check_images_of_different_sizes_are_named(exported, tmp_path, capsys):  # noqa: F811
    if not COCO_VAL.is_dir():
        pytest.skip('needs the shared coco-mini data')
    from PIL import Image
    by_aspect = {}
    for p in sorted(COCO_VAL.glob('*.jpg')):
        w, h = Image.open(p).size
        by_aspect.setdefault(round(w / h, 2), p)
        if len(by_aspect) == 2:
            break
    a, b = by_aspect.values()
    assert main([str(exported), '--format', 'exported', '--out', str(tmp_path / 'x.pt2'), '--image', str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert 'must come out at one size' in err and str(a) in err and str(b) in err, err
    assert list(tmp_path.iterdir()) == []


def test_detectors_and_segmenter_names_with_pretrained_are_refused(tmp_path, capsys):
    out = tmp_path / 'x.onnx'
    assert main(['maskrcnn_resnet18_fpn_wsbcn', '--format', 'onnx', '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'maskrcnn_resnet18_fpn_wsbcn is a detector (MaskRCNN)' in err and 'list of dicts' in err, err
    assert main(['deeplabv3_resnet18_wsbcn', '--pretrained', '--format', 'onnx', '--out', str(out)]) == 1
    assert 'deeplabv3_resnet18_wsbcn has no weights by name' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('name, task, create', [('deeplabv3_resnet18_wsbcn', 'segmenter', 'create_segmenter'),
                                                ('maskrcnn_resnet18_fpn_wsgn', 'detector', 'create_detector')])
def test_create_model_names_the_function_that_builds_a_task_model(name, task, create):
    with pytest.raises(zoo.UnknownModelError, match=f"'{name}' is a {task}, not a timm model: build it with "
                                                    rf"zoo.{create}\('{name}'"):
        zoo.create_model(name)


def test_a_segmenter_checkpoint_exports_checked_on_the_frames(run, tmp_path, capsys):  # noqa: F811
    """The Lightning checkpoint itself, not a folder: checked at the preprocessing zoo.load_model gives it (the run's
    eval_size is not read from a checkpoint: a limit noted on issue 28)."""
    model, ckpt = run
    frames = _frames()
    out = tmp_path / 'seg.pt2'
    assert main([str(ckpt), '--format', 'exported', '--out', str(out), '--image', *frames]) == 0
    printed = capsys.readouterr().out
    x = real_batch(zoo.load_model(ckpt), frames)
    assert f'on {tuple(x.shape)} real input' in printed, printed
    with torch.no_grad():
        expected = model.eval()(x)['out']
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), expected, rtol=1e-4,
                                   atol=1e-4 * max(1., expected.abs().max().item()))
