"""Layer 2 of issue 4: real Globus Compute endpoint engines run real pyhf fits, no cloud needed.

The engines get exactly what an endpoint gets from the service (a messagepack ``Task`` holding the
registered function buffer and the argument buffers) and return messagepack ``Result`` bytes. The
endpoint config templates in ``executors/funcx/`` are loaded with the endpoint's own loader; the
Slurm one runs against the local Slurm when it is up (marker ``slurm``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("globus_compute_endpoint")

from globus_compute_common import messagepack  # noqa: E402
from globus_compute_common.messagepack.message_types import Task  # noqa: E402
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml  # noqa: E402
from globus_compute_endpoint.engines.base import GCFuture  # noqa: E402
from globus_compute_sdk.sdk.batch import Batch  # noqa: E402
from globus_compute_sdk.sdk.client import FunctionRegistrationData  # noqa: E402

from pyhf_dist.executors.funcx.transport import ContextSerializer  # noqa: E402
from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit  # noqa: E402
from pyhf_dist.protocol import encode  # noqa: E402
from pyhf_dist.settings import FitSettings  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402

from helpers import assert_matches_reference, parsl_processes, serial_pyhf, slurm_partition  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent.parent / "executors" / "funcx"
NAMES = ["ERJR_100p0_20p0", "ERJR_200p0_100p0", "ERJR_300p0_150p0", "ERJR_500p0_0p0"]


def cache_probe():
    """Runs on an endpoint worker: (pid, how often this process parsed a workspace)."""
    import os
    import sys

    cache = sys.modules.get("_pyhf_dist_remote_cache")
    return os.getpid(), (cache.setups if cache is not None else 0)


class Service:
    """Builds the bytes the Globus Compute service would hand an endpoint, and reads its results."""

    def __init__(self, pallet):
        self.pallet = pallet
        self.serializer = ContextSerializer()
        self.context = WorkerContext.build(pallet.workspace, FitSettings(backend="numpy").to_dict())
        self.text = encode(self.context.payload.decode())
        self.serializer.set_context(self.text)
        self.functions: dict = {}

    def _function(self, function) -> str:
        if function not in self.functions:
            self.functions[function] = FunctionRegistrationData(function=function, serializer=self.serializer).to_dict()["function_code"]
        return self.functions[function]

    def task_bytes(self, function, args) -> tuple[uuid.UUID, bytes]:
        batch = Batch(task_group_id=None, serializer=self.serializer)
        batch.add(uuid.UUID(int=1), args)
        payload = batch.prepare()["tasks"][str(uuid.UUID(int=1))][0]
        task_id = uuid.uuid4()
        return task_id, messagepack.pack(Task(task_id=task_id, task_buffer=self._function(function) + payload))

    def fit_args(self, name) -> tuple:
        patch = next(p for p in self.pallet.patches if p.name == name)
        task = {"name": name, "patch": patch.operations, "context": self.context.key, "chunk": None, "timeout": None}
        return (self.text, encode(task))

    def run(self, engine, items, timeout=600) -> list:
        """Submit (function, args) pairs to ``engine`` as an endpoint does; return the results."""
        futures = []
        for function, args in items:
            task_id, body = self.task_bytes(function, args)
            future = GCFuture(task_id)
            engine.submit(future, body, resource_specification={},
                          result_serializers=["globus_compute_sdk.serialize.concretes.JSONData"])
            futures.append(future)
        results = []
        for future in futures:
            result = messagepack.unpack(future.result(timeout=timeout))
            assert not result.is_error, result.data
            results.append(self.serializer.deserialize(result.data))
        return results


def _wait_gone(before: set[int], seconds: float = 15.0) -> set[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = parsl_processes() - before
        if not left:
            return left
        time.sleep(0.2)
    return parsl_processes() - before


@pytest.fixture
def on_path(monkeypatch):
    """GlobusComputeEngine starts its interchange with the `globus-compute-endpoint` command."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def test_process_pool_engine_fits_and_keeps_the_workspace_per_worker(erjr_pallet, tmp_path):
    from globus_compute_endpoint.engines import ProcessPoolEngine

    service = Service(erjr_pallet)
    engine = ProcessPoolEngine(max_workers=2)
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path))
    try:
        records = service.run(engine, [(pyhf_dist_fit, service.fit_args(name)) for name in NAMES])
        probes = service.run(engine, [(cache_probe, ()) for _ in range(6)])
    finally:
        engine.shutdown(block=True)
    assert_matches_reference(records, serial_pyhf(erjr_pallet, NAMES))
    # Every worker that fitted parsed the workspace exactly once, however many tasks it ran.
    setups = dict(probes)
    assert set(setups.values()) <= {0, 1} and 1 in setups.values()
    assert {record["worker"]["pid"] for record in records} <= set(setups) | {record["worker"]["pid"] for record in records}


def test_workstation_template_runs_fits_with_the_globus_compute_engine(erjr_pallet, tmp_path, on_path):
    config = load_config_yaml((TEMPLATES / "workstation" / "config.yaml").read_text())
    engine = config.engine
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert type(engine.executor.provider).__name__ == "LocalProvider"
    service = Service(erjr_pallet)
    before = parsl_processes()
    began = time.perf_counter()
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path))
    try:
        records = service.run(engine, [(pyhf_dist_fit, service.fit_args(name)) for name in NAMES])
        elapsed = time.perf_counter() - began
    finally:
        engine.shutdown()
    assert_matches_reference(records, serial_pyhf(erjr_pallet, NAMES))
    assert _wait_gone(before) == set()
    print(f"\nworkstation template: 4 fits in {elapsed:.1f} s from engine start")


def test_slurm_template_loads_with_the_endpoint_loader():
    config = load_config_yaml((TEMPLATES / "slurm" / "config.yaml").read_text())
    executor = config.engine.executor
    provider = executor.provider
    assert type(provider).__name__ == "SlurmProvider"
    assert type(provider.launcher).__name__ == "SrunLauncher"
    assert (provider.nodes_per_block, provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 1, 0, 4)
    assert provider.exclusive is False and "OMP_NUM_THREADS=1" in provider.worker_init


@pytest.mark.slurm
def test_slurm_template_runs_fits_on_the_local_slurm(erjr_pallet, tmp_path, on_path):
    partition = slurm_partition()
    if partition is None:
        pytest.skip("no Slurm answers here (start one with executors/slurm/start-slurm.sh)")
    text = (TEMPLATES / "slurm" / "config.yaml").read_text()
    text = text.replace("partition: debug ", f"partition: {partition} ")
    text = text.replace("strategy_period: 5", "strategy_period: 0.5")
    text = text.replace('walltime: "01:00:00"', 'walltime: "00:10:00"')
    text = text.replace('scheduler_options: "#SBATCH --mem-per-cpu=2G"', 'scheduler_options: "#SBATCH --mem-per-cpu=1G"')
    text = text.replace("max_blocks: 4", "max_blocks: 1")
    text = text.replace("  max_workers_per_node: 2", "  max_workers_per_node: 2\n  address: 127.0.0.1")
    config = load_config_yaml(text)
    engine = config.engine
    service = Service(erjr_pallet)
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path))
    try:
        records = service.run(engine, [(pyhf_dist_fit, service.fit_args(name)) for name in NAMES[:2]], timeout=300)
    finally:
        engine.shutdown()
    assert_matches_reference(records, serial_pyhf(erjr_pallet, NAMES[:2]))
    assert all(record["worker"]["slurm_job_id"] for record in records)
    job_ids = {record["worker"]["slurm_job_id"] for record in records}
    deadline = time.time() + 30
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if not job_ids & set(queued):
            break
        time.sleep(0.5)
    assert not job_ids & set(queued), f"Slurm jobs left behind: {job_ids & set(queued)}"
