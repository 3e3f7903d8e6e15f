"""Sources that hold several pallets: finding, naming and choosing them; fitting them together;
their records, journal, combination and plots.

The ATLAS stau search's archive (three pallets in a top folder, with a README and macOS debris) is
read as published. Other layouts authors pack (nested region folders, AppleDouble ``._*.json``
files, ``__MACOSX/``, the older one-file-per-patch layout) are built in temporary directories from
its files; nothing is copied into the repository.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import tarfile
from pathlib import Path

import pytest

import pyhf_dist
from pyhf_dist import discovery
from pyhf_dist.cli import main
from pyhf_dist.combine import combine
from pyhf_dist.exceptions import InputError, JournalError, PalletSelectionError
from pyhf_dist.pallet import pallet_names
from pyhf_dist.results import FitRecord, ScanResult
from helpers import assert_matches_reference, serial_pyhf

REGIONS = ["Region-combined", "Region-highMass", "Region-lowMass"]
#: One point per pallet compared with serial pyhf: near the combined fit's exclusion boundary, in
#: the low-mass region's reach, and the high-mass region's.
SAMPLE = {"Region-combined": "DS_200_80_Staus", "Region-lowMass": "DS_120_40_Staus",
          "Region-highMass": "DS_320_120_Staus"}
#: AppleDouble content: what macOS writes beside each file in an archive (not JSON).
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02" + bytes(64)


def _run_cli(*args: str) -> tuple[int, str, str]:
    """``pyhf-dist ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------ the published archive


@pytest.fixture(scope="module")
def stau_files(stau_tarball) -> dict:
    """Each stau region's published files: ``{region: (BkgOnly.json bytes, patchset dict)}``."""
    files = {}
    with tarfile.open(stau_tarball) as archive:
        for region in REGIONS:
            background = archive.extractfile(f"./1911.06660/{region}/BkgOnly.json").read()
            patchset = json.load(archive.extractfile(f"./1911.06660/{region}/patchset.json"))
            files[region] = (background, patchset)
    return files


@pytest.fixture(scope="module")
def stau_pallets(stau_tarball) -> dict:
    return {pallet.name: pallet for pallet in pyhf_dist.load_pallet(stau_tarball, pallet="all")}


def test_the_stau_archive_holds_three_named_pallets(stau_tarball, stau_pallets):
    # Top folder 1911.06660/, its README, .DS_Store and ._.DS_Store are no pallets, and no part of a name.
    assert pyhf_dist.pallet.pallet_names(stau_tarball) == REGIONS
    assert list(stau_pallets) == REGIONS
    for name, pallet in stau_pallets.items():
        assert len(pallet) == 57 and pallet.labels == ["mst", "mn2"] and pallet.source == str(stau_tarball)
        assert name in pallet.description
    # Each pallet is its own: the combined fit has 5 channels, the regions 3.
    assert [len(stau_pallets[name].workspace["channels"]) for name in REGIONS] == [5, 3, 3]


def test_no_choice_is_refused_in_one_line_listing_the_pallets(stau_tarball, tmp_path):
    with pytest.raises(PalletSelectionError) as error:
        pyhf_dist.load_pallet(stau_tarball)
    message = str(error.value)
    assert "\n" not in message and "holds 3 pallets: Region-combined, Region-highMass, Region-lowMass" in message
    assert "--pallet NAME" in message and "--pallet all" in message and "pallet=" in message
    with pytest.raises(PalletSelectionError, match="holds 3 pallets"):
        pyhf_dist.map_fits(stau_tarball, executor="sequential")
    code, out, err = _run_cli("fit", str(stau_tarball), "-q", "-o", str(tmp_path / "r.json"))
    assert code == 2 and not (tmp_path / "r.json").exists()
    assert "holds 3 pallets: Region-combined, Region-highMass, Region-lowMass" in _one_error_line(err)


def test_an_unknown_pallet_suggests_close_names(stau_tarball, tmp_path):
    code, _, err = _run_cli("fit", str(stau_tarball), "--pallet", "Region-combine", "-q",
                            "-o", str(tmp_path / "r.json"))
    assert code == 2
    assert "has no pallet 'Region-combine': did you mean Region-combined?" in _one_error_line(err)
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(PalletSelectionError, match="has no pallet 'SR-A': its pallets are Region-combined, "):
        pyhf_dist.load_pallet(stau_tarball, pallet=["Region-lowMass", "SR-A"])


def test_pallet_choices(stau_tarball):
    names = ["Region-combined", "Region-highMass", "Region-lowMass"]
    assert discovery.select_names(names, "region-lowmass", "x") == [2]  # case does not matter
    assert discovery.select_names(names, "Region-*Mass", "x") == [1, 2]
    assert discovery.select_names(names, ["Region-lowMass", "all"], "x") == [2, 0, 1]  # order asked, once each
    one = pyhf_dist.load_pallet(stau_tarball, pallet="Region-lowMass", validate=False)
    assert isinstance(one, pyhf_dist.Pallet) and one.name == "Region-lowMass"
    several = pyhf_dist.load_pallet(stau_tarball, pallet=["Region-lowMass", "Region-combined"], validate=False)
    assert [pallet.name for pallet in several] == ["Region-lowMass", "Region-combined"]
    with pytest.raises(PalletSelectionError, match="empty"):
        pyhf_dist.load_pallet(stau_tarball, pallet=[])


# ------------------------------------------------------------------------------ archives as authors pack them


def _reduced(patchset: dict, names: list[str]) -> dict:
    """The patchset with only ``names`` (its digests still name the published background)."""
    return {**patchset, "patches": [patch for patch in patchset["patches"] if patch["metadata"]["name"] in names]}


FEW = ["DS_100_1_Staus", "DS_200_80_Staus", "DS_320_120_Staus"]


def _authors_layout(stau_files) -> dict[str, bytes]:
    """Member name -> content of an archive packed on a Mac, nested regions, mixed layouts.

    ``record/Combined/Region-combined`` (``bkgonly.json`` + patchset), ``record/SR/Region-lowMass``
    (``BkgOnly.json`` + patchset), ``record/SR/Region-highMass`` (``BkgOnly.json`` + one
    ``patch.<name>.json`` per point, the older layout); a README, ``.DS_Store``, AppleDouble
    ``._*`` files beside everything (some ending in ``.json``), and a ``__MACOSX/`` tree.
    """
    combined, low, high = (stau_files[name] for name in ("Region-combined", "Region-lowMass", "Region-highMass"))
    members = {
        "./record/README.md": b"# Likelihoods of the stau search\nThree regions.\n",
        "./record/.DS_Store": bytes(range(256)) * 4,
        "./record/._.DS_Store": APPLE_DOUBLE,
        "./._record": APPLE_DOUBLE,
        "./record/Combined/Region-combined/bkgonly.json": combined[0],
        "./record/Combined/Region-combined/patchset.json": json.dumps(_reduced(combined[1], FEW)).encode(),
        "./record/Combined/Region-combined/._bkgonly.json": APPLE_DOUBLE,
        "record/SR/Region-lowMass/BkgOnly.json": low[0],
        "record/SR/Region-lowMass/patchset.json": json.dumps(_reduced(low[1], FEW)).encode(),
        "record/SR/Region-lowMass/._BkgOnly.json": APPLE_DOUBLE,
        "record/SR/Region-lowMass/._patchset.json": APPLE_DOUBLE,
        "__MACOSX/record/SR/Region-lowMass/._BkgOnly.json": APPLE_DOUBLE,
        "record/SR/Region-highMass/BkgOnly.json": high[0],
        "record/SR/Region-highMass/._BkgOnly.json": APPLE_DOUBLE,
        "record/SR/Region-highMass/README.txt": b"one jsonpatch per signal point\n",
    }
    for patch in high[1]["patches"]:
        if patch["metadata"]["name"] in FEW:
            name = patch["metadata"]["name"]
            members[f"record/SR/Region-highMass/patch.{name}.json"] = json.dumps(patch["patch"]).encode()
            members[f"record/SR/Region-highMass/._patch.{name}.json"] = APPLE_DOUBLE
    return members


def _write_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def _write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, content in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


NESTED = ["Combined/Region-combined", "SR/Region-highMass", "SR/Region-lowMass"]


@pytest.fixture(scope="module")
def authors_archive(stau_files, tmp_path_factory) -> Path:
    return _write_tarball(tmp_path_factory.mktemp("packed") / "record.tar.gz", _authors_layout(stau_files))


@pytest.mark.parametrize("form", ["tarball", "directory"])
def test_an_archive_as_authors_pack_it(form, stau_files, authors_archive, tmp_path):
    source = authors_archive if form == "tarball" else _write_tree(tmp_path / "download", _authors_layout(stau_files))
    assert pyhf_dist.pallet.pallet_names(source) == NESTED
    with pytest.raises(PalletSelectionError, match="holds 3 pallets: Combined/Region-combined, SR/Region-highMass"):
        pyhf_dist.load_pallet(source)
    pallets = {pallet.name: pallet for pallet in pyhf_dist.load_pallet(source, pallet="all", validate=False)}
    assert list(pallets) == NESTED
    for name, pallet in pallets.items():
        region = name.split("/")[1]
        background, patchset = stau_files[region]
        assert pallet.workspace == json.loads(background)
        published = {p["metadata"]["name"]: p for p in patchset["patches"]}
        assert sorted(pallet.names()) == sorted(FEW)
        for patch in pallet.patches:  # the patch files give the same operations and values
            assert patch.operations == published[patch.name]["patch"]
            assert list(patch.values) == [float(v) for v in published[patch.name]["metadata"]["values"]]
    assert pallets["SR/Region-lowMass"].labels == ["mst", "mn2"]
    assert pallets["SR/Region-highMass"].labels == ["value 1", "value 2"]  # patch files carry no labels
    # Names are paths below the shared folder; a pattern picks a region wherever it lies.
    assert [p.name for p in pyhf_dist.load_pallet(source, pallet="*/Region-lowMass", validate=False)] == [
        "SR/Region-lowMass"]


def _patch_files_layout(stau_files) -> dict[str, bytes]:
    """Every region in the older layout, as the sbottom multi-b record has it: ``RegionA/``,
    ``RegionB/``, ``RegionC/`` each with a ``BkgOnly.json`` and one ``patch_<name>.json`` per point."""
    members = {"likelihoods/README": b"three regions, one jsonpatch file per point\n"}
    for folder, region in zip(("RegionA", "RegionB", "RegionC"), REGIONS):
        background, patchset = stau_files[region]
        members[f"likelihoods/{folder}/BkgOnly.json"] = background
        members[f"likelihoods/{folder}/._BkgOnly.json"] = APPLE_DOUBLE
        for patch in patchset["patches"]:
            if patch["metadata"]["name"] in FEW:
                name = patch["metadata"]["name"]
                members[f"likelihoods/{folder}/patch_{name}.json"] = json.dumps(patch["patch"]).encode()
    return members


def test_regions_each_with_one_file_per_patch(stau_scan, stau_files, tmp_path):
    source = _write_tarball(tmp_path / "sbottom-like.tar.gz", _patch_files_layout(stau_files))
    assert pyhf_dist.pallet.pallet_names(source) == ["RegionA", "RegionB", "RegionC"]
    result = pyhf_dist.map_fits(source, pallet="all", patches=["DS_200_80_Staus"], executor="sequential",
                                backend="jax", combine="best-expected")
    _, published, _, _ = stau_scan
    same = dict(zip(("RegionA", "RegionB", "RegionC"), REGIONS))
    assert [record.key for record in result] == [(folder, "DS_200_80_Staus") for folder in same] + [
        ("best-expected", "DS_200_80_Staus")]
    for record in result:  # values parsed from the file names; the fits those of the published pallets
        assert record.values == [200.0, 80.0]
        region = same[record.chosen_pallet if record.combined else record.pallet]
        reference = published[region, "DS_200_80_Staus"]
        assert record.ok and math.isclose(record.CLs_obs, reference.CLs_obs, rel_tol=1e-9, abs_tol=1e-12)


def test_a_lone_pallet_in_folders_is_unnamed(stau_files, tmp_path):
    background, patchset = stau_files["Region-lowMass"]
    source = _write_tarball(tmp_path / "one.tar.gz", {
        "./1911.06660/README.md": b"readme",
        "./1911.06660/._.DS_Store": APPLE_DOUBLE,
        "./1911.06660/Region-lowMass/BkgOnly.json": background,
        "./1911.06660/Region-lowMass/._BkgOnly.json": APPLE_DOUBLE,
        "./1911.06660/Region-lowMass/patchset.json": json.dumps(_reduced(patchset, FEW)).encode(),
    })
    pallet = pyhf_dist.load_pallet(source, validate=False)
    assert pallet.name is None and len(pallet) == 3
    # Its folder's name chooses it as well.
    assert pyhf_dist.load_pallet(source, pallet="Region-lowMass", validate=False).name is None


def test_only_appledouble_files_are_no_pallet(tmp_path):
    _write_tree(tmp_path / "mac", {"record/._BkgOnly.json": APPLE_DOUBLE, "__MACOSX/record/BkgOnly.json": b"{}",
                                   "record/.hidden/BkgOnly.json": b"{}"})
    code, _, err = _run_cli("fit", str(tmp_path / "mac"), "-q", "-o", str(tmp_path / "r.json"))
    assert code == 2 and "holds no BkgOnly.json" in _one_error_line(err)


# ------------------------------------------------------------------------------ every stau patch, one scan


@pytest.fixture(scope="module")
def stau_scan(stau_tarball, tmp_path_factory):
    """``pyhf-dist fit <stau> --pallet all --combine best-expected`` on 2 local workers, jax backend."""
    pytest.importorskip("jax")
    output = tmp_path_factory.mktemp("stau") / "results.json"
    code, out, err = _run_cli("fit", str(stau_tarball), "--pallet", "all", "--combine", "best-expected",
                              "--backend", "jax", "--executor", "local", "--workers", "2", "-q", "-o", str(output))
    assert code == 0, err
    return output, ScanResult.from_json(output), out, err


def test_all_171_stau_patches_each_with_its_pallet(stau_scan, stau_pallets):
    output, result, out, err = stau_scan
    fits = [record for record in result if not record.combined]
    assert len(fits) == 171 and all(record.ok for record in fits)
    for name in REGIONS:
        records = [record for record in fits if record.pallet == name]
        assert sorted(record.name for record in records) == sorted(stau_pallets[name].names())
    assert result.pallets() == REGIONS + ["best-expected"]
    assert result.metadata["pallets"] == {name: 57 for name in REGIONS}
    assert result.metadata["combine"] == "best-expected" and result.metadata["patches"] == 171
    assert {row["pallet"] for row in json.loads(output.read_text())["results"]} == set(REGIONS) | {"best-expected"}
    # The command said what it fitted, and its summary counts per pallet.
    assert "Fitting 171 patches of 3 pallets (Region-combined 57, Region-highMass 57, Region-lowMass 57)" in err
    assert "patches                     171" in out
    for name in REGIONS:
        assert f"  {name:<26}57 patches: 57 ok, 0 failed, " in out
    assert "  best-expected             57 points: 57 ok, 0 failed" in out


def test_a_sample_of_each_pallet_matches_serial_pyhf(stau_scan, stau_pallets):
    _, result, _, _ = stau_scan
    for name, patch in SAMPLE.items():
        reference = serial_pyhf(stau_pallets[name], [patch])
        assert_matches_reference([result[name, patch]], reference, tolerance=1e-4)
    # The same patch name in each pallet is a different fit.
    observed = {name: result[name, "DS_200_80_Staus"].CLs_obs for name in REGIONS}
    assert len({round(value, 6) for value in observed.values()}) == 3, observed


def test_best_expected_against_a_hand_computation(stau_scan):
    _, result, _, _ = stau_scan
    by_point: dict = {}
    for record in result:
        if not record.combined:
            by_point.setdefault(tuple(record.values), {})[record.pallet] = record
    combined = {tuple(record.values): record for record in result.for_pallet("best-expected")}
    assert len(combined) == len(by_point) == 57
    chosen = []
    for point, records in by_point.items():
        assert set(records) == set(REGIONS)
        medians = {name: records[name].CLs_exp[2] for name in REGIONS}
        best = min(REGIONS, key=lambda name: medians[name])
        record = combined[point]
        assert record.pallet == "best-expected" and record.chosen_pallet == best and record.ok
        assert record.CLs_obs == records[best].CLs_obs and record.CLs_exp == records[best].CLs_exp
        assert record.name == records[best].name
        chosen.append(best)
    # Neither region wins everywhere: this is a real choice on this pallet.
    assert set(chosen) == {"Region-combined", "Region-lowMass"}, set(chosen)
    # Made again from the per-pallet records of the file, the combination is the same.
    again = combine([record for record in result if not record.combined], "best-expected", REGIONS)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in result.for_pallet("best-expected")]


def test_records_by_pallet_and_name_in_json_and_csv(stau_scan, tmp_path):
    _, result, _, _ = stau_scan
    with pytest.raises(KeyError, match="is in several pallets"):
        result["DS_100_1_Staus"]
    assert ("Region-lowMass", "DS_100_1_Staus") in result and "DS_100_1_Staus" in result
    result.to_csv(tmp_path / "r.csv")
    back = ScanResult.from_csv(tmp_path / "r.csv")
    assert [record.key for record in back] == [record.key for record in result]
    for record in back:
        original = result[record.key]
        assert record.chosen_pallet == original.chosen_pallet
        assert math.isclose(record.CLs_obs, original.CLs_obs, rel_tol=1e-12)


def test_plot_one_pallet(stau_scan, tmp_path):
    pytest.importorskip("matplotlib")
    from pyhf_dist import plotting

    output, result, _, _ = stau_scan
    with pytest.raises(PalletSelectionError) as error:
        plotting.plot_exclusion(output, tmp_path / "x.png")
    assert "\n" not in str(error.value)
    assert ("the results hold 3 pallets (Region-combined, Region-highMass, Region-lowMass) and their combination "
            "best-expected; choose one") in str(error.value)
    code, _, err = _run_cli("plot", str(output), "-o", str(tmp_path / "x.png"))
    assert code == 2 and "choose one to draw with --pallet NAME" in _one_error_line(err)
    assert not (tmp_path / "x.png").exists()

    figure = plotting.plot_exclusion(output, tmp_path / "low.png", pallet="Region-lowMass", style=None)
    assert (tmp_path / "low.png").stat().st_size > 0
    points = plotting.exclusion_points(plotting.choose_pallet(result, "Region-lowMass"))
    low = {tuple(r.values): r.CLs_obs for r in result.for_pallet("Region-lowMass")}
    assert len(points["x"]) == 57
    assert all(low[(x, y)] == value for x, y, value in zip(points["x"], points["y"], points["observed"]))
    assert figure.exclusion_contours["observed"] is not None
    code, out, _ = _run_cli("plot", str(output), "--pallet", "best-expected", "-o", str(tmp_path / "best.png"))
    assert code == 0 and (tmp_path / "best.png").exists()
    # Results without the combination: it is made for the plot from the pallets' records.
    fits = ScanResult([record for record in result if not record.combined], result.metadata)
    assert [r.to_dict() for r in fits.for_pallet("best-expected")] == [
        r.to_dict() for r in result.for_pallet("best-expected")]
    with pytest.raises(PalletSelectionError, match="no pallet 'Region-lowmass': did you mean Region-lowMass"):
        plotting.plot_exclusion(output, pallet="Region-lowmass")


def test_an_authors_archive_gives_the_published_numbers(stau_scan, authors_archive):
    """Nested folders, ``._*`` files and the patch-file layout change nothing in the fits."""
    _, published, _, _ = stau_scan
    result = pyhf_dist.map_fits(authors_archive, pallet="all", patches=["DS_200_80_Staus"], executor="sequential",
                                backend="jax", combine="best-expected")
    assert [record.key for record in result] == [(name, "DS_200_80_Staus") for name in NESTED + ["best-expected"]]
    for record in result:
        region = (record.chosen_pallet or record.pallet).split("/")[-1]
        reference = published[region if not record.combined else "best-expected", "DS_200_80_Staus"]
        assert record.ok and math.isclose(record.CLs_obs, reference.CLs_obs, rel_tol=1e-9, abs_tol=1e-12)
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(record.CLs_exp, reference.CLs_exp))


# ------------------------------------------------------------------------------ resume


def test_resume_of_a_scan_of_several_pallets(stau_tarball, tmp_path):
    pytest.importorskip("jax")
    journal = tmp_path / "scan.journal.jsonl"
    options = dict(pallet=["Region-lowMass", "Region-highMass"], patches=["DS_100_1_Staus", "DS_120_1_Staus"],
                   executor="sequential", backend="jax", journal=journal)
    first = pyhf_dist.map_fits(stau_tarball, **options)
    assert [record.key for record in first] == [
        ("Region-lowMass", "DS_100_1_Staus"), ("Region-lowMass", "DS_120_1_Staus"),
        ("Region-highMass", "DS_100_1_Staus"), ("Region-highMass", "DS_120_1_Staus")]
    # As if the scan had stopped: one patch done in each pallet, each under a name that is missing
    # in the other, and a failure recorded for one.
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    kept = [entry for entry in lines if (entry["record"]["pallet"], entry["record"]["name"]) in {
        ("Region-lowMass", "DS_100_1_Staus"), ("Region-highMass", "DS_120_1_Staus")}]
    failed = {"key": lines[0]["key"], "record": {"name": "DS_100_1_Staus", "pallet": "Region-highMass",
                                                 "status": "failed", "error": "worker lost"}}
    journal.write_text("".join(json.dumps(entry) + "\n" for entry in kept + [failed]))

    resumed = pyhf_dist.map_fits(stau_tarball, resume=True, **options)
    assert resumed.metadata["resumed"] == 2
    assert [record.key for record in resumed] == [record.key for record in first]
    for record in resumed:
        before = first[record.key]
        assert record.ok and math.isclose(record.CLs_obs, before.CLs_obs, rel_tol=1e-9, abs_tol=1e-12)
        skipped = record.key in {("Region-lowMass", "DS_100_1_Staus"), ("Region-highMass", "DS_120_1_Staus")}
        assert (record.started == before.started) == skipped, record.key
    # Another choice of pallets is another scan: its journal is not mixed in.
    with pytest.raises(JournalError, match="pallet choice"):
        pyhf_dist.map_fits(stau_tarball, resume=True, **{**options, "pallet": "Region-lowMass"})


# ------------------------------------------------------------------------------ the Globus Compute function


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_the_endpoint_function_reads_a_context_of_several_pallets(backend, stau_pallets):
    """The self-contained remote function, on plain pyhf (numpy) and on the fast path (jax)."""
    import sys

    if backend == "jax":
        pytest.importorskip("jax")
    from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit
    from pyhf_dist.protocol import encode
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext

    pallets = {"Region-combined": "DS_200_80_Staus", "Region-lowMass": "DS_120_40_Staus"}
    # Plain pyhf takes seconds per stau fit: one pallet's suffices there (the other pallet's
    # workspace would give other numbers).
    chosen = pallets if backend == "jax" else {"Region-lowMass": pallets["Region-lowMass"]}
    context = WorkerContext.build_pallets({name: stau_pallets[name].workspace for name in pallets},
                                          FitSettings(backend=backend).to_dict())
    text = encode(context.payload.decode())
    sys.modules.pop("_pyhf_dist_remote_cache", None)
    try:
        for name, patch in chosen.items():
            operations = next(p.operations for p in stau_pallets[name].patches if p.name == patch)
            task = {"name": patch, "patch": operations, "context": context.key, "pallet": name,
                    "chunk": None, "timeout": None}
            record = pyhf_dist_fit(text, encode(task))
            tolerance = 1e-6 if backend == "numpy" else 1e-4
            assert_matches_reference([record], serial_pyhf(stau_pallets[name], [patch]), tolerance=tolerance)
        state = sys.modules["_pyhf_dist_remote_cache"].states[context.key]
        assert (state["prepared"] is not None) == (backend == "jax")
        wrong = pyhf_dist_fit(text, encode({**task, "pallet": "Region-highMass"}))
        assert wrong["status"] == "failed" and "no pallet 'Region-highMass'" in wrong["error"]
    finally:
        sys.modules.pop("_pyhf_dist_remote_cache", None)


# ------------------------------------------------------------------------------ rules and small cases


def _record(pallet, x, median, observed=0.1, status="ok", name=None) -> FitRecord:
    band = None if median is None else [median / 4, median / 2, median, median * 2, median * 4]
    return FitRecord(name or f"P_{x}", [x, 1], status=status, CLs_obs=observed if status == "ok" else None,
                     CLs_exp=band if status == "ok" else None, pallet=pallet,
                     error=None if status == "ok" else "fit failed")


def test_best_expected_rules():
    records = [
        _record("A", 100, 0.2, 0.3), _record("B", 100, 0.1, 0.05),  # B has the better expected CLs
        _record("A", 200, 0.1), _record("B", 200, 0.1, 0.9),  # a tie goes to the first pallet
        _record("A", 300, 0.3, 0.4),  # missing from B: chosen among the pallets that have it
        _record("A", 400, 0.1), _record("B", 400, None, status="failed"),  # failed in B: no choice
        _record("A", 500, float("nan")), _record("B", 500, 0.4, 0.5),  # undefined median: passed over
        _record("A", 600, float("nan")), _record("B", 600, None, 0.5),  # nothing to compare
    ]
    combined = {record.values[0]: record for record in combine(records, "best-expected", ["A", "B"])}
    assert [(x, r.chosen_pallet, r.CLs_obs) for x, r in combined.items() if r.ok] == [
        (100, "B", 0.05), (200, "A", 0.1), (300, "A", 0.4), (500, "B", 0.5)]
    assert combined[400].status == "failed" and "B failed: fit failed" in combined[400].error
    assert combined[600].status == "failed" and "no pallet has a defined median expected CLs" in combined[600].error
    assert all(record.pallet == "best-expected" for record in combined.values())
    # Upper limits: the smallest median expected mu_up.
    limits = [FitRecord("P", [1, 1], mu_up_obs=obs, mu_up_exp=[m] * 5, pallet=p)
              for p, obs, m in (("A", 0.9, 1.2), ("B", 1.4, 0.8))]
    assert combine(limits, "best-expected")[0].chosen_pallet == "B"


def test_pallet_objects_fitted_together():
    """In Python, a list of named :class:`Pallet` objects is a scan of several pallets too."""
    import dataclasses

    demo = pyhf_dist.demo_pallet(points=3)
    first, second = (dataclasses.replace(demo, name=name) for name in ("A", "B"))
    result = pyhf_dist.map_fits([first, second], executor="sequential", backend="numpy", combine="best-expected")
    assert [record.key for record in result] == [(p, n) for p in ("A", "B", "best-expected") for n in demo.names()]
    for name in demo.names():  # the same workspace twice: equal CLs, and a tie goes to the first
        assert result["A", name].CLs_obs == result["B", name].CLs_obs
        assert result["best-expected", name].chosen_pallet == "A"
    assert [record.pallet for record in pyhf_dist.map_fits([first, second], pallet="B", executor="sequential",
                                                           backend="numpy", patches=demo.names()[:1])] == ["B"]
    with pytest.raises(InputError, match="distinct names"):
        pyhf_dist.map_fits([demo, demo], executor="sequential")


def test_a_single_pallet_scan_is_as_it_was(tmp_path):
    from pyhf_dist.protocol import WorkerContext

    pallet = pyhf_dist.demo_pallet(points=2)
    result = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy")
    assert [record.pallet for record in result] == [None, None] and result.pallets() == []
    assert result.metadata["pallets"] is None and result.metadata["combine"] is None
    assert "pallets" not in result.summary()
    assert json.loads(WorkerContext.build(pallet.workspace, {}).payload).keys() == {"workspace", "settings"}
    result.to_csv(tmp_path / "r.csv")
    assert ScanResult.from_csv(tmp_path / "r.csv")[0].pallet is None
    with pytest.raises(InputError, match="needs at least two"):
        pyhf_dist.map_fits(pallet, executor="sequential", combine="best-expected")
    with pytest.raises(InputError, match="unknown combination 'best'"):
        pyhf_dist.map_fits(pallet, executor="sequential", combine="best")
    with pytest.raises(PalletSelectionError, match="no pallet names"):
        result.for_pallet("Region-combined")


def test_pallet_choice_with_a_separate_patchset_is_refused(tmp_path, erjr_dir):
    code, _, err = _run_cli("fit", str(erjr_dir / "BkgOnly.json"), "--patchset", str(erjr_dir), "--pallet", "x",
                            "-q", "-o", str(tmp_path / "r.json"))
    assert code == 2 and "drop the pallet choice" in _one_error_line(err)


# ------------------------------------------------------------------------------- patches as a list


def test_patches_given_as_a_list_of_files_pyhf_patches_or_entries(erjr_dir):
    """The older layout's patch files handed over one by one, as pyhf ``Patch`` objects or as
    patchset entries: the same patches, names and numbers as the pallet's directory gives."""
    import pyhf

    names = ["ERJR_100p0_20p0", "ERJR_350p0_200p0"]
    files = [erjr_dir / f"patch.{name}.json" for name in names]
    entries = [{"metadata": {"name": name, "values": [float(v) for v in pyhf_dist.specs.values_from_name(name)]},
                "patch": json.loads(path.read_text())} for name, path in zip(names, files)]
    background = json.loads((erjr_dir / "BkgOnly.json").read_text())
    expected = pyhf_dist.map_fits(erjr_dir, patches=names, executor="sequential")
    forms = {
        "paths": (erjr_dir / "BkgOnly.json", files),
        "names": (str(erjr_dir / "BkgOnly.json"), [str(path) for path in files]),
        "pyhf patches": (pyhf.Workspace(background), [pyhf.patchset.Patch(entry) for entry in entries]),
        "entries": (background, entries),
    }
    for form, (workspace, patches) in forms.items():
        found = pyhf_dist.map_fits(workspace, patches, executor="sequential")
        assert found.names() == names, form
        for record, reference in zip(found, expected):
            assert record.status == "ok" and record.converged, (form, record)
            assert tuple(record.values) == tuple(reference.values), form
            assert record.CLs_obs == pytest.approx(reference.CLs_obs, abs=1e-9), form
            assert record.CLs_exp == pytest.approx(reference.CLs_exp, abs=1e-9), form


@pytest.mark.parametrize("workspace, patches, message", [
    (None, [[{"op": "add", "path": "/channels/0", "value": {}}]], "item 0 of the list of patches is a jsonpatch without a name"),
    (None, ["patch.ERJR_100p0_20p0.json", "patch.ERJR_100p0_20p0.json"], "two patches in the list are named 'ERJR_100p0_20p0'"),
    (None, [], "the list of patches is empty"),
    (None, 5, "cannot read patches from int 5"),
    (None, ["patch.ERJR_100p0_20p0.json", 5], "item 1 of the list of patches is int 5"),
    (5, "patch.ERJR_100p0_20p0.json", "cannot read a workspace from int 5"),
])
def test_patches_or_a_workspace_of_the_wrong_kind_are_refused_in_one_line(erjr_dir, workspace, patches, message):
    from pyhf_dist.exceptions import WorkspaceError

    def located(item):
        return str(erjr_dir / item) if isinstance(item, str) else item

    workspace = erjr_dir / "BkgOnly.json" if workspace is None else workspace
    patches = [located(item) for item in patches] if isinstance(patches, list) else located(patches)
    with pytest.raises(WorkspaceError) as refused:
        pyhf_dist.map_fits(workspace, patches, executor="sequential")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


# ------------------------------------------------------------------------------ downloads

@pytest.fixture
def web(tmp_path, erjr_dir, lbb_tarball):
    """A real HTTP server on this machine serving pallet archives, standing in for HEPData, which
    tests cannot reach: the 1Lbb archive as HEPData serves it, a .zip of 3L-eRJR, and a page."""
    import functools
    import http.server
    import threading
    import zipfile

    root = tmp_path / "web"
    root.mkdir()
    (root / "1Lbb.tar.gz").write_bytes(lbb_tarball.read_bytes())
    with zipfile.ZipFile(root / "3L.zip", "w") as packed:
        for path in sorted(erjr_dir.iterdir()):
            packed.write(path, f"3L-eRJR/{path.name}")
    (root / "page.html").write_text("<html>a landing page, not an archive</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_downloaded_pallet_is_the_archives_and_leaves_nothing_behind(web, erjr_dir, lbb_tarball, tmp_path,
                                                                      monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    local = pyhf_dist.load_pallet(lbb_tarball)
    fetched = pyhf_dist.load_pallet(f"{web}/1Lbb.tar.gz", force_download=True)
    assert fetched.workspace == local.workspace and len(fetched.patches) == 125
    assert [p.operations for p in fetched.patches] == [p.operations for p in local.patches]
    zipped = pyhf_dist.load_pallet(f"{web}/3L.zip", force_download=True)
    assert sorted(p.name for p in zipped.patches) == sorted(p.name for p in pyhf_dist.load_pallet(erjr_dir).patches)
    assert pallet_names(f"{web}/3L.zip", force_download=True) == ["3L-eRJR"]
    assert list((tmp_path / "temporary").iterdir()) == [], "the download is removed once read"


def test_a_download_that_fails_says_why_in_one_line(web, tmp_path, monkeypatch):
    import socket

    from pyhf_dist import download
    from pyhf_dist.exceptions import DownloadError, PalletError

    cases = [
        (f"{web}/nothing.tar.gz", True, PalletError, "answers HTTP 404 File not found: check the DOI or URL"),
        (f"{web}/page.html", True, PalletError, "is not a readable tar archive"),
        (f"{web}/1Lbb.tar.gz", False, PalletError, "127.0.0.1 is not HEPData's (www.hepdata.net, doi.org): download "
                                                   "the archive and give its path"),
    ]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
    cases.append((f"http://127.0.0.1:{closed.getsockname()[1]}/1Lbb.tar.gz", True, DownloadError,
                  "127.0.0.1 cannot be reached: check the network (or its proxy), or download the pallet's .tar.gz"))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel accepts the connection; nothing ever answers
    cases.append((f"http://127.0.0.1:{silent.getsockname()[1]}/1Lbb.tar.gz", True, DownloadError,
                   "127.0.0.1 did not answer in time"))
    monkeypatch.setattr(download, "TIMEOUT", (2.0, 2.0))
    try:
        for url, force, kind, message in cases:
            with pytest.raises(kind) as caught:
                pyhf_dist.load_pallet(url, force_download=force)
            assert message in str(caught.value) and "\n" not in str(caught.value), (url, str(caught.value))
    finally:
        closed.close()
        silent.close()
    # On the command line: the network's fault is exit 1, the source's exit 2.
    code, _, stderr = _run_cli("fit", f"{web}/1Lbb.tar.gz", "-o", str(tmp_path / "r.json"))
    assert code == 2 and "is not HEPData's" in _one_error_line(stderr)
