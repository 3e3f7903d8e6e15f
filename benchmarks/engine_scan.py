"""One scan on a Globus Compute endpoint engine on this machine, from a cold process.

    python benchmarks/engine_scan.py PALLET --workers 2 [--backend jax] [--patches N]

The endpoint side of ``executor="funcx"``, without the cloud service in between (it cannot run
here): a real ``GlobusComputeEngine`` built by the endpoint's own loader from
``executors/funcx/workstation/config.yaml`` (LocalProvider, ``--workers`` workers) receives every
patch as the service delivers it to an endpoint — a messagepack ``Task`` holding the registered
function (``pyhf_dist_fit`` as source text) followed by its JSON arguments, the bytes
``FuncXExecutor`` submits — and returns messagepack results. Wall time covers imports, reading the
pallet, starting the engine (interchange and worker pool), the fits and writing the results file;
the network hops client → service → endpoint are not in it. Prints the same JSON line as
``one_scan.py``.
"""

from __future__ import annotations

import time

BEGAN = time.perf_counter()

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parent / "executors" / "funcx" / "workstation" / "config.yaml"
JSON_RESULTS = "globus_compute_sdk.serialize.concretes.JSONData"


def task_encoder(pallet, settings):
    """``(context, serializer, task_bytes)``: ``task_bytes(task)`` is ``(task id, the bytes an endpoint
    receives for task)``, as the Globus Compute SDK packs a batch of ``pyhf_dist_fit`` calls."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_sdk.sdk.batch import Batch
    from globus_compute_sdk.sdk.client import FunctionRegistrationData

    from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit
    from pyhf_dist.executors.funcx.transport import ContextSerializer
    from pyhf_dist.protocol import WorkerContext, encode

    context = WorkerContext.build(pallet.workspace, settings.to_dict())
    serializer = ContextSerializer()
    context_text = encode(context.payload.decode())
    serializer.set_context(context_text)
    function_buffer = FunctionRegistrationData(function=pyhf_dist_fit, serializer=serializer).to_dict()["function_code"]

    def task_bytes(task: dict) -> tuple[uuid.UUID, bytes]:
        batch = Batch(task_group_id=None, serializer=serializer)
        batch.add(uuid.UUID(int=1), (context_text, encode(task)))
        arguments = batch.prepare()["tasks"][str(uuid.UUID(int=1))][0]
        task_id = uuid.uuid4()
        return task_id, messagepack.pack(Task(task_id=task_id, task_buffer=function_buffer + arguments))

    return context, serializer, task_bytes


def load_engine(config_path: str, workers: int):
    """The engine of an endpoint ``config.yaml``, with ``workers`` workers."""
    import yaml
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    config = yaml.safe_load(Path(config_path).read_text())
    config["engine"]["max_workers_per_node"] = workers
    # The engine starts its interchange with the `globus-compute-endpoint` command of this Python.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return load_config_yaml(yaml.safe_dump(config)).engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pallet", help="PATH, or PATH::PALLET for one pallet of a multi-pallet source")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--patches", type=int, default=None, help="fit only the first N patches")
    parser.add_argument("--config", default=str(TEMPLATE), help="endpoint config.yaml whose engine runs the fits")
    args = parser.parse_args()

    from globus_compute_common import messagepack
    from globus_compute_endpoint.engines.base import GCFuture

    import pyhf_dist
    from pyhf_dist.pallet import check_workspace
    from pyhf_dist.results import FitRecord, ScanResult
    from pyhf_dist.settings import FitSettings

    from one_scan import CpuMeter, summary

    path, name = args.pallet.partition("::")[::2]
    pallet = pyhf_dist.load_pallet(path, pallet=name or None, validate=False)
    patches = pallet.patches[: args.patches] if args.patches else pallet.patches
    settings = FitSettings(backend=args.backend)
    context, serializer, task_bytes = task_encoder(pallet, settings)
    engine = load_engine(args.config, args.workers)
    received: dict[str, float] = {}
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        scan_began = time.time()
        engine.start(endpoint_id=uuid.uuid4(), run_dir=run_dir)
        try:
            check_workspace(pallet.workspace, pallet.source)  # as a scan does, while the engine starts
            futures = {}
            for patch in patches:
                task = {"name": patch.name, "patch": patch.operations, "context": context.key, "chunk": None,
                        "timeout": None}
                submitted = time.time()
                task_id, body = task_bytes(task)
                future = GCFuture(task_id)
                engine.submit(future, body, resource_specification={}, result_serializers=[JSON_RESULTS])
                futures[future] = (patch, submitted)
            meter = CpuMeter()
            for future in concurrent.futures.as_completed(futures):
                patch, submitted = futures[future]
                result = messagepack.unpack(future.result())
                received[patch.name] = time.time()
                if result.is_error:
                    raise RuntimeError(f"{patch.name} failed on the engine: {result.data}")
                record = serializer.deserialize(result.data)
                record.update(values=list(patch.values), submitted=submitted)
                records[patch.name] = record
                if len(records) in (max(2, len(futures) // 10), len(futures)):
                    meter.mark(len(records))
        finally:
            engine.shutdown()
        scan_seconds = time.time() - scan_began
    ordered = [records[patch.name] for patch in patches]
    with tempfile.TemporaryDirectory() as directory:
        ScanResult([FitRecord.from_dict(record) for record in ordered]).to_json(f"{directory}/results.json")
    wall = time.perf_counter() - BEGAN
    line = summary("globus-engine", args.workers, settings.backend, ordered, received, wall, scan_seconds)
    line.update(meter.per_fit(), scans=1)
    print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
