"""benchmarks/cifar_results.py on run folders laid out as zoo-train writes them (written by the make_run fixture in conftest.py)."""

import math

import pytest

import zoo.hub.registry

pytest.importorskip('matplotlib')

import cifar_results  # benchmarks/cifar_results.py (pytest's pythonpath)


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


def _seeds_of_wsbcn(tmp_path, make_run):
    """Three seeds of WS+BCN at 2 images per device, one seed of the BN baseline."""
    return [
        make_run(tmp_path, 'resnet20_wsbcn', 'resnet20_wsbcn', 2, 64, [0.8441], seed=0),
        make_run(tmp_path, 'resnet20_wsbcn_seed1', 'resnet20_wsbcn', 2, 64, [None, 0.8412], seed=1),  # resumed once
        make_run(tmp_path, 'resnet20_wsbcn_seed2', 'resnet20_wsbcn', 2, 64, [0.8437], seed=2),
        make_run(tmp_path, 'resnet20_b128', 'resnet20', 128, None, [0.8411], seed=0),
    ]


def test_seeds_of_a_config_are_one_row_with_mean_and_sample_std(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'no_weights_here')
    runs = _seeds_of_wsbcn(tmp_path, make_run)
    newer = runs[2] / 'logs' / 'version_0' / 'config.yaml'  # an option the zoo gained after the seed-0 run
    newer.write_text(newer.read_text() + 'top_k: 5\n')
    configs = cifar_results.group_by_config([cifar_results.read_run(r) for r in runs])
    assert sorted(len(c.runs) for c in configs) == [1, 3]
    wsbcn = next(c for c in configs if len(c.runs) == 3)
    assert [r.seed for r in wsbcn.runs] == [0, 1, 2]
    # 84.41, 84.12, 84.37: mean 84.30, squared deviations 0.0494; sample std sqrt(0.0494 / 2) = 0.1572
    # (the population std, sqrt(0.0494 / 3) = 0.1283, would round to 0.13 in the table)
    assert wsbcn.mean == pytest.approx(84.30, abs=1e-9) and wsbcn.std == pytest.approx((0.0494 / 2) ** 0.5, abs=1e-9)

    out = tmp_path / 'out' / 'table'
    assert cifar_results.main([str(r) for r in runs] + ['--out', str(out)]) == 0
    table = out.with_suffix('.md').read_text().splitlines()
    assert ('| resnet20_wsbcn, resnet20_wsbcn_seed1, resnet20_wsbcn_seed2 | resnet20_wsbcn | WS+BCN | 2 | 64 | 20 | '
            '84.30 ± 0.16 (seeds 0, 1, 2: 84.41, 84.12, 84.37) | +0.19 | - |') in table
    assert '| resnet20_b128 | resnet20 | BN | 128 | 1 | 20 | 84.11 | (baseline) | - |' in table  # one seed: no ±
    assert table[-1] == cifar_results.SEEDS_NOTE and 'sample standard deviation' in table[-1]
    png = out.with_suffix('.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_gap_to_a_multi_seed_baseline_carries_the_standard_error_of_the_difference(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'no_weights_here')
    runs = _seeds_of_wsbcn(tmp_path, make_run)
    runs.append(make_run(tmp_path, 'resnet20_b128_seed1', 'resnet20', 128, None, [0.8431], seed=1))
    table = cifar_results.markdown_table([cifar_results.read_run(r) for r in runs]).splitlines()
    # WS+BCN 84.41, 84.12, 84.37 (mean 84.30, variance 0.0494 / 2); BN 84.11, 84.31 (mean 84.21,
    # variance 0.02): standard error of the difference sqrt(0.0247 / 3 + 0.02 / 2) = 0.1353; Welch's
    # t = 0.6665 with 2.483 degrees of freedom, two-sided p = 0.5617 (mpmath's regularized incomplete beta)
    assert ('| resnet20_wsbcn, resnet20_wsbcn_seed1, resnet20_wsbcn_seed2 | resnet20_wsbcn | WS+BCN | 2 | 64 | 20 | '
            '84.30 ± 0.16 (seeds 0, 1, 2: 84.41, 84.12, 84.37) | +0.09 ± 0.14 (p = 0.56) | - |') in table
    assert '| resnet20_b128, resnet20_b128_seed1 | resnet20 | BN | 128 | 1 | 20 | 84.21 ± 0.14 (seeds 0, 1: 84.11, 84.31) | (baseline) | - |' in table


@pytest.mark.parametrize('t', [0., 0.3, 1., 2.96, 12., 300.])
def test_student_t_p_value_against_closed_forms(t):
    # P(|T| >= t) in closed form: df 1 (Cauchy), df 2, df 4 (two tails of the CDF
    # 1/2 + 3/8 * x * (1 - t^2 / (12 (1 + t^2 / 4))), x = t / sqrt(1 + t^2 / 4)), and a huge df (the normal)
    x4 = t / math.sqrt(1 + t * t / 4)
    closed = {1: 1 - 2 / math.pi * math.atan(t), 2: 1 - t / math.sqrt(2 + t * t),
              4: 1 - 2 * (3 / 8) * x4 * (1 - t * t / (12 * (1 + t * t / 4))), 1e6: math.erfc(t / math.sqrt(2))}
    for df, p in closed.items():
        assert cifar_results.student_t_two_sided_p(t, df) == pytest.approx(p, abs=1e-6), df
        assert cifar_results.student_t_two_sided_p(-t, df) == pytest.approx(p, abs=1e-6), df
    with pytest.raises(ValueError, match='df must be at least 1'):
        cifar_results.student_t_two_sided_p(t, 0.5)


def _config(top1s):
    return cifar_results.ConfigResult([cifar_results.RunResult(
        f'run{i}', 'resnet20', 'BN', 2, 64, 15, top1, None, 1, seed=i) for i, top1 in enumerate(top1s)])


def test_welch_test_degrees_of_freedom_and_edge_cases():
    # equal spreads and three seeds a side: Welch's df is 2 (n - 1) = 4, t = gap / sqrt(2 s^2 / 3)
    a, b = _config([85.0, 85.3, 85.6]), _config([84.0, 84.3, 84.6])
    test = cifar_results.welch_test(a, b)
    t = 1.0 / math.sqrt(2 * 0.09 / 3)
    x4 = t / math.sqrt(1 + t * t / 4)
    assert test.t == pytest.approx(t) and test.df == pytest.approx(4)
    assert test.p == pytest.approx(1 - 0.75 * x4 * (1 - t * t / (12 * (1 + t * t / 4))), abs=1e-6)
    # one side without spread (two equal seeds): all the variance, and the df, come from the other side
    same = cifar_results.welch_test(_config([84.41, 84.41]), b)
    assert same.df == pytest.approx(2) and same.t == pytest.approx((84.41 - 84.3) / math.sqrt(0.09 / 3))
    assert cifar_results.welch_test(_config([1., 1.]), _config([2., 2.])) is None  # no spread at all
    assert cifar_results.welch_test(_config([85.]), b) is None  # one seed


def test_runs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'no_weights_here')
    runs = [
        make_run(tmp_path, 'resnet20_bgn', 'resnet20_bgn', 2, 64, [0.7847], seed=0),
        make_run(tmp_path, 'resnet20_bgn_g1', 'resnet20_bgn', 2, 64, [0.80], seed=0, model_kwargs={'norm_groups': 1}),
        make_run(tmp_path, 'resnet20_bgn_g2', 'resnet20_bgn', 2, 64, [0.79], seed=0, model_kwargs={'norm_groups': 2}),
        make_run(tmp_path, 'resnet20_bgn_lr', 'resnet20_bgn', 2, 64, [0.77], seed=1, lr=0.05),  # another lr
    ]
    table = cifar_results.markdown_table([cifar_results.read_run(r) for r in runs])
    assert '| resnet20_bgn | resnet20_bgn | BGN | 2 | 64 | 20 | 78.47 | - | - |' in table
    assert '| resnet20_bgn_g1 | resnet20_bgn | BGN (G=1) | 2 | 64 | 20 | 80.00 | - | - |' in table
    assert '| resnet20_bgn_g2 | resnet20_bgn | BGN (G=2) | 2 | 64 | 20 | 79.00 | - | - |' in table
    assert '| resnet20_bgn_lr | resnet20_bgn | BGN | 2 | 64 | 20 | 77.00 | - | - |' in table
    assert '±' not in table and cifar_results.SEEDS_NOTE not in table
    default, g1 = ({'model': {'init_args': {'model_name': 'resnet20_bgn', 'model_kwargs': kw}}}
                   for kw in (None, {'norm_groups': 1}))  # as LightningCLI logs them
    a, b = (cifar_results.RunResult(**{**vars(cifar_results.read_run(runs[0])),
                                       'settings': cifar_results._setup_settings(cfg)}) for cfg in (default, g1))
    assert cifar_results.setup_differences(a, b) == ['model.init_args.model_kwargs']


def test_one_seed_twice_is_a_clear_error(tmp_path, make_run):
    runs = [make_run(tmp_path, 'resnet20_gn', 'resnet20_gn', 2, 64, [0.75], seed=0),
            make_run(tmp_path, 'resnet20_gn_copy', 'resnet20_gn', 2, 64, [0.76], seed=0)]
    with pytest.raises(ValueError, match=r'same configuration with the same seed \(0\)'):
        cifar_results.markdown_table([cifar_results.read_run(r) for r in runs])


def test_shipped_weights_are_those_of_the_recipe_run_and_its_seed_is_named(tmp_path, monkeypatch, make_run):
    monkeypatch.setattr(zoo.hub.registry, 'SHIPPED_WEIGHTS_DIR', tmp_path / 'pretrained')
    for tag in ('resnet20_wsbcn.cifar10', 'resnet20_bgn.cifar10'):
        (tmp_path / 'pretrained' / tag).mkdir(parents=True)
        (tmp_path / 'pretrained' / tag / 'model.safetensors').write_bytes(b'x')
    runs = _seeds_of_wsbcn(tmp_path, make_run) + [
        make_run(tmp_path, 'resnet20_bgn_g1', 'resnet20_bgn', 2, 64, [0.80], seed=0, model_kwargs={'norm_groups': 1})]
    table = cifar_results.markdown_table([cifar_results.read_run(r) for r in runs])
    assert '| +0.19 | resnet20_wsbcn.cifar10 (seed 0) |' in table
    assert '| BGN (G=1) | 2 | 64 | 20 | 80.00 | -4.11 | - |' in table  # not the G = 8 run's shipped weights


def test_published_weights_are_read_from_their_model_card_and_logs_win(tmp_path, make_run):
    """Runs of earlier sessions survive only as published cards: those give the same row as the logs."""
    folder = zoo.hub.registry.SHIPPED_WEIGHTS_DIR / 'resnet20_wsbcn.cifar10'
    card = cifar_results.read_run(folder)
    assert (card.run, card.model, card.images_per_device, card.devices, card.seed) == ('resnet20_wsbcn', 'resnet20_wsbcn', 2, 64, 0)
    card_text = (folder / 'README.md').read_text()
    assert f'| test/top1 | {card.test_top1 / 100:.4g} |' in card_text and card.test_step == -1
    assert cifar_results.shipped_tag(card) == 'resnet20_wsbcn.cifar10'
    logs = make_run(tmp_path, 'resnet20_wsbcn', 'resnet20_wsbcn', 2, 64, [0.85], seed=0)
    kept = cifar_results.prefer_logs([card, cifar_results.read_run(logs)])
    assert [r.test_top1 for r in kept] == [85.0]
    broken = tmp_path / 'broken.cifar10'
    broken.mkdir()
    (broken / 'README.md').write_text('# a card without the run')
    with pytest.raises(ValueError, match='no training config'):
        cifar_results.read_run(broken)


def test_bgn_group_recommendation_quotes_the_archived_runs():
    """The groups note of BGN's registry entry (and so its model card) and the layer's docstring give
    the test top-1 of the archived G = 8, 2, 1 runs, and those runs do rank as the recommendation says."""
    from pathlib import Path

    import zoo.layers.batch_group_norm
    archive = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results' / 'cifar10_runs'
    card = Path(zoo.hub.registry.SHIPPED_WEIGHTS_DIR) / 'resnet20_bgn.cifar10'
    runs = {8: cifar_results.read_run(card), 2: cifar_results.read_run(archive / 'resnet20_bgn_g2'),
            1: cifar_results.read_run(archive / 'resnet20_bgn_g1')}
    assert {g: r.groups for g, r in runs.items()} == {8: None, 2: 2, 1: 1}  # None: the model's default, 8
    assert all(r.images_per_device == 2 and r.devices == 64 and r.seed == 0 for r in runs.values())
    assert runs[8].test_top1 > runs[2].test_top1 > runs[1].test_top1
    note = zoo.hub.registry.get_entry('resnet20_bgn.cifar10').notes[0]
    docstring = ' '.join(zoo.layers.batch_group_norm.__doc__.split())
    for g, r in runs.items():
        assert f'G = {g} {r.test_top1:.2f}%' in note and f'G = {g} {r.test_top1:.2f}%' in docstring, g
