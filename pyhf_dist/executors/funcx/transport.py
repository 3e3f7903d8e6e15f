"""The client side's plumbing for Globus Compute: login check, serialization, request sizes,
result polling.

* :func:`check_credentials`: how the SDK would log in, found out without ever prompting.
* :class:`ContextSerializer`: source-text functions and JSON data, the scan's context encoded once.
* :class:`RequestSplitter`: no submission request over the service's 10 MB limit is ever sent.
* :class:`ResultPoller`: results fetched by task id when the AMQP result stream fails.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from pyhf_dist.exceptions import ExecutorError, PayloadTooLargeError
from pyhf_dist.executors.base import NoAnswer, call_within
from pyhf_dist.protocol import first_line

from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_RESULT_BYTES",
    "REQUEST_MARGIN",
    "check_credentials",
    "ContextSerializer",
    "task_request_bytes",
    "RequestSplitter",
    "within",
    "stop_result_watcher",
    "ResultPoller",
]

log = logging.getLogger(__name__)

#: The service refuses a submission request (one batch of tasks) larger than this.
MAX_REQUEST_BYTES = 10_000_000
#: The endpoint refuses a result larger than this.
MAX_RESULT_BYTES = 10 * 1024 * 1024
#: Room left in each request for what the SDK adds besides the tasks (runtime info, ids).
REQUEST_MARGIN = 64 * 1024


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


class ContextSerializer(ComputeSerializer):
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


class RequestSplitter:
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


#: What the SDK needs of the network, for the errors that say it is not there.
NETWORK_HINT = ("check the network (the SDK needs HTTPS to the service, and AMQP on port 443, 5671 or 5672 for "
                "results)")


def within(seconds: float, what: str, function, *args):
    """Run ``function(*args)`` but give up after ``seconds`` (the SDK retries for a long time).

    Raises:
        ExecutorError: No answer within ``seconds``, or no connection to the service at all.
    """
    try:
        return call_within(seconds, function, *args, name=f"pyhf-dist {what}")
    except NoAnswer:
        raise ExecutorError(
            f"the Globus Compute service did not answer within {seconds:g} s ({what}): {NETWORK_HINT}, "
            "or raise connect_timeout"
        ) from None
    except Exception as error:
        if not is_connection_error(error):
            raise
        raise ExecutorError(
            f"could not reach the Globus Compute service ({what}: {first_line(error)}): {NETWORK_HINT}"
        ) from None


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` says the service could not be reached (no route, no name, refused)."""
    import globus_sdk
    import requests

    return isinstance(error, (globus_sdk.GlobusConnectionError, requests.exceptions.ConnectionError, ConnectionError))


def stop_result_watcher(sdk) -> None:
    # The SDK keeps one result-stream thread per task group until the interpreter exits; stop ours
    # when no other executor's futures are waiting on it.
    try:
        from globus_compute_sdk.sdk import executor as sdk_executor

        # SDK internals, read defensively (no public API stops the thread): the module's registry
        # of result watchers by task group, and the executor tag on each future.
        watchers = getattr(sdk_executor, "_RESULT_WATCHERS", {})
        watcher = watchers.get(sdk.task_group_id)
        if watcher is not None and watcher.is_alive():
            others = [f for f in watcher.get_open_futures().values() if f._metadata.get("executor_id") != id(sdk)]
            if not others:
                watcher.shutdown(wait=False, cancel_futures=True)
    except Exception as error:  # SDK internals: never let cleanup fail a scan
        log.debug("could not stop the Globus Compute result watcher: %s", error)


class ResultPoller(threading.Thread):
    """Fetches results by task id (``Client.get_batch_result``) once the result stream failed.

    Args:
        client: The ``globus_compute_sdk.Client`` to poll with.
        interval: Seconds between polls.
        deliver: Called as ``deliver(future, result=...)`` or ``deliver(future, remote_error=...)``
            for each finished task.
    """

    def __init__(self, client, interval: float, deliver):
        super().__init__(name="pyhf-dist globus-compute poller", daemon=True)
        self.client = client
        self.deliver = deliver
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
                    self.deliver(outer, result=answer["result"])
                else:
                    self.deliver(outer, remote_error=str(answer.get("exception") or answer.get("reason") or "unknown failure"))

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
