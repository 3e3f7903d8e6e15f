"""The journal: every finished record appended as it arrives, so a crashed scan can resume.

A journal is a JSON-lines file, written by one scan at a time: a scan holds a lock on it (a
``<journal>.lock`` file beside it, naming the scan's process) from its start to its end, and a
second scan on the same journal (or the same output file) is refused with one line naming the
first. Each line is ``{"key": <scan key>, "record": {...}}`` and is
flushed and fsynced before the scan moves on; the scan key is a hash of the background workspace
and of every setting that changes a result, so that a resumed scan never mixes in results computed
differently. A last line cut short by a crash is ignored (and cut off before appending); other
lines that are not entries (a disk that lost a block, a stray edit) are skipped, and
:attr:`Journal.skipped` names them: their patches are fitted again. A resumed scan skips the
patches whose latest record is ``ok`` and fits the failed ones again. Records are identified by
``(pallet, name)``: a scan of several pallets can hold one patch name in each.

What the machine can do to the file is answered without losing a finished record: a full disk,
an exceeded quota or a folder made read-only stops the scan with a :class:`StorageError` that
counts the whole records kept; a journal removed mid-scan (its folder with it) is written again
from memory, and the scan goes on.

Toy-based scans also journal every finished chunk of a patch's toys as it arrives (``{"key",
"chunk": {"pallet", "record"}}``, the statistics packed bit for bit): a resumed scan merges them
with the chunks it still has to fit, and fits no toy twice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: concurrent scans are not detected there
    fcntl = None

from pyhf_dist.exceptions import JournalError, StorageError
from pyhf_dist.records import is_stream
from pyhf_dist.results import FitRecord, json_safe
from pyhf_dist.chunks import compact_chunk, expand_chunk

__all__ = ["Journal", "scan_key", "journal_path_for", "describe_errno"]

log = logging.getLogger(__name__)
# Made once: json.dumps with options builds an encoder per call, a line per record of the scan.
_ENCODER = json.JSONEncoder(default=str, allow_nan=False)


def describe_errno(error: OSError) -> str:
    """The operating system's words for ``error``, with a plainer name for the common faults.

    >>> import errno
    >>> describe_errno(OSError(errno.ENOSPC, "No space left on device"))
    'No space left on device (disk full)'
    """
    text = error.strerror or type(error).__name__
    plain = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only filesystem"}
    return f"{text} ({plain[error.errno]})" if error.errno in plain else text


def scan_key(workspace: dict, settings) -> str:
    """Hash of the background workspace (for several pallets: ``{name: workspace}``) and of the
    result-changing settings."""
    digest = hashlib.sha256(json.dumps(workspace, sort_keys=True, separators=(",", ":")).encode())
    digest.update(settings.digest().encode())
    return digest.hexdigest()[:16]


def journal_path_for(output: str | os.PathLike) -> Path:
    """The journal that goes with an output file: ``results.json`` -> ``results.journal.jsonl``
    (for a device or a pipe such as ``/dev/stdout``: ``stdout.journal.jsonl`` here)."""
    output = Path(output)
    return Path(f"{output.stem}.journal.jsonl") if is_stream(output) else output.with_name(f"{output.stem}.journal.jsonl")


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
        #: Lines of the journal skipped when it was loaded, as not being entries (1-based).
        self.skipped: list[int] = []
        #: Whole records in the file now: those loaded with this scan's key, then those written.
        self.kept = 0
        # Every whole line of this scan's key in the file, so that a journal removed mid-scan can
        # be written again without losing one.
        self._lines = _Lines()
        self._inode: int | None = None
        #: Finished chunks of toy-based patches, by ``(pallet, patch name)`` (filled by :meth:`load`).
        self.chunks: dict[tuple, list[dict]] = {}
        #: The :func:`~pyhf_dist.specs.patch_digest` each loaded record, and each loaded chunk (in the
        #: order of :attr:`chunks`), was fitted from (``None``: a journal before them), by key.
        self.record_digests: dict[tuple, str | None] = {}
        self.chunk_digests: dict[tuple, list] = {}

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
        try:
            stream.seek(0)
            stream.truncate()
            stream.write(f"{os.getpid()}\n")
            stream.flush()
        except OSError as error:
            # The lock is held whatever the file says; only the owner's name for a second scan is missing.
            log.debug("could not write the lock's owner to %s: %s", self.lock_path, error)
        self._lock = stream

    def load(self) -> dict[tuple, FitRecord]:
        """Records already finished with this scan's key, by ``(pallet, patch name)`` (for resuming).

        Lines that are not journal entries are skipped and listed in :attr:`skipped` (a last line
        cut short by a crash is expected, and only dropped).

        Raises:
            JournalError: The journal holds records computed with other settings or another
                workspace, or is not a journal at all (no line of it is an entry).
        """
        if not self.path.exists():
            return {}
        done: dict[tuple, FitRecord] = {}
        foreign = 0
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise JournalError(f"cannot read {self.path}: {describe_errno(error)}") from None
        lines = data.split(b"\n")
        # No newline at the end: the write a crash cut short. Never a record, even where what was
        # written happens to parse: appending cuts it off (see open()).
        lines = lines[:-1]
        bad: list[int] = []
        records = 0
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
                key = entry["key"]
                if "chunk" in entry:  # one finished chunk of a toy-based patch
                    chunk = entry["chunk"]
                    where = (chunk["pallet"], chunk["record"]["name"])
                    unpacked = expand_chunk(chunk["record"]) if key == self.key else None
                    record = None
                else:
                    record = FitRecord.from_dict(entry["record"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                bad.append(number)
                continue
            if key != self.key:
                foreign += 1
                continue
            self._lines.append(raw + b"\n")
            if record is None:
                self.chunks.setdefault(where, []).append(unpacked)
                self.chunk_digests.setdefault(where, []).append(entry.get("patch"))
                continue
            done[record.key] = record
            self.record_digests[record.key] = entry.get("patch")
            records += 1
        if foreign:
            raise JournalError(
                f"{self.path} holds {foreign} results computed with other settings or another workspace "
                "(or pallet choice): resume with the same settings, or delete it to start afresh"
            )
        if bad and not self._lines:
            raise JournalError(
                f"{self.path} is not a journal (no line of it is a journal entry): delete the file or give "
                "another --journal"
            )
        self.skipped = bad
        if self.skipped:
            log.warning(
                "%s: skipped line%s %s (not journal entries, e.g. a disk that lost a block): their patches are "
                "fitted again", self.path, "s" if len(self.skipped) > 1 else "", _ranges(self.skipped),
            )
        self.kept = records
        return done

    def check_unused(self) -> None:
        """Refuse to start this journal afresh over a file that holds results, or is another file.

        For a scan that does not resume: it would empty the file, and a scan that finishes removes
        its journal. An empty file, or one whose first entry a crash cut short, holds nothing.

        Raises:
            JournalError: The file holds an earlier scan's results, or is not a journal.
        """
        try:
            with open(self.path, "rb") as stream:
                head = stream.read(1 << 20)
        except FileNotFoundError:
            return
        except OSError as error:
            raise JournalError(f"cannot read {self.path}: {describe_errno(error)}") from None
        lines = [line for line in head.split(b"\n")[:-1] if line.strip()]
        if not lines and (not head.strip() or head.lstrip().startswith(b'{"key"')):
            return  # empty, or the first entry cut short by a crash: nothing finished
        keys = set()
        for raw in lines:
            try:
                keys.add(json.loads(raw.decode("utf-8"))["key"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                continue
        if not keys:
            raise JournalError(
                f"{self.path} exists and is not a journal of pyhf-dist: give the scan another --journal "
                "(it would be overwritten)"
            )
        if self.key in keys:
            raise JournalError(
                f"{self.path} holds results of an earlier run of this scan: add --resume (resume=True in "
                "Python) to keep them and fit only the rest, or delete it to start afresh"
            )
        raise JournalError(
            f"{self.path} holds results of an earlier scan with other settings or another workspace: delete it "
            "to start afresh, or give this scan another output file (-o) or --journal"
        )

    def open(self, append: bool) -> None:
        """Open for writing: append to what is there (resuming) or start a new journal.

        Raises:
            StorageError: The file cannot be created or written (nothing was fitted yet).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                self._drop_partial_line()
            else:
                self._lines, self.kept = _Lines(), 0
            # Unbuffered: a write that fails (a full disk) leaves nothing pending that closing the
            # file would try, and fail, to write again.
            self._stream = open(self.path, "ab" if append else "wb", buffering=0)
            self._inode = os.fstat(self._stream.fileno()).st_ino
        except OSError as error:
            raise self._fault(error, "open") from None

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
        """Append one record and make sure it is on disk before returning.

        A journal removed meanwhile (with its folder, say) is written again, whole, from what this
        scan holds, and the scan goes on.

        Raises:
            StorageError: The record could not be kept (full disk, quota, read-only folder); the
                error counts the whole records the journal keeps.
        """
        self.write_many([record])

    def write_many(self, records: list[FitRecord], digests: list | None = None) -> None:
        """Append several records with one write and one flush to disk: when it returns, every
        one of them is on disk (what :meth:`write` promises for one).

        Args:
            records: The records.
            digests: Each record's :func:`~pyhf_dist.specs.patch_digest`, kept beside it.

        Raises:
            StorageError: As :meth:`write`; the error counts the whole records kept, those of
                this group that reached the disk included.
        """
        if records:
            digests = digests or [None] * len(records)
            self._append_lines([self._line({"key": self.key, "record": record.fields(), **_patch(digest)})
                                for record, digest in zip(records, digests)])

    def write_chunk(self, pallet: str | None, outcome: dict, digest: str | None = None) -> None:
        """Append one finished chunk of a toy-based patch (its statistics packed, exactly) and make
        sure it is on disk: a resumed scan fits only the toys no such line covers.

        Raises:
            StorageError: As :meth:`write`.
        """
        chunk = {"pallet": pallet, "record": json_safe(compact_chunk(outcome))}
        self._append({"key": self.key, "chunk": chunk, **_patch(digest)})

    def drop_changed(self, current: dict) -> tuple[set, set]:
        """Drop the loaded chunks of a patch other than ``current`` (``key -> digest``) says (the scan
        fits those toys again); returns the keys whose record is of another patch (to fit again),
        and every key with a record or chunk of another patch."""
        stale_records, changed = set(), set()
        for key, digest in current.items():
            if self.record_digests.get(key) not in (None, digest):
                stale_records.add(key)
                changed.add(key)
            digests = self.chunk_digests.get(key)
            if digests and any(each not in (None, digest) for each in digests):
                changed.add(key)
                kept = [(chunk, each) for chunk, each in zip(self.chunks[key], digests) if each in (None, digest)]
                self.chunks[key] = [chunk for chunk, _ in kept]
                self.chunk_digests[key] = [each for _, each in kept]
                if not kept:
                    del self.chunks[key], self.chunk_digests[key]
        return stale_records, changed

    def _append(self, entry: dict) -> None:
        """Write one line (not a record), on disk before returning."""
        self._append_lines([self._line(entry)], records=False)

    @staticmethod
    def _line(entry: dict) -> bytes:
        try:  # most records hold only finite numbers: one pass, no copy
            text = _ENCODER.encode(entry)
        except ValueError:  # JSON has no NaN: written as null
            text = json.dumps(json_safe(entry), default=str)
        return (text + "\n").encode()

    def _append_lines(self, lines: list[bytes], records: bool = True) -> None:
        """Write whole lines with one write and one fsync, on disk before returning; a journal
        removed meanwhile is written again."""
        data = b"".join(lines)
        view = memoryview(data)
        try:
            while view:  # a write to a nearly full disk can be partial before it fails
                view = view[os.write(self._stream.fileno(), view):]
            os.fsync(self._stream.fileno())
        except OSError as error:
            if records:  # the group's lines that reached the file whole are kept
                self.kept += data[:len(data) - len(view)].count(b"\n")
            raise self._fault(error, "write") from None
        self._lines.extend(lines)
        if records:
            self.kept += len(lines)
        if not self._still_there():
            self._write_again()

    def _still_there(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def _write_again(self) -> None:
        """Write the whole journal again at its path: the file there was removed or replaced."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(temporary, "wb") as stream:
                stream.write(self._lines.data())
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
            stream = open(self.path, "ab", buffering=0)
        except OSError as error:
            self.kept = 0
            raise StorageError(
                f"the journal {self.path} was removed mid-scan and cannot be written again "
                f"({describe_errno(error)}): the {len(self._lines)} records finished are lost with it",
                path=self.path, kept=0, journal=self.path, errno=error.errno,
            ) from None
        self._stream.close()
        self._stream = stream
        self._inode = os.fstat(stream.fileno()).st_ino
        log.warning(
            "the journal %s was removed mid-scan: written again with the %d records finished, and the scan goes on",
            self.path, len(self._lines),
        )

    def _fault(self, error: OSError, doing: str) -> StorageError:
        """The one-line error for a journal the machine would not let us write."""
        where = f"{self.kept} finished record{'s are' if self.kept != 1 else ' is'} kept in it"
        what = {"open": "create", "write": "write to"}[doing]
        return StorageError(
            f"cannot {what} the journal {self.path}: {describe_errno(error)}; {where}",
            path=self.path, kept=self.kept, journal=self.path, errno=error.errno,
        )

    def close(self) -> None:
        """Close the journal and release it for other scans."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except OSError:  # unbuffered: nothing is pending; a failing close loses nothing
                pass
        if self._lock is not None:
            lock, self._lock = self._lock, None
            try:
                os.unlink(self.lock_path)  # while still holding it: see acquire()
            except OSError:
                pass
            try:
                lock.close()
            except OSError:
                pass


class _Lines:
    """The journal's whole lines, kept to write it again should it be removed: in a temporary file
    rather than in memory, so that the client's memory does not grow by a line per record (in
    memory only where no temporary file can be made or written)."""

    def __init__(self):
        self.count, self._memory, self._file = 0, [], None
        try:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="pyhf-dist-journal-")
        except OSError:
            self._file = None

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def append(self, line: bytes) -> None:
        self.extend([line])

    def extend(self, lines: list[bytes]) -> None:
        self.count += len(lines)
        if self._file is not None:
            try:
                self._file.write(b"".join(lines))
                return
            except OSError:  # a full temporary folder: from here on in memory, after what is there
                self._memory = [self._spilled()]
                self._file = None
        self._memory.extend(lines)

    def _spilled(self) -> bytes:
        self._file.flush()
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0, 2)
        return data

    def data(self) -> bytes:
        """Every line, in order."""
        return self._spilled() if self._file is not None else b"".join(self._memory)


def _patch(digest: str | None) -> dict:
    return {} if digest is None else {"patch": digest}


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}-{number}")
            start = None
    return ", ".join(parts)
