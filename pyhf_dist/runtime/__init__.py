"""The worker side of a scan: what runs where the fits run.

Everything here runs on a worker (or in the client's own process, for the sequential executor)
and never imports the client (:mod:`pyhf_dist.scan`, the executors, the command line): an
import-linter contract checks it. It reads tasks and contexts as :mod:`pyhf_dist.protocol`
defines them.

* :mod:`~pyhf_dist.runtime.dispatch` — :func:`run_task`: one task, a pack of tasks, or a no-op,
  and its record;
* :mod:`~pyhf_dist.runtime.state` — a worker's prepared state per scan context
  (:func:`initialize`, :func:`prepared`, :func:`preload`, :func:`release`);
* :mod:`~pyhf_dist.runtime.threads` — one thread per numerical library;
* :mod:`~pyhf_dist.runtime.calculations` — the fast path or plain pyhf for a task;
* :mod:`~pyhf_dist.runtime.reference` — plain pyhf: model building, hypotest, upper limits;
* :mod:`~pyhf_dist.runtime.toys` — one chunk of a patch's pseudo-experiments;
* :mod:`pyhf_dist.runtime.fast` — the compiled engine.
"""

from pyhf_dist.runtime.dispatch import run_task, worker_info
from pyhf_dist.runtime.state import initialize, preload, prepared, release, setup_count
from pyhf_dist.runtime.threads import pin_threads, thread_limit_exports, thread_limits

__all__ = [
    "run_task", "worker_info", "initialize", "preload", "prepared", "release", "setup_count", "pin_threads",
    "thread_limits", "thread_limit_exports",
]
