"""The endpoint side of ``executor="funcx"``: the function a Globus Compute endpoint runs for each
patch. It runs on the endpoint, never in the scan's process, and is self-contained (pyhf and numpy).

:func:`pyhf_dist_fit` is shipped to the service as *source text* (``PureSourceTextInspect``), not
by reference, so an endpoint needs pyhf and numpy but not pyhf-dist, and the endpoint's Python
and dill versions need not match the client's. Everything it uses is therefore imported or defined
inside its body. Where the endpoint does have ``pyhf-dist[jax]`` installed, scans on the jax
backend (the default) run pyhf-dist's own worker there (:func:`pyhf_dist.runtime.run_task`: the
compiled fast path, exactly as on a local worker); otherwise plain pyhf fits on numpy.

Its arguments are plain JSON data (``JSONData``): the scan's context (background workspace + fit
settings; for a scan of several pallets, each pallet's workspace by name, see
:class:`pyhf_dist.protocol.WorkerContext`) and the task (patch operations, name, pallet, timeout).
Either may be compressed text
(``"zlib+base64:<...>"``, see :func:`pyhf_dist.protocol.encode`): a workspace is highly redundant JSON, and
compressing it keeps a batch of tasks far below the service's 10 MB limit per submission.

The Globus Compute cloud has no per-worker setup hook, so the context travels with every task;
but the endpoint's workers are long-lived processes, so a worker parses it on its first task only
and keeps the parsed workspace in a small cache module in ``sys.modules`` (the function's own
globals are new on every task: the endpoint re-creates the function from source each time).
"""

from __future__ import annotations

__all__ = ["pyhf_dist_fit", "CACHE_MODULE"]

#: Name of the per-worker-process cache module the remote function keeps in ``sys.modules``.
CACHE_MODULE = "_pyhf_dist_remote_cache"


def pyhf_dist_fit(context, task):
    """Fit one signal patch on a Globus Compute endpoint and return its result record.

    Self-contained: needs only pyhf (and numpy) on the endpoint, not pyhf-dist.

    Args:
        context: ``{"workspace": <background spec>, "settings": <FitSettings dict>}`` as JSON
            text, optionally compressed (``"zlib+base64:..."``); for several pallets
            ``{"pallets": {<name>: {"key", "workspace"}}, "settings"}``.
        task: JSON text (optionally compressed) of a task (:func:`pyhf_dist.protocol.make_task`).

    Returns:
        The record a local worker returns (:func:`pyhf_dist.runtime.run_task`): ``name``,
        ``status``, ``error``, ``CLs_obs``, ``CLs_exp``, ``engine``, ``fallback_reason`` (why not
        ``"fast"``, on a scan that asked for it), ``fit_seconds``, ``started``, ``finished``,
        ``worker`` (host, pid, Slurm job).
    """
    import base64, json, os, signal, socket, sys, threading, time, types, zlib  # noqa: E401

    def load(text):
        if isinstance(text, str) and text.startswith("zlib+base64:"):
            text = zlib.decompress(base64.b64decode(text[len("zlib+base64:"):])).decode()
        return json.loads(text) if isinstance(text, str) else text

    task = load(task)
    cache = sys.modules.get("_pyhf_dist_remote_cache")
    if cache is None:  # the function's globals are new on every task: a module in sys.modules is not
        cache = sys.modules["_pyhf_dist_remote_cache"] = types.ModuleType("_pyhf_dist_remote_cache")
        cache.states, cache.setups, cache.lock = {}, 0, threading.Lock()
    with cache.lock:
        state = cache.states.get(task["context"])
        if state is None:
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
                os.environ.setdefault(name, "1")  # one thread per numerical library (an admin's value kept)
            data = load(context)
            state = {"settings": data["settings"], "prepared": None, "workspace": None, "fallback_reason": None}
            if data["settings"].get("backend") == "jax":
                try:  # pyhf-dist's own worker, where the endpoint has it: the compiled fast path
                    from pyhf_dist.protocol import WorkerContext
                    from pyhf_dist.runtime import initialize, run_task
                    payload = json.dumps(data, separators=(",", ":")).encode()
                    state["prepared"] = (initialize(WorkerContext(task["context"], payload)), run_task)
                except ImportError:
                    state["fallback_reason"] = "pyhf-dist[jax] is not installed on the endpoint"
                except Exception as error:  # another version there: plain pyhf still works
                    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    state["fallback_reason"] = f"the endpoint's pyhf-dist cannot take this scan: {line}"
            if state["prepared"] is None:  # plain pyhf: the workspaces, validated once per worker
                import pyhf
                state["workspace"] = {name: part["workspace"] for name, part in (data.get("pallets") or {None: data}).items()}
                for spec in state["workspace"].values():
                    pyhf.Workspace(spec)
            for stale in list(cache.states)[:-1]:  # the latest two scans: a worker serves many
                cache.states.pop(stale)
            cache.states[task["context"]] = state
            cache.setups += 1
    if state["prepared"] is not None:
        return state["prepared"][1](task)
    settings, timeout, started, began = state["settings"], task.get("timeout"), time.time(), time.monotonic()
    record = {"name": task["name"], "status": "ok", "error": None, **({"chunk": task["chunk"]} if task.get("chunk") else {})}

    def on_alarm(signum, frame): raise TimeoutError(f"timed out after {timeout} s")  # noqa: E704
    alarm = bool(timeout) and threading.current_thread() is threading.main_thread()  # SIGALRM: main thread only
    previous = signal.signal(signal.SIGALRM, on_alarm) if alarm else None
    if alarm:
        signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        if settings.get("require_fast"):
            raise RuntimeError(f"the fast path is not available ({state['fallback_reason']}) and require_fast "
                               "(--require-fast) is on")
        import jsonpatch, pyhf  # noqa: E401
        minuit = settings.get("optimizer", "scipy") == "minuit"  # plain pyhf runs on numpy, the reference
        pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2) if minuit
                         else pyhf.optimize.scipy_optimizer())
        # The patch applies to the whole workspace, as pyhf.PatchSet applies it.
        if task.get("pallet") not in state["workspace"]:
            raise KeyError(f"the scan's context has no pallet {task.get('pallet')!r}")
        patched = pyhf.Workspace(jsonpatch.apply_patch(state["workspace"][task.get("pallet")], task["patch"]),
                                 validate=False)
        model = patched.model(modifier_settings=settings.get("modifier_settings"))
        observed, expected = pyhf.infer.hypotest(settings.get("poi_test", 1.0), patched.data(model), model,
                                                 test_stat=settings.get("test_stat", "qtilde"), return_expected_set=True)
        reason = {"fallback_reason": state["fallback_reason"]} if state["fallback_reason"] else {}
        record.update(CLs_obs=float(observed), CLs_exp=[float(value) for value in expected], engine="pyhf", **reason)
    except Exception as error:  # a failed fit is a record, worded as pyhf_dist.protocol.first_line words it
        text = (str(error).strip().splitlines() or [""])[0].rstrip(":").strip()
        named = f"{type(error).__name__}: {text}" if text else type(error).__name__
        record.update(status="failed", error=text if isinstance(error, TimeoutError) else named)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    host = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    record.update(started=started, finished=time.time(), fit_seconds=time.monotonic() - began, worker=host)
    return record
