"""``zoo-train``: LightningCLI for the zoo (fit / validate / test / predict, ``--print_config``).

    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml
    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml --ckpt_path last     # resume
    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml --print_config

Model and data are chosen by ``class_path`` in the config (any LightningModule /
LightningDataModule, e.g. ``lightning_modules.ImageClassifier`` and
``lightning_modules.Cifar10DataModule``). Extra option: ``--test_after_fit true`` runs the test
set after ``fit`` with the final weights and prints top-1.
"""
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import zoo  # noqa: F401  (registers the zoo models in timm)

__all__ = ['ZooCLI', 'build_cli', 'main']


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument('--test_after_fit', type=bool, default=False,
                            help='After fit, evaluate the final weights on the test set and print top-1.')

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self._save_final_checkpoint()
        if not self.config[self.subcommand].get('test_after_fit'):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if self.trainer.is_global_zero and results:
            metrics = results[0]
            top1 = metrics.get('test/top1')
            ckpt = self.trainer.checkpoint_callback
            where = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ''
            n = len(self.datamodule.test_set) if getattr(self.datamodule, 'test_set', None) is not None else '?'
            if top1 is None:  # another task (e.g. detection): every test metric it logged
                print(f'\nTest on {n} images: ' + ', '.join(f'{k} {float(v):.4f}' for k, v in sorted(metrics.items())
                                                         if k.startswith('test/'))
                      + (f'\nCheckpoint: {where}' if where else ''), flush=True)
                return
            print(f'\nTest top-1: {100 * top1:.2f}% on {n} test images'
                  + (f', top-5: {100 * metrics["test/top5"]:.2f}%' if 'test/top5' in metrics else '')
                  + (f'\nCheckpoint: {where}' if where else ''), flush=True)

    def _save_final_checkpoint(self) -> None:
        """Write the final weights to ``last.ckpt``.

        With ``every_n_train_steps``, ModelCheckpoint's last save can be up to N-1 steps before the
        end of training (its ``on_train_end`` only saves when nothing was saved yet), so the weights
        that ``--test_after_fit`` evaluates, and that get published, would be in no checkpoint.
        """
        ckpt = self.trainer.checkpoint_callback
        if ckpt is None or not ckpt.save_last or not ckpt.dirpath:
            return
        path = Path(ckpt.dirpath) / f'{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}'
        self.trainer.save_checkpoint(path, weights_only=False)  # full state: resumable
        ckpt.last_model_path = str(path)


def build_cli(args: Optional[Sequence[str]] = None, run: bool = True) -> ZooCLI:
    return ZooCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={'overwrite': True}, args=args, run=run)


def main(args: Optional[Sequence[str]] = None) -> None:
    """Console entry point (returns None: a console script exits with main()'s return value)."""
    build_cli(args)


if __name__ == '__main__':
    main()
