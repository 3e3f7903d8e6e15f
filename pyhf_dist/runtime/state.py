"""A worker's prepared state, one per scan context, kept in the process between tasks.

:func:`initialize` takes a context (:class:`~pyhf_dist.protocol.Context`: the background
workspace — or, for a scan of several pallets, each pallet's, by name — and the fit settings,
serialized once on the client) and prepares the worker: one thread per BLAS/OpenMP/XLA pool, the
parsed settings, the fast path's compiled likelihood. The prepared :class:`WorkerState` is kept in
the process, keyed by the context's digest, so the setup runs once per worker whatever the engine.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from pyhf_dist import collector
from pyhf_dist.protocol import Context
from pyhf_dist.runtime.threads import pin_threads

__all__ = ["WorkerState", "initialize", "preload", "release", "setup_count", "prepared"]


class WorkerState:
    """A worker's prepared state for one context: parsed workspace, settings, caches.

    A context of several pallets gives one state per pallet (:attr:`pallets`, each with the
    attributes below); :meth:`for_pallet` picks the one a task names.

    Attributes:
        workspace: The background ``pyhf.Workspace``.
        settings: The :class:`~pyhf_dist.settings.FitSettings`.
        memo: Free for calculations to keep things between tasks (compiled likelihoods...).
        pallets: The per-pallet states by name (empty for a single-pallet context).
    """

    def __init__(self, context: Context):
        from pyhf_dist.settings import FitSettings

        with collector.paused():  # the workspace: many containers, no cycles
            data = json.loads(context.payload)
        settings = FitSettings.from_dict(data["settings"])
        self._setup(context.key, settings, data.get("workspace"))
        self.pallets = {
            name: WorkerState._part(part["key"], settings, part["workspace"])
            for name, part in (data.get("pallets") or {}).items()
        }

    def _setup(self, key: str, settings, workspace_spec: dict | None) -> None:
        self.key = key
        self.settings = settings
        self.workspace_spec = workspace_spec
        self._workspace = None
        self.memo: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.pallets: dict[str, WorkerState] = {}

    @classmethod
    def _part(cls, key: str, settings, workspace_spec: dict) -> "WorkerState":
        state = cls.__new__(cls)
        state._setup(key, settings, workspace_spec)
        return state

    def for_pallet(self, name: str | None) -> "WorkerState":
        """The state of pallet ``name`` (this state itself for a single-pallet context)."""
        if not self.pallets:
            return self
        try:
            return self.pallets[name]
        except KeyError:
            raise KeyError(f"the scan's context has no pallet {name!r} (it has {', '.join(self.pallets)})") from None

    def parts(self) -> list["WorkerState"]:
        """The states that hold a workspace: one per pallet, or this one."""
        return list(self.pallets.values()) or [self]

    @property
    def workspace(self):
        """The ``pyhf.Workspace``, made on first use: a worker whose fits all take the fast path
        never imports pyhf."""
        if self._workspace is None:
            import pyhf

            # The client validated the workspace against the schema before any task was sent.
            self._workspace = pyhf.Workspace(self.workspace_spec, validate=False)
        return self._workspace


_STATES: dict[str, WorkerState] = {}
_STATES_LOCK = threading.Lock()
_SETUP_COUNT = 0


def setup_count() -> int:
    """How many times :func:`initialize` prepared a new state in this process (for tests)."""
    return _SETUP_COUNT


def initialize(context: Context) -> WorkerState:
    """Prepare this worker for ``context`` (once; later calls return the cached state)."""
    global _SETUP_COUNT
    with _STATES_LOCK:
        state = _STATES.get(context.key)
        if state is None:
            pin_threads()
            state = WorkerState(context)
            _STATES[context.key] = state
            _SETUP_COUNT += 1
            from pyhf_dist.runtime import fast

            # Compile the fast path's likelihood now, while the client is still sending tasks
            # (a no-op for scans that do not use it).
            for part in state.parts():
                fast.warm_up(part)
        return state


def preload(settings: dict) -> None:
    """Import what fits with ``settings`` (a FitSettings dict) will need, before the context arrives.

    For workers started while the client still reads the pallet. Never raises: anything missing
    shows up, with its real error, when the worker is set up. The garbage collector is paused
    meanwhile (:func:`pyhf_dist.collector.paused`): the modules imported live as long as the
    process, and collections in the middle of jax's import would walk them again and again.
    """
    pin_threads()
    try:
        from pyhf_dist.settings import FitSettings

        with collector.paused():
            if FitSettings.from_dict(settings).fast_path:
                from pyhf_dist.runtime import fast

                fast.preload()
            else:
                import pyhf  # noqa: F401
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def release(key: str) -> None:
    """Forget the state of context ``key`` in this process (a long-lived worker between scans)."""
    with _STATES_LOCK:
        _STATES.pop(key, None)


def prepared(key: str) -> WorkerState | None:
    """The state prepared in this process for context ``key``, if any."""
    return _STATES.get(key)
