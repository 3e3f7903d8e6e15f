"""The README's Python examples are tests: each block runs verbatim as a script in a fresh process.

The blocks name the published files as a physicist has them: the HEPData tarball, or its
``BkgOnly.json`` and ``patchset.json`` unpacked beside it. Each block runs in a directory that
holds exactly those (and nothing is substituted in the code), without a main guard, as
``python scan.py``. Every ``ScanResult`` a block leaves in a variable is then compared with plain
serial pyhf on the sampled 1Lbb patches it fitted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from helpers import LBB_SAMPLE, REPOSITORY, assert_matches_reference, slurm_partition

#: The fast path's agreement with plain pyhf on numpy (measured: 3.8e-5 on 1Lbb).
TOLERANCE = 1e-4


def python_blocks() -> list[str]:
    text = (REPOSITORY / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


BLOCKS = python_blocks()

# Appended to each block: every ScanResult the block left in a variable, written out for checking.
EPILOGUE = textwrap.dedent("""
    import json as _json, pyhf_dist as _pyhf_dist
    _json.dump({_name: [_r.to_dict() for _r in _value] for _name, _value in list(globals().items())
                if isinstance(_value, _pyhf_dist.ScanResult)}, open("_results.json", "w"))
""")


@pytest.fixture(scope="module")
def data_directory(lbb_tarball, tmp_path_factory) -> Path:
    """A directory as a physicist has it: the tarball, and its files unpacked beside it."""
    directory = tmp_path_factory.mktemp("readme")
    (directory / lbb_tarball.name).symlink_to(lbb_tarball)
    with tarfile.open(lbb_tarball) as archive:
        archive.extractall(directory, filter="data")
    return directory


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs_verbatim(index, data_directory, lbb_reference, tmp_path):
    code = BLOCKS[index]
    if 'executor="slurm"' in code and slurm_partition() is None:
        pytest.skip("the block runs on Slurm, and no Slurm answers here (executors/slurm/start-slurm.sh)")
    work = tmp_path / "work"
    work.mkdir()
    for item in data_directory.iterdir():
        (work / item.name).symlink_to(item)
    (work / "scan.py").write_text(code + EPILOGUE)
    run = subprocess.run([sys.executable, "scan.py"], cwd=work, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"README block {index + 1} failed:\n{code}\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr
    results = json.loads((work / "_results.json").read_text())
    for name, records in results.items():
        sampled = [record for record in records if record["name"] in LBB_SAMPLE]
        if sampled:
            reference = {record["name"]: lbb_reference[record["name"]] for record in sampled}
            assert_matches_reference(sampled, reference, tolerance=TOLERANCE)
        assert all(record["status"] == "ok" for record in records), f"{name}: failed fits"
