"""The layout's contracts (``[tool.importlinter]`` in ``pyproject.toml``) hold: the worker runtime
never imports the client, the protocol is the standard library only, executors are independent,
and nothing imports its siblings in a cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    result = subprocess.run([command, "--no-cache"], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
