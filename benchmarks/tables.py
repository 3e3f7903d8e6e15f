"""The tables and figures of ``run.py``: Table 1 of the 2021 study reproduced, each executor
against the local pool, per-task breakdown, scaling."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from scans import mean_std

__all__ = ["STUDY", "write_table", "write_table1", "write_ratios", "write_overhead_table", "write_scaling", "plot"]

#: Table 1 of the 2021 study (funcX on RIVER: wall time mean ± std over trials on 4 nodes, and the
#: single-node time), keyed by our pallet names.
STUDY = {
    "1Lbb": {"analysis": "ATLAS 1Lbb (Eur. Phys. J. C 80 (2020) 691)", "patches": 125,
             "wall": 156.2, "std": 9.5, "single": 3842},
    "stau": {"analysis": "ATLAS stau (Phys. Rev. D 101 (2020) 032009), Region-combined", "patches": 57,
             "wall": 57.4, "std": 5.2, "single": 612},
}


def write_table(analysis: dict, workers: int) -> str:
    """One pallet's table: wall times, ratios to plain pyhf (both baselines), agreement."""
    baselines, patches = analysis["baselines"], analysis["patches"]
    pool, perfect, serial = baselines["pool_seconds"], baselines["perfect_pool_seconds"], baselines["serial_seconds"]
    lines = [
        f"| executor | backend | patches | wall time (s), {workers} workers | first run, empty cache (s) "
        f"| single worker (s) | × faster than plain pyhf Pool({workers}) | × faster than a perfect pool of "
        f"{workers} single-threaded pyhf | × faster than serial pyhf | max abs ΔCLs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in analysis["rows"]:
        mean = statistics.mean(row["walls"])
        single = "–" if row["single_worker"] is None else f"{row['single_worker']:.1f}"
        first = "–" if row.get("first_run") is None else f"{row['first_run']:.1f}"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {patches} | {mean_std(row['walls'])} | {first} | {single} "
            f"| {pool / mean:.1f} | {perfect / mean:.1f} | {serial / mean:.1f} | {row['max_difference']:.1e} |"
        )
    lines.append(
        f"| plain pyhf, multiprocessing.Pool({workers}) | numpy | {patches} | {pool:.1f} (est.) | – "
        f"| {serial:.0f} (est.) | 1.0 | {perfect / pool:.1f} | {serial / pool:.1f} | {baselines['pool_max_difference']:.1e} |"
    )
    where = baselines["machine"]
    note = ("\nWall time: from a cold `python` process to the results file, with the machine's cache "
            "(compiled likelihood, checks already passed) from earlier runs; *first run, empty cache*: the "
            "same with an empty cache, as on a fresh machine. ΔCLs: against plain pyhf on numpy, over the "
            f"{baselines['compared_patches']} patches it was run on.\n"
            f"Plain pyhf was timed on {baselines['serial_estimated_from']} random patches, alone in one process "
            f"(serial: seconds per patch × {patches}; perfect pool: the same / {workers}) and over the Pool "
            f"(its wall × {patches} / {baselines['pool_estimated_from']}), one thread each, "
            + (f"**cached** from {where['date']} on {where['host']} ({where['cores']} cores, {where['cpu']}).\n"
               if baselines.get("cached") else f"in this run ({where['date']}, {where['host']}).\n"))
    return "\n".join(lines) + "\n" + note


def write_table1(analyses: list[dict], workers: int, command: str) -> str:
    """Table 1 of the 2021 study, reproduced: every executor, both analyses, the study beside them."""
    lines = [
        f"| analysis | patches | executor | wall time (s), {workers} workers | single worker (s) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for analysis in analyses:
        study = STUDY.get(analysis["name"])
        label = study["analysis"] if study else analysis["name"]
        for row in analysis["rows"]:
            single = "–" if row["single_worker"] is None else f"{row['single_worker']:.1f}"
            name = row["executor"] if row["backend"] == "jax" else f"{row['executor']} ({row['backend']})"
            lines.append(f"| {label} | {analysis['patches']} | {name} | {mean_std(row['walls'])} | {single} |")
        if study:
            lines.append(f"| {label} | {study['patches']} | *2021 study: funcX, 4 nodes / 1 node* "
                         f"| *{study['wall']} ± {study['std']}* | *{study['single']}* |")
    return ("\n".join(lines) + "\n\n"
            f"Wall time mean ± std over trials, from a cold `python` process to the results file, on this "
            f"machine ({os.cpu_count()} cores); the study's figures are its Table 1 (RIVER cluster: "
            "4 nodes, and a single node). Made by\n\n```bash\n" + command + "\n```\n")


def write_ratios(analyses: list[dict]) -> str:
    """Each executor against the local pool, measured in the same run: wall time and per-fit compute."""
    lines = [
        "| pallet | executor | wall / local | median fit on a worker (ms) | fit / local "
        "| worker CPU per fit (ms) | CPU / local | client CPU per fit (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for analysis in analyses:
        by_name = {(row["executor"], row["backend"]): row for row in analysis["rows"]}
        for row in analysis["rows"]:
            local = by_name.get(("local", row["backend"]))

            def typical(r, key):
                values = [run.get(key) for run in r["runs"] if run.get(key) is not None]
                return statistics.median(values) if values else None

            def ratio(a, b):
                return f"{a / b:.2f}" if a is not None and b else "–"

            def ms(value):
                return f"{value * 1000:.1f}" if value is not None else "–"

            wall = statistics.mean(row["walls"])
            local_wall = statistics.mean(local["walls"]) if local else None
            fit, cpu = typical(row, "compute_median_seconds"), typical(row, "worker_cpu_per_fit")
            local_fit = typical(local, "compute_median_seconds") if local else None
            local_cpu = typical(local, "worker_cpu_per_fit") if local else None
            lines.append(
                f"| {analysis['name']} | {row['executor']} | {ratio(wall, local_wall)} | {ms(fit)} | {ratio(fit, local_fit)} "
                f"| {ms(cpu)} | {ratio(cpu, local_cpu)} | {ms(typical(row, 'client_cpu_per_fit'))} |"
            )
    return ("\n".join(lines) + "\n\nWorker CPU per fit: CPU time of all worker processes between the first "
            "tenth of the results and the last, over the fits in between (for `sequential`, the one process).\n")


def write_overhead_table(analysis: dict, noop: dict) -> str:
    """Per-task breakdown (means, seconds) and the no-op scheduling overhead per executor."""
    lines = [
        "| executor | backend | queue wait + transfer | compute | first task extra (setup, compile) "
        "| result return | executor start-up | no-op task overhead |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in analysis["rows"]:
        last = row["runs"][-1]
        overhead = noop.get(row["executor"], {})
        startup = f"{overhead['startup_seconds']:.2f} s" if overhead else "–"
        per_task = f"{overhead['per_task_ms']:.2f} ms" if overhead else "–"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {last['queue_wait_seconds']:.3f} s | {last['compute_seconds']:.3f} s "
            f"| {last['first_task_extra_seconds']:.3f} s | {last['return_seconds'] * 1000:.1f} ms | {startup} | {per_task} |"
        )
    return "\n".join(lines) + "\n"


def write_scaling(scaling: dict, workers: int, cores: int) -> str:
    lines = []
    for executor, entry in scaling.items():
        by_workers = ", ".join(f"{n}: {mean_std(walls)}" for n, walls in entry["workers"].items())
        by_patches = ", ".join(f"{label} ({data['patches']}): {mean_std(data['walls'])}"
                               for label, data in entry["patches"].items())
        lines.append(f"- **{executor}**: by workers ({cores} cores) {by_workers} s; by patches ({workers} workers) "
                     f"{by_patches} s; fit: {entry['fixed_seconds']:.2f} s fixed per scan + "
                     f"{entry['per_patch_seconds'] * 1000:.0f} ms per patch")
    return "\n".join(lines) + ("\n\n'all pallets': 1Lbb and the three stau pallets scanned one after another in one "
                               "process (four scans); the fit is wall = scans × fixed + patches × per patch.\n")


def plot(analyses: list[dict], scaling: dict, output: Path, workers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install "pyhf-dist[plot]"): no figures', flush=True)
        return
    # Like Figure 2 of the study: per analysis, the wall time of each executor (and the study's).
    figure, axes = plt.subplots(1, len(analyses), figsize=(6 * len(analyses), 4.5), squeeze=False)
    for axis, analysis in zip(axes[0], analyses):
        study = STUDY.get(analysis["name"])
        labels = [row["executor"] for row in analysis["rows"]]
        means = [statistics.mean(row["walls"]) for row in analysis["rows"]]
        errors = [statistics.stdev(row["walls"]) if len(row["walls"]) > 1 else 0 for row in analysis["rows"]]
        singles = [row["single_worker"] or 0 for row in analysis["rows"]]
        colors = ["tab:blue"] * len(labels)
        if study:
            labels.append("2021 study\n(funcX)")
            means.append(study["wall"])
            errors.append(study["std"])
            singles.append(study["single"])
            colors.append("tab:gray")
        positions = range(len(labels))
        axis.bar([p - 0.2 for p in positions], means, width=0.4, yerr=errors, capsize=3, color=colors,
                 label=f"{workers} workers (study: 4 nodes)")
        axis.bar([p + 0.2 for p in positions], singles, width=0.4, color=colors, alpha=0.4, hatch="//",
                 label="single worker (study: 1 node)")
        axis.set_xticks(list(positions), labels, fontsize=8, rotation=30)
        axis.set_yscale("log")
        axis.set_ylabel("wall time [s]")
        axis.set_title(f"{analysis['name']}: {analysis['patches']} patches")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "table1.png", dpi=120)
    if scaling:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for executor, entry in scaling.items():
            counts = list(entry["workers"])
            left.errorbar(counts, [statistics.mean(w) for w in entry["workers"].values()],
                          yerr=[statistics.stdev(w) if len(w) > 1 else 0 for w in entry["workers"].values()],
                          marker="o", label=executor, capsize=3)
            data = list(entry["patches"].values())
            right.errorbar([d["patches"] for d in data], [statistics.mean(d["walls"]) for d in data],
                           yerr=[statistics.stdev(d["walls"]) if len(d["walls"]) > 1 else 0 for d in data],
                           marker="o", linestyle="", label=executor, capsize=3)
        left.set_xlabel(f"workers ({os.cpu_count()} cores)")
        left.set_ylabel("wall time [s]")
        left.set_title(f"{analyses[0]['name']}, all patches")
        right.set_xlabel("patches (stau; 1Lbb; all four pallets, one after another)")
        right.set_title(f"{workers} workers")
        for axis in (left, right):
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(output / "scaling.png", dpi=120)
