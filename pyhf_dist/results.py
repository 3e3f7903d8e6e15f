"""Scan results: one :class:`~pyhf_dist.records.FitRecord` per patch, gathered in a :class:`ScanResult`.

The JSON file schema is ``{"metadata": {...}, "results": [{...}, ...]}`` with one object per
patch holding the fields of :class:`FitRecord`. A scan of several pallets of one source holds the
records of each (``pallet`` names it; a patch name can be in several) and, when asked, their
combination (records whose ``pallet`` is the combination's name, e.g. ``"best-expected"``; see
:mod:`pyhf_dist.combine`). Files are written atomically (:func:`~pyhf_dist.records.write_atomic`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

from pyhf_dist.combine import combine
from pyhf_dist.exceptions import PalletError
from pyhf_dist.records import COMBINATIONS, EXCLUSION_LEVEL, FitRecord, json_safe, write_atomic
from pyhf_dist.summary import summary as summary_of

__all__ = ["FitRecord", "ScanResult", "write_atomic", "json_safe", "EXCLUSION_LEVEL", "COMBINATIONS"]

CSV_COLUMNS = [
    "name", "pallet", "chosen_pallet", "values",
    "status", "CLs_obs", "CLs_exp_m2", "CLs_exp_m1", "CLs_exp", "CLs_exp_p1", "CLs_exp_p2",
    "mu_up_obs", "mu_up_exp_m2", "mu_up_exp_m1", "mu_up_exp", "mu_up_exp_p1", "mu_up_exp_p2",
    "error", "fit_seconds", "attempts", "host", "pid", "slurm_job_id", "engine", "fallback_reason", "ntoys", "seed",
    "converged",
]
_BAND = ("m2", "m1", None, "p1", "p2")
#: The columns :meth:`ScanResult.from_csv` cannot do without (the others may be left out).
_CSV_REQUIRED = ("name", "values", "status", "CLs_obs")


class ScanResult:
    """The records of a scan and its metadata.

    Iterates over :class:`FitRecord` objects, indexes by position, by patch name, or by
    ``(pallet, name)`` (needed when a name is in several pallets), and reads and writes JSON and CSV.

    >>> result = ScanResult([FitRecord("A", [1, 2], CLs_obs=0.01, CLs_exp=[0.1] * 5)], {"executor": "local"})
    >>> result["A"].excluded, len(result)
    (True, 1)
    >>> two = ScanResult([FitRecord("A", [1, 2], pallet="SR1"), FitRecord("A", [1, 2], pallet="SR2")])
    >>> two["SR2", "A"].pallet, two.pallets(), len(two.for_pallet("SR1"))
    ('SR2', ['SR1', 'SR2'], 1)
    """

    def __init__(self, records: list[FitRecord] | None = None, metadata: dict | None = None):
        self.records = list(records or [])
        self.metadata = dict(metadata or {})

    def __iter__(self) -> Iterator[FitRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | str | tuple) -> FitRecord:
        if isinstance(key, tuple):
            for record in self.records:
                if record.key == key:
                    return record
            raise KeyError(key)
        if isinstance(key, str):
            found = [record for record in self.records if record.name == key]
            if len(found) > 1:
                pallets = ", ".join(str(record.pallet) for record in found)
                raise KeyError(
                    f"{key!r} is in several pallets ({pallets}): index with (pallet, name), "
                    f"e.g. results[{found[0].pallet!r}, {key!r}]"
                )
            if found:
                return found[0]
            raise KeyError(key)
        return self.records[key]

    def __contains__(self, key: str | tuple) -> bool:
        if isinstance(key, tuple):
            return any(record.key == key for record in self.records)
        return any(record.name == key for record in self.records)

    def __repr__(self) -> str:
        counts = self.counts()
        return f"<ScanResult {counts['total']} patches: {counts['ok']} ok, {counts['failed']} failed>"

    def names(self) -> list[str]:
        return [record.name for record in self.records]

    # ---------------------------------------------------------------------------- data frames

    def rows(self) -> list[dict]:
        """One flat dict per record: the values under the pallet's labels, the CLs (and upper
        limits) with their bands spread over ``*_m2 .. *_p2`` columns, status, error, timing and
        worker — the columns of :meth:`to_csv`, with the values split by label.

        >>> ScanResult([FitRecord("A", [1, 2], CLs_obs=0.5)], {"labels": ["m1", "m2"]}).rows()[0]["m2"]
        2
        """
        labels = list(self.metadata.get("labels") or [])
        named = any(record.pallet is not None for record in self.records)
        rows = []
        for record in self.records:
            row = _flat(record)
            if not named:  # a single-pallet source: no pallet columns
                del row["pallet"], row["chosen_pallet"]
            values = row.pop("values")
            names = labels if len(labels) == len(record.values) else [f"value {i + 1}" for i in range(len(record.values))]
            row = {"name": row.pop("name"), **dict(zip(names, values)), **row}
            rows.append(row)
        return rows

    def to_pandas(self):
        """The records as a ``pandas.DataFrame`` indexed by patch name, or by (pallet, patch name)
        when the source held several pallets (needs pandas).

        Columns as :meth:`rows`; ``CLs_obs``, ``CLs_exp`` (the median) and the band edges are
        floats, NaN where a CLs is undefined or the fit failed.
        """
        try:
            import pandas
        except ImportError:
            from pyhf_dist.exceptions import MissingDependencyError

            raise MissingDependencyError("pandas", "pandas", "ScanResult.to_pandas()") from None
        frame = pandas.DataFrame(self.rows())
        if not len(frame):
            return frame
        return frame.set_index(["pallet", "name"] if "pallet" in frame else "name")

    def _repr_html_(self) -> str:
        """What a notebook shows: a summary line and a table of the records (first 50)."""
        import html

        counts = self.counts()
        head = (f"<p><b>ScanResult</b>: {counts['total']} patches, {counts['ok']} ok, {counts['failed']} failed, "
                f"{counts['excluded']} excluded (CLs_obs &lt; 0.05)")
        if self.metadata.get("executor"):
            head += f" &middot; {html.escape(str(self.metadata['executor']))}"
            if self.metadata.get("wall_seconds") is not None:
                head += f", {self.metadata['wall_seconds']:.1f} s"
        head += "</p>"
        rows = self.rows()[:50]
        if not rows:
            return head
        columns = [c for c in rows[0] if c not in ("host", "pid", "slurm_job_id", "error")] + ["error"]
        cells = []
        for row in rows:
            cells.append("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>")
        more = f"<p>... {len(self.records) - 50} more</p>" if len(self.records) > 50 else ""
        header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        return f"{head}<table><thead><tr>{header}</tr></thead><tbody>{''.join(cells)}</tbody></table>{more}"

    def pallets(self) -> list[str]:
        """The pallet names of the records, in order (combinations included); ``[]`` for a scan
        of a single-pallet source."""
        return list(dict.fromkeys(record.pallet for record in self.records if record.pallet is not None))

    def for_pallet(self, pallet: str) -> "ScanResult":
        """The records of one pallet (or of a combination, e.g. ``"best-expected"``: made from the
        pallets' records when the results do not hold it yet; see :mod:`pyhf_dist.combine`).

        Raises:
            PalletSelectionError: No such pallet in the results (close names are suggested).
        """
        from pyhf_dist.exceptions import PalletSelectionError

        available = self.pallets()
        metadata = {**self.metadata, "pallet": pallet}
        if pallet in available:
            return ScanResult([record for record in self.records if record.pallet == pallet], metadata)
        fitted = [name for name in available if name not in COMBINATIONS]
        if pallet in COMBINATIONS and len(fitted) > 1:
            return ScanResult(combine([r for r in self.records if not r.combined], pallet, fitted), metadata)
        if not available:
            raise PalletSelectionError(
                f"the results are of a single-pallet scan (no pallet names): drop the pallet choice {pallet!r}"
            )
        import difflib

        choices = available + [name for name in COMBINATIONS if name not in available and len(fitted) > 1]
        close = difflib.get_close_matches(pallet, choices, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"they hold {', '.join(choices)}"
        raise PalletSelectionError(f"the results hold no pallet {pallet!r}: {hint}")

    def failed(self) -> list[FitRecord]:
        return [record for record in self.records if not record.ok]

    def counts(self) -> dict:
        """Numbers for a summary: total, ok, failed, excluded (observed CLs < 0.05).

        Records of a combination of pallets are not fits: they are counted only by
        ``for_pallet("best-expected").counts()``, unless the results hold nothing else.
        """
        records = [record for record in self.records if not record.combined] or self.records
        return {
            "total": len(records),
            "ok": sum(record.ok for record in records),
            "failed": sum(not record.ok for record in records),
            "excluded": sum(bool(record.excluded) for record in records),
        }

    # ------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"metadata": self.metadata, "results": [record.to_dict() for record in self.records]}

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        """The JSON text; written atomically to ``path`` when given."""
        text = json.dumps(json_safe(self.to_dict()), indent=indent) + "\n"
        if path is not None:
            write_atomic(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Any, where: str = "the results") -> "ScanResult":
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise PalletError(f"{where} is not a pyhf-dist results file (expected 'metadata' and 'results')")
        try:
            records = [FitRecord.from_dict(item) for item in data["results"]]
        except (TypeError, ValueError) as error:
            raise PalletError(f"{where} has a malformed result record: {error}") from None
        return cls(records, data.get("metadata") or {})

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "ScanResult":
        """Read results from a JSON file (or JSON text)."""
        text = str(path_or_text)
        if isinstance(path_or_text, os.PathLike) or not text.lstrip().startswith("{"):
            try:
                text = Path(path_or_text).read_text(encoding="utf-8-sig")
            except OSError as error:
                raise PalletError(f"cannot read results file {path_or_text}: {error.strerror}") from None
            except UnicodeDecodeError:
                raise PalletError(f"{path_or_text} is not a results file (not UTF-8 text)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PalletError(f"{path_or_text} is not valid JSON ({error.msg}, line {error.lineno})") from None
        return cls.from_dict(data, str(path_or_text))

    # ------------------------------------------------------------------------------------- CSV

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per patch; bands spread over ``*_m2 .. *_p2`` columns. Written atomically."""
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            row = _flat(record)
            row["values"] = " ".join(str(value) for value in row["values"])
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
        text = stream.getvalue()
        if path is not None:
            write_atomic(path, text)
        return text

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "ScanResult":
        """Read records back from :meth:`to_csv` output (metadata is not stored in CSV), also
        once a spreadsheet has saved it again ("CSV UTF-8": a byte order mark, CRLF lines).

        Raises:
            PalletError: The file cannot be read, or is not such a table (names the first
                missing column, or the line and cell that cannot be read).
        """
        records = []
        try:
            with open(path, newline="", encoding="utf-8-sig") as stream:
                reader = csv.DictReader(stream)
                missing = [name for name in _CSV_REQUIRED if name not in (reader.fieldnames or [])]
                if missing:
                    raise PalletError(f"{path} is not a results table of pyhf-dist: it has no column {missing[0]!r} "
                                      "(pyhf-dist fit ... -o results.csv writes one)")
                for line, row in enumerate(reader, start=2):
                    try:
                        records.append(record_from_row(row))
                    except ValueError as error:
                        raise PalletError(f"{path}, line {line}: {error}") from None
        except OSError as error:
            raise PalletError(f"cannot read results file {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise PalletError(f"{path} is not a results table (not UTF-8 text)") from None
        return cls(records)

    # ---------------------------------------------------------------------------------- summary

    def engines(self) -> dict:
        """Records per engine (``"fast"``, ``"pyhf"``; failed records have none), and why the fast
        path declined the patches plain pyhf fitted: ``{"engines": {...}, "fallbacks": {reason: count}}``.

        >>> ScanResult([FitRecord("A", engine="fast"), FitRecord("B", engine="pyhf", fallback_reason="why")]).engines()
        {'engines': {'fast': 1, 'pyhf': 1}, 'fallbacks': {'why': 1}}
        """
        engines: dict = {}
        fallbacks: dict = {}
        for record in self.records:
            if record.combined:  # a copy of a pallet's record, counted there
                continue
            if record.engine is not None:
                engines[record.engine] = engines.get(record.engine, 0) + 1
            if record.fallback_reason:
                fallbacks[record.fallback_reason] = fallbacks.get(record.fallback_reason, 0) + 1
        ordered = dict(sorted(fallbacks.items(), key=lambda item: (-item[1], item[0])))
        return {"engines": dict(sorted(engines.items())), "fallbacks": ordered}

    def certification(self) -> dict:
        """How the fits behind the ok records ended: ``certified`` (every fit checked converged),
        ``not_converged``, ``unchecked`` (plain pyhf), and ``pyhf_stalls``: records on whose
        patch pyhf's default minimizer stalls at its starting point.

        >>> ScanResult([FitRecord("A", converged=True, pyhf_default={"stalls_at_start": True}),
        ...             FitRecord("B", engine="pyhf")]).certification()
        {'certified': 1, 'not_converged': 0, 'unchecked': 1, 'pyhf_stalls': 1}
        """
        records = [record for record in self.records if record.ok and not record.combined]
        return {
            "certified": sum(record.converged is True for record in records),
            "not_converged": sum(record.converged is False for record in records),
            "unchecked": sum(record.converged is None for record in records),
            "pyhf_stalls": sum(bool(record.pyhf_default) for record in records),
        }

    def summary(self) -> str:
        """A short text table: counts, wall time, how many points are excluded (per pallet, and for
        their combination, when the scan fitted several), what fitted them.

        >>> print(ScanResult([FitRecord("A", engine="pyhf", fallback_reason="why")]).summary())
        patches                     1
        ok                          1
        failed                      0
        engine pyhf                 1
        fast path declined          why (1)
        """
        return summary_of(self)

    @property
    def discovery(self) -> bool:
        """Whether the records hold discovery p-values (``p0``, test statistic ``q0``) in their
        ``CLs_obs`` and ``CLs_exp``: small values are an excess there, not an exclusion."""
        return (self.metadata.get("settings") or {}).get("test_stat") == "q0"


def record_from_row(row: dict) -> FitRecord:
    """A record from a row of :meth:`ScanResult.from_csv`, cells as text (``ValueError``: a cell is
    not what its column holds)."""

    def number(text: str | None, kind=float):
        return None if text in ("", None) else kind(text)

    bands = {}
    for prefix in ("CLs_exp", "mu_up_exp"):
        band = [number(row.get(prefix if s is None else f"{prefix}_{s}", "")) for s in _BAND]
        bands[prefix] = None if all(value is None for value in band) else band
    worker = {key: row.get(key) or None for key in ("host", "pid", "slurm_job_id")}
    if worker["pid"] is not None:
        worker["pid"] = int(worker["pid"])
    return FitRecord(
        name=row["name"],
        pallet=row.get("pallet") or None,
        chosen_pallet=row.get("chosen_pallet") or None,
        values=[float(value) for value in (row["values"] or "").split()],
        status=row["status"],
        CLs_obs=number(row["CLs_obs"]),
        CLs_exp=bands["CLs_exp"],
        mu_up_obs=number(row.get("mu_up_obs", "")),
        mu_up_exp=bands["mu_up_exp"],
        error=row.get("error") or None,
        fit_seconds=number(row.get("fit_seconds", "")),
        attempts=number(row.get("attempts", ""), int) or 1,
        worker=worker if any(worker.values()) else None,
        engine=row.get("engine") or None,
        fallback_reason=row.get("fallback_reason") or None,
        ntoys=number(row.get("ntoys", ""), int),
        seed=number(row.get("seed", ""), int),
        converged={"True": True, "False": False}.get(row.get("converged", "")),
    )


def _flat(record: FitRecord) -> dict:
    """A record as one flat row (the CSV columns; ``values`` still a list)."""
    row = {
        "name": record.name,
        "pallet": record.pallet,
        "chosen_pallet": record.chosen_pallet,
        "values": list(record.values),
        "status": record.status,
        "CLs_obs": record.CLs_obs,
        "mu_up_obs": record.mu_up_obs,
        "error": record.error,
        "fit_seconds": record.fit_seconds,
        "attempts": record.attempts,
        "engine": record.engine,
        "fallback_reason": record.fallback_reason,
        "ntoys": record.ntoys,
        "seed": record.seed,
        "converged": record.converged,
        **{key: (record.worker or {}).get(key) for key in ("host", "pid", "slurm_job_id")},
    }
    for prefix, band in (("CLs_exp", record.CLs_exp), ("mu_up_exp", record.mu_up_exp)):
        for suffix, value in zip(_BAND, band or [None] * 5):
            row[prefix if suffix is None else f"{prefix}_{suffix}"] = value
    return {field: row[field] for field in CSV_COLUMNS}


def _cell(value: Any) -> str:
    import html

    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))
