"""How a worker process died: the signal or exit code, the kernel's OOM killer, its memory.

What an executor that owns its worker processes (:class:`~pyhf_dist.executors.local.LocalExecutor`)
says of a worker that died (:func:`describe_death`): its process id, the signal or exit code,
whether the kernel's OOM killer killed it (read from the kernel log and from its memory cgroup's
OOM-kill counter, where this machine lets us read them), and its resident memory last seen
(:class:`MemoryWatch`, sampled twice a second while it runs).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

__all__ = ["MemoryWatch", "describe_death", "memory_cgroup", "oom_kills", "running"]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process rather than a zombie waiting to be reaped (Linux only;
    elsewhere every existing process counts as live)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class MemoryWatch:
    """Resident memory of the workers, sampled twice a second, and their memory cgroups' OOM-kill
    counters as first seen: what is left to say of a worker the kernel killed."""

    INTERVAL = 0.5

    def __init__(self):
        self.rss: dict[int, int] = {}
        self.cgroups: dict[int, tuple[Path, int | None]] = {}
        self._pids: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def watch(self, pid: int) -> None:
        if pid in self._pids:
            return
        self._pids.add(pid)
        self._sample(pid)
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="pyhf-dist-memory-watch", daemon=True)
            self._thread.start()

    def _sample(self, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/statm") as stream:
                rss = int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            rss = 0
        if not rss:
            # Killed and not yet reaped (a zombie reads as 0 bytes, in the root cgroup) or gone: its
            # last sample stays. (A read can also fail while it starts: then it is sampled again.)
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                self._pids.discard(pid)
            return
        self.rss[pid] = rss
        group = memory_cgroup(pid)
        if group is not None and self.cgroups.get(pid, (None,))[0] != group and not _zombie(pid):
            # A worker may move to another cgroup as it starts (a site's initializer, a job step):
            # its counter is read from where it lives now.
            self.cgroups[pid] = (group, oom_kills(group))

    def _run(self) -> None:
        while not self._stopped.wait(self.INTERVAL):
            for pid in list(self._pids):
                self._sample(pid)

    def stop(self) -> None:
        self._stopped.set()
        self._thread = None
        self._pids.clear()


def _zombie(pid: int) -> bool:
    return not running(pid)


def memory_cgroup(pid: int) -> Path | None:
    """The memory cgroup directory of ``pid`` (cgroup v2 or v1), or ``None`` where unreadable."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):  # v1
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        elif number == "0" and not controllers:  # v2 (unified)
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/")
            if not (candidate / "memory.events").exists():
                continue
        else:
            continue
        if candidate.is_dir():
            return candidate
    return None


def oom_kills(group: Path) -> int | None:
    """How many processes the OOM killer has killed in memory cgroup ``group`` (``None``: unknown)."""
    for name in ("memory.events", "memory.oom_control"):  # v2, v1 (kernel 4.13 and later)
        try:
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def _memory_limit(group: Path) -> int | None:
    for name in ("memory.max", "memory.limit_in_bytes"):
        try:
            text = (group / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _kernel_log_kill(pid: int) -> str | None:
    """The kernel's line on killing ``pid`` for lack of memory (``dmesg``): ``""`` when the log has
    none, ``None`` when it cannot be read here."""
    import re
    import subprocess

    try:
        run = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if run.returncode != 0:  # not allowed to read it (kernel.dmesg_restrict)
        return None
    log = run.stdout
    for line in reversed(log.splitlines()):
        if re.search(rf"(Out of memory|out of memory).*: Killed process {pid} ", line):
            match = re.search(r"anon-rss:(\d+)kB", line)
            return f"anon-rss {_size(int(match.group(1)) * 1024)} at the kill" if match else "Killed process"
    return ""


def _size(octets: int) -> str:
    """``1.9 GB``, ``512 MB``: memory sizes for one-line messages."""
    return f"{octets / 1e9:.1f} GB" if octets >= 1e9 else f"{octets / 1e6:.0f} MB"


def describe_death(pid: int, code: int | None, memory: MemoryWatch | None = None) -> str:
    """One line on how worker ``pid`` ended, from its exit ``code`` (negative: the signal) and what
    ``memory`` saw of it."""
    seen = memory.rss.get(pid) if memory is not None else None
    last = f"; its memory last seen {_size(seen)}" if seen else ""
    if code is None:
        return f"worker {pid} was lost (no exit code){last}"
    if code >= 0:
        return f"worker {pid} exited with code {code}{last}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code != signal.SIGKILL:
        return f"worker {pid} died of {name}{last}"
    evidence = []
    kernel = _kernel_log_kill(pid)
    if kernel:
        evidence.append(f"kernel log: {kernel}")
    group, before = memory.cgroups.get(pid, (None, None)) if memory is not None else (None, None)
    after = oom_kills(group) if group is not None else None
    if group is not None:
        if before is not None and after is not None and after > before:
            limit = _memory_limit(group)
            evidence.append(f"memory cgroup {group.name}: {after - before} OOM kill{'s' if after - before > 1 else ''}"
                            + (f", limit {_size(limit)}" if limit else ""))
    if evidence:
        return f"worker {pid} was killed by the kernel's OOM killer ({'; '.join(evidence)}){last}"
    if kernel is None and (before is None or after is None):
        return (f"worker {pid} was killed (SIGKILL: by the OOM killer or another process; neither the kernel log "
                f"nor its memory cgroup can be read here){last}")
    return f"worker {pid} was killed (SIGKILL), not by the OOM killer as far as the kernel log and memory cgroup tell{last}"
