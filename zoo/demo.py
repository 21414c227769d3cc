"""Smoke demo: build a zoo model and run a real CIFAR-10 batch from the shared tarball through it.

    python -m zoo.demo --data ../shared/data/cifar10-jpeg.tar.gz --model resnet20_wsbcn
"""
import argparse
import io
import tarfile

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import zoo  # noqa: F401  (registers the models)


def read_images(tar_path: str, split: str, count: int):
    """The first ``count`` JPEGs of ``split`` in the tarball, with their class names."""
    images = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(f'{split}/') and member.name.endswith('.jpg'):
                data = tar.extractfile(member).read()
                images.append((Image.open(io.BytesIO(data)).convert('RGB'), member.name.split('/')[1]))
                if len(images) == count:
                    break
    return images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data', default='../shared/data/cifar10-jpeg.tar.gz')
    parser.add_argument('--model', default='resnet20_wsbcn')
    parser.add_argument('--batch-size', type=int, default=2)
    args = parser.parse_args(argv)

    model = zoo.create_model(args.model)
    transform = create_transform(**resolve_data_config(model=model))
    images = read_images(args.data, 'test', args.batch_size)
    batch = torch.stack([transform(img) for img, _ in images])
    model.train()
    loss = torch.nn.functional.cross_entropy(model(batch), torch.zeros(len(batch), dtype=torch.long))
    loss.backward()
    model.eval()
    with torch.no_grad():
        logits = model(batch)
    print(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; '
          f'batch {tuple(batch.shape)} from {args.data}')
    print(f'train step loss {loss.item():.4f}; eval logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}')


if __name__ == '__main__':
    main()
