"""What travels between a scan's client and its workers: contexts, tasks, packs and records.

Standard library only, so that every side can import it: the client
(:mod:`pyhf_dist.scan`), the executors that ship the data (:mod:`pyhf_dist.executors`) and the
worker runtime that acts on it (:mod:`pyhf_dist.runtime`) import this module, never each other.

* A **context** (:class:`Context`) is everything a worker needs besides the patch: the
  background workspace(s) and the fit settings, serialized once on the client
  (:class:`WorkerContext`), and shipped once per worker. Executors may ship it in another form
  (:class:`CompressedContext`, or a file on a shared disk) as long as it has ``key`` and
  ``payload``.
* A **task** (:class:`Task`, :func:`make_task`) is one patch, or one *chunk* of a patch's toys.
  Its ``kind`` is ``"fit"``, or ``"noop"`` for a task that computes nothing (the overhead of an
  executor, in benchmarks).
* A **pack** (:class:`Pack`, :func:`make_pack`) is several tasks sent as one, for executors
  whose per-task cost rivals a short fit; its result is ``{"pack": [record, ...]}`` in the same
  order (:func:`records_of`).
* A **record** (:class:`Record`) is the plain-dict result of a task: ``name``, ``status``,
  ``error``, the calculation's numbers, timings and the worker. A task that produced nothing
  still gets a record (:func:`failed_record`).

Texts that cross a service's wire compress with :func:`encode` and :func:`decode`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import zlib
from typing import Any, Protocol, TypedDict, runtime_checkable

__all__ = [
    "Context", "WorkerContext", "CompressedContext", "Task", "Pack", "Record", "FIT", "NOOP", "PACK", "KINDS",
    "make_task", "make_pack", "records_of", "new_record", "failed_record", "first_line", "encode", "decode",
    "COMPRESSED_PREFIX", "SMALLEST_GROUP",
]

#: Task kinds: a fit (one patch, or one chunk of its toys), a task that computes nothing, a pack.
FIT, NOOP, PACK = "fit", "noop", "pack"
KINDS = (FIT, NOOP, PACK)
#: The fewest patches of a pack that a worker fits together in one loop (signal points of one
#: template; on a GPU, patches of any structures); fewer are fitted one at a time (the loop's fixed
#: cost per call). The scan's packs of short fits hold at least this many.
SMALLEST_GROUP = 4
#: Marks text that holds zlib-compressed, base64-encoded JSON (:func:`encode`).
COMPRESSED_PREFIX = "zlib+base64:"


@runtime_checkable
class Context(Protocol):
    """What every context a worker is given has: the digest it is cached under, and its JSON bytes.

    ``payload`` may be computed on access (read from a file, decompressed): a worker reads it
    only the first time it meets ``key``.
    """

    key: str

    @property
    def payload(self) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """The context of a scan, as the client builds it.

    Attributes:
        key: Digest of ``payload``; the worker caches its setup under it.
        payload: JSON bytes ``{"workspace": <background spec>, "settings": <FitSettings dict>}``;
            for several pallets ``{"pallets": {<name>: {"key": <key of that pallet's own
            single-workspace context>, "workspace": <spec>}, ...}, "settings": ...}``, and each
            task names its pallet (``task["pallet"]``).
    """

    key: str
    payload: bytes

    @classmethod
    def build(cls, workspace_spec: dict, settings: dict) -> "WorkerContext":
        """The context of one pallet: its background ``workspace_spec`` and the ``settings`` dict."""
        return cls.of({"workspace": workspace_spec, "settings": settings})

    @classmethod
    def build_pallets(cls, workspaces: dict, settings: dict) -> "WorkerContext":
        """The context of a scan of several pallets: ``workspaces`` maps pallet names to specs.

        Each pallet keeps the key its own single-pallet context has, so what a worker remembers
        per workspace (the fast path's checks) is shared with scans of that pallet alone.
        """
        pallets = {name: {"key": cls.build(spec, settings).key, "workspace": spec} for name, spec in workspaces.items()}
        return cls.of({"pallets": pallets, "settings": settings})

    @classmethod
    def for_pallets(cls, workspaces: dict, settings: dict) -> "WorkerContext":
        """The context of a scan's pallets (name -> spec); a lone unnamed pallet (name ``None``) has
        the context of its workspace alone (:meth:`build`)."""
        if list(workspaces) == [None]:
            return cls.build(workspaces[None], settings)
        return cls.build_pallets(workspaces, settings)

    @classmethod
    def of(cls, data: dict) -> "WorkerContext":
        payload = json.dumps(data, separators=(",", ":")).encode()
        return cls(key=hashlib.sha256(payload).hexdigest()[:20], payload=payload)

    def __repr__(self) -> str:
        return f"WorkerContext(key={self.key!r}, payload=<{len(self.payload)} bytes>)"


class CompressedContext:
    """A context whose payload travels zlib-compressed, decompressed only where a worker needs it.

    >>> context = WorkerContext.build({"channels": []}, {})
    >>> CompressedContext.of(context).payload == context.payload
    True
    """

    __slots__ = ("key", "compressed")

    def __init__(self, key: str, compressed: bytes):
        self.key = key
        self.compressed = compressed

    @classmethod
    def of(cls, context: Context) -> "CompressedContext":
        return cls(context.key, zlib.compress(context.payload, 6))

    @property
    def payload(self) -> bytes:
        return zlib.decompress(self.compressed)

    def __getstate__(self):
        return (self.key, self.compressed)

    def __setstate__(self, state):
        self.key, self.compressed = state


class Task(TypedDict, total=False):
    """One patch, or one chunk of its toys (:func:`make_task`)."""

    kind: str
    name: str
    patch: list
    context: str
    pallet: str
    chunk: dict | None
    timeout: float | None
    progress: str


class Pack(TypedDict):
    """Several tasks of one context sent as one (:func:`make_pack`)."""

    kind: str
    context: str
    tasks: list[Task]


class Record(TypedDict, total=False):
    """The result of a task; the calculation adds its numbers (``CLs_obs``, ``CLs_exp``...)."""

    name: str
    status: str
    error: str | None
    chunk: dict
    engine: str
    started: float | None
    finished: float | None
    fit_seconds: float | None
    worker: dict | None


def make_task(name: str, patch: list, context: str, *, pallet: str | None = None, chunk: dict | None = None,
              timeout: float | None = None, kind: str = FIT, progress: str | None = None) -> Task:
    """The task of one patch (or of one chunk of its toys): what a scan submits to a worker.

    Args:
        name: The patch's name.
        patch: Its jsonpatch operations.
        context: The key of the context it applies to.
        pallet: The patch's pallet, in a context of several pallets (its name there).
        chunk: The slice of the patch's pseudo-experiments, if split.
        timeout: Seconds after which the worker gives up on the fit.
        kind: :data:`FIT`, or :data:`NOOP` for a task that computes nothing.
        progress: For a chunk of toys: a file on the client's machine where the worker writes
            the fraction of the chunk done (:mod:`pyhf_dist.runtime.reports`), if it can see it.

    >>> make_task("A_1_2", [], "c0ffee")
    {'kind': 'fit', 'name': 'A_1_2', 'patch': [], 'context': 'c0ffee', 'chunk': None, 'timeout': None}
    """
    if kind not in (FIT, NOOP):
        raise ValueError(f"a task's kind is {FIT!r} or {NOOP!r}, not {kind!r}")
    task: Task = {"kind": kind, "name": name, "patch": patch, "context": context, "chunk": chunk, "timeout": timeout}
    if pallet is not None:
        task["pallet"] = pallet
    if progress is not None:
        task["progress"] = progress
    return task


def make_pack(tasks: list[Task]) -> Pack:
    """One task of several, run in turn (or fitted together) on one worker; its result is
    ``{"pack": [record, ...]}`` in the same order.

    >>> pack = make_pack([make_task("A_1_2", [], "c0ffee"), make_task("A_1_3", [], "c0ffee")])
    >>> pack["kind"], pack["context"], len(pack["tasks"])
    ('pack', 'c0ffee', 2)
    """
    return {"kind": PACK, "context": tasks[0]["context"], "tasks": list(tasks)}


def records_of(result: Any, count: int) -> list[Record]:
    """The records in the result of a task (``count == 1``) or of a pack of ``count`` tasks.

    Raises:
        ValueError: The result is not what such a task returns.

    >>> records_of({"pack": [{"name": "a"}, {"name": "b"}]}, 2)
    [{'name': 'a'}, {'name': 'b'}]
    """
    if count == 1 and isinstance(result, dict) and "pack" not in result:
        return [result]
    records = result.get("pack") if isinstance(result, dict) else None
    if not isinstance(records, list) or len(records) != count:
        raise ValueError(f"expected the records of {count} tasks, got {type(result).__name__}")
    return records


def new_record(task: Task) -> Record:
    """The start of the record of ``task``: its name (and chunk), status ``"ok"``, no error.

    >>> new_record(make_task("A_1_2", [], "c0ffee"))
    {'name': 'A_1_2', 'status': 'ok', 'error': None}
    """
    record: Record = {"name": task["name"], "status": "ok", "error": None}
    if task.get("chunk") is not None:
        record["chunk"] = task["chunk"]
    return record


def failed_record(task: Task, error: str) -> Record:
    """The record of a task that produced no result: status ``"failed"`` and why (one line, or a
    remote traceback); no timing or worker, as nothing was measured.

    >>> failed_record(make_task("A_1_2", [], "c0ffee"), "worker lost 3 times")["status"]
    'failed'
    """
    record = new_record(task)
    record.update(status="failed", error=error, started=None, finished=None, fit_seconds=None, worker=None)
    return record


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message, for one-line reports (its type name if it has none).

    Args:
        error: The exception.
        with_type: Prefix the exception's type name (``"KeyError: 'x'"``), for errors whose
            message alone does not say what went wrong.

    >>> first_line(ValueError("bad value:\\nmore detail"))
    'bad value'
    >>> first_line(KeyError("x"), with_type=True)
    "KeyError: 'x'"
    >>> first_line(RuntimeError())
    'RuntimeError'
    """
    lines = str(error).strip().splitlines()
    text = lines[0].rstrip(":").strip() if lines else ""
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text


def encode(data: Any, compress: bool = True) -> str:
    """JSON text of ``data``, compressed (``"zlib+base64:..."``) when ``compress``.

    >>> decode(encode({"a": [1, 2]}))
    {'a': [1, 2]}
    """
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    if not compress:
        return text
    return COMPRESSED_PREFIX + base64.b64encode(zlib.compress(text.encode(), 6)).decode("ascii")


def decode(text: Any) -> Any:
    """Inverse of :func:`encode` (also accepts already-decoded data)."""
    if not isinstance(text, str):
        return text
    if text.startswith(COMPRESSED_PREFIX):
        text = zlib.decompress(base64.b64decode(text[len(COMPRESSED_PREFIX):])).decode()
    return json.loads(text)
