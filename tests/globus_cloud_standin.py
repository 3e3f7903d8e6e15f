"""An in-test STAND-IN for the Globus Compute cloud service. It is not the real service.

The real ``globus_compute_sdk.Executor`` and ``Client`` are driven unchanged; only what would cross
the network is replaced:

* the REST calls the SDK makes (version, endpoint status, function registration, batch submit,
  task status) are answered by :class:`GlobusCloudStandIn` through the ``responses`` library;
* the AMQP result stream is replaced by :class:`StandInResultWatcher`, a subclass of the SDK's
  ``_ResultWatcher`` that receives the stand-in's results instead of connecting to a broker.

Behind the REST facade, tasks run on a *real* Globus Compute endpoint engine
(``ProcessPoolEngine`` or ``GlobusComputeEngine``) from the exact bytes the service would deliver
to an endpoint: the registered function buffer followed by the submitted argument buffers, packed
in a messagepack ``Task``. Results go back as messagepack ``Result`` bytes, as an endpoint sends
them. The stand-in enforces the service's 10 MB limit per submission request
(``TASK_PAYLOAD_TOO_LARGE``) and records every request's size.

This relies on SDK internals (``_ResultWatcher``, REST routes), so the tests that use it pin
globus-compute-sdk 4.19.0 (see ``SDK_VERSION``).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import types
import uuid

SDK_VERSION = "4.19.0"
MAX_REQUEST_BYTES = 10_000_000


def make_result_watcher_class(standin: "GlobusCloudStandIn"):
    """The SDK's ``_ResultWatcher`` with its AMQP connection replaced by ``standin``'s outbox."""
    from globus_compute_common import messagepack
    from globus_compute_sdk.sdk.executor import _ResultWatcher

    class StandInResultWatcher(_ResultWatcher):
        """The SDK's result watcher with the AMQP connection replaced by the stand-in's outbox."""

        def run(self):
            self._thread_id = threading.get_ident()
            props = types.SimpleNamespace(headers={}, timestamp=int(time.time()))
            while not self._time_to_stop:
                if standin.amqp_broken:
                    # What the real watcher does once it gave up connecting: fail every open future.
                    time.sleep(0.2)
                    with self._new_futures_lock:
                        self._closed = True
                        self._time_to_stop = True
                        reason = ConnectionError("stand-in: AMQP result stream unavailable")
                        while self._open_futures:
                            _, future = self._open_futures.popitem()
                            future.set_exception(reason)
                        self._open_futures_empty.set()
                    break
                try:
                    body = standin.outbox.get(timeout=0.05)
                except queue.Empty:
                    if self._received_results:
                        self._match_results_to_futures()
                    continue
                result = messagepack.unpack(body)
                self._received_results[str(result.task_id)] = (props, result)
                self._match_results_to_futures()  # results not yet watched are matched later

        def shutdown(self, wait=True, *, cancel_futures=False):
            from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

            self._closed = True
            if cancel_futures:
                with self._new_futures_lock:
                    while self._open_futures:
                        _, future = self._open_futures.popitem()
                        future.cancel()
                        future.set_running_or_notify_cancel()
                    self._open_futures_empty.set()
            self._time_to_stop = True
            if wait and self.is_alive() and threading.get_ident() != self._thread_id:
                self.join(5)
            _RESULT_WATCHERS.pop(self.task_group_id, None)

    return StandInResultWatcher


class GlobusCloudStandIn:
    """Answers the Globus Compute REST API in-process and runs tasks on a real endpoint engine.

    Args:
        engine: A started Globus Compute endpoint engine (``engine.submit(GCFuture, bytes, ...)``).
        endpoint_id: The one endpoint this stand-in knows; other ids get HTTP 404.
        base_url: The SDK client's ``web_service_address``.
    """

    def __init__(self, engine, endpoint_id: str, base_url: str):
        self.engine = engine
        self.endpoint_id = str(endpoint_id)
        self.base_url = base_url.rstrip("/")
        self.functions: dict[str, str] = {}
        self.tasks: dict[str, dict] = {}
        self.requests: list[dict] = []  # one entry per submit request: bytes, tasks, accepted
        self.outbox: "queue.Queue[bytes]" = queue.Queue()
        self.amqp_broken = False
        self.hang_seconds = 0.0
        self.unreachable = False  # every request fails as a refused connection does
        self.lock = threading.Lock()

    # -------------------------------------------------------------------------------- routes
    def install(self, mock) -> None:
        """Register the routes on a ``responses.RequestsMock``."""
        base = re.escape(self.base_url)
        mock.add_callback("GET", re.compile(base + r"/v2/version.*"), callback=self._version)
        mock.add_callback("GET", re.compile(base + r"/v2/endpoints/([^/]+)/status.*"), callback=self._endpoint_status)
        mock.add_callback("POST", re.compile(base + r"/v3/functions"), callback=self._register)
        mock.add_callback("POST", re.compile(base + r"/v3/endpoints/([^/]+)/submit"), callback=self._submit)
        mock.add_callback("POST", re.compile(base + r"/v2/batch_status"), callback=self._batch_status)
        mock.add_callback("GET", re.compile(base + r"/v2/tasks/([^/?]+).*"), callback=self._task)

    @staticmethod
    def _json(status: int, data) -> tuple:
        return status, {"Content-Type": "application/json"}, json.dumps(data)

    def _version(self, request):
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        return self._json(200, {"api": "1.0.0", "min_sdk_version": "2.0.0", "min_ep_version": "2.0.0"})

    def _endpoint_status(self, request):
        if self.unreachable:
            import requests

            raise requests.exceptions.ConnectionError("Connection refused")
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        endpoint = re.search(r"/v2/endpoints/([^/]+)/status", request.url).group(1)
        if endpoint != self.endpoint_id:
            return self._json(404, {"code": "ENDPOINT_NOT_FOUND", "message": f"Endpoint {endpoint} not found"})
        return self._json(200, {"status": "online", "details": {}})

    def _register(self, request):
        data = json.loads(request.body)
        function_id = str(uuid.uuid4())
        self.functions[function_id] = data["function_code"]
        return self._json(200, {"function_uuid": function_id})

    def _submit(self, request):
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        body = request.body if isinstance(request.body, (bytes, str)) else b""
        size = len(body)
        endpoint = re.search(r"/v3/endpoints/([^/]+)/submit", request.url).group(1)
        data = json.loads(body)
        count = sum(len(payloads) for payloads in data["tasks"].values())
        record = {"bytes": size, "tasks": count, "accepted": False}
        self.requests.append(record)
        if size > MAX_REQUEST_BYTES:
            return self._json(413, {"code": "TASK_PAYLOAD_TOO_LARGE", "error_args": [MAX_REQUEST_BYTES],
                                    "message": f"Task payload too large (max {MAX_REQUEST_BYTES} bytes)"})
        if endpoint != self.endpoint_id:
            return self._json(404, {"code": "ENDPOINT_NOT_FOUND", "message": f"Endpoint {endpoint} not found"})
        record["accepted"] = True
        group = data.get("task_group_id") or str(uuid.uuid4())
        serializers = data.get("result_serializers")
        answer = {}
        for function_id, payloads in data["tasks"].items():
            answer[function_id] = []
            for payload in payloads:
                task_id = str(uuid.uuid4())
                answer[function_id].append(task_id)
                self.tasks[task_id] = {"status": "waiting-for-ep"}
                # What the service hands the endpoint: function buffer + argument buffers.
                packed = messagepack.pack(Task(task_id=uuid.UUID(task_id), task_buffer=self.functions[function_id] + payload))
                future = GCFuture(uuid.UUID(task_id), function_id=function_id)
                future.add_done_callback(lambda f, tid=task_id: self._finished(tid, f))
                self.engine.submit(future, packed, resource_specification={}, result_serializers=serializers)
        return self._json(200, {"request_id": str(uuid.uuid4()), "task_group_id": group,
                                "endpoint_id": endpoint, "tasks": answer})

    def _finished(self, task_id: str, future) -> None:
        from globus_compute_common import messagepack

        body = future.result()
        result = messagepack.unpack(body)
        with self.lock:
            if result.is_error:
                self.tasks[task_id] = {"status": "failed", "exception": result.data}
            else:
                self.tasks[task_id] = {"status": "success", "result": result.data}
        self.outbox.put(body)

    def _describe(self, task_id: str) -> dict:
        entry = dict(self.tasks.get(task_id, {"status": "unknown"}))
        entry["task_id"] = task_id
        if entry["status"] in ("success", "failed"):
            entry["completion_t"] = str(time.time())
        return entry

    def _batch_status(self, request):
        data = json.loads(request.body)
        return self._json(200, {"response": "batch", "results": {tid: self._describe(tid) for tid in data["task_ids"]}})

    def _task(self, request):
        task_id = re.search(r"/v2/tasks/([^/?]+)", request.url).group(1)
        if task_id not in self.tasks:
            return self._json(404, {"code": "TASK_NOT_FOUND", "message": f"Task {task_id} not found"})
        return self._json(200, self._describe(task_id))
