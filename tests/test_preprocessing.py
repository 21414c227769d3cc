"""Fine-tuning data: preprocessing comes from the weights' pretrained config unless the user sets it."""
import lightning.pytorch as pl
import torch
from torchvision.transforms import Normalize

from lightning_modules import ImageClassifier, ImageFolderDataModule
from lightning_modules.datamodules import CIFAR10_MEAN
from test_data import make_image_folder


def _normalize(transform) -> Normalize:
    return next(t for t in transform.transforms if isinstance(t, Normalize))


def _setup(model: ImageClassifier, data: ImageFolderDataModule) -> None:
    """Runs the DataModule's setup with the model attached (a validation pass over the tiny val split)."""
    pl.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).validate(model, data, verbose=False)


def test_shipped_cifar_weights_bring_their_statistics_and_size(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=2, size=64)
    data = ImageFolderDataModule(str(root), batch_size=2, num_workers=0)
    _setup(ImageClassifier('resnet20_wsbcn.cifar10', num_classes=3, pretrained=True), data)
    norm = _normalize(data.eval_transform)
    torch.testing.assert_close(torch.tensor(norm.mean), torch.tensor(CIFAR10_MEAN))
    image, _ = data.val_set[0]
    assert image.shape == (3, 32, 32)  # the weights' input size, not the 64x64 files


def test_given_preprocessing_wins_over_the_model(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=2, size=64)
    data = ImageFolderDataModule(str(root), batch_size=2, num_workers=0, input_size=48, mean=(0.5, 0.5, 0.5))
    _setup(ImageClassifier('resnet20_wsbcn.cifar10', num_classes=3, pretrained=True), data)
    assert torch.tensor(_normalize(data.eval_transform).mean).tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(torch.tensor(_normalize(data.eval_transform).std), torch.tensor((0.247, 0.2435, 0.2616)))
    assert data.val_set[0][0].shape == (3, 48, 48)


def test_without_a_model_imagenet_defaults(tmp_path):
    data = ImageFolderDataModule(str(make_image_folder(tmp_path / 'data', per_class=1)), num_workers=0)
    torch.testing.assert_close(torch.tensor(_normalize(data.eval_transform).mean), torch.tensor((0.485, 0.456, 0.406)))
