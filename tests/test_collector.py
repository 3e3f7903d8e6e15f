"""The cyclic garbage collector kept off a scan's big, long-lived data (:mod:`pyhf_dist.collector`).

Not timed: what is checked is that no collection runs while a pallet's JSON is parsed, that the
collector is on again after it, and that a local worker leaves what it holds (libraries,
workspace, compiled likelihood) out of later collections and still collects what comes after.
"""

from __future__ import annotations

import gc
import tarfile

import pytest

import pyhf_dist
from pyhf_dist import collector, specs
from pyhf_dist.executors.local import LocalExecutor


@pytest.fixture
def collections():
    """The generations of the collections run while the test body runs."""
    seen: list[int] = []

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield seen
    finally:
        gc.callbacks.remove(count)


def test_a_pallets_json_is_parsed_without_a_collection(lbb_tarball, collections):
    with tarfile.open(lbb_tarball) as archive:
        text = archive.extractfile("BkgOnly.json").read()  # 2 MB: the old code ran ~40 collections
    gc.collect()  # counts from zero: no collection is due as the parse begins
    collections.clear()
    parsed = specs.parse_json(text, "BkgOnly.json")
    # Counted before anything else is allocated. Ending the pause may run a young collection (the
    # parsed containers are young then; another thread's allocation may run one too), no more.
    during = list(collections)
    assert len(during) <= 2 and set(during) <= {0}, during
    assert gc.isenabled()
    assert parsed["channels"] and parsed["measurements"]


def test_what_a_pause_parsed_is_old_at_once_and_a_callers_frozen_objects_stay_frozen(erjr_dir):
    text = (erjr_dir / "BkgOnly.json").read_bytes()
    parsed = specs.parse_json(text, "BkgOnly.json")
    # Straight to the oldest generation: no young collection walks the workspace after the parse.
    assert any(each is parsed for each in gc.get_objects(generation=2))
    gc.freeze()  # a process that froze objects of its own (a settled worker, a user's)
    try:
        frozen = gc.get_freeze_count()
        specs.parse_json(text, "BkgOnly.json")
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_pause_leaves_a_collector_the_caller_turned_off_off():
    gc.disable()
    try:
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_pause_ends_when_the_block_raises():
    with pytest.raises(ValueError), collector.paused():
        raise ValueError("bad JSON")
    assert gc.isenabled()


def _collector_facts() -> dict:
    class Cycle:
        pass

    made = Cycle()
    made.itself = made
    del made
    return {"frozen": gc.get_freeze_count(), "enabled": gc.isenabled(), "cycle collected": gc.collect() >= 1}


def test_a_local_worker_settles_what_it_holds_and_still_collects(erjr_pallet):
    names = erjr_pallet.names()[:2]
    with LocalExecutor(workers=1) as executor:
        result = pyhf_dist.map_fits(erjr_pallet, executor=executor, patches=names, backend="numpy")
        assert [record.status for record in result] == ["ok", "ok"]
        facts = executor._slots[0].submit(_collector_facts, task=False).result(timeout=60)
    # Its libraries and the parsed workspace: tens of thousands of containers no collection walks.
    assert facts["frozen"] > 10_000
    assert facts["enabled"]
    assert facts["cycle collected"]  # garbage made after settling is collected as before


def test_a_workers_imports_leave_the_collector_as_they_found_it():
    from pyhf_dist.runtime import preload
    from pyhf_dist.settings import FitSettings

    with collector.paused():  # a caller's own pause is kept
        preload(FitSettings(backend="jax").to_dict())
        assert not gc.isenabled()
    preload(FitSettings(backend="numpy").to_dict())
    assert gc.isenabled()
