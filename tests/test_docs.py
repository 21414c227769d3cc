"""Every Python code block of ``README.md`` and ``docs/*.md`` runs as written (issue 26).

Each ```` ```python ```` block runs in its own interpreter (``python -c BLOCK``), with the repository root
as its working directory, as a newcomer would paste it there, and must exit 0 within its timeout.
Blocks are not joined: each one carries its own imports and makes or names everything it uses.

Marker convention: HTML comments (invisible when the Markdown is rendered) on the line(s) directly
above the opening fence.

- ``<!-- needs: network -->``: the block needs the internet (a Hub repo, a published download);
  skipped here, with the reason shown.
- ``<!-- needs: gpu -->``: the block needs a CUDA GPU; skipped when none is visible.
  Both at once: ``<!-- needs: network, gpu -->``. Free text after the need may say why:
  ``<!-- needs: network (the authors' rn50_bcn_ws.pth) -->``.
- ``<!-- test: slow -->``: the block takes long (a training run); it runs with ``pytest -m slow``
  only, so that the default test set stays fast.

A block without a marker always runs: needing a file that no block makes (a trained checkpoint, a
photo) is a failure of the docs, not a reason to skip. Files a block writes into the repository
root (names it spells out, that did not exist before) are deleted after it ran.
"""
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
TIMEOUT = 900  # seconds per block
NEEDS = re.compile(r'^<!--\s*needs:\s*(?P<needs>[a-z, ]+?)\s*(?:\((?P<why>[^)]*)\))?\s*-->$')
SLOW = re.compile(r'^<!--\s*test:\s*slow\s*-->$')
KNOWN_NEEDS = {'network', 'gpu'}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    needs: Tuple[str, ...]
    why: str
    slow: bool

    @property
    def id(self) -> str:
        return f'{self.path.relative_to(REPO)}:{self.line}'


def python_blocks(path: Path) -> List[Block]:
    """The ```python blocks of a Markdown file, with the markers on the lines above each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == '```python':
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith('```')), None)
            if end is None:
                raise ValueError(f'{path}:{i + 1}: a ```python block that never closes')
            needs, why, slow, k = set(), [], False, i - 1
            while k >= 0 and lines[k].strip().startswith('<!--'):
                comment = lines[k].strip()
                m = NEEDS.match(comment)
                if m:
                    needs |= {n.strip() for n in m['needs'].split(',') if n.strip()}
                    why += [m['why']] if m['why'] else []
                slow = slow or bool(SLOW.match(comment))
                k -= 1
            unknown = needs - KNOWN_NEEDS
            if unknown:
                raise ValueError(f'{path}:{i + 1}: unknown need(s) {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}')
            blocks.append(Block(path, i + 1, '\n'.join(lines[i + 1:end]) + '\n', tuple(sorted(needs)),
                                '; '.join(why), slow))
            i = end
        i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in python_blocks(doc)]


def _param(block: Block):
    marks = [pytest.mark.slow] if block.slow else []
    return pytest.param(block, id=block.id, marks=marks)


def _skip_reason(block: Block) -> str:
    reasons = []
    if 'network' in block.needs:
        reasons.append('needs the network')
    if 'gpu' in block.needs and not torch.cuda.is_available():
        reasons.append('needs a GPU')
    if reasons and block.why:
        reasons.append(block.why)
    return ', '.join(reasons)


def _named_files(code: str) -> List[Path]:
    """Files in the repository root that ``code`` names as string literals (what it may write there)."""
    names = set(re.findall(r"""['"]([\w.\-]+\.\w+)['"]""", code))
    return [REPO / n for n in sorted(names)]


def test_the_marker_convention_is_understood(tmp_path):
    doc = tmp_path / 'doc.md'
    doc.write_text('text\n\n<!-- needs: network, gpu (a 7 GB download) -->\n```python\nprint(1)\n```\n\n'
                   '<!-- test: slow -->\n```python\nprint(2)\n```\n\n```python\nprint(3)\n```\n')
    first, second, third = python_blocks(doc)
    assert (first.needs, first.why, first.slow, first.code) == (('gpu', 'network'), 'a 7 GB download', False, 'print(1)\n')
    assert (second.needs, second.slow, second.line) == ((), True, 9)
    assert (third.needs, third.slow) == ((), False)
    doc.write_text('<!-- needs: internet -->\n```python\npass\n```\n')
    with pytest.raises(ValueError, match=r"unknown need\(s\) \['internet'\]"):
        python_blocks(doc)


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 10 and any(b.path.name == 'README.md' for b in BLOCKS)


@pytest.mark.parametrize('block', [_param(b) for b in BLOCKS])
def test_python_block_runs_as_written(block: Block):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(f'{block.id} {reason}')
    existing = {p for p in _named_files(block.code) if p.exists()}
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.setdefault('OMP_NUM_THREADS', '1')  # blocks run beside the rest of the tests
    try:
        r = subprocess.run([sys.executable, '-c', block.code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    finally:
        for p in _named_files(block.code):
            if p not in existing and p.is_file() and p.parent == REPO:
                p.unlink()
    assert r.returncode == 0, (
        f'{block.id}: the block exits {r.returncode}\n--- block ---\n{block.code}--- stderr (end) ---\n'
        f'{r.stderr[-4000:]}')


# ----------------------------------------------------------------------------------- numbers the README quotes

def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find('\n## ', start + len(heading))
    return text[start:end if end != -1 else len(text)]


def test_readme_quickstart_numbers_come_from_the_committed_results():
    """The quickstart's time and accuracy are quoted from benchmarks/results/quickstart.json, as
    benchmarks/quickstart_results.py renders it, and stated nowhere else in the Training section."""
    from quickstart_results import README_END, README_START, load_results, render
    text = (REPO / 'README.md').read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    quoted = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert quoted == render(load_results()).strip(), 'run: python benchmarks/quickstart_results.py --readme README.md --no-run'
    training = _section(text, '## Training').replace(quoted, '')
    stray = re.findall(r'\d+(?:\.\d+)?\s?%|\d+ min\b|\d+ s\b', training)
    assert not stray, f'numbers in the README\'s Training section that no script wrote: {stray}'


def test_quickstart_record_renders():
    from quickstart_results import render
    record = {'wall_seconds': 276.4, 'test_top1': 51.39, 'test_top5': 94.07, 'cpu_count': 2, 'omp_num_threads': None,
              'load_average_before': 0.1, 'cuda': False, 'torch': '2.9.0', 'commit': 'abc1234', 'date': '2025-01-01'}
    assert render(record).endswith(': 4 min 36 s, test top-1 51.39% (top-5 94.07%).')
    assert '2 cores, load average 0.1 before the run, OMP_NUM_THREADS unset' in render(record)


def test_readme_keeps_its_two_setup_commands_first():
    lines = (REPO / 'README.md').read_text().splitlines()
    assert lines[2:6] == [
        '```bash',
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && zoo-train fit -c '
        'configs/cifar10/quickstart.yaml',
        '. .venv/bin/activate && python -m pytest',
        '```']


@pytest.mark.parametrize('results,heading', [('cifar_results', '## CIFAR-10'), ('camvid_results', '## CamVid')])
def test_readme_prose_quotes_gaps_and_means_from_the_table(results, heading):
    """A gap to large-batch BN written in the prose (``-0.74``) and a mean with its spread (``35.08% ± 0.24``)
    must be ones the generated table shows: the prose once kept a gap against an older baseline mean after the
    table was regenerated."""
    module = importlib.import_module(results)
    text = (REPO / 'README.md').read_text()
    table = text.split(module.README_START, 1)[1].split(module.README_END, 1)[0]
    prose = _section(text, heading).replace(table, '')
    quoted = re.findall(r'(?<![\w.])[+-]\d+\.\d\d\b', prose)
    quoted += [f'{m} ± {s}' for m, s in re.findall(r'(\d+\.\d\d)%? ± (\d+\.\d\d)', prose)]
    missing = [q for q in quoted if q not in table]
    assert not missing, f'numbers in the README\'s {heading} prose that its table does not show: {missing}'
