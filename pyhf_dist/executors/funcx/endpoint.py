"""The endpoint side of ``executor="funcx"``: the function a Globus Compute endpoint runs for each
patch. It runs on the endpoint, never in the scan's process, and is self-contained (pyhf and numpy).

:func:`pyhf_dist_fit` is shipped to the service as *source text* (``PureSourceTextInspect``), not
by reference, so an endpoint needs pyhf and numpy but not pyhf-dist, and the endpoint's Python
and dill versions need not match the client's. Everything it uses is therefore imported or defined
inside its body. Where the endpoint does have ``pyhf-dist[jax]`` installed, scans on the jax
backend (the default) take its compiled fast path there, exactly as on a local worker; otherwise
plain pyhf fits on numpy.

Its arguments are plain JSON data (``JSONData``): the scan's context (background workspace + fit
settings; for a scan of several pallets, each pallet's workspace by name, see
:class:`pyhf_dist.worker.WorkerContext`) and the task (patch operations, name, pallet, timeout).
Either may be compressed text
(``"zlib+base64:<...>"``, see :func:`encode`): a workspace is highly redundant JSON, and
compressing it keeps a batch of tasks far below the service's 10 MB limit per submission.

The Globus Compute cloud has no per-worker setup hook, so the context travels with every task;
but the endpoint's workers are long-lived processes, so a worker parses it on its first task only
and keeps the parsed workspace in a small cache module in ``sys.modules`` (the function's own
globals are new on every task: the endpoint re-creates the function from source each time).
"""

from __future__ import annotations

import base64
import json
import zlib

__all__ = ["pyhf_dist_fit", "encode", "decode", "COMPRESSED_PREFIX", "CACHE_MODULE"]

#: Marks text that holds zlib-compressed, base64-encoded JSON.
COMPRESSED_PREFIX = "zlib+base64:"
#: Name of the per-worker-process cache module the remote function keeps in ``sys.modules``.
CACHE_MODULE = "_pyhf_dist_remote_cache"


def encode(data, compress: bool = True) -> str:
    """JSON text of ``data``, compressed (``"zlib+base64:..."``) when ``compress``."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    if not compress:
        return text
    return COMPRESSED_PREFIX + base64.b64encode(zlib.compress(text.encode(), 6)).decode("ascii")


def decode(text):
    """Inverse of :func:`encode` (also accepts already-decoded data)."""
    if not isinstance(text, str):
        return text
    if text.startswith(COMPRESSED_PREFIX):
        text = zlib.decompress(base64.b64decode(text[len(COMPRESSED_PREFIX):])).decode()
    return json.loads(text)


def pyhf_dist_fit(context, task):
    """Fit one signal patch on a Globus Compute endpoint and return its result record.

    Self-contained: needs only pyhf (and numpy) on the endpoint, not pyhf-dist.

    Args:
        context: ``{"workspace": <background spec>, "settings": <FitSettings dict>}`` as JSON
            text, optionally compressed (``"zlib+base64:..."``); for several pallets
            ``{"pallets": {<name>: {"key", "workspace"}}, "settings"}``.
        task: JSON text (optionally compressed) of ``{"name", "patch", "context" (digest of the
            context), "pallet" (with several pallets), "chunk", "timeout"}``.

    Returns:
        A JSON-able record: ``name``, ``status`` (``"ok"``/``"failed"``), ``error``, ``CLs_obs``,
        ``CLs_exp``, ``engine`` (``"fast"``/``"pyhf"``), ``fallback_reason`` (why not ``"fast"``,
        on a scan that asked for it), ``fit_seconds``, ``started``, ``finished``, ``worker``
        (host, pid, Slurm job).
    """
    import base64
    import json
    import os
    import signal
    import socket
    import sys
    import threading
    import time
    import types
    import zlib

    def unpack(text):
        if isinstance(text, str) and text.startswith("zlib+base64:"):
            return zlib.decompress(base64.b64decode(text[len("zlib+base64:"):])).decode()
        return text

    def load(text):
        text = unpack(text)
        return json.loads(text) if isinstance(text, str) else text

    task = load(task)
    cache = sys.modules.get("_pyhf_dist_remote_cache")
    if cache is None:
        cache = types.ModuleType("_pyhf_dist_remote_cache")
        cache.states = {}
        cache.setups = 0
        cache.lock = threading.Lock()
        sys.modules["_pyhf_dist_remote_cache"] = cache

    key = task["context"]
    with cache.lock:
        state = cache.states.get(key)
        if state is None:
            # One thread per numerical library: many single-threaded fits beat a few that fight
            # over the cores (values the endpoint's administrator set are kept).
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
                os.environ.setdefault(name, "1")
            text = unpack(context)
            data = load(text)
            pallets = data.get("pallets")
            settings = data["settings"]
            state = {"settings": settings, "workspace": None, "workspaces": None, "prepared": None,
                     "compute": None, "fallback_reason": None}
            if settings.get("backend") == "jax":
                # pyhf-dist's compiled fast path, where the endpoint has pyhf-dist installed; its
                # state (parsed workspace, compiled likelihood) stays in this worker process.
                try:
                    from pyhf_dist.calculations import compute
                    from pyhf_dist.worker import WorkerContext, initialize
                except ImportError:
                    state["fallback_reason"] = "pyhf-dist[jax] is not installed on the endpoint"
                else:
                    try:
                        payload = (text if isinstance(text, str) else json.dumps(text)).encode()
                        prepared = initialize(WorkerContext(key=key, payload=payload))
                        if pallets is not None and not hasattr(prepared, "for_pallet"):
                            raise TypeError("this pyhf-dist fits one pallet per scan")
                        state["prepared"] = prepared
                        state["compute"] = compute
                    except Exception as error:  # e.g. another pyhf-dist version there: plain pyhf still works
                        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                        state["fallback_reason"] = f"the endpoint's pyhf-dist cannot take this scan: {line}"
            if state["prepared"] is None:
                import pyhf

                # Validated once per worker; patches are applied to the specification.
                if pallets is None:
                    pyhf.Workspace(data["workspace"])
                    state["workspace"] = data["workspace"]
                else:
                    for part in pallets.values():
                        pyhf.Workspace(part["workspace"])
                    state["workspaces"] = {name: part["workspace"] for name, part in pallets.items()}
            # Keep the latest two scans: a long-lived endpoint worker serves many scans.
            while len(cache.states) >= 2:
                cache.states.pop(next(iter(cache.states)))
            cache.states[key] = state
            cache.setups += 1

    settings = state["settings"]
    started = time.time()
    record = {"name": task["name"], "status": "ok", "error": None}
    if task.get("chunk") is not None:
        record["chunk"] = task["chunk"]

    class FitTimeout(Exception):
        pass

    def on_alarm(signum, frame):
        raise FitTimeout()

    def fit():
        if settings.get("calculation", "hypotest") != "hypotest" or settings.get("calctype", "asymptotics") != "asymptotics":
            raise NotImplementedError(
                f"calculation {settings.get('calculation')!r} with calctype {settings.get('calctype')!r} "
                "is not available on Globus Compute"
            )
        if state["prepared"] is not None:
            prepared = state["prepared"]
            if getattr(prepared, "pallets", None):
                prepared = prepared.for_pallet(task.get("pallet"))
            return state["compute"](prepared, task)
        reason = state["fallback_reason"]
        if settings.get("require_fast"):
            raise RuntimeError(f"the fast path is not available ({reason}) and require_fast (--require-fast) is on")
        import jsonpatch
        import pyhf

        if state["workspaces"] is None:
            workspace = state["workspace"]
        elif task.get("pallet") in state["workspaces"]:
            workspace = state["workspaces"][task["pallet"]]
        else:
            raise KeyError(f"the scan's context has no pallet {task.get('pallet')!r}")

        # Plain pyhf runs on numpy, the reference, as on every other executor.
        if settings.get("optimizer", "scipy") == "minuit":
            pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
        elif pyhf.tensorlib.name != "numpy":
            pyhf.set_backend("numpy")
        # The patch applies to the whole workspace, as pyhf.PatchSet applies it (it may change
        # observations and the measurement, not only the channels).
        patched = pyhf.Workspace(jsonpatch.apply_patch(workspace, task["patch"]), validate=False)
        model = patched.model(modifier_settings=settings.get("modifier_settings"))
        observed, expected = pyhf.infer.hypotest(
            settings.get("poi_test", 1.0), patched.data(model), model,
            test_stat=settings.get("test_stat", "qtilde"), return_expected_set=True,
        )
        values = {"CLs_obs": float(observed), "CLs_exp": [float(value) for value in expected], "engine": "pyhf"}
        if reason is not None:
            values["fallback_reason"] = reason
        return values

    timeout = task.get("timeout")
    use_alarm = bool(timeout) and threading.current_thread() is threading.main_thread()
    try:
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, float(timeout))
        try:
            record.update(fit())
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    except FitTimeout:
        record.update(status="failed", error=f"timed out after {timeout} s")
    except Exception as error:  # a failed fit is a result, not a failed task
        # As pyhf_dist.exceptions.first_line(error, with_type=True) words it on any other worker.
        lines = str(error).strip().splitlines()
        text = lines[0].rstrip(":").strip() if lines else ""
        record.update(status="failed", error=f"{type(error).__name__}: {text}" if text else type(error).__name__)
    finished = time.time()
    record.update(
        started=started, finished=finished, fit_seconds=finished - started,
        worker={"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    )
    return record
