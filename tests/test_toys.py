"""Toys split over workers: the merged result is serial pyhf's ToyCalculator, bit for bit.

The reference is plain pyhf: ``numpy.random.seed(seed)`` then ``ToyCalculator.distributions``
(samples) and ``pyhf.infer.hypotest(..., calctype="toybased")`` (CLs). Most tests use a two-bin
model whose fits take milliseconds; one runs a demo-pallet patch on worker processes.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import pyhf_dist
from pyhf_dist.runtime import calculations
from pyhf_dist.runtime import reference
from pyhf_dist import chunks as chunk_plan
from pyhf_dist.runtime import toys
from pyhf_dist import kept_toys
from pyhf_dist.exceptions import SettingsError
from pyhf_dist.settings import FitSettings
from pyhf_dist.protocol import WorkerContext
from pyhf_dist.runtime import initialize

from helpers import serial_pyhf_toys, tiny_pallet

SEED = 20211


def model_and_data(pallet, patch, settings):
    state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
    return state, *reference.build_model(state, patch.operations)


def run_split(state, patch, settings, chunks: int) -> dict:
    """Every chunk of a ``chunks``-way split through the worker's compute, then the merge."""
    records = []
    for chunk in toys.split(settings.ntoys, chunks):
        record = {"name": patch.name, "status": "ok", "error": None, "chunk": chunk,
                  "fit_seconds": 1.0, "started": 10.0 + chunk["index"], "finished": 20.0 + chunk["index"]}
        record.update(calculations.compute(state, {"patch": patch.operations, "chunk": chunk}))
        records.append(record)
    # Chunks come back in any order.
    return chunk_plan.merge_chunks(records[::-1], settings)


# ------------------------------------------------------------------------------------- splitting


@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=64))
@hypothesis_settings(max_examples=200, deadline=None)
def test_split_is_a_contiguous_cover(ntoys, chunks):
    entries = toys.split(ntoys, chunks)
    assert entries[0]["start"] == 0 and entries[-1]["stop"] == ntoys
    assert all(a["stop"] == b["start"] for a, b in zip(entries, entries[1:]))
    sizes = [e["stop"] - e["start"] for e in entries]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert all(e["of"] == len(entries) and e["ntoys"] == ntoys for e in entries)


@given(st.integers(min_value=1, max_value=100000), st.integers(min_value=1, max_value=512))
@hypothesis_settings(max_examples=200, deadline=None)
def test_plan_uses_workers_without_tiny_chunks(ntoys, workers):
    entries = chunk_plan.plan(ntoys, workers)
    assert len(entries) <= workers
    if len(entries) > 1:
        assert min(e["stop"] - e["start"] for e in entries) >= chunk_plan.MIN_TOYS_PER_CHUNK
    if ntoys >= workers * chunk_plan.MIN_TOYS_PER_CHUNK:
        assert len(entries) == workers


def test_plan_chunks_only_splits_toy_hypotests():
    assert chunk_plan.plan_chunks(FitSettings(backend="numpy"), 8) == [None]
    assert chunk_plan.plan_chunks(FitSettings(backend="numpy", calculation="upper_limit"), 8) == [None]
    assert len(chunk_plan.plan_chunks(FitSettings(backend="numpy", calctype="toybased", ntoys=1000), 8)) == 8
    with pytest.raises(SettingsError, match="toy-based upper limits"):
        FitSettings(backend="numpy", calculation="upper_limit", calctype="toybased")


# ---------------------------------------------------------------------- equality with serial pyhf


@pytest.mark.parametrize("test_stat, poi_test", [("qtilde", 1.0), ("q", 1.0), ("q0", 0.0)])
def test_any_split_equals_serial_toycalculator(pyhf_percentile_fix, test_stat, poi_test):
    pallet = tiny_pallet()
    patch = pallet.patches[0]
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=40, seed=SEED, test_stat=test_stat,
                           poi_test=poi_test)
    state, model, data = model_and_data(pallet, patch, settings)
    reference = serial_pyhf_toys(model, data, settings)
    for chunks in (1, 2, 4):
        merged = run_split(state, patch, settings, chunks)
        assert merged["status"] == "ok", merged["error"]
        assert merged["toys"]["chunks"] == chunks
        # Bitwise: same draws, same fits, same order.
        assert np.array_equal(merged["toys"]["sb"], reference["sb"])
        assert np.array_equal(merged["toys"]["b"], reference["b"])
        assert merged["CLs_obs"] == reference["CLs_obs"]
        assert merged["CLs_exp"] == reference["CLs_exp"]


def test_cls_formulas_equal_pyhf_calculator(pyhf_percentile_fix):
    import pyhf

    pyhf.set_backend("numpy")
    generator = np.random.default_rng(3)
    sb, b = generator.chisquare(1, 301), generator.chisquare(1, 301) + 0.5
    b[::7] = sb[::7]  # ties, exercised by ">="
    calculator = pyhf.infer.calculators.ToyCalculator.__new__(pyhf.infer.calculators.ToyCalculator)
    sb_dist = pyhf.infer.calculators.EmpiricalDistribution(pyhf.tensorlib.astensor(sb))
    b_dist = pyhf.infer.calculators.EmpiricalDistribution(pyhf.tensorlib.astensor(b))
    for teststat in (0.0, 0.7, float(b[7]), 3.0):
        ours = toys.cls_from_distributions(teststat, sb, b)
        clsb, clb, cls = calculator.pvalues(teststat, sb_dist, b_dist)
        assert (ours["CLsb_obs"], ours["CLb_obs"], ours["CLs_obs"]) == (float(clsb), float(clb), float(cls))
        expected = calculator.expected_pvalues(sb_dist, b_dist)[2]
        assert ours["CLs_exp"] == [float(value) for value in expected]


@pytest.mark.parametrize("case", range(12))
def test_cls_from_sorted_samples_equals_pyhf_counting_each_value(case, pyhf_percentile_fix):
    """The band from sorted samples (N log N) is pyhf's count one value at a time (N^2), bit for
    bit: ties, zeros, infinite and NaN statistics, an observed value at a sample, q and q0."""
    import pyhf

    pyhf.set_backend("numpy")
    calculator = pyhf.infer.calculators.ToyCalculator.__new__(pyhf.infer.calculators.ToyCalculator)
    generator = np.random.default_rng(case)
    sb, b = generator.chisquare(1, generator.integers(1, 500)), generator.chisquare(1, generator.integers(1, 500)) + 0.1
    sb[: len(sb) // 3], b[: len(b) // 4] = 0.0, np.round(b[: len(b) // 4], 1)  # ties
    if case % 3 == 0:
        sb[-2:], b[-1:] = np.inf, np.inf
    if case % 4 == 0:
        sb[0], b[-1] = np.nan, np.nan
    if case == 5:
        b[:] = 0.0
    sb_dist = pyhf.infer.calculators.EmpiricalDistribution(pyhf.tensorlib.astensor(sb))
    b_dist = pyhf.infer.calculators.EmpiricalDistribution(pyhf.tensorlib.astensor(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        bands = np.asarray(calculator.expected_pvalues(sb_dist, b_dist))
        for teststat in (0.0, -0.0, float(b[0]), 1.7, np.inf):
            clsb, clb, cls = (float(value) for value in calculator.pvalues(teststat, sb_dist, b_dist))
            for test_stat, observed, band in (("q", cls, bands[2]), ("q0", clsb, bands[0])):
                ours = toys.cls_from_distributions(teststat, sb, b, test_stat)
                assert np.array_equal([ours["CLs_obs"], ours["CLsb_obs"], ours["CLb_obs"]], [observed, clsb, clb], equal_nan=True)
                assert np.array_equal(ours["CLs_exp"], band, equal_nan=True), (teststat, test_stat)


def test_map_fits_splits_over_1_2_4_workers_identically(monkeypatch, pyhf_percentile_fix):
    """Through the scan: the chunks really are separate tasks, and the answer never changes."""
    monkeypatch.setattr(chunk_plan, "MIN_TOYS_PER_CHUNK", 5)
    seen = []
    original = toys.run_chunk

    def spy(model, data, settings, chunk=None, key=None, report=None):
        seen.append(chunk)
        return original(model, data, settings, chunk, key, report)

    monkeypatch.setattr(toys, "run_chunk", spy)
    pallet = tiny_pallet()
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=40, seed=SEED)
    answers = {}
    for workers in (1, 2, 4):
        seen.clear()
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            result = pyhf_dist.map_fits(pallet, executor=pool, backend="numpy", calctype="toybased",
                                        ntoys=40, seed=SEED)
        assert result.counts()["failed"] == 0
        assert sorted((c["start"], c["of"]) for c in seen) == sorted(
            (c["start"], c["of"]) for _ in pallet.patches for c in toys.split(40, workers))
        answers[workers] = {r.name: (r.CLs_obs, r.CLs_exp) for r in result}
        assert result.metadata["settings"]["calctype"] == "toybased"
    assert answers[1] == answers[2] == answers[4]
    for patch in pallet.patches:
        _, model, data = model_and_data(pallet, patch, settings)
        reference = serial_pyhf_toys(model, data, settings, samples=False)
        assert answers[4][patch.name] == (reference["CLs_obs"], reference["CLs_exp"])


def test_demo_patch_on_worker_processes_equals_serial_pyhf(pyhf_percentile_fix):
    """A demo-pallet patch near its exclusion boundary, 50 toys in two chunks on two processes."""
    pallet = pyhf_dist.demo_pallet()
    patch = next(p for p in pallet.patches if p.name == "demo_700_150")
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=50, seed=SEED)
    result = pyhf_dist.map_fits(pallet, executor="local", workers=2, patches=[patch.name], backend="numpy",
                                calctype="toybased", ntoys=50, seed=SEED)
    record = result[patch.name]
    assert record.ok, record.error
    _, model, data = model_and_data(pallet, patch, settings)
    reference = serial_pyhf_toys(model, data, settings, samples=False)
    assert (record.CLs_obs, record.CLs_exp) == (reference["CLs_obs"], reference["CLs_exp"])
    assert record.fit_seconds > 0 and record.started <= record.finished


# ------------------------------------------------------------------------ seeds and random state


def test_seed_changes_toys_and_caller_random_state_is_kept():
    pallet = tiny_pallet()
    patch = pallet.patches[1]
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=30, seed=1)
    state, model, data = model_and_data(pallet, patch, settings)
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    first = run_split(state, patch, settings, 2)
    assert np.array_equal(np.random.get_state()[1], before)
    again = run_split(state, patch, settings, 3)
    assert first["toys"]["sb"] == again["toys"]["sb"]
    other = FitSettings(backend="numpy", calctype="toybased", ntoys=30, seed=2)
    state2, _, _ = model_and_data(pallet, patch, other)
    assert run_split(state2, patch, other, 2)["toys"]["sb"] != first["toys"]["sb"]


# ---------------------------------------------------------------------------------------- merge


def test_failed_chunk_fails_the_patch_with_its_reason():
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=100)
    chunks = toys.split(100, 3)
    records = [
        {"name": "p", "status": "ok", "error": None, "chunk": chunks[0], "fit_seconds": 2.0, "started": 5.0,
         "finished": 7.0, "worker": {"pid": 1}, "toys": {"start": 0, "stop": 34, "ntoys": 100, "teststat": 1.0,
                                                         "sb": [0.0] * 34, "b": [0.0] * 34}},
        {"name": "p", "status": "failed", "error": "timed out after 60 s", "chunk": chunks[1], "fit_seconds": 60.0,
         "started": 4.0, "finished": 64.0, "worker": {"pid": 2}},
        {"name": "p", "status": "failed", "error": "worker lost 3 times: BrokenProcessPool", "chunk": chunks[2]},
    ]
    merged = chunk_plan.merge_chunks(records, settings)
    assert merged["status"] == "failed"
    assert "2 of 3 toy chunks failed" in merged["error"]
    assert "chunk 2/3 (toys 34-66): timed out after 60 s" in merged["error"]
    assert "worker lost 3 times" in merged["error"]
    assert merged["fit_seconds"] == 62.0 and merged["started"] == 4.0 and merged["finished"] == 64.0
    assert merged["worker"] == {"pid": 1} and merged.get("CLs_obs") is None
    record = pyhf_dist.FitRecord.from_dict({**merged, "values": [1, 2]})
    assert not record.ok


def test_merge_refuses_incomplete_cover():
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=10)
    part = {"name": "p", "status": "ok", "error": None, "chunk": toys.split(10, 2)[0],
            "toys": {"start": 0, "stop": 5, "ntoys": 10, "teststat": 1.0, "sb": [1.0] * 5, "b": [1.0] * 5}}
    merged = chunk_plan.merge_chunks([part], settings)
    assert merged["status"] == "failed" and "5 of 10 toys" in merged["error"]


def test_toy_upper_limits_are_refused_before_fitting():
    with pytest.raises(SettingsError, match="toy-based upper limits"):
        pyhf_dist.map_fits(tiny_pallet(), executor="sequential", backend="numpy", calculation="upper_limit",
                           calctype="toybased", ntoys=10)


# ------------------------------------------------------------- large scans: blocks and resuming


@pytest.fixture
def small_blocks(monkeypatch):
    """Block-drawn toys from 20 toys on, in blocks of 10: a large scan's machinery at the size of a test."""
    monkeypatch.setattr(toys, "PYHF_STREAM_MAX", 20)
    monkeypatch.setattr(toys, "BLOCK", 10)


def test_block_streams_do_not_depend_on_chunks_or_workers(small_blocks):
    """Each block draws from its own stream of the seed: any split over any workers, one answer."""
    pallet = tiny_pallet()
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=35, seed=SEED)
    assert [(c["start"], c["stop"]) for c in chunk_plan.plan_chunks(settings, 2)] == [(0, 10), (10, 20), (20, 30), (30, 35)]
    # Four blocks on three workers: each block in three chunks, none left idle at the end.
    assert [(c["start"], c["stop"]) for c in chunk_plan.plan_chunks(settings, 3)][:4] == [(0, 4), (4, 7), (7, 10), (10, 14)]
    state, model, data = model_and_data(pallet, pallet.patches[0], settings)
    whole = toys.draw(model, data, settings, blocks=(0, 4))
    for start, stop in ((20, 30), (24, 27), (30, 35)):
        part = toys.chunk_samples(model, data, settings, {"index": 0, "of": 1, "start": start, "stop": stop, "ntoys": 35})
        assert np.array_equal(part["signal"], whole["signal"][start:stop])
        assert np.array_equal(part["background"], whole["background"][start:stop])
    other_seed = toys.draw(model, data, FitSettings(backend="numpy", calctype="toybased", ntoys=35, seed=SEED + 1),
                           blocks=(0, 4))
    assert not np.array_equal(other_seed["signal"], whole["signal"])
    answers = []
    for workers in (1, 3):
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            result = pyhf_dist.map_fits(pallet, executor=pool, patches=["tiny_200_0"], backend="numpy",
                                        calctype="toybased", ntoys=35, seed=SEED)
        record = result["tiny_200_0"]
        assert record.ok, record.error
        answers.append((record.CLs_obs, record.CLs_exp))
    assert answers[0] == answers[1]


def _fitted_chunks(monkeypatch) -> list[tuple]:
    """``(start, stop)`` of every chunk plain pyhf fits from now on (filled as they are fitted)."""
    fitted = []
    original = toys.run_chunk

    def spy(model, data, settings, chunk=None, key=None, report=None):
        fitted.append((chunk["start"], chunk["stop"]))
        return original(model, data, settings, chunk, key, report)

    monkeypatch.setattr(toys, "run_chunk", spy)
    return fitted


def test_a_scan_of_block_pieces_resumes_without_fitting_a_toy_twice(small_blocks, tmp_path, monkeypatch):
    """A journal of chunks that are pieces of blocks (a scan on three workers), resumed by a scan
    that plans whole blocks (one worker): only the toys missing are fitted, each once, and the CLs
    are those of the uninterrupted scan."""
    journal = tmp_path / "scan.journal.jsonl"
    options = dict(patches=["tiny_100_0"], backend="numpy", calctype="toybased", ntoys=40, seed=SEED)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        whole = pyhf_dist.map_fits(tiny_pallet(), executor=pool, journal=journal, **options)["tiny_100_0"]
    pieces = _journaled_chunks(journal)
    assert len(pieces) == 12 and all(stop - start < toys.BLOCK for start, stop in pieces)
    lines = journal.read_text().splitlines()
    kept = [line for line in lines if '"chunk"' in line][::2]  # every other piece survived a kill
    journal.write_text("\n".join(kept) + "\n")
    survived = _journaled_chunks(journal)
    fitted = _fitted_chunks(monkeypatch)
    resumed = pyhf_dist.map_fits(tiny_pallet(), executor="sequential", journal=journal, resume=True,
                                 **options)["tiny_100_0"]
    covered = sorted(survived + fitted)
    assert [start for start, _ in covered] == [0] + [stop for _, stop in covered[:-1]] and covered[-1][1] == 40
    assert all(start // toys.BLOCK == (stop - 1) // toys.BLOCK for start, stop in fitted)  # none spans two blocks
    assert resumed.ok and (resumed.CLs_obs, resumed.CLs_exp) == (whole.CLs_obs, whole.CLs_exp)


_KILLED_SCAN = """
import sys
sys.path.insert(0, {tests!r})
import pyhf_dist
from pyhf_dist.runtime import toys
from helpers import tiny_pallet
toys.PYHF_STREAM_MAX, toys.BLOCK = 20, 10
pyhf_dist.map_fits(tiny_pallet(), executor="sequential", patches=["tiny_100_0"], backend="numpy",
                   calctype="toybased", ntoys=80, seed={seed}, journal={journal!r})
"""


def _journaled_chunks(journal) -> list[tuple]:
    """``(start, stop)`` of the toy chunks in a journal (a last line cut short is skipped)."""
    import json

    found = []
    for line in journal.read_text().splitlines() if journal.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "chunk" in entry:
            part = entry["chunk"]["record"]["toys"]
            found.append((part["start"], part["stop"]))
    return sorted(found)


def test_toy_scan_killed_mid_way_resumes_to_identical_cls(small_blocks, tmp_path, monkeypatch):
    """SIGKILL while chunks are being journaled; the resumed scan fits only the missing chunks and
    gives exactly the CLs of a scan never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    journal = tmp_path / "scan.journal.jsonl"
    code = _KILLED_SCAN.format(tests=os.path.dirname(__file__), seed=SEED, journal=str(journal))
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if len(_journaled_chunks(journal)) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the scan ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    options = dict(executor="sequential", patches=["tiny_100_0"], backend="numpy", calctype="toybased", ntoys=80, seed=SEED)
    journaled = _journaled_chunks(journal)
    assert 3 <= len(journaled) < 8  # killed mid-way, with chunks kept

    fitted = _fitted_chunks(monkeypatch)
    resumed = pyhf_dist.map_fits(tiny_pallet(), journal=journal, resume=True, **options)["tiny_100_0"]
    assert resumed.ok, resumed.error
    assert not set(fitted) & set(journaled), "a journaled chunk was fitted again"
    assert sorted(fitted + journaled) == [(start, start + 10) for start in range(0, 80, 10)]
    fitted.clear()
    uninterrupted = pyhf_dist.map_fits(tiny_pallet(), **options)["tiny_100_0"]
    assert len(fitted) == 8
    assert (resumed.CLs_obs, resumed.CLs_exp) == (uninterrupted.CLs_obs, uninterrupted.CLs_exp)
    assert resumed.toy_summary == uninterrupted.toy_summary


def test_kept_toys_of_two_seeds_merge_to_their_union(tmp_path, pyhf_percentile_fix):
    """--keep-toys files of runs with different seeds merge into the toys of both, bit for bit; CLs
    of the merged file are those of the union; a seed merged twice is kept once; bad files are refused."""
    from pyhf_dist.exceptions import InputError

    pallet = tiny_pallet()
    options = dict(executor="sequential", patches=["tiny_200_0"], backend="numpy", calctype="toybased", ntoys=30)
    runs = {}
    for seed in (1, 2):
        path = tmp_path / f"seed{seed}.npz"
        record = pyhf_dist.map_fits(pallet, seed=seed, keep_toys=path, **options)["tiny_200_0"]
        _, parts, arrays = kept_toys.read_kept(path)
        assert parts == [{"pallet": None, "name": "tiny_200_0", "seed": seed, "ntoys": 30}]
        assert kept_toys.cls_from_kept(path)["tiny_200_0"]["CLs_obs"] == record.CLs_obs
        runs[seed] = arrays[0]
    merged = tmp_path / "merged.npz"
    result = kept_toys.merge_kept([tmp_path / "seed2.npz", tmp_path / "seed1.npz", tmp_path / "seed1.npz"], merged)
    _, parts, arrays = kept_toys.read_kept(merged)
    assert sorted(part["seed"] for part in parts) == [1, 2]
    for part, kept in zip(parts, arrays):
        assert np.array_equal(kept["sb"], runs[part["seed"]]["sb"]) and np.array_equal(kept["b"], runs[part["seed"]]["b"])
    union = toys.cls_from_distributions(runs[1]["teststat"], np.concatenate([runs[1]["sb"], runs[2]["sb"]]),
                                        np.concatenate([runs[1]["b"], runs[2]["b"]]))
    assert (result["tiny_200_0"]["CLs_obs"], result["tiny_200_0"]["CLs_exp"]) == (union["CLs_obs"], union["CLs_exp"])
    assert result["tiny_200_0"]["ntoys"] == 60 and result["tiny_200_0"]["seeds"] == [1, 2]
    other = tmp_path / "q.npz"
    pyhf_dist.map_fits(pallet, seed=1, keep_toys=other, test_stat="q", **options)
    with pytest.raises(InputError, match=r"other settings than .* \(test_stat\)"):
        kept_toys.merge_kept([tmp_path / "seed1.npz", other], tmp_path / "bad.npz")
    # The same patch name over another observed count: toys of another model, refused.
    excess = tiny_pallet()
    excess.workspace["observations"][0]["data"] = [71.0, 48.0]
    pyhf_dist.map_fits(excess, seed=3, keep_toys=tmp_path / "excess.npz", **options)
    with pytest.raises(InputError, match=r"the observed test statistic of tiny_200_0 is .* these are toys of another "
                                         r"model \(workspace, patch or observed data\) and cannot be merged"):
        kept_toys.merge_kept([tmp_path / "seed1.npz", tmp_path / "excess.npz"], tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a file of toys")
    with pytest.raises(InputError, match="not a file of kept toys"):
        kept_toys.read_kept(tmp_path / "junk.npz")
    with pytest.raises(SettingsError, match="needs toy-based"):
        pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", keep_toys=tmp_path / "x.npz")


def test_toy_progress_counts_toys_per_hypothesis_from_a_resumed_journal(small_blocks, tmp_path, capsys):
    """A toy scan's bar counts toys per hypothesis (its rate and time left come from them), starts
    from the toys a resumed scan's journal holds, and counts the fits beside them."""
    import re

    journal = tmp_path / "scan.journal.jsonl"
    options = dict(executor="sequential", patches=["tiny_100_0"], backend="numpy", calctype="toybased", ntoys=80, seed=SEED)
    pyhf_dist.map_fits(tiny_pallet(), journal=journal, progress=False, **options)
    lines = journal.read_text().splitlines()
    assert ['"chunk"' in line for line in lines] == [True] * 8 + [False]
    journal.write_text("\n".join(lines[:3]) + "\n")  # killed after three of the eight blocks
    capsys.readouterr()
    resumed = pyhf_dist.map_fits(tiny_pallet(), journal=journal, resume=True, progress=True, **options)
    assert resumed["tiny_100_0"].ok
    frames = [frame for frame in re.split(r"[\r\n]", capsys.readouterr().err) if "toys per hypothesis" in frame]
    assert frames, "no progress bar drawn"
    assert "30/80 toys per hypothesis" in frames[0] and "0/1 fits, 0 failed" in frames[0]
    assert "80/80 toys per hypothesis" in frames[-1] and "1/1 fits, 0 failed" in frames[-1]
    rate = float(re.search(r"([\d,.]+) toys/s", frames[-1]).group(1).replace(",", ""))
    assert rate > 0


def test_progress_of_a_scan_without_toys_counts_fits_and_failures():
    import io
    import types

    stream = io.StringIO()
    from pyhf_dist.progress import ProgressBar

    bar = ProgressBar(total=3, stream=stream)
    for ok in (True, False, True):
        bar.update(types.SimpleNamespace(ok=ok))
    bar.close()
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "1 failed" in last and "toys" not in last


def test_running_chunks_move_the_toy_count_before_they_finish(erjr_dir, tmp_path, monkeypatch):
    """Workers report how far they are through a chunk: the count of toys grows while the chunks
    run, never shrinks and ends at the scan's toys; the scan's progress folder is gone afterwards."""
    import tempfile
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    began = time.monotonic()
    counts, chunks_at = [], []
    reported = pyhf_dist.map_fits(erjr_dir, patches=["ERJR_350p0_200p0"], calctype="toybased", ntoys=2000, seed=SEED,
                                  executor="local", workers=2,
                                  on_toy_progress=lambda count: counts.append((time.monotonic() - began, count)),
                                  on_chunk=lambda outcome: chunks_at.append(time.monotonic() - began))
    assert len(chunks_at) == 2  # the 2,000 toys in two chunks, one per worker
    before_any_chunk = [count for at, count in counts if at < min(chunks_at)]
    assert before_any_chunk and 0 < max(before_any_chunk) < 2000, counts
    values = [count for _, count in counts]
    assert values == sorted(values) and values[-1] == 2000
    assert not list(tmp_path.glob("pyhf-dist-toys-*"))
    assert reported[0].ok and reported[0].ntoys == 2000


def test_plain_pyhf_toys_report_each_toy():
    """The plain-pyhf path reports after every toy: signal-plus-background toys, then background-only."""
    pallet = tiny_pallet()
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=6, seed=SEED)
    _, model, data = model_and_data(pallet, pallet.patches[0], settings)
    fractions = []
    toys.run_chunk(model, data, settings, {"start": 2, "stop": 6, "ntoys": 6, "index": 1, "of": 2},
                   report=fractions.append)
    assert fractions == [step / 8 for step in range(1, 9)]


def test_running_toys_count_what_chunks_report_and_never_shrink(tmp_path, monkeypatch):
    import tempfile

    from pyhf_dist.runtime.reports import ChunkReport
    from pyhf_dist.scan.running_toys import RunningToys

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shown = []
    running = RunningToys(shown.append)
    first, second = {"start": 0, "stop": 100}, {"start": 100, "stop": 300}
    one, two = running.path_for(first), running.path_for(second)
    ChunkReport(one)(0.5)
    ChunkReport(two)(0.25)
    running.poll()
    assert shown == [100]  # 50 of the first chunk, 50 of the second
    running.forget(two)  # its worker died: submitted again, under a new file
    running.poll()
    assert shown == [100]
    running.done(one, first, fitted=True)
    assert shown == [100]  # 100 finished: not more than shown
    again = running.path_for(second)
    ChunkReport(again)(0.5)
    running.poll()
    assert shown == [100, 200]
    running.done(again, second, fitted=True)
    assert shown == [100, 200, 300]
    running.close()
    assert not list(tmp_path.iterdir())
