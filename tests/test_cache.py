"""The on-disk cache: checks remembered by content and versions, and what a warm cache skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyhf_dist import cache

from helpers import last_json_line


def test_an_answer_is_recalled_under_its_key_only(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    key = cache.digest(b"spec bytes", cache.versions("pyhf"))
    assert cache.recall("workspace", key) is None
    cache.remember("workspace", key, "valid")
    assert cache.recall("workspace", key) == "valid"
    assert cache.recall("patchset", key) is None
    assert cache.recall("workspace", cache.digest(b"other bytes", cache.versions("pyhf"))) is None


def test_digest_parts_cannot_run_together():
    assert cache.digest("ab", "c") != cache.digest("a", "bc")
    assert cache.digest(b"x") == cache.digest("x")


def test_off_disables_the_cache(monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.root() is None
    cache.remember("workspace", "key", "valid")
    assert cache.recall("workspace", "key") is None


def test_an_unusable_directory_is_skipped_quietly(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker))
    monkeypatch.setenv(cache.NOTED_ENV, "")  # restored after the test: noting it sets it
    assert cache.directory("checks") is None
    cache.remember("workspace", "key", "valid")
    assert cache.recall("workspace", "key") is None


_PYTHON_SCAN = """
import pyhf_dist
records = pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=4), executor="local", workers=2, progress=False)
assert all(record.ok for record in records)
"""


def test_an_unusable_cache_is_said_once_for_a_scan_and_its_workers(tmp_path):
    """A file where the cache's folder should be: one note that says what to do, from the command
    line and from Python, not one per process and per folder of the cache."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    environment = {name: value for name, value in os.environ.items()
                   if name not in (cache.NOTED_ENV, "PYHF_DIST_JAX_CACHE")}
    environment[cache.CACHE_ENV] = str(blocker / "cache")
    command_line = subprocess.run(
        [sys.executable, "-m", "pyhf_dist", "demo", "--workers", "2", "-o", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300, env=environment)
    python = subprocess.run([sys.executable, "-c", _PYTHON_SCAN], capture_output=True, text=True, timeout=300,
                            env=environment)
    for run in (command_line, python):
        assert run.returncode == 0, run.stderr
        assert run.stderr.count("cache disabled") == 1 and "compile cache" not in run.stderr, run.stderr
        assert f"pyhf-dist cache disabled: cannot use {blocker / 'cache'}/" in run.stderr
        assert "(Not a directory): point PYHF_DIST_CACHE at a writable folder, or set it to off" in run.stderr


# One client and one worker, as a scan runs them, in a fresh process: load the pallet, validate the
# background, set up the worker and fit two patches on the fast path.
_SCAN_STEPS = r"""
import json, sys
import pyhf_dist
from pyhf_dist.pallet import check_workspace
from pyhf_dist.settings import FitSettings
from pyhf_dist.protocol import WorkerContext
from pyhf_dist.runtime import initialize, run_task

pallet = pyhf_dist.load_pallet(sys.argv[1])
check_workspace(pallet.workspace, "background")
client_imported_pyhf = "pyhf" in sys.modules
context = WorkerContext.build(pallet.workspace, FitSettings(backend="jax").to_dict())
initialize(context)
records = [run_task({"name": p.name, "patch": p.operations, "context": context.key}) for p in pallet.patches[:2]]
print(json.dumps({
    "client_imported_pyhf": client_imported_pyhf,
    "worker_imported_pyhf": "pyhf" in sys.modules,
    "patches": [[p.name, list(p.values), p.operations] for p in pallet.patches],
    "labels": pallet.labels,
    "description": pallet.description,
    "cls": [[r["status"], r.get("CLs_obs"), r.get("CLs_exp")] for r in records],
}))
"""


def test_a_warm_cache_skips_pyhf_and_changes_nothing(lbb_tarball, tmp_path):
    pytest.importorskip("jax")
    first = last_json_line(_SCAN_STEPS, lbb_tarball, cache=tmp_path)
    second = last_json_line(_SCAN_STEPS, lbb_tarball, cache=tmp_path)
    # Fresh cache: the client validates with pyhf, the worker checks the structure against pyhf.Model.
    assert first["client_imported_pyhf"] and first["worker_imported_pyhf"]
    kinds = sorted(name.split("-")[0] for name in os.listdir(tmp_path / "checks"))
    assert kinds == ["patchset", "structure", "workspace"]
    # The likelihood's executables are kept, and the second run's numbers come from them.
    assert [name.split("-")[0] for name in os.listdir(tmp_path / "executables")] == ["likelihood"]
    # Warm cache: neither needs pyhf, and the pallet and the numbers are the same.
    assert not second["client_imported_pyhf"] and not second["worker_imported_pyhf"]
    assert [record[0] for record in second["cls"]] == ["ok", "ok"]
    for field in ("patches", "labels", "description", "cls"):
        assert second[field] == first[field], field


# A worker as a scan starts it, in a fresh process: set up for the background, then its first patch,
# with every compilation jax makes logged.
_FIRST_PATCH = r"""
import json, logging, sys
import jax
import pyhf_dist
from pyhf_dist.settings import FitSettings
from pyhf_dist.protocol import WorkerContext
from pyhf_dist.runtime import initialize, run_task

pallet = pyhf_dist.load_pallet(sys.argv[1])
context = WorkerContext.build(pallet.workspace, FitSettings(backend="jax").to_dict())
initialize(context)
compiled = []


class Compilations(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            compiled.append(record.getMessage()[:80])


logging.getLogger("jax").addHandler(Compilations())
jax.config.update("jax_log_compiles", True)
record = run_task({"name": pallet.patches[0].name, "patch": pallet.patches[0].operations, "context": context.key})
print(json.dumps({"status": record["status"], "engine": record.get("engine"), "compiled": compiled}))
"""


def test_a_warm_workers_first_patch_compiles_nothing(erjr_dir, tmp_path):
    # Each compilation is ~30 ms of a worker's start (seen: a division on a device array, in
    # every worker's first patch).
    pytest.importorskip("jax")
    last_json_line(_FIRST_PATCH, erjr_dir, cache=tmp_path)  # compiles the likelihood and keeps it
    second = last_json_line(_FIRST_PATCH, erjr_dir, cache=tmp_path)
    assert (second["status"], second["engine"]) == ("ok", "fast")
    assert second["compiled"] == []


def test_a_changed_input_is_validated_again(erjr_dir, tmp_path, monkeypatch):
    from pyhf_dist.exceptions import WorkspaceError
    from pyhf_dist.pallet import check_workspace, load_pallet

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    workspace = load_pallet(erjr_dir).workspace
    check_workspace(workspace, "background")
    broken = json.loads(json.dumps(workspace))
    broken["channels"][0]["samples"][0]["data"] = "not a list"
    with pytest.raises(WorkspaceError, match="not a valid HistFactory workspace"):
        check_workspace(broken, "background")


def test_a_patched_model_is_validated_once_and_an_invalid_one_every_time(erjr_dir, tmp_path, monkeypatch):
    """A worker builds pyhf's model of a patch for plain pyhf and for drawing toys; the schema
    validation of the patched model is remembered, so a later build of the same patch skips it.
    A patch that fails validation is never remembered: every build says so."""
    import pyhf

    from pyhf_dist.pallet import load_pallet
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.runtime import initialize, reference
    from pyhf_dist.settings import FitSettings

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    pallet = load_pallet(erjr_dir)
    state = initialize(WorkerContext.build(pallet.workspace, FitSettings(backend="numpy").to_dict()))
    validations = []
    building = reference.pyhf_model

    def recorded(*args, validate=True):
        validations.append(validate)
        return building(*args, validate=validate)

    monkeypatch.setattr(reference, "pyhf_model", recorded)
    first = reference.build_model(state, pallet.patches[0].operations)
    second = reference.build_model(state, pallet.patches[0].operations)
    reference.build_model(state, pallet.patches[1].operations)
    assert validations == [True, False, True]
    assert second[1] == first[1] and second[0].config.par_order == first[0].config.par_order
    spoilt = {"op": "replace", "path": "/channels/0/samples/0/data", "value": "not a list"}
    broken = [*pallet.patches[0].operations, spoilt]
    for _ in range(2):
        with pytest.raises(pyhf.exceptions.InvalidSpecification):
            reference.build_model(state, broken)
    assert validations[3:] == [True, True]


def test_exclusive_makes_a_second_holder_wait_and_never_blocks_forever(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    order = []

    def second():
        with cache.exclusive("layout", timeout=30):
            order.append("second")

    with cache.exclusive("layout"):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        order.append("first done")
    waiter.join(10)
    assert order == ["first done", "second"]
    # A holder that never lets go only delays the others by the timeout.
    with cache.exclusive("layout"):
        with cache.exclusive("layout", timeout=0.2):
            order.append("went on")
    assert order[-1] == "went on"


def _erjr_problem(erjr_dir):
    """A 3L-eRJR patch's problem, the jitted likelihood functions, and their arguments."""
    pytest.importorskip("jax")
    from pyhf_dist.pallet import load_pallet
    from pyhf_dist.runtime.fast import likelihood
    from pyhf_dist.runtime.fast.engine import FastHypotest

    pallet = load_pallet(erjr_dir)
    problem = FastHypotest(pallet.workspace, verify=False).problem(pallet.patches[0].operations)
    functions = likelihood.functions(*problem.functions.codes)  # the jitted ones
    arguments = {"theta": problem.init, "main": problem.main, "aux": problem.aux, "layout": problem.layout}
    return problem, functions, arguments


def test_kept_executables_are_loaded_and_a_damaged_one_is_compiled_again(erjr_dir, tmp_path, monkeypatch):
    import numpy as np

    from pyhf_dist.runtime.fast import executables

    problem, functions, arguments = _erjr_problem(erjr_dir)

    def numbers(found) -> list:
        return [
            np.asarray(found.value_and_grad(problem.init, problem.main, problem.aux, problem.layout)),
            *map(np.asarray, found.expected(problem.init, problem.layout)),
            np.asarray(found.fisher_diagonal(problem.init, problem.layout)),
        ]

    expected = numbers(functions)
    # As in a process that used the jitted functions before, with jax's persistent cache (this
    # session's) in use: their executables in memory are loaded from that cache, which holds this
    # layout's entries too. Neither serializes into bytes that load back; the kept executables are
    # compiled anew all the same.
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from pyhf_dist.runtime.fast import likelihood

    assert likelihood.persistent_cache() is not None
    compilation_cache.reset_cache()  # jax checks again, at its next compilation, that the cache is on
    jax.clear_caches()
    assert all(np.array_equal(a, b) for a, b in zip(numbers(functions), expected))
    jax.clear_caches()
    assert all(np.array_equal(a, b) for a, b in zip(numbers(functions), expected))
    assert any(Path(likelihood.persistent_cache()).glob("jit_value_and_grad-*"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    compiled = executables.load(functions, "3L-eRJR test layout", arguments)
    (kept,) = (tmp_path / "executables").iterdir()
    loaded = executables.load(functions, "3L-eRJR test layout", arguments)
    key = kept.name.removeprefix("likelihood-")
    assert loaded is not None and executables._read(key) is not None
    for found in (compiled, loaded):
        assert all(np.array_equal(a, b) for a, b in zip(numbers(found), expected))
    # Inputs of another type than the executable's (counts as integers) go to the jitted function.
    counts = np.rint(np.asarray(problem.main)).astype(np.int64)
    assert np.array_equal(counts, np.asarray(problem.main))
    assert np.allclose(np.asarray(loaded.value_and_grad(problem.init, counts, problem.aux, problem.layout)), expected[0])

    kept.write_text(kept.read_text()[:1000])
    assert executables._read(key) is None
    again = executables.load(functions, "3L-eRJR test layout", arguments)
    assert executables._read(key) is not None
    assert all(np.array_equal(a, b) for a, b in zip(numbers(again), expected))


def test_a_new_layout_is_compiled_once_also_for_the_check_against_pyhf(erjr_dir, tmp_path):
    """On a machine whose cache is empty, a worker compiles a new layout's likelihood and keeps its
    executables; checking the structure against pyhf's model then calls the kept executable, not
    the jitted likelihood (a second compilation: ~1 s of a 1Lbb scan's first patch)."""
    pytest.importorskip("jax")
    code = f"""
import pyhf_dist
from pyhf_dist.runtime.fast import layout, likelihood
from pyhf_dist.settings import DEFAULT_MODIFIER_SETTINGS
record = pyhf_dist.map_fits({str(erjr_dir)!r}, executor="sequential", patches=["ERJR_350p0_200p0"], progress=False)[0]
assert record.ok and record.engine == "fast", record.error
jitted = likelihood.functions(*layout.interpolation_codes(DEFAULT_MODIFIER_SETTINGS))
print("jitted likelihood compiled", jitted.value_and_grad._cache_size(), "times")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, cache.CACHE_ENV: str(tmp_path / "empty")})
    assert run.returncode == 0, run.stderr
    assert "jitted likelihood compiled 0 times" in run.stdout
    assert [path.name.split("-")[0] for path in (tmp_path / "empty" / "checks").glob("structure-*")] == ["structure"]


def test_executables_that_cannot_be_kept_are_not_tried_again(erjr_dir, tmp_path, monkeypatch):
    from jax.experimental import serialize_executable

    from pyhf_dist.runtime.fast import executables

    _, functions, arguments = _erjr_problem(erjr_dir)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    tries = []

    def refuse(compiled):
        tries.append(compiled)
        raise ValueError("Compilation does not support serialization")

    monkeypatch.setattr(serialize_executable, "serialize", refuse)
    assert executables.load(functions, "unkeepable layout", arguments) is None
    assert executables.load(functions, "unkeepable layout", arguments) is None
    assert len(tries) == 1 and not list((tmp_path / "executables").iterdir())


_FIRST_COMPILATION_KEEPS = """
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from pyhf_dist.pallet import load_pallet
from pyhf_dist.runtime.fast import likelihood
from pyhf_dist.runtime.fast.engine import FastHypotest

pallet = load_pallet(sys.argv[1])
FastHypotest(pallet.workspace, verify=False).problem(pallet.patches[0].operations)
kept = list(Path(sys.argv[2], "executables").glob("likelihood-*"))
jax.jit(lambda x: 3.0 * x + 1.0)(jnp.arange(3.0))
print(len(kept), len(list(Path(likelihood.persistent_cache()).glob("jit_*lambda*"))))
"""


def test_a_worker_whose_first_compilation_keeps_executables_still_uses_jaxs_cache(erjr_dir, tmp_path):
    """Keeping the executables compiles with jax's persistent cache off; where that is the
    process's first compilation (a cold worker), the cache is on again for the compilations after."""
    environment = dict(os.environ, PYHF_DIST_CACHE=str(tmp_path))
    environment.pop("PYHF_DIST_JAX_CACHE", None)
    completed = subprocess.run(
        [sys.executable, "-c", _FIRST_COMPILATION_KEEPS, str(erjr_dir), str(tmp_path)],
        env=environment, capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["1", "1"]  # the executables kept, the next compilation cached
