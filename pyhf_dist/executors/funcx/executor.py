"""The client side of ``executor="funcx"`` (alias ``"globus-compute"``): :class:`FuncXExecutor`.

Tasks go through the Globus Compute SDK's own ``concurrent.futures`` executor
(``globus_compute_sdk.Executor``): it batches them into REST submissions and receives the results
over the service's AMQP result stream. What this adds:

* **A self-contained remote function** (:func:`pyhf_dist.executors.funcx.endpoint.pyhf_dist_fit`),
  registered as source text, so that an endpoint needs only pyhf and numpy, not pyhf-dist (where
  ``pyhf-dist[jax]`` is installed on the endpoint, it takes the compiled fast path there).
* **Data as JSON.** The context (background workspace + fit settings) and each task are sent as
  JSON text (``JSONData``), compressed with zlib by default (``compress=True``); results come
  back as JSON too. The cloud path has no per-worker setup hook, so the context travels with
  *every* task — it is encoded and serialized once on the client, and each endpoint worker parses
  it once and keeps it for the following tasks.
* **Payload limits checked on the client.** The service refuses a submission (a whole batch) over
  10 MB, and the endpoint refuses results over 10 MiB. Batches are sized from the measured task
  size and, should one still be too large, split into several requests before sending
  (:class:`~pyhf_dist.executors.funcx.transport.RequestSplitter`); a single task that cannot fit
  raises :class:`~pyhf_dist.exceptions.PayloadTooLargeError` with the fix.
* **Clear failures.** No credentials (checked before anything could prompt on a terminal), no
  endpoint id, an unknown endpoint, or a service that does not answer within
  ``connect_timeout`` seconds raise :class:`~pyhf_dist.exceptions.ExecutorError` at start. A task
  that raises on the endpoint becomes a failed record whose ``error`` holds the remote traceback;
  a lost endpoint worker raises :class:`~pyhf_dist.exceptions.WorkerLostError` so the scan
  retries. When the result stream fails, finished tasks are fetched by id
  (``Client.get_batch_result``) instead.
* **The user's objects left as they were.** A ``client=`` given is copied before the scan's
  serializer and request splitter are set on the copy; an ``executor=`` given is configured for
  the scan and given its own settings back at shutdown.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import os
import re
import threading
from typing import Any

from pyhf_dist.exceptions import (
    ExecutorError,
    ExecutorOptionError,
    MissingDependencyError,
    PayloadTooLargeError,
    WorkerLostError,
)
from pyhf_dist.executors.base import Description, Executor, ExecutorFlag
from pyhf_dist.protocol import Context, Task, encode, failed_record, first_line, make_task

try:
    import globus_compute_sdk
    from globus_compute_sdk.errors import TaskExecutionFailed
    from globus_compute_sdk.serialize import JSONData
except ImportError as error:  # the registry imports this module only when "funcx" is asked for
    raise MissingDependencyError("globus-compute-sdk", "funcx", 'executor="funcx" (Globus Compute)') from error

from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit  # noqa: E402
from pyhf_dist.executors.funcx.transport import (  # noqa: E402
    MAX_REQUEST_BYTES,
    NETWORK_HINT,
    REQUEST_MARGIN,
    ContextSerializer,
    RequestSplitter,
    ResultPoller,
    check_credentials,
    is_connection_error,
    stop_result_watcher,
    task_request_bytes,
    within,
)

__all__ = ["FuncXExecutor", "ENDPOINT_ID_VARIABLE"]

log = logging.getLogger(__name__)

#: Where the endpoint id is read from when none is given.
ENDPOINT_ID_VARIABLE = "GLOBUS_COMPUTE_ENDPOINT_ID"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_WORKER_LOST = re.compile(r"WorkerLost|ManagerLost|worker (was )?lost|BrokenProcessPool|terminated abruptly", re.IGNORECASE)


class FuncXExecutor(Executor):
    """Runs fits on a Globus Compute endpoint through the Globus Compute SDK.

    Args:
        endpoint_id: The endpoint's UUID (default: ``$GLOBUS_COMPUTE_ENDPOINT_ID``).
        client: A ``globus_compute_sdk.Client`` to use (default: one built from the stored login
            or the ``GLOBUS_COMPUTE_CLIENT_ID``/``..._SECRET`` client credentials).
        executor: A ready ``globus_compute_sdk.Executor`` to submit through. It is not shut down
            here; for the scan it submits with the scan's serializer (source-text functions, JSON
            data), result serializers and batch size, and gets its own back at shutdown.
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
    flags = (
        ExecutorFlag("endpoint_id", "Globus Compute endpoint id [default: $GLOBUS_COMPUTE_ENDPOINT_ID]."),
        ExecutorFlag("batch_size", "Most tasks per submission request (lowered to stay under 10 MB).", int),
        ExecutorFlag("amqp_port", "Port of the result stream.", (443, 5671, 5672)),
    )

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
        self.client: Any = None  # the client the scan submits through (set by start)
        self._given_client = client
        self.batch_size = batch_size or 128
        self.amqp_port = amqp_port
        self.user_endpoint_config = user_endpoint_config
        self.compress = bool(compress)
        self.connect_timeout = float(connect_timeout)
        self.poll_interval = float(poll_interval)
        self.max_request_bytes = int(max_request_bytes)
        self._given_executor = executor
        self._given_settings: dict | None = None
        self._sdk: Any = None
        self._serializer = ContextSerializer()
        self._context_text: str | None = None
        self._splitter: RequestSplitter | None = None
        self._largest_task = 0
        self._pending: dict[concurrent.futures.Future, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._poller: ResultPoller | None = None
        self._endpoint_status: str | None = None

    # ------------------------------------------------------------------------------------ start
    def supports(self, settings) -> str | None:
        if settings.calculation != "hypotest" or settings.calctype != "asymptotics":
            return (f'executor="funcx" runs asymptotic hypotests only; calculation={settings.calculation!r}, '
                    f'calctype={settings.calctype!r} are not available there yet: use executor="parsl" on the site')
        return None

    def launch(self, context: Context) -> None:
        self._context_text = encode(context.payload.decode(), compress=self.compress)
        self._serializer.set_context(self._context_text)
        probe = make_task("", [], context.key)
        self._check_size(task_request_bytes(self._serializer, (self._context_text, encode(probe, self.compress))), "the background workspace alone")

        if self._given_executor is not None:
            self._sdk = self._given_executor
            self._given_settings = {"client": self._sdk.client, "result_serializers": self._sdk.result_serializers,
                                    "batch_size": self._sdk.batch_size}
            self.client = self._copy_client(self._sdk.client)
            self._sdk.client = self.client
        elif self._given_client is not None:
            self.client = self._copy_client(self._given_client)
        else:
            check_credentials()
            self.client = within(self.connect_timeout, "login and version check", globus_compute_sdk.Client)
        self._splitter = RequestSplitter(self.client.batch_run, self.max_request_bytes - REQUEST_MARGIN)
        self.client.batch_run = self._splitter
        self._endpoint_status = within(self.connect_timeout, "endpoint status", self._check_endpoint)
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
            within(self.connect_timeout, "function registration", self._register)
        except Exception:
            self.shutdown()
            raise

    def _copy_client(self, client):
        # The scan sets its serializer and request splitter on a client: on a copy of one the user
        # gave, which keeps its own (the copy shares the login and the connections).
        copied = copy.copy(client)
        copied.fx_serializer = self._serializer
        return copied

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
            hint = f": {NETWORK_HINT}" if is_connection_error(error) else ""
            raise ExecutorError(f"could not reach the Globus Compute service: {first_line(error)}{hint}") from error
        state = status.get("status") if isinstance(status, dict) else None
        if state and state != "online":
            log.warning("Globus Compute endpoint %s is %s: tasks wait until it is online", self.endpoint_id, state)
        return state

    def _register(self) -> None:
        try:
            self._sdk.register_function(pyhf_dist_fit)
        except ValueError:  # registered already by an earlier scan with this SDK executor
            pass

    # ----------------------------------------------------------------------------------- submit
    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_request_bytes - REQUEST_MARGIN:
            hint = "" if self.compress else " (try compress=True)"
            raise PayloadTooLargeError(
                f"{what} needs {size:,} bytes per Globus Compute task, over the service's limit of "
                f"{self.max_request_bytes:,} bytes per submission{hint}; a workspace this large cannot "
                "travel with the tasks: use executor=\"parsl\" or \"slurm\" on the site instead"
            )

    def submit(self, task: Task) -> concurrent.futures.Future:
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
        outer.task = task  # type: ignore[attr-defined]  # our own future: what its result is for
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
            outer.set_result(failed_record(outer.task, f"task raised on the Globus Compute endpoint:\n{remote_error.rstrip()}"))
            return
        if not isinstance(result, dict) or result.get("name") != outer.task["name"]:
            outer.set_exception(ExecutorError(f"unexpected result from the endpoint for {outer.task['name']!r}: {str(result)[:200]}"))
            return
        outer.set_result(result)

    def _ensure_poller(self) -> "ResultPoller":
        with self._lock:
            if self._poller is None:
                self._poller = ResultPoller(self.client, self.poll_interval, self._deliver)
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
            stop_result_watcher(sdk)
        elif sdk is not None and self._given_settings is not None:
            for name, value in self._given_settings.items():  # the user's executor, as it was given
                setattr(sdk, name, value)
            self._given_settings = None
        with self._lock:
            leftover = list(self._pending.values())
            self._pending.clear()
        for outer in leftover:
            outer.cancel()

    def describe(self) -> Description:
        info: Description = {
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

    def __repr__(self) -> str:
        return f"FuncXExecutor(endpoint_id={self.endpoint_id!r}, batch_size={self.batch_size!r}, compress={self.compress!r})"
