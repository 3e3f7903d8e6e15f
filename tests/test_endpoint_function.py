"""The Globus Compute endpoint function returns the very record a local worker returns.

:func:`pyhf_dist.executors.funcx.endpoint.pyhf_dist_fit` is self-contained (it is shipped as source
text to endpoints without pyhf-dist), so it restates the worker's record format instead of
importing it; these tests hold the two to each other for the same tasks, fits that succeed and
fits that fail.
"""

from __future__ import annotations

import pytest

from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit
from pyhf_dist.protocol import encode
from pyhf_dist.pallet import Patch
from pyhf_dist.settings import FitSettings
from pyhf_dist.protocol import WorkerContext, make_task

#: Fields measured where the task ran, which differ between two runs of one task.
from pyhf_dist.runtime import run_task

#: Fields measured where the task ran, which differ between two runs of one task.
MEASURED = {"started", "finished", "fit_seconds"}


def both(pallet, patch: Patch, compress: bool):
    settings = FitSettings(backend="numpy").to_dict()
    context = WorkerContext.build(pallet.workspace, settings)
    task = make_task(patch.name, patch.operations, context.key, timeout=120)
    local = run_task(task, context)
    remote = pyhf_dist_fit(encode(context.payload.decode(), compress), encode(task, compress))
    return local, remote


@pytest.mark.parametrize("compress", [True, False])
def test_same_record_for_a_fit(erjr_pallet, compress):
    local, remote = both(erjr_pallet, erjr_pallet.patches[0], compress)
    assert local["status"] == "ok"
    assert set(remote) == set(local)
    assert {k: v for k, v in remote.items() if k not in MEASURED} == {k: v for k, v in local.items() if k not in MEASURED}


def test_same_record_for_a_fit_that_fails(erjr_pallet):
    broken = Patch("broken", (0.0, 0.0), [{"op": "replace", "path": "/channels/9/name", "value": "x"}])
    local, remote = both(erjr_pallet, broken, compress=True)
    assert local["status"] == "failed" and local["error"]
    assert set(remote) == set(local)
    assert {k: v for k, v in remote.items() if k not in MEASURED} == {k: v for k, v in local.items() if k not in MEASURED}
