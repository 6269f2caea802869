"""The sample lakehouse of ``view_samples`` in a fresh tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from view_samples import write_sample_lake

from lakehouse import Lakehouse


@pytest.fixture
def sample_lake(tmp_path: Path) -> Lakehouse:
    return write_sample_lake(tmp_path / "lake")
