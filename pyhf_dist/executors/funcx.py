"""Fit on a Globus Compute (formerly funcX) endpoint: ``executor="funcx"`` or ``"globus-compute"``.

Tasks go through the Globus Compute SDK's own ``concurrent.futures`` executor
(``globus_compute_sdk.Executor``): it batches them into REST submissions and receives the results
over the service's AMQP result stream. What this module adds:

* **A self-contained remote function** (:func:`pyhf_dist.executors.remote.pyhf_dist_fit`),
  registered as source text, so that an endpoint needs only pyhf and numpy, not pyhf-dist (where
  ``pyhf-dist[jax]`` is installed on the endpoint, it takes the compiled fast path there).
* **Data as JSON.** The context (background workspace + fit settings) and each task are sent as
  JSON text (``JSONData``), compressed with zlib by default (``compress=True``); results come
  back as JSON too. The cloud path has no per-worker setup hook, so the context travels with
  *every* task — it is encoded and serialized once on the client, and each endpoint worker parses
  it once and keeps it for the following tasks.
* **Payload limits checked on the client.** The service refuses a submission (a whole batch) over
  10 MB, and the endpoint refuses results over 10 MiB. Batches are sized from the measured task
  size and, should one still be too large, split into several requests before sending; a single
  task that cannot fit raises :class:`~pyhf_dist.exceptions.PayloadTooLargeError` with the fix.
* **Clear failures.** No credentials (checked before anything could prompt on a terminal), no
  endpoint id, an unknown endpoint, or a service that does not answer within
  ``connect_timeout`` seconds raise :class:`~pyhf_dist.exceptions.ExecutorError` at start. A task
  that raises on the endpoint becomes a failed record whose ``error`` holds the remote traceback;
  a lost endpoint worker raises :class:`~pyhf_dist.exceptions.WorkerLostError` so the scan
  retries. When the result stream fails, finished tasks are fetched by id
  (``Client.get_batch_result``) instead.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pyhf_dist.exceptions import (
    ExecutorError,
    ExecutorOptionError,
    MissingDependencyError,
    PayloadTooLargeError,
    SettingsError,
    WorkerLostError,
)
from pyhf_dist.executors.base import Executor, NoAnswer, call_within
from pyhf_dist.executors.remote import encode, pyhf_dist_fit
from pyhf_dist.worker import WorkerContext

try:
    import globus_compute_sdk
    from globus_compute_sdk.errors import TaskExecutionFailed
    from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect
except ImportError as error:  # the registry imports this module only when "funcx" is asked for
    raise MissingDependencyError("globus-compute-sdk", "funcx", 'executor="funcx" (Globus Compute)') from error

__all__ = [
    "FuncXExecutor",
    "MAX_REQUEST_BYTES",
    "MAX_RESULT_BYTES",
    "ENDPOINT_ID_VARIABLE",
    "check_credentials",
    "task_request_bytes",
]

log = logging.getLogger(__name__)

#: The service refuses a submission request (one batch of tasks) larger than this.
MAX_REQUEST_BYTES = 10_000_000
#: The endpoint refuses a result larger than this.
MAX_RESULT_BYTES = 10 * 1024 * 1024
#: Room left in each request for what the SDK adds besides the tasks (runtime info, ids).
REQUEST_MARGIN = 64 * 1024
#: Where the endpoint id is read from when none is given.
ENDPOINT_ID_VARIABLE = "GLOBUS_COMPUTE_ENDPOINT_ID"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_WORKER_LOST = re.compile(r"WorkerLost|ManagerLost|worker (was )?lost|BrokenProcessPool|terminated abruptly", re.IGNORECASE)


def check_credentials() -> str:
    """How this process would log in to Globus Compute, without ever prompting.

    Returns:
        ``"client credentials"`` (``GLOBUS_COMPUTE_CLIENT_ID`` and ``..._SECRET`` set) or
        ``"stored login"`` (tokens from an earlier ``globus-compute-endpoint login`` or SDK login).

    Raises:
        ExecutorError: Neither is available; the message says how to log in.
    """
    client_id = os.environ.get("GLOBUS_COMPUTE_CLIENT_ID")
    secret = os.environ.get("GLOBUS_COMPUTE_CLIENT_SECRET")
    if client_id and secret:
        return "client credentials"
    if secret and not client_id:
        raise ExecutorError("GLOBUS_COMPUTE_CLIENT_SECRET is set but GLOBUS_COMPUTE_CLIENT_ID is not: set both")
    from globus_compute_sdk.sdk.compute_dir import get_compute_dir

    storage = Path(get_compute_dir()) / "storage.db"
    if storage.is_file():
        try:
            from globus_compute_sdk.sdk.auth.globus_app import get_globus_app

            if not get_globus_app().login_required():
                return "stored login"
        except Exception as error:  # a damaged token store is a missing login too
            log.debug("reading the stored Globus login failed: %s", error)
    raise ExecutorError(
        "no Globus Compute login: set GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET "
        "(a Globus service client), or log in once interactively (python -c \"from globus_compute_sdk "
        "import Client; Client()\"), or pass client= / executor= objects you built yourself"
    )


class _ContextSerializer(ComputeSerializer):
    """Source-text functions and JSON data; the scan's context is serialized only once.

    Every task's arguments are ``(context_text, task_text)`` with the very same ``context_text``
    object; its JSON form is cached, so each task costs only the JSON of its own patch. The bytes
    are exactly those ``JSONData`` produces, so any endpoint decodes them.
    """

    def __init__(self):
        super().__init__(strategy_code=PureSourceTextInspect(), strategy_data=JSONData())
        self._context_text: str | None = None
        self._context_json = ""

    def set_context(self, text: str) -> None:
        self._context_text = text
        self._context_json = json.dumps(text)

    def serialize(self, data: Any) -> str:
        if (
            isinstance(data, tuple) and len(data) == 2 and self._context_text is not None
            and data[0] is self._context_text
        ):
            return f"{JSONData.identifier}[{self._context_json}, {json.dumps(data[1])}]"
        return super().serialize(data)


def task_request_bytes(serializer: ComputeSerializer, args: tuple, kwargs: dict | None = None) -> int:
    """Bytes one task adds to a submission request: its packed payload as a JSON string."""
    payload = serializer.pack_buffers([serializer.serialize(tuple(args)), serializer.serialize(kwargs or {})])
    return len(json.dumps(payload)) + 2


def _request_bytes(data: dict) -> int:
    return len(json.dumps(data))


class _SplittingBatchRun:
    """Wraps ``Client.batch_run``: a batch over the request limit goes out as several requests.

    The executor sizes batches so that this rarely has to act; it is the guarantee that no
    request over :data:`MAX_REQUEST_BYTES` is ever sent. The answers are merged in task order, as
    if the service had accepted one request.
    """

    def __init__(self, original, limit: int):
        self.original = original
        self.limit = limit
        self.requests: list[tuple[int, int]] = []  # (tasks, bytes) of every request sent

    def __call__(self, endpoint_id, batch):
        data = batch.prepare()
        size = _request_bytes(data)
        if size <= self.limit:
            self.requests.append((len(batch), size))
            return self.original(endpoint_id, batch)
        empty = copy.copy(batch)
        empty.tasks = defaultdict(list)
        base = _request_bytes(empty.prepare()) + 64
        groups: list[list[tuple[Any, str]]] = [[]]
        used = base
        for function_id, payloads in batch.tasks.items():
            for payload in payloads:
                cost = len(json.dumps(payload)) + 2 + 64
                if base + cost > self.limit:
                    raise PayloadTooLargeError(
                        f"one Globus Compute task is {base + cost:,} bytes, over the service's "
                        f"{self.limit:,}-byte limit per request"
                    )
                if groups[-1] and used + cost > self.limit:
                    groups.append([])
                    used = base
                groups[-1].append((function_id, payload))
                used += cost
        merged: dict[str, Any] | None = None
        for group in groups:
            part = copy.copy(batch)
            part.tasks = defaultdict(list)
            for function_id, payload in group:
                part.tasks[function_id].append(payload)
            if merged is not None:
                part.task_group_id = merged["task_group_id"]
            self.requests.append((len(part), _request_bytes(part.prepare())))
            answer = dict(self.original(endpoint_id, part))
            if merged is None:
                merged = answer
                merged["tasks"] = {key: list(value) for key, value in answer["tasks"].items()}
            else:
                for function_id, task_ids in answer["tasks"].items():
                    merged["tasks"].setdefault(function_id, []).extend(task_ids)
        log.info("split a Globus Compute batch of %d tasks (%d bytes) into %d requests", len(batch), size, len(groups))
        return merged


def _within(seconds: float, what: str, function, *args):
    """Run ``function(*args)`` but give up after ``seconds`` (the SDK retries for a long time)."""
    try:
        return call_within(seconds, function, *args, name=f"pyhf-dist {what}")
    except NoAnswer:
        raise ExecutorError(
            f"the Globus Compute service did not answer within {seconds:g} s ({what}): check the network "
            "(the SDK needs HTTPS to the service, and AMQP on port 443, 5671 or 5672 for results), "
            "or raise connect_timeout"
        ) from None


class FuncXExecutor(Executor):
    """Runs fits on a Globus Compute endpoint through the Globus Compute SDK.

    Args:
        endpoint_id: The endpoint's UUID (default: ``$GLOBUS_COMPUTE_ENDPOINT_ID``).
        client: A ``globus_compute_sdk.Client`` to use (default: one built from the stored login
            or the ``GLOBUS_COMPUTE_CLIENT_ID``/``..._SECRET`` client credentials).
        executor: A ready ``globus_compute_sdk.Executor`` to submit through; it is not shut down
            here. Its serializer is set to source-text functions and JSON data.
        batch_size: Most tasks per submission request (default 128, the SDK's); lowered
            automatically so that a request stays under 10 MB.
        amqp_port: Port of the result stream (443, 5671 or 5672; default: the SDK's).
        user_endpoint_config: Values for the endpoint's user configuration template (e.g.
            ``{"account": "...", "partition": "...", "nodes_per_block": 1}``).
        compress: Send workspace and patches zlib-compressed (about 6x smaller; default). With
            ``False`` they travel as plain JSON text.
        connect_timeout: Seconds to wait for the service at start before giving up.
        poll_interval: Seconds between ``get_batch_result`` polls once the result stream failed.
        max_request_bytes: Limit per submission request (the service's is 10 MB).
        workers: How many tasks the endpoint runs at once, if known (only recorded).

    Example:
        >>> result = pyhf_dist.map_fits("pallet/", executor="funcx",
        ...                             endpoint_id="4b116d3c-1703-4f8f-9f6f-39921e5864df")  # doctest: +SKIP
    """

    name = "funcx"

    def __init__(
        self,
        endpoint_id: str | None = None,
        client: Any = None,
        executor: Any = None,
        batch_size: int | None = None,
        amqp_port: int | None = None,
        user_endpoint_config: dict | None = None,
        compress: bool = True,
        connect_timeout: float = 30.0,
        poll_interval: float = 2.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        workers: int | None = None,
    ):
        super().__init__(workers=workers)
        if endpoint_id is None and executor is not None:
            endpoint_id = executor.endpoint_id
        endpoint_id = endpoint_id or os.environ.get(ENDPOINT_ID_VARIABLE)
        if not endpoint_id:
            raise ExecutorOptionError(
                f'executor="funcx" needs the Globus Compute endpoint id: endpoint_id="<uuid>" '
                f"(--endpoint-id) or ${ENDPOINT_ID_VARIABLE}; `globus-compute-endpoint list` shows yours"
            )
        endpoint_id = str(endpoint_id).strip()
        if not _UUID.match(endpoint_id):
            raise ExecutorOptionError(f"endpoint id {endpoint_id!r} is not a UUID (see `globus-compute-endpoint list`)")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ExecutorOptionError(f"batch_size must be a positive integer, got {batch_size!r}")
        if amqp_port not in (None, 443, 5671, 5672):
            raise ExecutorOptionError(f"amqp_port must be 443, 5671 or 5672, got {amqp_port!r}")
        if user_endpoint_config is not None and not isinstance(user_endpoint_config, dict):
            raise ExecutorOptionError(f"user_endpoint_config must be a dict, got {type(user_endpoint_config).__name__}")
        if client is not None and executor is not None:
            raise ExecutorOptionError("give client= or executor=, not both")
        if not max_request_bytes or max_request_bytes <= REQUEST_MARGIN:
            raise ExecutorOptionError(f"max_request_bytes must exceed {REQUEST_MARGIN}, got {max_request_bytes!r}")
        self.endpoint_id = endpoint_id
        self.client = client
        self.batch_size = batch_size or 128
        self.amqp_port = amqp_port
        self.user_endpoint_config = user_endpoint_config
        self.compress = bool(compress)
        self.connect_timeout = float(connect_timeout)
        self.poll_interval = float(poll_interval)
        self.max_request_bytes = int(max_request_bytes)
        self._given_executor = executor
        self._sdk: Any = None
        self._serializer = _ContextSerializer()
        self._context_text: str | None = None
        self._splitter: _SplittingBatchRun | None = None
        self._largest_task = 0
        self._pending: dict[concurrent.futures.Future, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._poller: _ResultPoller | None = None
        self._endpoint_status: str | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ start
    def start(self, context: WorkerContext) -> None:
        super().start(context)
        data = json.loads(context.payload)
        settings = data["settings"]
        if settings.get("calculation", "hypotest") != "hypotest" or settings.get("calctype", "asymptotics") != "asymptotics":
            raise SettingsError(
                f'executor="funcx" runs asymptotic hypotests only; calculation={settings.get("calculation")!r}, '
                f'calctype={settings.get("calctype")!r} are not available there yet'
            )
        began = time.perf_counter()
        self._context_text = encode(context.payload.decode(), compress=self.compress)
        self._serializer.set_context(self._context_text)
        probe = {"name": "", "patch": [], "context": context.key, "chunk": None, "timeout": None}
        self._check_size(task_request_bytes(self._serializer, (self._context_text, encode(probe, self.compress))), "the background workspace alone")
        self.timings["encode_seconds"] = time.perf_counter() - began

        if self._given_executor is not None:
            self._sdk = self._given_executor
            self.client = self._sdk.client
        else:
            if self.client is None:
                check_credentials()
                self.client = _within(self.connect_timeout, "login and version check", globus_compute_sdk.Client)
        self._sdk_client_setup()
        self._endpoint_status = _within(self.connect_timeout, "endpoint status", self._check_endpoint)
        if self._sdk is None:
            self._sdk = globus_compute_sdk.Executor(
                endpoint_id=self.endpoint_id,
                client=self.client,
                batch_size=self.batch_size,
                amqp_port=self.amqp_port,
                user_endpoint_config=self.user_endpoint_config,
                result_serializers=[JSONData()],
            )
        else:
            self._sdk.result_serializers = [JSONData()]
        self._sdk.serializer = self._serializer
        try:
            _within(self.connect_timeout, "function registration", self._register)
        except Exception:
            self.shutdown()
            raise
        self.timings["start_seconds"] = time.perf_counter() - began

    def _sdk_client_setup(self) -> None:
        self.client.fx_serializer = self._serializer
        batch_run = self.client.batch_run
        if not isinstance(batch_run, _SplittingBatchRun):
            self._splitter = _SplittingBatchRun(batch_run, self.max_request_bytes - REQUEST_MARGIN)
            self.client.batch_run = self._splitter
        else:
            self._splitter = batch_run

    def _check_endpoint(self) -> str | None:
        try:
            status = self.client.get_endpoint_status(self.endpoint_id)
        except Exception as error:
            code = getattr(error, "http_status", None)
            if code in (400, 403, 404):
                raise ExecutorError(
                    f"Globus Compute endpoint {self.endpoint_id} is unknown or not shared with this identity "
                    f"(HTTP {code}): check the id with `globus-compute-endpoint list`"
                ) from error
            raise ExecutorError(f"could not reach the Globus Compute service: {error}") from error
        state = status.get("status") if isinstance(status, dict) else None
        if state and state != "online":
            log.warning("Globus Compute endpoint %s is %s: tasks wait until it is online", self.endpoint_id, state)
        return state

    def _register(self) -> None:
        if self._sdk._fn_cache_key(pyhf_dist_fit) not in self._sdk._function_registry:
            self._sdk.register_function(pyhf_dist_fit)

    # ----------------------------------------------------------------------------------- submit
    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_request_bytes - REQUEST_MARGIN:
            hint = "" if self.compress else " (try compress=True)"
            raise PayloadTooLargeError(
                f"{what} needs {size:,} bytes per Globus Compute task, over the service's limit of "
                f"{self.max_request_bytes:,} bytes per submission{hint}; a workspace this large cannot "
                "travel with the tasks: use executor=\"parsl\" or \"slurm\" on the site instead"
            )

    def submit(self, task: dict) -> concurrent.futures.Future:
        if self._sdk is None:
            raise RuntimeError("FuncXExecutor.start(context) must be called before submit()")
        task_text = encode(task, compress=self.compress)
        args = (self._context_text, task_text)
        size = task_request_bytes(self._serializer, args)
        self._check_size(size, f"task {task['name']!r}")
        if size > self._largest_task:
            self._largest_task = size
            self._sdk.batch_size = max(1, min(self.batch_size, (self.max_request_bytes - REQUEST_MARGIN) // size))
        outer: concurrent.futures.Future = concurrent.futures.Future()
        outer.task_name = task["name"]  # type: ignore[attr-defined]
        inner = self._sdk.submit(pyhf_dist_fit, *args)
        with self._lock:
            self._pending[inner] = outer
        inner.add_done_callback(self._on_done)
        return outer

    def _on_done(self, inner) -> None:
        with self._lock:
            outer = self._pending.pop(inner, None)
        if outer is None or outer.done():
            return
        if inner.cancelled():
            outer.cancel()
            outer.set_running_or_notify_cancel()
            return
        error = inner.exception()
        if error is None:
            self._deliver(outer, result=inner.result())
        elif isinstance(error, TaskExecutionFailed):
            self._deliver(outer, remote_error=error.remote_data)
        elif getattr(inner, "task_id", None):
            # Accepted by the service, but the result stream (AMQP) broke: fetch it by id.
            log.warning("Globus Compute result stream failed (%s); fetching results by task id", error)
            self._ensure_poller().add(inner.task_id, outer)
        else:
            outer.set_exception(ExecutorError(f"Globus Compute did not accept the task: {type(error).__name__}: {error}"))

    def _deliver(self, outer, result: Any = None, remote_error: str | None = None) -> None:
        if outer.done():
            return
        if remote_error is not None:
            if _WORKER_LOST.search(remote_error):
                outer.set_exception(WorkerLostError(f"the endpoint lost the worker running the task: {remote_error.strip().splitlines()[-1]}"))
                return
            now = time.time()
            outer.set_result({
                "name": outer.task_name, "status": "failed",
                "error": f"task raised on the Globus Compute endpoint:\n{remote_error.rstrip()}",
                "started": None, "finished": now, "fit_seconds": None, "worker": None,
            })
            return
        if not isinstance(result, dict) or result.get("name") != outer.task_name:
            outer.set_exception(ExecutorError(f"unexpected result from the endpoint for {outer.task_name!r}: {str(result)[:200]}"))
            return
        outer.set_result(result)

    def _ensure_poller(self) -> "_ResultPoller":
        with self._lock:
            if self._poller is None:
                self._poller = _ResultPoller(self, self.poll_interval)
                self._poller.start()
            return self._poller

    # ------------------------------------------------------------------------------- lifecycle
    def is_worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, WorkerLostError)

    def shutdown(self, cancel_futures: bool = True) -> None:
        sdk, self._sdk = self._sdk, None
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()
        if sdk is not None and sdk is not self._given_executor:
            sdk.shutdown(wait=not cancel_futures, cancel_futures=cancel_futures)
            _stop_result_watcher(sdk)
        with self._lock:
            leftover = list(self._pending.values())
            self._pending.clear()
        for outer in leftover:
            outer.cancel()

    def describe(self) -> dict:
        info = {
            "executor": self.name,
            "workers": self.workers,
            "endpoint_id": self.endpoint_id,
            "endpoint_status": self._endpoint_status,
            "compress": self.compress,
            "sdk_version": globus_compute_sdk.__version__,
        }
        if self._context_text is not None:
            info["context_bytes"] = len(self._context_text)
        return info

    @property
    def requests(self) -> list[tuple[int, int]]:
        """``(tasks, bytes)`` of every submission request sent so far."""
        return list(self._splitter.requests) if self._splitter is not None else []

    def __repr__(self) -> str:
        return f"FuncXExecutor(endpoint_id={self.endpoint_id!r}, batch_size={self.batch_size!r}, compress={self.compress!r})"


def _stop_result_watcher(sdk) -> None:
    # The SDK keeps one result-stream thread per task group until the interpreter exits; stop ours
    # when no other executor's futures are waiting on it.
    try:
        from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

        watcher = _RESULT_WATCHERS.get(sdk.task_group_id)
        if watcher is not None and watcher.is_alive():
            others = [f for f in watcher.get_open_futures().values() if f._metadata.get("executor_id") != id(sdk)]
            if not others:
                watcher.shutdown(wait=False, cancel_futures=True)
    except Exception as error:  # SDK internals: never let cleanup fail a scan
        log.debug("could not stop the Globus Compute result watcher: %s", error)


class _ResultPoller(threading.Thread):
    """Fetches results by task id (``Client.get_batch_result``) once the result stream failed."""

    def __init__(self, owner: FuncXExecutor, interval: float):
        super().__init__(name="pyhf-dist globus-compute poller", daemon=True)
        self.owner = owner
        self.client = owner.client
        self.interval = interval
        self.waiting: dict[str, concurrent.futures.Future] = {}
        self.errors: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def add(self, task_id: str, outer: concurrent.futures.Future) -> None:
        with self.lock:
            self.waiting[str(task_id)] = outer

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                task_ids = [tid for tid, outer in self.waiting.items() if not outer.done()]
            if not task_ids:
                continue
            try:
                answers = self.client.get_batch_result(task_ids)
            except Exception as error:
                log.warning("polling Globus Compute for %d results failed: %s", len(task_ids), error)
                continue
            for task_id in task_ids:
                answer = answers.get(task_id)
                if answer is None:
                    # get_batch_result leaves out failed tasks (their exception is raised while
                    # unpacking); get_task raises it where we can catch it.
                    answer = self._one(task_id)
                if answer is None or answer.get("pending", True):
                    continue
                with self.lock:
                    outer = self.waiting.pop(task_id)
                if "result" in answer:
                    self.owner._deliver(outer, result=answer["result"])
                else:
                    self.owner._deliver(outer, remote_error=str(answer.get("exception") or answer.get("reason") or "unknown failure"))

    def _one(self, task_id: str) -> dict | None:
        try:
            return self.client.get_task(task_id)
        except TaskExecutionFailed as error:
            return {"pending": False, "exception": error.remote_data}
        except Exception as error:
            self.errors[task_id] += 1
            if self.errors[task_id] >= 5:
                return {"pending": False, "exception": f"could not fetch the result of task {task_id}: {error}"}
            return None
