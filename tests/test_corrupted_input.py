"""Property-based: corrupted workspaces and patches always end in our clear error.

Hypothesis corrupts the demo pallet (a real workspace and a real pyhf patchset with digests) in
the ways files get damaged or hand-edited — truncated text, random bytes, values of the wrong
type, deleted keys — and feeds it to :func:`pyhf_dist.load_pallet`, :func:`pyhf_dist.map_fits` and
the command line. Each must either work (a corruption can be harmless, e.g. a changed
description) or raise a :class:`pyhf_dist.exceptions.PyhfDistError` with a one-line message —
never a raw ``KeyError``/``TypeError``/... from deep inside. A scan that does run ends with one
record per patch (a patch that cannot be applied is a failed record with its reason).
"""

from __future__ import annotations

import copy
import json
import signal
import tarfile
import io

from hypothesis import HealthCheck, assume, given, settings, strategies as st

import pyhf_dist
from pyhf_dist.demo import demo_patchset, demo_workspace
from pyhf_dist.exceptions import PyhfDistError

WORKSPACE = demo_workspace()
PATCHSET = demo_patchset()
PATCHSET["patches"] = PATCHSET["patches"][:2]  # keep the scans short
WORKSPACE_TEXT = json.dumps(WORKSPACE, indent=1)
PATCHSET_TEXT = json.dumps(PATCHSET, indent=1)

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------------------ corruptions


def _paths(document, prefix=()):
    """Every location in a JSON document, as a tuple of keys/indices (the root is ``()``)."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, prefix + (index,))


_OTHER_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.just([]), st.just({}), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def corrupted_document(draw, document):
    """``document`` with one to three values replaced by another type, or keys/items deleted."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = [path for path in _paths(document) if path]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_OTHER_VALUES)
    return document


@st.composite
def corrupted_text(draw, text):
    """``text`` truncated, with random bytes spliced in, or replaced by random bytes."""
    data = text.encode()
    kind = draw(st.sampled_from(["truncate", "splice", "random"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=20)) + data[at + draw(st.integers(0, 20)):]
    return draw(st.binary(max_size=200))


def _expect_clear_error_or_success(call):
    """Run ``call``; a PyhfDistError must have a single-line message. Returns the value or None."""
    try:
        return call()
    except PyhfDistError as error:
        message = str(error)
        assert message and "\n" not in message.strip(), f"multi-line message: {message!r}"
        assert "Traceback" not in message
        return None


def _assert_one_record_per_patch(result, names):
    assert sorted(record.name for record in result) == sorted(names)
    for record in result:
        assert record.status in ("ok", "failed") and (record.ok or record.error)


# ------------------------------------------------------------------------------ properties


@settings(max_examples=60, **COMMON)
@given(workspace=st.one_of(corrupted_text(WORKSPACE_TEXT), st.just(WORKSPACE_TEXT.encode())),
       patchset=st.one_of(corrupted_text(PATCHSET_TEXT), st.just(PATCHSET_TEXT.encode())))
def test_load_pallet_with_corrupted_files(tmp_path_factory, workspace, patchset):
    assume(workspace != WORKSPACE_TEXT.encode() or patchset != PATCHSET_TEXT.encode())
    directory = tmp_path_factory.mktemp("pallet")
    (directory / "BkgOnly.json").write_bytes(workspace)
    (directory / "patchset.json").write_bytes(patchset)
    _expect_clear_error_or_success(lambda: pyhf_dist.load_pallet(directory))


@settings(max_examples=60, **COMMON)
@given(workspace=corrupted_document(WORKSPACE))
def test_load_corrupted_workspace_document(tmp_path_factory, workspace):
    directory = tmp_path_factory.mktemp("pallet")
    (directory / "BkgOnly.json").write_text(json.dumps(workspace))
    (directory / "patchset.json").write_text(PATCHSET_TEXT)
    _expect_clear_error_or_success(lambda: pyhf_dist.load_pallet(directory))
    _expect_clear_error_or_success(lambda: pyhf_dist.pallet.load_workspace(workspace))


@settings(max_examples=60, **COMMON)
@given(patchset=corrupted_document(PATCHSET))
def test_load_corrupted_patchset_document(patchset):
    _expect_clear_error_or_success(lambda: pyhf_dist.pallet.load_patches(patchset, WORKSPACE))


@settings(max_examples=40, **COMMON)
@given(operations=corrupted_document(PATCHSET["patches"][0]["patch"]))
def test_load_corrupted_patch_files(tmp_path_factory, operations):
    directory = tmp_path_factory.mktemp("pallet")
    (directory / "BkgOnly.json").write_text(WORKSPACE_TEXT)
    (directory / "patch.demo_300_0.json").write_text(json.dumps(operations))
    _expect_clear_error_or_success(lambda: pyhf_dist.load_pallet(directory))


@settings(max_examples=30, **COMMON)
@given(data=st.data())
def test_load_corrupted_tarball(tmp_path_factory, data):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in (("pallet/BkgOnly.json", WORKSPACE_TEXT), ("pallet/patchset.json", PATCHSET_TEXT)):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    good = buffer.getvalue()
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "flip":
        at = data.draw(st.integers(0, len(good) - 1))
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1:]
    else:
        bad = data.draw(st.binary(max_size=300))
    path = tmp_path_factory.mktemp("tarball") / "pallet.tar.gz"
    path.write_bytes(bad)
    _expect_clear_error_or_success(lambda: pyhf_dist.load_pallet(path))


@settings(max_examples=25, **COMMON)
@given(workspace=st.one_of(corrupted_document(WORKSPACE), st.just(WORKSPACE)),
       patchset=st.one_of(corrupted_document(PATCHSET), st.just(PATCHSET)))
def test_map_fits_with_corrupted_documents(workspace, patchset):
    assume(workspace is not WORKSPACE or patchset is not PATCHSET)
    result = _expect_clear_error_or_success(
        lambda: pyhf_dist.map_fits(workspace, patchset, executor="sequential", backend="numpy")
    )
    if result is not None:
        _assert_one_record_per_patch(result, [patch.name for patch in pyhf_dist.pallet.load_patches(patchset)[0]])


@settings(max_examples=25, **COMMON)
@given(operations=corrupted_document(PATCHSET["patches"][0]["patch"]))
def test_map_fits_with_corrupted_patch_file(tmp_path_factory, operations):
    """A patch file that loads but cannot be applied is a failed record, not a crash."""
    directory = tmp_path_factory.mktemp("pallet")
    (directory / "BkgOnly.json").write_text(WORKSPACE_TEXT)
    (directory / "patch.demo_300_0.json").write_text(json.dumps(operations))
    result = _expect_clear_error_or_success(
        lambda: pyhf_dist.map_fits(directory, executor="sequential", backend="numpy")
    )
    if result is not None:
        _assert_one_record_per_patch(result, ["demo_300_0"])


@settings(max_examples=15, **COMMON)
@given(workspace=corrupted_text(WORKSPACE_TEXT), patchset=corrupted_document(PATCHSET))
def test_cli_with_corrupted_files(tmp_path_factory, capsys, workspace, patchset):
    from pyhf_dist.cli import main

    directory = tmp_path_factory.mktemp("pallet")
    (directory / "BkgOnly.json").write_bytes(workspace)
    (directory / "patchset.json").write_text(json.dumps(patchset))
    output = directory / "out.json"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["fit", str(directory), "--executor", "sequential", "--backend", "numpy", "-q", "-o", str(output)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code != 0:
        assert code == 2, captured.err
        errors = [line for line in captured.err.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, captured.err
        assert not output.exists()
