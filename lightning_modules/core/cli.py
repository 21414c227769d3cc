"""``zoo-train``: LightningCLI for the zoo (fit / validate / test / predict, ``--print_config``).

    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml
    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml --ckpt_path last     # resume
    zoo-train fit -c configs/cifar10/resnet20_wsbcn.yaml --print_config
    zoo-train predict -c configs/cifar10/resnet20_wsbcn.yaml --ckpt_path last \
        --data.init_args.predict photos/ --predict_output predictions.csv   # top-5 per image

Model and data are chosen by ``class_path`` in the config (any LightningModule /
LightningDataModule, e.g. ``lightning_modules.classification.ImageClassifier`` and
``lightning_modules.classification.Cifar10DataModule``). Extra option: ``--test_after_fit true`` runs the test
set after ``fit`` with the final weights and prints top-1.

Checkpoints (:mod:`lightning_modules.checkpointing`): ``--ckpt_path`` refuses a checkpoint whose
model hyper-parameters differ from the command line/config, naming each, unless
``--use_checkpoint_hparams true`` (then the checkpoint's values are used, as plain LightningCLI
does); ``--ckpt_path last`` resumes from the newest of ``last.ckpt`` and Lightning's SLURM
``hpc_ckpt_N.ckpt``; every checkpoint written records a digest that is checked when it is loaded.
"""
import argparse
import warnings
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.utilities import rank_zero_warn

import zoo  # noqa: F401  (registers the zoo models in timm)
from .checkpointing import (DigestCheckpointIO, hparams_differences, newest_resume_checkpoint, read_checkpoint_header,
                            resume_candidates)
from .predict import TopKWriter
from .runtime import quiet_known_noise, set_cpu_threads

__all__ = ['ZooCLI', 'build_cli', 'main', 'evaluated_inputs', 'CheckpointResumeError']


class CheckpointResumeError(RuntimeError):
    """``--ckpt_path last`` found checkpoints but could read none of them."""

# Model arguments that load trained weights (a test without one of them, or --ckpt_path, scores random weights).
_WEIGHT_ARGS = ('pretrained', 'pretrained_backbone', 'init_checkpoint')


def evaluated_inputs(datamodule, metrics) -> str:
    """What a test really scored: '9,998 images of the val split (2 unreadable, skipped)', '5 clips of ...'."""
    dataset = getattr(datamodule, 'test_set', None)
    total = len(dataset) if dataset is not None else None
    split = getattr(datamodule, 'test_split_name', 'test')
    unit = next((u for u in ('images', 'videos') if f'test/{u}' in metrics or f'test/skipped_{u}' in metrics), None)
    if unit is not None and f'test/{unit}' in metrics:
        n, skipped = int(metrics[f'test/{unit}']), int(metrics.get(f'test/skipped_{unit}', 0))
    elif unit is not None and total is not None:
        skipped = int(metrics[f'test/skipped_{unit}'])
        n = total - skipped
    else:
        n, unit, skipped = total, 'images', 0
    unit = {'videos': 'clips'}.get(unit, unit)
    count = f'{n:,}' if n is not None else 'all'
    return f'{count} {unit} of the {split} split' + (f' ({skipped} unreadable, skipped)' if skipped else '')


def _data_attribute(name: str):
    """What a link reads from the DataModule: its attribute ``name``, None if it has none (a user's own DataModule)."""
    def read(datamodule):
        return getattr(datamodule, name, None)
    return read


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A config states the devices and images per device once, on the data; the model receives them.
        for source, target in (('virtual_devices', 'virtual_devices'), ('batch_size', 'images_per_device')):
            parser.link_arguments('data', f'model.init_args.{target}', apply_on='instantiate',
                                  compute_fn=_data_attribute(source))
        parser.add_argument('--test_after_fit', type=bool, default=False,
                            help='After fit, evaluate the final weights on the test set and print top-1.')
        parser.add_argument('--predict_output', type=str, default='predictions.csv',
                            help='predict: where the top-k classes of every input go (.csv, .jsonl or .json).')
        parser.add_argument('--top_k', type=int, default=5, help='predict: classes written per input.')
        parser.add_argument('--predict_resume', type=bool, default=False,
                            help='predict: continue after the rows already in the output (their inputs are not '
                                 'predicted again) instead of overwriting it.')
        parser.add_argument('--use_checkpoint_hparams', type=bool, default=False,
                            help="With --ckpt_path: build the model from the checkpoint's hyper-parameters where they "
                                 'differ from the command line/config (default: refuse, naming the differences).')

    def _set_seed(self) -> None:
        """Lightning's seeding, without its "Seed set to N" line for ``predict`` (which draws nothing)."""
        if self.subcommand != 'predict':
            return super()._set_seed()
        seed = self.config['predict'].get('seed_everything')
        if seed is not False:
            seed_everything(None if seed is True else seed, workers=True, verbose=False)

    def before_instantiate_classes(self) -> None:
        quiet_known_noise()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == 'predict' and cfg.get('trainer') is not None:
            # predict writes its predictions only: no log folder, no saved config, no checkpoint callbacks
            cfg['trainer']['logger'] = False
            self.save_config_callback = None
            callbacks = cfg['trainer'].get('callbacks') or []
            cfg['trainer']['callbacks'] = [c for c in callbacks if not str(getattr(c, 'class_path', '')).endswith(
                '.ModelCheckpoint')]
            warnings.filterwarnings('ignore', message='Be aware that when using `ckpt_path`, callbacks used to create')
        accelerator = str(cfg.get('trainer', {}).get('accelerator') or 'auto')
        if accelerator == 'cpu' or (accelerator == 'auto' and not torch.cuda.is_available()):
            workers = (cfg.get('data') or {}).get('init_args', {}).get('num_workers')
            set_cpu_threads(int(workers or 0))

    def before_predict(self) -> None:
        """The writer that streams predictions to disk (see :mod:`lightning_modules.core.writer`).

        A writer named in the config (e.g. ``SegmentationWriter``) is used as it is; otherwise the
        DataModule's ``default_prediction_writer`` (classes: top-k into ``--predict_output``;
        detection: that table plus a folder of per-image results). ``--predict_resume true``
        continues after the rows already in the output instead of overwriting them (the default).
        Predictions are not also kept in memory (``return_predictions: false``) unless asked.
        """
        from .writer import PredictionWriter
        cfg = self.config[self.subcommand]
        resume = cfg.get('predict_resume')
        writers = [c for c in self.trainer.callbacks if isinstance(c, BasePredictionWriter)]
        if not writers:
            make = getattr(self.datamodule, 'default_prediction_writer', None)
            kwargs = dict(top_k=cfg.get('top_k') or 5, resume=bool(resume))
            writer = make(cfg.get('predict_output'), **kwargs) if callable(make) else \
                TopKWriter(cfg.get('predict_output'), **kwargs)
            if writer is not None:
                self.trainer.callbacks.append(writer)
                writers = [writer]
        elif resume:  # a writer of the config: --predict_resume true turns its resume on
            for writer in writers:
                if isinstance(writer, PredictionWriter):
                    writer.resume = True
        run_cfg = self.config_init[self.subcommand]
        if writers and run_cfg.get('return_predictions') is None:
            run_cfg['return_predictions'] = False  # the writer has them; don't hold every batch's in memory

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get('subcommand')
        ckpt_path = self.config[sub].get('ckpt_path') if sub else None
        if ckpt_path and Path(ckpt_path).is_file():  # LightningCLI merges its hparams next: compare first
            self._check_checkpoint_hparams(ckpt_path, resolved=False)

    def _check_checkpoint_hparams(self, ckpt_path: str, resolved: bool) -> None:
        sub = self.config['subcommand']
        if self.config[sub].get('use_checkpoint_hparams') and not resolved:
            return
        hparams = read_checkpoint_header(ckpt_path).get('hyper_parameters') or {}
        diffs = hparams_differences(self.parser, self.config, sub, hparams)
        if diffs:
            hint = ('pass the checkpoint path itself with --use_checkpoint_hparams true to build the checkpoint\'s '
                    'model' if resolved else 'pass --use_checkpoint_hparams true to use the checkpoint\'s values')
            self.parser.error(
                f'--ckpt_path {ckpt_path} was saved with other model arguments than the command line/config:\n  '
                + '\n  '.join(diffs) + f'\nFix the command line/config, or {hint}.')

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = getattr(self, 'trainer', None) and self.trainer.strategy
        if strategy is not None and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = DigestCheckpointIO()

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: the newest of last.ckpt and hpc_ckpt_N.ckpt, checked like an explicit path."""
        cfg = self.config_init[self.subcommand]
        if cfg.get('ckpt_path') != 'last':
            return
        path = newest_resume_checkpoint(self.trainer)
        if path is None:
            refused = resume_candidates(self.trainer)
            if refused:  # never let Lightning's own 'last' open a file the zoo would not read
                raise CheckpointResumeError(
                    f'--ckpt_path last: no readable resume checkpoint; refused {", ".join(map(str, refused))} (see the '
                    f'warnings above). Pass --ckpt_path <another checkpoint>, or move these files away to start afresh.')
            rank_zero_warn('--ckpt_path last: no checkpoint to resume from yet; training starts afresh')
            cfg['ckpt_path'] = None
            return
        self._check_checkpoint_hparams(path, resolved=True)
        cfg['ckpt_path'] = path

    def before_fit(self) -> None:
        self._resolve_last()

    def before_validate(self) -> None:
        self._resolve_last()

    def before_test(self) -> None:
        self._resolve_last()
        cfg = self.config[self.subcommand]
        model_args = (cfg.get('model') or {}).get('init_args') or {}
        if not cfg.get('ckpt_path') and not any(model_args.get(k) for k in _WEIGHT_ARGS):
            rank_zero_warn('zoo-train test without --ckpt_path or pretrained weights evaluates randomly initialised '
                           'weights; pass --ckpt_path <checkpoint> or --model.init_args.pretrained true')

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
            evaluated = evaluated_inputs(self.datamodule, metrics)
            if top1 is None:  # another task (e.g. detection): every test metric it logged
                print(f'\nTest on {evaluated}: ' + ', '.join(
                    f'{k} {float(v):.4f}' for k, v in sorted(metrics.items()) if k.startswith('test/'))
                      + (f'\nCheckpoint: {where}' if where else ''), flush=True)
                return
            print(f'\nTest top-1: {100 * top1:.2f}% on {evaluated}'
                  + (f', top-5: {100 * metrics["test/top5"]:.2f}%' if 'test/top5' in metrics else '')
                  + (f'\nCheckpoint: {where}' if where else ''), flush=True)

    def _save_final_checkpoint(self) -> None:
        """Write the final weights to ``last.ckpt``.

        With ``every_n_train_steps``, ModelCheckpoint's last save can be up to N-1 steps before the
        end of training (its ``on_train_end`` only saves when nothing was saved yet), so the weights
        that ``--test_after_fit`` evaluates, and that get published, would be in no checkpoint.
        Written only when ``last.ckpt`` does not already hold the final step (no second write).
        """
        ckpt = self.trainer.checkpoint_callback
        if ckpt is None or not ckpt.save_last or not ckpt.dirpath:
            return
        path = Path(ckpt.dirpath) / f'{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}'
        done = self.trainer.is_global_zero and path.is_file() and \
            read_checkpoint_header(path).get('global_step') == self.trainer.global_step
        ckpt.last_model_path = str(path)
        if self.trainer.strategy.broadcast(done, src=0):  # every rank decides alike: saving has a barrier
            return
        self.trainer.save_checkpoint(path, weights_only=False)  # full state: resumable


DESCRIPTION = """\
zoo-train: train, evaluate and predict with the wsbcn-zoo (Weight Standardization, Batch-Channel
and Batch Group Normalization for micro-batch training), on Lightning's CLI.

  zoo-train fit -c configs/cifar10/quickstart.yaml                  train (the README's quickstart)
  zoo-train fit -c CONFIG --ckpt_path last                          resume a killed run exactly
  zoo-train test -c CONFIG --ckpt_path PATH                         evaluate a checkpoint
  zoo-train predict -c CONFIG --ckpt_path PATH --data.init_args.predict DIR   predict, streamed to disk

Configs: configs/<task>/*.yaml (classification, video, detection, segmentation). Images per device
and emulated devices are set on the data (data.init_args.batch_size, virtual_devices); the
optimizer is the model's optim: block. Docs: docs/training.md, docs/architecture.md."""


def build_cli(args: Optional[Sequence[str]] = None, run: bool = True) -> ZooCLI:
    return ZooCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={'overwrite': True}, args=args, run=run,
        auto_configure_optimizers=False,  # one way to set the optimizer: the model's optim: block
        parser_kwargs={'description': DESCRIPTION, 'formatter_class': argparse.RawDescriptionHelpFormatter})


def main(args: Optional[Sequence[str]] = None) -> None:
    """Console entry point (returns None: a console script exits with main()'s return value)."""
    build_cli(args)


if __name__ == '__main__':
    main()
