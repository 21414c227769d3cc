import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
