"""zoo-train (LightningCLI): every shipped config parses; a tiny fit + test prints top-1 and leaves a checkpoint."""
import warnings
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main
from test_data import make_image_folder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / 'configs').rglob('*.yaml') if 'video' not in p.parts)


def test_configs_exist_for_every_cifar_variant():
    names = {p.stem for p in CONFIGS}
    for v in ('', '_wsbn', '_gn', '_wsgn', '_bcn', '_wsbcn', '_bgn', '_wsbgn'):
        assert f'resnet20{v}' in names
    assert {'quickstart', 'resnet50_wsbcn_2x32', 'resnet50_bn_b256', 'resnet101_wsgn_fsdp'} <= names


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: str(p.relative_to(REPO / 'configs')))
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['fit', '-c', str(config), '--print_config'])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed['model']['init_args']['model_name'] == source['model']['init_args']['model_name']
    assert printed['data']['init_args']['batch_size'] == source['data']['init_args']['batch_size']


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match='Close matches'):
        main(['fit', '--model', 'lightning_modules.classification.ImageClassifier', '--model.model_name', 'resnet20_wsbnc',
              '--data', 'lightning_modules.classification.ImageFolderDataModule', '--data.root', str(tmp_path), '--trainer.logger', 'false'])


def test_fit_then_test_prints_top1_and_leaves_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / 'data', per_class=4)
    main(['fit', '--model', 'lightning_modules.classification.ImageClassifier', '--model.model_name', 'resnet20_wsbcn',
          '--model.num_classes', '3', '--data', 'lightning_modules.classification.ImageFolderDataModule', '--data.root', str(root),
          '--data.input_size', '16', '--data.batch_size', '2', '--data.virtual_devices', '2', '--data.num_workers', '0',
          '--trainer.max_steps', '3', '--trainer.accelerator', 'cpu', '--trainer.logger', 'false',
          '--trainer.default_root_dir', str(tmp_path / 'run'), '--trainer.enable_progress_bar', 'false',
          '--test_after_fit', 'true'])
    out = capsys.readouterr().out
    # 12 images really scored, and named as the validation split they are (no test_dir given).
    assert 'Test top-1:' in out and 'on 12 images of the val (validation) split' in out
    assert list((tmp_path / 'run').rglob('*.ckpt'))


def test_test_without_weights_warns_that_it_scores_random_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / 'data', per_class=1)
    args = ['test', '--model', 'lightning_modules.classification.ImageClassifier', '--model.model_name', 'resnet20_wsbcn',
            '--model.num_classes', '3', '--data', 'lightning_modules.classification.ImageFolderDataModule', '--data.root', str(root),
            '--data.input_size', '16', '--data.num_workers', '0', '--trainer.accelerator', 'cpu',
            '--trainer.logger', 'false', '--trainer.enable_progress_bar', 'false']
    with pytest.warns(UserWarning, match='randomly initialised weights'):
        main(args)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*randomly initialised')
        main(args[:4] + ['resnet20_wsbcn.cifar10', '--model.pretrained', 'true'] + args[5:])


def test_last_checkpoint_holds_the_final_weights(tmp_path, monkeypatch):
    """every_n_train_steps=2 and 3 steps: ModelCheckpoint alone leaves step 2 in last.ckpt."""
    import torch
    from lightning_modules.cli import build_cli
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / 'data', per_class=4)
    cli = build_cli([
        'fit', '--model', 'lightning_modules.classification.ImageClassifier', '--model.model_name', 'resnet20_wsbcn',
        '--model.num_classes', '3', '--data', 'lightning_modules.classification.ImageFolderDataModule', '--data.root', str(root),
        '--data.input_size', '16', '--data.batch_size', '2', '--data.num_workers', '0',
        '--trainer.max_steps', '3', '--trainer.accelerator', 'cpu', '--trainer.logger', 'false',
        '--trainer.enable_progress_bar', 'false',
        '--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint',
        f'--trainer.callbacks.dirpath={tmp_path / "ckpt"}', '--trainer.callbacks.save_last=true',
        '--trainer.callbacks.every_n_train_steps=2'])
    last = torch.load(tmp_path / 'ckpt' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert cli.trainer.global_step == 3 and last['global_step'] == 3
    final = cli.model.state_dict()
    for k, v in last['state_dict'].items():
        assert torch.equal(v, final[k]), k


ALL_CONFIGS = sorted((REPO / 'configs').rglob('*.yaml'))


@pytest.mark.parametrize('config', ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO / 'configs')))
def test_every_config_builds_its_model_and_data_through_the_cli(config, tmp_path, monkeypatch):
    """Every shipped config, video included, instantiates through zoo-train: one class_path style, the
    ``optim`` block, and the devices and images per device linked from the data to the model."""
    from lightning_modules.core.cli import build_cli
    from lightning_modules import TASKS
    from lightning_modules.core.task import TaskModule
    monkeypatch.chdir(tmp_path)  # run folders the build may create stay out of the repository
    source = yaml.safe_load(config.read_text())
    class_paths = _class_paths(source)
    ours = [c for c in class_paths if not c.startswith('lightning.')]
    assert ours and all(c.split('.')[:2] in (['lightning_modules', t] for t in TASKS) for c in ours), ours
    offline = [f'--model.init_args.{k}=false' for k in ('pretrained', 'pretrained_backbone')  # nothing downloads here
               if source['model']['init_args'].get(k)]
    cpu = ['--trainer.accelerator=cpu', '--trainer.devices=1', '--trainer.num_nodes=1', '--trainer.strategy=auto',
           '--trainer.precision=32-true']  # the GPU recipes, built on this machine's CPU
    cli = build_cli(['-c', str(config), '--trainer.logger', 'false', *offline, *cpu], run=False)
    assert isinstance(cli.model, TaskModule)
    data = cli.datamodule
    assert cli.model.virtual_devices == getattr(data, 'virtual_devices', None)
    assert cli.model.images_per_device == getattr(data, 'batch_size', None)


def _class_paths(cfg) -> list:
    if isinstance(cfg, dict):
        return ([cfg['class_path']] if 'class_path' in cfg else []) + [p for v in cfg.values() for p in _class_paths(v)]
    if isinstance(cfg, list):
        return [p for v in cfg for p in _class_paths(v)]
    return []
