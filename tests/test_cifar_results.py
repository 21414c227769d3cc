"""benchmarks/cifar_results.py on run folders laid out as zoo-train writes them (written by the make_run fixture in conftest.py)."""
import importlib.util
from pathlib import Path

import pytest

import zoo.hub.registry

pytest.importorskip('matplotlib')

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'cifar_results.py'
spec = importlib.util.spec_from_file_location('cifar_results', SCRIPT)
cifar_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar_results)


def test_table_and_plot_from_run_folders(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'no_weights_here')
    runs = [
        make_run(tmp_path, 'resnet20_wsbcn', 'resnet20_wsbcn', 2, 64, [None, 0.9012]),  # resumed once
        make_run(tmp_path, 'resnet20_b128', 'resnet20', 128, None, [0.9105]),
        make_run(tmp_path, 'resnet20', 'resnet20', 2, 64, [0.8533]),
    ]
    out = tmp_path / 'out' / 'table'
    assert cifar_results.main([str(r) for r in runs] + ['--out', str(out)]) == 0
    table = out.with_suffix('.md').read_text().splitlines()
    assert '| resnet20_wsbcn | resnet20_wsbcn | WS+BCN | 2 | 64 | 20 | 90.12 | -0.93 | - |' in table
    assert '| resnet20_b128 | resnet20 | BN | 128 | 1 | 20 | 91.05 | (baseline) | - |' in table
    assert '| resnet20 | resnet20 | BN | 2 | 64 | 20 | 85.33 | -5.72 | - |' in table
    assert table.index('| resnet20_b128 | resnet20 | BN | 128 | 1 | 20 | 91.05 | (baseline) | - |') == 2  # baseline first
    png = out.with_suffix('.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_unfinished_run_is_a_clear_error(tmp_path, make_run):
    run = make_run(tmp_path, 'resnet20_gn', 'resnet20_gn', 2, 64, [None])
    with pytest.raises(ValueError, match='no test/top1.*did the run finish'):
        cifar_results.read_run(run)
    with pytest.raises(FileNotFoundError, match='no logs/version_'):
        cifar_results.read_run(tmp_path / 'empty')


def test_shipped_weights_are_named_in_the_table(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'pretrained')
    (tmp_path / 'pretrained' / 'resnet20.cifar10_b2').mkdir(parents=True)
    (tmp_path / 'pretrained' / 'resnet20.cifar10_b2' / 'model.safetensors').write_bytes(b'x')
    runs = [make_run(tmp_path, 'resnet20', 'resnet20', 2, 64, [0.8533]), make_run(tmp_path, 'resnet20_b128', 'resnet20', 128, None, [0.9105])]
    table = cifar_results.markdown_table([cifar_results.read_run(r) for r in runs])
    assert '| 85.33 | -5.72 | resnet20.cifar10_b2 |' in table and '| 91.05 | (baseline) | - |' in table


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path, make_run):
    runs = [make_run(tmp_path, 'resnet20_b128', 'resnet20', 128, None, [0.9105])]
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n<!-- cifar10-results:start -->\nold table\n<!-- cifar10-results:end -->\noutro\n')
    out = tmp_path / 'results' / 'table'
    assert cifar_results.main([str(runs[0]), '--out', str(out), '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith('intro\n<!-- cifar10-results:start -->\n| run |') and text.endswith('<!-- cifar10-results:end -->\noutro\n')
    assert 'old table' not in text and '| 91.05 | (baseline) |' in text and '](results/table.png)' in text
    readme.write_text('no markers\n')
    with pytest.raises(ValueError, match='add the markers'):
        cifar_results.main([str(runs[0]), '--out', str(out), '--readme', str(readme)])
