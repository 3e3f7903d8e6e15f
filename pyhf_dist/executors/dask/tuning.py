"""The Dask settings of the clusters pyhf-dist starts, and what it tells users of their own.

Applied only to the workers pyhf-dist starts itself (``executor="dask"`` without a cluster, and the
jobs of ``executor="slurm"``), and only where the user's Dask configuration still has Dask's
default. A cluster or client the user gives is never reconfigured: :func:`advice` words one line
for its user instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pyhf_dist.runtime.threads import thread_limits

__all__ = ["TUNING", "MESSAGE_LOGS", "own_cluster_tuning", "tuning_exports", "leftover_variables", "worker_facts", "advice",
           "worker_environment"]

#: Dask settings for the clusters pyhf-dist starts (never for one it is given), each applied only
#: where the user's Dask configuration still has Dask's default. Measured on the 1Lbb scan
#: (worker CPU per fit in benchmarks/run.py; docs/performance.md, "Speed on Dask"):
#: * ``MALLOC_TRIM_THRESHOLD_``, which a Nanny sets in every worker process (65536), fixes glibc's
#:   thresholds: freed memory goes back to the system at once and the mmap threshold stops adapting,
#:   so the buffers of every jax call are mapped and page-faulted afresh (about 7400 minor faults
#:   and 18 ms of system time per 1Lbb fit instead of 250 and 3 ms): about 30% more CPU per fit.
#: * The statistical profiler (a thread sampling every 10 ms), the 20 ms event-loop tick and the
#:   0.5 s system monitor cost an idle two-worker cluster about 10% of one core; nobody reads them
#:   during a scan.
TUNING = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # With gilknocker installed, Dask polls the GIL every millisecond.
    "distributed.admin.system-monitor.gil.enabled": False,
}

#: For the Dask objects of this process that pyhf-dist makes (its client; its own cluster's
#: scheduler, while the workers join): none of Dask's logs for its developers, among them the last
#: 1000 batches of messages each stream sent. A batch of a scan that packs points holds a whole
#: pack of tasks (to ~400 kB for 2500 signal points) and a 10^5-point scan sends fewer than 1000
#: packs: the client's stream and the scheduler's streams to the workers kept every task sent,
#: ~330 bytes a point of the client's memory (no-op fits on two workers; 16 batches a stream
#: still cost ~10 MB at 10^5 points). The scheduler's transition and event logs go with them
#: (one setting). A user who wants them sets the key: a value of the user's is left as it is.
MESSAGE_LOGS = {"distributed.admin.low-level-log-length": 0}


def own_cluster_tuning(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of ``settings`` (default :data:`TUNING`) that applies now: keys the user's Dask
    config leaves at Dask's default.

    >>> "distributed.worker.profile.enabled" in own_cluster_tuning()  # doctest: +SKIP
    True
    """
    import dask

    defaults = dask.config.merge(*dask.config.defaults)
    missing = object()
    tuning = {}
    for key, value in (TUNING if settings is None else settings).items():
        current = dask.config.get(key, default=missing)
        if current is missing or current == dask.config.get(key, default=missing, config=defaults):
            tuning[key] = value
    return tuning


def tuning_exports(tuning: dict[str, Any], environ: dict | None = None) -> list[str]:
    """Shell lines that give a Dask process started elsewhere (a batch job) the same settings.

    Args:
        tuning: Dask settings (dotted keys), as from :func:`own_cluster_tuning`.
        environ: The environment the job inherits (a batch system copies the submitter's). A
            variable ``tuning`` drops that it holds at Dask's default, as a Nanny that ran in the
            submitting process leaves it, is unset too.

    >>> print(*tuning_exports({"distributed.worker.profile.enabled": False,
    ...                        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None},
    ...                       environ={"MALLOC_TRIM_THRESHOLD_": "65536"}), sep="\\n")
    export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
    export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{"MALLOC_TRIM_THRESHOLD_": None}'
    unset MALLOC_TRIM_THRESHOLD_
    """
    import shlex

    lines = []
    for key, value in tuning.items():
        *parents, leaf = key.split(".")
        if leaf != leaf.lower():
            # Dask lower-cases the names of DASK_* variables: an upper-case key (an environment
            # variable's name) travels inside a mapping, which Dask merges into its parent.
            name, text = "__".join(parents), f"{{{json.dumps(leaf)}: {value!r}}}"
        else:
            name, text = key.replace(".", "__"), value if isinstance(value, str) else repr(value)
        lines.append(f"export DASK_{name.upper().replace('-', '_')}={shlex.quote(text)}")
    for variable in leftover_variables(tuning, environ or {}):
        lines.append(f"unset {variable}")
    return lines


def leftover_variables(tuning: dict[str, Any], environ: dict) -> list[str]:
    """Variables of ``environ`` that ``tuning`` drops from a worker's environment and that hold
    Dask's default value: left by a Nanny that ran in this process, not chosen by the user."""
    import dask

    defaults = dask.config.merge(*dask.config.defaults)
    prefix = "distributed.nanny.pre-spawn-environ."
    leftovers = []
    for key, value in tuning.items():
        if key.startswith(prefix) and value is None:
            variable = key[len(prefix):]
            default = dask.config.get(key, default=None, config=defaults)
            if default is not None and environ.get(variable) == str(default):
                leftovers.append(variable)
    return leftovers


def worker_facts() -> dict[str, Any]:
    """What a worker process runs with, as far as fit speed goes (called on a worker)."""
    import dask

    return {
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "profile": dask.config.get("distributed.worker.profile.enabled", default=None),
    }


def advice(facts: dict[str, dict]) -> str | None:
    """One line for the user whose own cluster runs fits slower than it could (never acted on)."""
    trimmed = sorted({str(f.get("MALLOC_TRIM_THRESHOLD_")) for f in facts.values() if f.get("MALLOC_TRIM_THRESHOLD_")})
    if not trimmed:
        return None
    return (
        f"the workers run with MALLOC_TRIM_THRESHOLD_={','.join(trimmed)} (Dask's default), which makes each jax fit "
        "take about 30% more CPU; start them with dask config distributed.nanny.pre-spawn-environ."
        "MALLOC_TRIM_THRESHOLD_ set to None (see pyhf-dist's docs/performance.md, 'Speed on Dask')"
    )


def worker_environment(config: dict, tuning: dict[str, Any]) -> dict[str, str]:
    """The environment of a worker process we start: this process's (less what ``tuning`` drops
    and a Nanny left here, see :func:`leftover_variables`), with what a Nanny would add before it starts a
    worker (``pre-spawn-environ``, ``environ``; values already set win) and one thread per
    numerical library, all in force before the interpreter loads anything; and the Dask
    configuration of this process, ``tuning`` included."""
    import dask

    environment = dict(os.environ)
    for variable in leftover_variables(tuning, environment):
        del environment[variable]
    spawn = dask.config.get("distributed.nanny.pre-spawn-environ", config=config, default={}) or {}
    for section in (spawn, dask.config.get("distributed.nanny.environ", config=config, default={}) or {}):
        for key, value in section.items():
            if value is not None:
                environment.setdefault(key, str(value))
    environment.update(thread_limits(environment))
    try:
        environment["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(config)
    except (TypeError, ValueError):  # something in the user's config that is not JSON: ours only
        environment["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(
            {key: value for key, value in config.items() if key == "distributed"})
    return environment
