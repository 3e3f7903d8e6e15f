"""The README's and the docs' Python examples are tests: each block runs verbatim as a script.

The blocks name the published files as a physicist has them: the HEPData tarball, or its
``BkgOnly.json`` and ``patchset.json`` unpacked beside it (and the stau archive and the 3L-eRJR
directory). Each block runs in a directory that holds exactly those (and nothing is substituted in
the code), without a main guard, as ``python scan.py`` in a fresh process. Every ``ScanResult`` a
block leaves in a variable is then compared with plain serial pyhf on the sampled 1Lbb patches it
fitted. A block that needs what no test machine has (a site's Slurm partition, a Globus Compute
endpoint) says so on the line above it, ``<!-- not run: the reason -->``, and is skipped with
that reason; a block that asks for ``executor="slurm"`` runs where a Slurm controller answers.

The pages' shell examples are checked too: every ``pyhf-dist`` command in them is parsed by the
command line itself, so a renamed or misspelt option fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import click
import pytest

from helpers import ERJR_DIR, LBB_FEW, REPOSITORY, STAU_TARBALL, assert_matches_reference, serial_pyhf, slurm_partition

#: The fast path's agreement with plain pyhf on numpy (measured: 3.8e-5 on 1Lbb).
TOLERANCE = 1e-4
#: The README is the front page: what it is, two commands, three examples, executors, links.
README_MOST_LINES = 200

PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*\n)?```(?P<language>\w*)[^\n]*\n(?P<code>.*?)```",
                   flags=re.DOTALL)


def blocks(path: Path, language: str) -> list[tuple[str, str | None]]:
    """The ``language`` code blocks of a page, each with the reason it is not run (or ``None``)."""
    return [(match["code"], match["reason"]) for match in BLOCK.finditer(path.read_text())
            if match["language"] == language]


def python_blocks() -> list[tuple[str, str, str | None]]:
    """``(id, code, reason not run)`` for every Python block of the pages; a block repeated
    verbatim on another page runs once."""
    found, seen = [], set()
    for path in PAGES:
        for index, (code, reason) in enumerate(blocks(path, "python"), start=1):
            if code not in seen:
                seen.add(code)
                found.append((f"{path.relative_to(REPOSITORY)}:{index}", code, reason))
    return found


BLOCKS = python_blocks()

# Appended to each block: every ScanResult the block left in a variable, written out for checking
# (by the script itself, not by worker processes that multiprocessing starts by importing it again).
EPILOGUE = textwrap.dedent("""
    if __name__ == "__main__":
        import json as _json, pyhf_dist as _pyhf_dist
        _json.dump({_name: {"settings": _value.metadata.get("settings"), "records": [_r.to_dict() for _r in _value]}
                    for _name, _value in list(globals().items()) if isinstance(_value, _pyhf_dist.ScanResult)},
                   open("_results.json", "w"))
""")


@pytest.fixture(scope="module")
def data_directory(lbb_tarball, tmp_path_factory) -> Path:
    """A directory as a physicist has it: the tarball, and its files unpacked beside it."""
    directory = tmp_path_factory.mktemp("readme")
    (directory / lbb_tarball.name).symlink_to(lbb_tarball)
    with tarfile.open(lbb_tarball) as archive:
        archive.extractall(directory, filter="data")
    for other in (STAU_TARBALL, ERJR_DIR):
        if other.exists():
            (directory / other.name).symlink_to(other)
    return directory


def test_the_readme_has_python_examples():
    assert len(blocks(REPOSITORY / "README.md", "python")) >= 3


def test_the_readme_is_a_front_page():
    text = (REPOSITORY / "README.md").read_text()
    assert text.count("\n") <= README_MOST_LINES, "move the details into a page of docs/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (REPOSITORY / target).is_file(), f"the README links to {target}, which does not exist"


def test_every_page_is_in_the_site():
    nav = (REPOSITORY / "mkdocs.yml").read_text()
    pages = [path.relative_to(REPOSITORY / "docs").as_posix() for path in (REPOSITORY / "docs").rglob("*.md")]
    assert pages
    assert [page for page in pages if f": {page}\n" not in nav] == []


#: What Dask logs when, as a LocalCluster closes, a worker's heartbeat meets its scheduler already
#: gone (a race inside Dask's own teardown, seen once in three runs of the suite on a loaded machine).
_HEARTBEAT_RACE = re.compile(
    r"^\S+ \S+ - distributed\.worker - ERROR - Failed to communicate with scheduler during heartbeat\.\n"
    r"(?:(?!\d{4}-\d\d-\d\d ).*\n?)*", re.MULTILINE)


def _without_own_cluster_teardown(stderr: str, code: str) -> str:
    """``stderr``, less the heartbeat race of a Dask cluster the block starts and closes itself
    (``LocalCluster(...)``): Dask's, not pyhf-dist's, whose own cluster starts no such worker."""
    return _HEARTBEAT_RACE.sub("", stderr) if "LocalCluster(" in code else stderr


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[block[0] for block in BLOCKS])
def test_python_block_runs_verbatim(index, data_directory, lbb_pallet, tmp_path):
    where, code, not_run = BLOCKS[index]
    if not_run:
        pytest.skip(f"not run: {not_run}")
    if 'executor="slurm"' in code and slurm_partition() is None:
        pytest.skip("the block runs on Slurm, and no Slurm answers here (executors/slurm/start-slurm.sh)")
    if any(name in code for name in (STAU_TARBALL.name, ERJR_DIR.name)) and not (
            (data_directory / STAU_TARBALL.name).exists() and (data_directory / ERJR_DIR.name).exists()):
        pytest.skip("the block reads a published pallet that is not here: set PYHF_DIST_DATA")
    work = tmp_path / "work"
    work.mkdir()
    for item in data_directory.iterdir():
        (work / item.name).symlink_to(item)
    (work / "scan.py").write_text(code + EPILOGUE)
    run = subprocess.run([sys.executable, "scan.py"], cwd=work, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{where} failed:\n{code}\n{run.stderr[-3000:]}"
    assert "Traceback" not in _without_own_cluster_teardown(run.stderr, code), run.stderr
    results = json.loads((work / "_results.json").read_text())
    for name, result in results.items():
        records, settings = result["records"], result["settings"] or {}
        sampled = [record for record in records if record["name"] in LBB_FEW and record["pallet"] is None]
        # The reference is hypotest(1.0, qtilde) with asymptotics: other calculations are checked elsewhere.
        plain = (settings.get("calculation"), settings.get("calctype"), settings.get("poi_test"),
                 settings.get("test_stat")) == ("hypotest", "asymptotics", 1.0, "qtilde")
        if sampled and plain:
            reference = serial_pyhf(lbb_pallet, [record["name"] for record in sampled])
            assert_matches_reference(sampled, reference, tolerance=TOLERANCE)
        assert all(record["status"] == "ok" for record in records), f"{name}: failed fits"


def commands() -> list[tuple[str, list[str]]]:
    """``(page, arguments)`` of every ``pyhf-dist`` command in the pages' shell blocks."""
    found = []
    for path in PAGES:
        for code, _ in blocks(path, "bash"):
            for line in code.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "pyhf-dist" in words:
                    found.append((path.name, words[words.index("pyhf-dist") + 1:]))
    return found


COMMANDS = commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("page, arguments", COMMANDS, ids=[" ".join(words[:2]) for _, words in COMMANDS])
def test_shell_command_parses(page, arguments):
    """The command line accepts the command as written: its options exist, their values convert."""
    from pyhf_dist.cli import cli

    group = click.Context(cli, info_name="pyhf-dist")
    _, rest, _ = cli.make_parser(group).parse_args(list(arguments))
    assert rest, f"{page}: no subcommand in pyhf-dist {' '.join(arguments)}"
    command = cli.get_command(group, rest[0])
    assert command is not None, f"{page}: pyhf-dist has no command {rest[0]!r}"
    # A lenient parse first lets a command settle its parameters from the arguments (``fit`` adds
    # the flags of the executor that --executor names); the strict parse below checks them.
    command.parse_args(click.Context(command, info_name=rest[0], parent=group, resilient_parsing=True), list(rest[1:]))
    context = click.Context(command, info_name=rest[0], parent=group)
    try:
        options, extra, _ = command.make_parser(context).parse_args(rest[1:])
        for parameter in command.params:
            # Files named in the examples need not exist here; every other value must convert.
            if parameter.name in options and not isinstance(parameter.type, (click.Path, click.File)):
                parameter.type_cast_value(context, options[parameter.name])
    except click.ClickException as error:
        pytest.fail(f"{page}: pyhf-dist {' '.join(arguments)}: {error.format_message()}")
    assert extra == [], f"{page}: pyhf-dist {' '.join(arguments)}: unexpected arguments {extra}"


def test_api_reference_extension_reads_docstrings_as_markdown():
    """The griffe extension of the API reference: Sphinx roles become code, bare doctests fenced,
    sections named as the Google parser knows them."""
    pytest.importorskip("griffe", reason="the docs extra is not installed (pip install -e '.[docs]')")
    sys.path.insert(0, str(REPOSITORY / "docs"))
    try:
        from griffe_docstrings import markdown
    finally:
        sys.path.remove(str(REPOSITORY / "docs"))
    text = "See :class:`~a.B` and :func:`c.d`::\n\n    x = 1\n\n>>> f()[0][\"m2\"]\n2\n\nExample:\n    >>> 3\n    3"
    assert markdown(text).split("\n") == [
        "See `B` and `c.d`:", "", "    x = 1", "", "```pycon", ">>> f()[0][\"m2\"]", "2", "```", "",
        "Examples:", "    >>> 3", "    3",
    ]
