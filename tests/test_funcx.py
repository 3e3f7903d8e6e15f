"""``executor="funcx"`` (Globus Compute) without the cloud: layers 1, 3 and 4 of issue 4.

1. Serialization: the remote function and real workspaces/patches go through the SDK's own
   serializer and ``Batch``, and the endpoint's own ``execute_task`` runs the exact bytes the
   service would deliver — in a process where pyhf-dist cannot be imported.
3. The real SDK ``Executor`` driven end to end by ``map_fits`` against an in-test STAND-IN for the
   Globus cloud (``tests/globus_cloud_standin.py``: ``responses`` for REST, a replaced result
   watcher for AMQP), with a real endpoint engine behind it. The SDK version is pinned for these.
4. A live test against a real endpoint (marker ``globus_live``), skipped without credentials.

Layer 2 (real endpoint engines and the config templates) is in ``test_funcx_engines.py``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

globus_compute_sdk = pytest.importorskip("globus_compute_sdk")
pytest.importorskip("globus_compute_endpoint")
responses = pytest.importorskip("responses")

import globus_sdk  # noqa: E402
from globus_compute_sdk.sdk.batch import Batch  # noqa: E402

import pyhf_dist  # noqa: E402
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, PayloadTooLargeError  # noqa: E402
from pyhf_dist.executors import get_executor  # noqa: E402
from pyhf_dist.executors.funcx import transport  # noqa: E402
from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit  # noqa: E402
from pyhf_dist.protocol import decode, encode  # noqa: E402
from pyhf_dist.executors.funcx.executor import FuncXExecutor  # noqa: E402
from pyhf_dist.executors.funcx.transport import (  # noqa: E402
    MAX_REQUEST_BYTES,
    ContextSerializer,
    RequestSplitter,
    task_request_bytes,
)
from pyhf_dist.pallet import Pallet  # noqa: E402
from pyhf_dist.settings import FitSettings  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402

import globus_cloud_standin  # noqa: E402
from helpers import LBB_FEW, LBB_SAMPLE, assert_matches_reference, serial_pyhf  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERJR_FEW = ["ERJR_100p0_20p0", "ERJR_110p0_20p0", "ERJR_200p0_100p0", "ERJR_500p0_0p0"]


def _context(pallet) -> WorkerContext:
    return WorkerContext.build(pallet.workspace, FitSettings(backend="numpy").to_dict())


def _task(pallet, name, context) -> dict:
    patch = next(p for p in pallet.patches if p.name == name)
    return {"name": name, "patch": patch.operations, "context": context.key, "chunk": None, "timeout": None}


def _service_bytes(serializer, function, args) -> tuple[str, str]:
    """(function buffer, argument buffers) exactly as the SDK sends them to the service."""
    from globus_compute_sdk.sdk.client import FunctionRegistrationData

    function_code = FunctionRegistrationData(function=function, serializer=serializer).to_dict()["function_code"]
    batch = Batch(task_group_id=None, serializer=serializer)
    function_id = uuid.uuid4()
    batch.add(function_id, args)
    return function_code, batch.prepare()["tasks"][str(function_id)][0]


# =========================================================================== layer 1: bytes
def test_sdk_version_is_the_pinned_one():
    assert globus_compute_sdk.__version__ == globus_cloud_standin.SDK_VERSION


def test_remote_function_round_trips_through_the_sdk_serializer(erjr_pallet):
    serializer = ContextSerializer()
    context = _context(erjr_pallet)
    text = encode(context.payload.decode())
    serializer.set_context(text)
    args = (text, encode(_task(erjr_pallet, ERJR_FEW[0], context)))
    # The SDK's own check: the function and its arguments survive serialization.
    serializer.check_strategies(pyhf_dist_fit, *args)
    # The context is serialized once; each task's bytes are exactly what JSONData would produce.
    from globus_compute_sdk.serialize import JSONData

    assert serializer.serialize(args) == JSONData().serialize(args)
    # Shipped as source text: the endpoint never imports pyhf_dist.
    function_buffer = serializer.serialize(pyhf_dist_fit)
    assert function_buffer.startswith("st\n")
    source = function_buffer.split(":", 1)[1]
    # It may use pyhf_dist where the endpoint has it, but only behind an ImportError guard.
    tree = ast.parse(textwrap.dedent(source))
    guarded = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.Try) and any(getattr(h.type, "id", None) == "ImportError" for h in block.handlers)
        for statement in block.body
        for node in ast.walk(statement)
    }
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    uses = [node for node in imports if "pyhf_dist" in ast.dump(node)]
    assert uses and all(id(node) in guarded for node in uses)
    assert "import pyhf" in source


def test_endpoint_runs_the_exact_service_bytes_without_pyhf_dist(erjr_pallet, tmp_path):
    """The endpoint's execute_task on the bytes the service would deliver, pyhf_dist unimportable."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task

    serializer = ContextSerializer()
    context = _context(erjr_pallet)
    text = encode(context.payload.decode())
    serializer.set_context(text)
    bodies = {}
    for name in ERJR_FEW[:2]:
        function_code, payload = _service_bytes(serializer, pyhf_dist_fit, (text, encode(_task(erjr_pallet, name, context))))
        task_id = uuid.uuid4()
        bodies[name] = (task_id, messagepack.pack(Task(task_id=task_id, task_buffer=function_code + payload)))
        (tmp_path / f"{name}.task").write_bytes(bodies[name][1])
    script = textwrap.dedent(
        f"""
        import sys, pathlib, uuid
        sys.modules["pyhf_dist"] = None  # importing pyhf_dist now fails: the endpoint does not have it
        from globus_compute_endpoint.engines.helper import execute_task
        for path in sorted(pathlib.Path({str(tmp_path)!r}).glob("*.task")):
            body = execute_task(path.read_bytes(), uuid.uuid4(), run_dir={str(tmp_path / "run")!r},
                                result_serializers=["globus_compute_sdk.serialize.JSONData"])
            path.with_suffix(".result").write_bytes(body)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300,
                   env={**os.environ, "PYTHONPATH": ""})
    records = []
    for name in ERJR_FEW[:2]:
        result = messagepack.unpack((tmp_path / f"{name}.result").read_bytes())
        assert not result.is_error, result.data
        assert result.data.startswith("11\n")  # JSON, as asked with result_serializers
        assert len(result.data) < transport.MAX_RESULT_BYTES // 1000
        records.append(serializer.deserialize(result.data))
    assert_matches_reference(records, serial_pyhf(erjr_pallet, ERJR_FEW[:2]))


def test_payload_sizes_of_the_1lbb_pallet(lbb_pallet):
    """What one 1Lbb task costs in a submission request, compressed and as plain JSON."""
    context = _context(lbb_pallet)
    sizes = {}
    for compress in (True, False):
        serializer = ContextSerializer()
        text = encode(context.payload.decode(), compress=compress)
        serializer.set_context(text)
        args = (text, encode(_task(lbb_pallet, LBB_SAMPLE[0], context), compress=compress))
        size = task_request_bytes(serializer, args)
        # Exactly what the task adds to the JSON body of the request.
        batch = Batch(task_group_id=None, serializer=serializer)
        empty = len(json.dumps(batch.prepare() | {"tasks": {str(uuid.UUID(int=0)): []}}))
        batch.add(uuid.UUID(int=0), args)
        one = len(json.dumps(batch.prepare()))
        batch.add(uuid.UUID(int=0), args)
        two = len(json.dumps(batch.prepare()))
        assert two - one == size
        assert one - empty == size - 2
        sizes[compress] = size
    assert sizes[True] < 400_000  # workspace + patch, compressed
    assert 1_200_000 < sizes[False] < 2_500_000  # plain JSON (escaped twice): ~5 per 10 MB request
    assert sizes[False] / sizes[True] > 4
    print(f"\n1Lbb task in a submission request: {sizes[True]:,} bytes compressed, {sizes[False]:,} plain")


def test_remote_function_parses_the_workspace_once_per_process(erjr_pallet):
    context = _context(erjr_pallet)
    text = encode(context.payload.decode())
    sys.modules.pop("_pyhf_dist_remote_cache", None)
    try:
        records = [pyhf_dist_fit(text, encode(_task(erjr_pallet, name, context))) for name in ERJR_FEW[2:]]
        assert sys.modules["_pyhf_dist_remote_cache"].setups == 1
        # A corrupted context is not even read once the worker has the workspace.
        record = pyhf_dist_fit("zlib+base64:broken", encode(_task(erjr_pallet, ERJR_FEW[2], context)))
        assert record["status"] == "ok"
    finally:
        sys.modules.pop("_pyhf_dist_remote_cache", None)
    assert_matches_reference(records, serial_pyhf(erjr_pallet, ERJR_FEW[2:]))
    assert decode(encode({"a": [1, 2]})) == {"a": [1, 2]} == decode(encode({"a": [1, 2]}, compress=False))


def test_remote_function_takes_the_fast_path_where_pyhf_dist_is_installed(lbb_pallet, lbb_few_reference):
    """On the jax backend an endpoint with pyhf-dist installed fits on the compiled likelihood and
    keeps it between tasks; the numbers are serial pyhf's within the fast path's tolerance."""
    pytest.importorskip("jax")
    from pyhf_dist import runtime as worker

    context = WorkerContext.build(lbb_pallet.workspace, FitSettings(backend="jax").to_dict())
    text = encode(context.payload.decode())
    sys.modules.pop("_pyhf_dist_remote_cache", None)
    try:
        records = [pyhf_dist_fit(text, encode(_task(lbb_pallet, name, context))) for name in LBB_FEW]
        remote_state = sys.modules["_pyhf_dist_remote_cache"].states[context.key]
    finally:
        sys.modules.pop("_pyhf_dist_remote_cache", None)
    assert remote_state["workspace"] is None  # no plain pyhf model was made
    assert remote_state["prepared"][0] is worker.initialize(context)  # one state, kept for every task
    assert "fast_hypotest" in remote_state["prepared"][0].memo
    assert_matches_reference(records, lbb_few_reference, tolerance=1e-4)


class _FakeService:
    """Stands in for Client.batch_run in the splitter's unit test: records requests, hands out ids."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, endpoint_id, batch):
        self.sizes.append(len(json.dumps(batch.prepare())))
        return {"request_id": "r", "task_group_id": str(batch.task_group_id or uuid.UUID(int=7)),
                "endpoint_id": str(endpoint_id),
                "tasks": {str(fid): [f"{payload[-6:]}" for payload in payloads] for fid, payloads in batch.tasks.items()}}


def test_a_batch_over_10_MB_is_split_and_a_single_oversize_task_refused():
    service = _FakeService()
    splitter = RequestSplitter(service, MAX_REQUEST_BYTES)
    batch = Batch(task_group_id=None, serializer=ContextSerializer())
    function_id = uuid.uuid4()
    for index in range(7):  # 7 tasks of ~3 MB: 21 MB in one batch
        batch.add(function_id, ("x" * 3_000_000 + f"{index:06d}",))
    assert len(json.dumps(batch.prepare())) > 2 * MAX_REQUEST_BYTES
    answer = splitter(uuid.uuid4(), batch)
    assert len(service.sizes) == 3 and max(service.sizes) <= MAX_REQUEST_BYTES
    ids = answer["tasks"][str(function_id)]
    assert len(ids) == 7 and ids == sorted(ids)  # every task, in submission order
    assert [count for count, _ in splitter.requests] == [3, 3, 1]

    single = Batch(task_group_id=None, serializer=ContextSerializer())
    single.add(function_id, ("x" * 10_500_000,))
    with pytest.raises(PayloadTooLargeError, match="over the service's"):
        splitter(uuid.uuid4(), single)


# ============================================================ layer 3: SDK against the stand-in
@pytest.fixture(scope="module")
def process_engine(tmp_path_factory):
    """A real ProcessPoolEngine (two worker processes), as an endpoint runs it."""
    from globus_compute_endpoint.engines import ProcessPoolEngine

    engine = ProcessPoolEngine(max_workers=2)
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path_factory.mktemp("endpoint")))
    yield engine
    engine.shutdown(block=True)


@pytest.fixture(scope="module")
def htex_engine(tmp_path_factory):
    """A real GlobusComputeEngine (Parsl HTEX inside) with a LocalProvider: the endpoint default."""
    from globus_compute_endpoint.engines import GlobusComputeEngine
    from parsl.providers import LocalProvider

    # The engine starts its interchange with the `globus-compute-endpoint` command.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    run_dir = tmp_path_factory.mktemp("htex-endpoint")
    engine = GlobusComputeEngine(
        address="127.0.0.1", max_workers_per_node=2, encrypted=False,
        job_status_kwargs={"strategy_period": 0.2},
        provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1),
    )
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(run_dir))
    yield engine
    engine.shutdown()
    os.environ["PATH"] = path


def _cloud(engine, monkeypatch):
    from globus_compute_sdk.sdk import executor as sdk_executor

    client = globus_compute_sdk.Client(authorizer=globus_sdk.NullAuthorizer(), do_version_check=False)
    standin = globus_cloud_standin.GlobusCloudStandIn(engine, str(engine.endpoint_id), client.web_service_address)
    monkeypatch.setattr(sdk_executor, "_ResultWatcher", globus_cloud_standin.make_result_watcher_class(standin))
    monkeypatch.setattr(sdk_executor.Executor, "_default_task_group_id", None)
    mock = responses.RequestsMock(assert_all_requests_are_fired=False)
    standin.install(mock)
    mock.start()
    return client, standin, mock


@pytest.fixture
def cloud(process_engine, monkeypatch):
    """(client, stand-in) for the Globus cloud STAND-IN, tasks running on the ProcessPoolEngine."""
    client, standin, mock = _cloud(process_engine, monkeypatch)
    yield client, standin
    mock.stop()
    mock.reset()
    _stop_watchers()


@pytest.fixture
def htex_cloud(htex_engine, monkeypatch):
    client, standin, mock = _cloud(htex_engine, monkeypatch)
    yield client, standin
    mock.stop()
    mock.reset()
    _stop_watchers()


def _stop_watchers():
    from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

    for watcher in list(_RESULT_WATCHERS.values()):
        watcher.shutdown(wait=True, cancel_futures=True)
    _RESULT_WATCHERS.clear()


def test_3L_eRJR_patches_through_the_sdk_and_an_htex_endpoint(htex_cloud, erjr_pallet, erjr_sample_names,
                                                               erjr_sample_reference):
    client, standin = htex_cloud
    info = {}
    began = time.perf_counter()
    result = pyhf_dist.map_fits(erjr_pallet, executor="funcx", endpoint_id=standin.endpoint_id, client=client,
                                patches=erjr_sample_names, backend="numpy",
                                on_start=lambda meta: info.update(meta, up=time.perf_counter() - began))
    assert_matches_reference(result, erjr_sample_reference)
    assert result.metadata["executor"] == "funcx" and result.metadata["endpoint_status"] == "online"
    assert all(request["accepted"] and request["bytes"] <= MAX_REQUEST_BYTES for request in standin.requests)
    assert sum(request["tasks"] for request in standin.requests) == len(erjr_sample_names)
    # Tasks were batched: far fewer requests than tasks.
    assert len(standin.requests) <= 10
    print(f"\nfuncx/htex: executor up {info['up']:.2f} s, {len(result)} patches in {time.perf_counter() - began:.1f} s, "
          f"{len(standin.requests)} requests, context {info['context_bytes']} bytes")


@pytest.mark.slow
def test_1lbb_sample_through_the_sdk_with_batches_split_under_10_MB(htex_cloud, lbb_pallet, lbb_reference):
    """Uncompressed, a 1Lbb task is ~1.5 MB: the 8 tasks cannot go in one 10 MB request."""
    client, standin = htex_cloud
    result = pyhf_dist.map_fits(lbb_pallet, executor="funcx", endpoint_id=standin.endpoint_id, client=client,
                                backend="numpy", patches=LBB_SAMPLE, compress=False)
    assert_matches_reference(result, lbb_reference)
    sizes = [request["bytes"] for request in standin.requests]
    assert len(sizes) >= 2 and max(sizes) <= MAX_REQUEST_BYTES and sum(sizes) > MAX_REQUEST_BYTES
    assert all(request["accepted"] for request in standin.requests)
    assert sum(request["tasks"] for request in standin.requests) == 8


def test_results_are_fetched_by_id_when_the_result_stream_fails(cloud, erjr_pallet):
    client, standin = cloud
    standin.amqp_broken = True
    result = pyhf_dist.map_fits(erjr_pallet, executor="funcx", endpoint_id=standin.endpoint_id, client=client,
                                backend="numpy", patches=ERJR_FEW, poll_interval=0.2)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, ERJR_FEW))


def test_a_task_that_raises_on_the_endpoint_keeps_the_remote_traceback(cloud, erjr_pallet):
    client, standin = cloud
    context = _context(erjr_pallet)
    executor = FuncXExecutor(endpoint_id=standin.endpoint_id, client=client)
    executor.start(context)
    try:
        good = executor.submit(_task(erjr_pallet, ERJR_FEW[0], context))
        # A context the endpoint worker has never seen, and cannot decode: raises outside the fit.
        broken = "zlib+base64:AAAA"
        executor._context_text = broken
        executor._serializer.set_context(broken)
        bad_task = dict(_task(erjr_pallet, ERJR_FEW[1], context), context="never-seen")
        bad = executor.submit(bad_task)
        record = bad.result(timeout=120)
        assert good.result(timeout=120)["status"] == "ok"
    finally:
        executor.shutdown()
    assert record["status"] == "failed" and record["name"] == ERJR_FEW[1]
    assert "task raised on the Globus Compute endpoint" in record["error"]
    assert "Traceback" in record["error"] and "zlib" in record["error"]


def test_an_oversize_workspace_or_patch_is_refused_before_sending(cloud):
    client, standin = cloud
    pallet = pyhf_dist.demo_pallet(points=2)
    big = json.loads(json.dumps(pallet.workspace))
    # A valid workspace of over 10 MB (as plain JSON): a very long measurement name.
    big["measurements"][0]["name"] = "m" * 10_500_000
    big_pallet = Pallet(big, pallet.patches, pallet.labels, "big", "")
    with pytest.raises(PayloadTooLargeError, match="background workspace alone .* over the service's limit"):
        pyhf_dist.map_fits(big_pallet, executor="funcx", endpoint_id=standin.endpoint_id, client=client,
                           backend="numpy", compress=False)
    assert standin.requests == []  # nothing was sent

    executor = FuncXExecutor(endpoint_id=standin.endpoint_id, client=client, compress=False)
    executor.start(_context(pallet))
    try:
        patch = pallet.patches[0]
        huge = {"name": patch.name, "patch": patch.operations + [{"op": "add", "path": "/x", "value": "y" * 10_100_000}],
                "context": executor.context.key, "chunk": None, "timeout": None}
        with pytest.raises(PayloadTooLargeError, match=f"task '{patch.name}' needs .* bytes"):
            executor.submit(huge)
    finally:
        executor.shutdown()
    assert standin.requests == []


def test_unknown_endpoint_is_a_clear_error(cloud):
    client, standin = cloud
    other = str(uuid.uuid4())
    with pytest.raises(ExecutorError, match=f"endpoint {other} is unknown"):
        pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=2), executor="funcx", endpoint_id=other, client=client,
                           backend="numpy")


def test_a_service_that_does_not_answer_fails_within_connect_timeout(cloud):
    client, standin = cloud
    standin.hang_seconds = 3.0
    began = time.perf_counter()
    with pytest.raises(ExecutorError, match="did not answer within 0.5 s"):
        pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=2), executor="funcx", endpoint_id=standin.endpoint_id,
                           client=client, backend="numpy", connect_timeout=0.5)
    assert time.perf_counter() - began < 2.5
    standin.hang_seconds = 0.0


def test_a_service_that_cannot_be_reached_says_to_check_the_network(cloud):
    """No connection at all (no route, a firewall, DNS): not the SDK's bare "ConnectionError on
    request", but what the SDK needs of the network."""
    client, standin = cloud
    standin.unreachable = True
    web = client._compute_web_client  # the SDK retries five times, backing off: not needed here
    retries = {version: getattr(web, version).retry_config.max_retries for version in ("v2", "v3")}
    for version in retries:
        getattr(web, version).retry_config.max_retries = 0
    try:
        with pytest.raises(ExecutorError) as caught:
            pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=2), executor="funcx", endpoint_id=standin.endpoint_id,
                               client=client, backend="numpy")
    finally:
        standin.unreachable = False
        for version, count in retries.items():
            getattr(web, version).retry_config.max_retries = count
    message = str(caught.value)
    assert message.startswith("could not reach the Globus Compute service: ") and "\n" not in message, message
    assert message.endswith("check the network (the SDK needs HTTPS to the service, and AMQP on port 443, 5671 "
                            "or 5672 for results)"), message


# ================================================================ options and credentials
def test_endpoint_id_is_required_and_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("GLOBUS_COMPUTE_ENDPOINT_ID", raising=False)
    with pytest.raises(ExecutorOptionError, match="needs the Globus Compute endpoint id.*GLOBUS_COMPUTE_ENDPOINT_ID"):
        get_executor("funcx")
    endpoint = str(uuid.uuid4())
    monkeypatch.setenv("GLOBUS_COMPUTE_ENDPOINT_ID", endpoint)
    assert get_executor("globus-compute").endpoint_id == endpoint
    with pytest.raises(ExecutorOptionError, match="not a UUID"):
        get_executor("funcx", endpoint_id="my-endpoint")
    with pytest.raises(ExecutorOptionError, match="amqp_port"):
        get_executor("funcx", amqp_port=1234)
    with pytest.raises(ExecutorOptionError, match="does not take"):
        get_executor("funcx", provider="slurm")


def test_no_login_fails_fast_without_prompting(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path))
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_ID", raising=False)
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_SECRET", raising=False)
    began = time.perf_counter()
    with pytest.raises(ExecutorError, match="no Globus Compute login: set GLOBUS_COMPUTE_CLIENT_ID"):
        pyhf_dist.map_fits(pyhf_dist.demo_pallet(points=2), executor="funcx", endpoint_id=str(uuid.uuid4()),
                           backend="numpy")
    assert time.perf_counter() - began < 5
    assert list(tmp_path.iterdir()) == []  # nothing written: no token store was created
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", "s")
    with pytest.raises(ExecutorError, match="GLOBUS_COMPUTE_CLIENT_ID is not"):
        transport.check_credentials()
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", str(uuid.uuid4()))
    assert transport.check_credentials() == "client credentials"


def test_unsupported_calculations_are_refused_before_anything_starts(erjr_pallet):
    from pyhf_dist.exceptions import SettingsError

    executor = FuncXExecutor(endpoint_id=str(uuid.uuid4()))
    for settings in (FitSettings(backend="numpy", calctype="toybased"), FitSettings(backend="numpy", calculation="upper_limit")):
        assert "asymptotic hypotests only" in executor.supports(settings)
    assert executor.supports(FitSettings(backend="numpy")) is None
    # Refused by the scan, in one line, before any login or request to the service.
    with pytest.raises(SettingsError, match="asymptotic hypotests only"):
        pyhf_dist.map_fits(erjr_pallet, executor=executor, backend="numpy", calctype="toybased", ntoys=10)
    assert executor.client is None


# ================================================================== layer 4: a real endpoint
@pytest.mark.globus_live
def test_live_endpoint(erjr_pallet):
    endpoint = os.environ.get("GLOBUS_COMPUTE_ENDPOINT_ID")
    if not endpoint or not (os.environ.get("GLOBUS_COMPUTE_CLIENT_ID") and os.environ.get("GLOBUS_COMPUTE_CLIENT_SECRET")):
        pytest.skip("set GLOBUS_COMPUTE_ENDPOINT_ID, GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET "
                    "to run against a real Globus Compute endpoint")
    result = pyhf_dist.map_fits(erjr_pallet, executor="funcx", endpoint_id=endpoint, backend="numpy",
                                patches=ERJR_FEW)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, ERJR_FEW))
