"""Toy distributions kept in a file (``--keep-toys``), merged across runs (``pyhf-dist merge-toys``).

A scan with ``keep_toys`` writes every patch's test statistics to a compressed ``.npz``
(:func:`write_kept`); files of runs with other seeds merge into one (:func:`merge_kept`), whose
CLs come from the merged distributions (:func:`cls_from_kept`).
"""

from __future__ import annotations

import json

import numpy as np

from pyhf_dist.chunks import no_minimum_summary
from pyhf_dist.records import written_aside
from pyhf_dist.runtime.toys import cls_from_distributions

__all__ = ["KEPT_FORMAT", "write_kept", "read_kept", "merge_kept", "cls_from_kept"]

#: Format tag of the files ``--keep-toys`` writes.
KEPT_FORMAT = "pyhf-dist-toys/1"


def _kept_settings(settings) -> dict:
    """What toys of different runs must share to be merged: everything but the seed and the count."""
    data = settings.to_dict()
    for name in ("ntoys", "seed", "require_fast", "upper_limit_scan", "level"):
        data.pop(name, None)
    return data


def write_kept(path, distributions: dict, settings) -> None:
    """Write the toy distributions of a scan's patches to ``path`` (a compressed ``.npz``).

    Args:
        path: The file (``.npz``).
        distributions: ``{(pallet, patch name): merged "toys"}`` as :func:`pyhf_dist.chunks.merge` returns them.
        settings: The scan's :class:`~pyhf_dist.settings.FitSettings`.
    """
    parts = [{"pallet": pallet, "name": name, "seed": int(settings.seed), "ntoys": int(settings.ntoys)}
             for pallet, name in distributions]
    _write_kept(path, parts, [distributions[(p["pallet"], p["name"])] for p in parts], _kept_settings(settings))


def _write_kept(path, parts: list[dict], arrays: list[dict], settings: dict) -> None:
    payload = {"meta": np.array(json.dumps({"format": KEPT_FORMAT, "settings": settings, "parts": parts}))}
    for index, toys in enumerate(arrays):
        payload[f"{index}/teststat"] = np.array(float(toys["teststat"]))
        payload[f"{index}/sb"] = np.asarray(toys["sb"], dtype="<f8")
        payload[f"{index}/b"] = np.asarray(toys["b"], dtype="<f8")
        for key in ("sb", "b"):
            entries = (toys.get("no_minimum") or {}).get(key, [])
            payload[f"{index}/{key}_no_minimum"] = np.asarray([int(i) for i, _ in entries], dtype=np.int64)
    # The temporary name ends in .npz: numpy would append it to any other.
    with written_aside(path, suffix=".npz") as temporary:
        np.savez_compressed(temporary, **payload)


def read_kept(path) -> tuple[dict, list[dict], list[dict]]:
    """``(settings, parts, distributions)`` of a kept toy file (see :func:`write_kept`).

    Raises:
        InputError: The file is missing or not a kept toy file.
    """
    from pyhf_dist.exceptions import InputError

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != KEPT_FORMAT:
                raise ValueError(meta.get("format"))
            arrays = []
            for index in range(len(meta["parts"])):
                arrays.append({
                    "teststat": float(data[f"{index}/teststat"]),
                    "sb": data[f"{index}/sb"].copy(),
                    "b": data[f"{index}/b"].copy(),
                    "no_minimum": {key: [[int(i), None] for i in data[f"{index}/{key}_no_minimum"]] for key in ("sb", "b")},
                })
    except FileNotFoundError:
        raise InputError(f"no kept toy file at {path}") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        raise InputError(f"{path} is not a file of kept toys (pyhf-dist fit --keep-toys writes them)") from None
    return meta["settings"], meta["parts"], arrays


def merge_kept(paths, output) -> dict:
    """Merge kept toy files of runs with different seeds into one file at ``output``.

    Parts are identified by ``(pallet, patch, seed)``; one found in several files must be the same
    toys (it is then kept once); files of different settings (test statistic, tested POI value,
    interpolation codes, backend), and parts of one patch with different observed test statistics
    (another workspace, other signal yields under the same name), are refused.

    Returns:
        :func:`cls_from_kept` of the merged file.

    Raises:
        InputError: A file is not a kept toy file, the settings differ, or a seed's toys differ.
    """
    from pyhf_dist.exceptions import InputError

    settings, parts, arrays, seen, observed = None, [], [], {}, {}
    for path in paths:
        their_settings, their_parts, their_arrays = read_kept(path)
        if settings is None:
            settings = their_settings
        elif their_settings != settings:
            differ = sorted(key for key in {*settings, *their_settings} if settings.get(key) != their_settings.get(key))
            raise InputError(f"{path} holds toys of other settings than {paths[0]} ({', '.join(differ)}): only toys "
                             "of one test can be merged")
        for part, toys in zip(their_parts, their_arrays):
            # One model, one observed statistic: toys of a patch with other yields, or of another
            # workspace, under the same name would otherwise merge without a word.
            patch = (part["pallet"], part["name"])
            first = observed.setdefault(patch, (toys["teststat"], path))
            if not _same_statistic(first[0], toys["teststat"]):
                raise InputError(f"{path}: the observed test statistic of {part['name']} is {toys['teststat']:.6g}, in "
                                 f"{first[1]} {first[0]:.6g}: these are toys of another model (workspace, patch or "
                                 "observed data) and cannot be merged")
            identity = (part["pallet"], part["name"], part["seed"])
            if identity in seen:
                earlier = arrays[seen[identity]]
                if not (np.array_equal(earlier["sb"], toys["sb"]) and np.array_equal(earlier["b"], toys["b"])):
                    raise InputError(f"{path}: seed {part['seed']} of {part['name']} holds other toys than an "
                                     "earlier file: toys of one seed can be merged only once")
                continue
            seen[identity] = len(parts)
            parts.append(part)
            arrays.append(toys)
    if settings is None:
        raise InputError("no kept toy files to merge")
    _write_kept(output, parts, arrays, settings)
    return cls_from_kept(output)


def _same_statistic(first: float, second: float) -> bool:
    """Whether two observed test statistics are one model's (equal to the fits' precision)."""
    return abs(first - second) <= 1e-6 * max(1.0, abs(first)) or (np.isnan(first) and np.isnan(second))


def cls_from_kept(path) -> dict:
    """CLs of every patch in a kept toy file: its parts (seeds) concatenated in seed order.

    Returns:
        ``{patch name (pallet:name in a scan of several pallets): {"CLs_obs", "CLs_exp", "ntoys",
        "seeds", "toy_summary"}}``.
    """
    settings, parts, arrays = read_kept(path)
    by_patch: dict = {}
    for part, toys in zip(parts, arrays):
        by_patch.setdefault((part["pallet"], part["name"]), []).append((part["seed"], toys))
    results = {}
    for (pallet, name), entries in by_patch.items():
        entries.sort(key=lambda entry: entry[0])
        teststat = entries[0][1]["teststat"]
        sb = np.concatenate([toys["sb"] for _, toys in entries])
        b = np.concatenate([toys["b"] for _, toys in entries])
        no_minimum, offset = {"sb": [], "b": []}, 0
        for _, toys in entries:
            for key in ("sb", "b"):
                no_minimum[key] += [[offset + i, None] for i, _ in toys["no_minimum"][key]]
            offset += len(toys["sb"])
        result = cls_from_distributions(teststat, sb, b, settings["test_stat"])
        results[f"{pallet}:{name}" if pallet else name] = {
            "CLs_obs": result["CLs_obs"], "CLs_exp": result["CLs_exp"], "ntoys": int(len(sb)),
            "seeds": [seed for seed, _ in entries],
            "toy_summary": no_minimum_summary(teststat, sb, b, no_minimum, settings["test_stat"]),
        }
    return results
