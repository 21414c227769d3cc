"""Publish finished CIFAR-10 runs as the zoo's shipped ``.cifar10`` weights, with ``hub_upload.py``.

For each run folder, ``hub_upload.py --dry-run`` writes a Hub-ready folder (fp32 safetensors,
timm ``config.json`` with the digest, model card with the run's test accuracy in its model-index)
into ``zoo/pretrained/<arch>.<tag>``, from which ``timm.create_model('<arch>.<tag>',
pretrained=True)`` loads with no network. The same folder can later be pushed as it is:
``python hub_upload.py zoo/pretrained/<arch>.<tag> --repo-id wsbcn-zoo/<arch>.<tag>``.

    python benchmarks/publish_cifar_weights.py runs/cifar10/resnet20_wsbcn runs/cifar10/resnet20_b128 ...

The tag: ``cifar10``, except BN trained with few images per device (``cifar10_b2``), so that the
plain ``resnet20.cifar10`` is the large-batch BN baseline. A new tag also needs its entry in
``zoo/hub/registry.py`` (``tests/test_weights_registry.py`` checks that folders and entries match).

The cards take what the weights are (description, recipe, notes) from the registry. After a
registry entry changes, rebuild the shipped cards from it, keeping each card's run record
(metrics, training config); the weights must come out byte-identical:

    python benchmarks/publish_cifar_weights.py --refresh-cards
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from cifar_results import credits_run, read_run, recipe_of, tag_for  # a sibling script: on the path when run as one
from zoo.hub import publish as hub_upload, read_lightning_checkpoint
from zoo.hub.registry import HUB_ORG, SHIPPED_WEIGHTS_DIR
from zoo.models.cifar_resnet import CIFAR10_CLASSES


def publish(run_dir: Path, out_root: Path = SHIPPED_WEIGHTS_DIR, tag: Optional[str] = None) -> Path:
    result = read_run(run_dir)
    version = result.log_dir
    ckpt = run_dir / 'checkpoints' / 'last.ckpt'
    saved_step = read_lightning_checkpoint(ckpt).global_step
    if saved_step != result.test_step:  # the published weights must be the tested ones
        raise ValueError(f'{ckpt} is from step {saved_step}, the test ran at step {result.test_step}: resume the run '
                         f'(zoo-train fit ... --ckpt_path last) so that last.ckpt holds the final weights.')
    name = tag or tag_for(result.model, result.norm, result.images_per_device)
    if tag is None and credits_run(name, result.run) is False:
        # Another seed (<config>_seed1) or a variant (BGN with other groups) maps to the same tag name
        # but is not the run the registry credits: publishing it would silently replace those weights.
        raise ValueError(f'{run_dir} is not the run the registry credits for {name} ({recipe_of(name)}); '
                         f'publish it under another tag (--tag) and add a registry entry for it')
    out = out_root / name
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / 'labels.json'
        labels.write_text(json.dumps(list(CIFAR10_CLASSES)))
        rc = hub_upload.main([
            str(ckpt), '--repo-id', f'{HUB_ORG}/{name}', '--dry-run', '--out', str(out), '--dataset', 'cifar10',
            '--metrics', str(version / 'metrics.csv'), '--train-config', str(version / 'config.yaml'),
            '--label-names', str(labels)])
    if rc:
        raise RuntimeError(f'hub_upload.py failed for {run_dir}')
    return out


def refresh_card(folder: Path) -> Path:
    """Rebuild a shipped folder's model card and config.json from the registry and the card's run record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / folder.name
        if hub_upload.main([str(folder), '--repo-id', f'{HUB_ORG}/{folder.name}', '--dry-run', '--out', str(out)]):
            raise RuntimeError(f'hub_upload.py failed for {folder}')
        weights = hub_upload.WEIGHTS_NAME
        if (out / weights).read_bytes() != (folder / weights).read_bytes():
            raise RuntimeError(f'{folder}: re-exported weights differ from the shipped ones; card not replaced')
        for name in ('README.md', hub_upload.CONFIG_NAME):
            shutil.copyfile(out / name, folder / name)
    return folder


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='*', type=Path, help='finished zoo-train run folders')
    parser.add_argument('--out-root', type=Path, default=SHIPPED_WEIGHTS_DIR)
    parser.add_argument('--tag', default=None, help='publish under this tag (one run only) instead of the recipe\'s')
    parser.add_argument('--refresh-cards', action='store_true',
                        help='rebuild the cards of every shipped folder in --out-root from the registry instead')
    args = parser.parse_args(argv)
    if args.refresh_cards:
        if args.runs or args.tag:
            parser.error('--refresh-cards takes no runs and no --tag')
        for folder in sorted(p for p in args.out_root.iterdir() if (p / hub_upload.WEIGHTS_NAME).is_file()):
            print(f'{refresh_card(folder)}: card rebuilt')
        return 0
    if not args.runs:
        parser.error('give finished run folders, or --refresh-cards')
    if args.tag and len(args.runs) > 1:
        parser.error('--tag names one run')
    for run in args.runs:
        print(f'{run} -> {publish(run, args.out_root, args.tag)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
