"""The journal: every finished record appended as it arrives, so a crashed scan can resume.

A journal is a JSON-lines file, written by one scan at a time: a scan holds a lock on it (a
``<journal>.lock`` file beside it, naming the scan's process) from its start to its end, and a
second scan on the same journal (or the same output file) is refused with one line naming the
first. Each line is ``{"key": <scan key>, "record": {...}}`` and is
flushed and fsynced before the scan moves on; the scan key is a hash of the background workspace
and of every setting that changes a result, so that a resumed scan never mixes in results computed
differently. A last line cut short by a crash is ignored (and cut off before appending). A resumed
scan skips the patches whose latest record is ``ok`` and fits the failed ones again. Records are
identified by ``(pallet, name)``: a scan of several pallets can hold one patch name in each.

Toy-based scans also journal every finished chunk of a patch's toys as it arrives (``{"key",
"chunk": {"pallet", "record"}}``, the statistics packed bit for bit): a resumed scan merges them
with the chunks it still has to fit, and fits no toy twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: concurrent scans are not detected there
    fcntl = None

from pyhf_dist.exceptions import JournalError
from pyhf_dist.results import FitRecord, json_safe
from pyhf_dist.toys import pack_chunk, unpack_chunk

__all__ = ["Journal", "scan_key", "journal_path_for"]


def scan_key(workspace: dict, settings) -> str:
    """Hash of the background workspace (for several pallets: ``{name: workspace}``) and of the
    result-changing settings."""
    digest = hashlib.sha256(json.dumps(workspace, sort_keys=True, separators=(",", ":")).encode())
    digest.update(settings.digest().encode())
    return digest.hexdigest()[:16]


def journal_path_for(output: str | os.PathLike) -> Path:
    """The journal that goes with an output file: ``results.json`` -> ``results.journal.jsonl``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.journal.jsonl")


class Journal:
    """Append-only record log for one scan.

    Args:
        path: The journal file.
        key: The scan key (:func:`scan_key`).
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self._stream = None
        self._lock = None
        #: Finished chunks of toy-based patches, by ``(pallet, patch name)`` (filled by :meth:`load`).
        self.chunks: dict[tuple, list[dict]] = {}

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def acquire(self) -> None:
        """Make this scan the journal's only writer until :meth:`close`.

        Raises:
            JournalError: Another running scan holds the journal.
        """
        if fcntl is None or self._lock is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            stream = open(self.lock_path, "a+")
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                stream.seek(0)
                owner = stream.read().strip() or "unknown"
                stream.close()
                raise JournalError(
                    f"another scan (pid {owner}) is writing {self.path}: wait for it to finish, or give "
                    "this scan another output file (-o) or --journal"
                ) from None
            # The previous holder removes the file as it finishes: a lock taken on a file that was
            # removed meanwhile guards nothing, so take it again on the file now at that path.
            try:
                same = os.fstat(stream.fileno()).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            stream.close()
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n")
        stream.flush()
        self._lock = stream

    def load(self) -> dict[tuple, FitRecord]:
        """Records already finished with this scan's key, by ``(pallet, patch name)`` (for resuming).

        Raises:
            JournalError: The journal holds records computed with other settings or another
                workspace, or is not a journal at all.
        """
        if not self.path.exists():
            return {}
        done: dict[tuple, FitRecord] = {}
        foreign = 0
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
                if "chunk" in entry:  # one finished chunk of a toy-based patch
                    chunk = entry["chunk"]
                    where = (chunk["pallet"], chunk["record"]["name"])
                    if key == self.key:
                        self.chunks.setdefault(where, []).append(unpack_chunk(chunk["record"]))
                    else:
                        foreign += 1
                    continue
                record = FitRecord.from_dict(entry["record"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if number == len(lines):  # the write a crash interrupted
                    continue
                raise JournalError(
                    f"{self.path} line {number} is not a journal entry: delete the file or give another --journal"
                ) from None
            if key != self.key:
                foreign += 1
                continue
            done[record.key] = record
        if foreign:
            raise JournalError(
                f"{self.path} holds {foreign} results computed with other settings or another workspace "
                "(or pallet choice): resume with the same settings, or start afresh without --resume"
            )
        return done

    def open(self, append: bool) -> None:
        """Open for writing: append to what is there (resuming) or start a new journal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            self._drop_partial_line()
        self._stream = open(self.path, "a" if append else "w")

    def _drop_partial_line(self) -> None:
        # A crash during a write leaves a last line without its newline: cut it off, or the next
        # record would be appended to it and the journal could not be read again.
        try:
            with open(self.path, "rb+") as stream:
                data = stream.read()
                if data and not data.endswith(b"\n"):
                    stream.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    def write(self, record: FitRecord) -> None:
        """Append one record and make sure it is on disk before returning."""
        line = json.dumps({"key": self.key, "record": json_safe(record.to_dict())}, default=str)
        self._stream.write(line + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def write_chunk(self, pallet: str | None, outcome: dict) -> None:
        """Append one finished chunk of a toy-based patch (its statistics packed, exactly) and make
        sure it is on disk: a resumed scan fits only the toys no such line covers."""
        line = json.dumps({"key": self.key, "chunk": {"pallet": pallet, "record": json_safe(pack_chunk(outcome))}},
                          default=str)
        self._stream.write(line + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        """Close the journal and release it for other scans."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._lock is not None:
            lock, self._lock = self._lock, None
            try:
                os.unlink(self.lock_path)  # while still holding it: see acquire()
            except OSError:
                pass
            lock.close()
