"""What a scan computes: the settings every worker applies to every patch.

:class:`FitSettings` is frozen and JSON-able; it travels to the workers once, inside the worker
context, and its :meth:`~FitSettings.digest` keys the journal so that results computed with other
settings are never mixed into a resumed scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from typing import Any


class CHOICE(tuple):
    """The values a setting takes, for its command-line flag (``click.Choice`` there)."""


#: A setting's flag takes a file path (``click.Path(dir_okay=False)`` there).
PATH = "path"

from pyhf_dist.exceptions import SettingsError

__all__ = [
    "FitSettings",
    "Flag",
    "CHOICE",
    "PATH",
    "option",
    "declared",
    "TEST_STATISTICS",
    "BACKENDS",
    "CALCULATIONS",
    "NORMSYS_CODES",
    "HISTOSYS_CODES",
    "OPTIMIZERS",
    "default_backend",
    "parse_interpcodes",
]

TEST_STATISTICS = ("qtilde", "q", "q0")
#: ``numpy`` is plain pyhf on numpy, the reference; ``jax`` is the compiled fast path for asymptotic
#: hypotests and upper limits (anything it does not cover is fitted by plain pyhf on numpy).
BACKENDS = ("numpy", "jax")
CALCULATIONS = ("hypotest", "upper_limit")
CALCTYPES = ("asymptotics", "toybased")
NORMSYS_CODES = ("code1", "code4")
HISTOSYS_CODES = ("code0", "code2", "code4p")
#: The minimizers of plain pyhf: SciPy's SLSQP (pyhf's default) or MINUIT (MIGRAD via iminuit).
OPTIMIZERS = ("scipy", "minuit")
DEFAULT_MODIFIER_SETTINGS = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}


def default_backend() -> str:
    """The backend used when none is asked for: ``jax`` when it is installed, else ``numpy``.

    >>> default_backend() in BACKENDS
    True
    """
    return "jax" if importlib.util.find_spec("jax") is not None else "numpy"


def parse_interpcodes(text: str) -> dict:
    """Turn ``"code4,code4p"`` (normsys, histosys) into pyhf's ``modifier_settings``.

    >>> parse_interpcodes("code1,code0")
    {'normsys': {'interpcode': 'code1'}, 'histosys': {'interpcode': 'code0'}}
    """
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise SettingsError(
            f"invalid interpolation codes {text!r}: give two, normsys then histosys, e.g. code4,code4p"
        )
    return {"normsys": {"interpcode": parts[0]}, "histosys": {"interpcode": parts[1]}}


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{what} must be a finite number, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line: its flags and click's keyword arguments.

    ``to_options`` turns the parsed value into scan options (default: ``{field: value}``, nothing
    when the value is ``None``), for flags that set something else than their own field
    (``--toys N`` sets ``calctype`` and ``ntoys``).
    """

    flags: tuple[str, ...]
    click: dict = dataclasses.field(default_factory=dict)
    to_options: Any = None


def option(value: Any, doc: str, *flags: str, to_options: Any = None, **click: Any) -> Any:
    """Declare a setting once: its default ``value``, its ``doc``, and (with ``flags``) its
    command-line flag, with click's keyword arguments (``help`` there when the flag's own wording
    differs from ``doc``).

    The scan's keyword arguments (:func:`pyhf_dist.map_fits`), their documentation and the
    ``pyhf-dist fit`` options are all derived from these declarations (:func:`declared`).
    """
    metadata = {"help": doc, "flag": Flag(tuple(flags), click, to_options) if flags else None}
    return dataclasses.field(default=value, metadata=metadata)


def declared(cls) -> list[dataclasses.Field]:
    """The settings :func:`option` declared on dataclass ``cls``, in order."""
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def _upper_limit_flag(value: bool) -> dict:
    return {"calculation": "upper_limit"} if value else {}


def _scan_flag(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        start, stop, points = text.split(",")
        return {"upper_limit_scan": (float(start), float(stop), int(points))}
    except ValueError:
        raise SettingsError(f"--scan {text!r} is not START,STOP,N (e.g. --scan 0,5,21)") from None


def _toys_flag(ntoys: int | None) -> dict:
    return {} if ntoys is None else {"calctype": "toybased", "ntoys": ntoys}


def _interpcodes_flag(text: str | None) -> dict:
    return {} if text is None else {"modifier_settings": parse_interpcodes(text)}


def _true_flag(name: str):
    return lambda value: {name: True} if value else {}


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """The statistical settings of a scan: what every worker applies to every patch.

    Each field is declared once, with its help and its command-line flag; ``help(FitSettings)``
    and the documentation list them. Invalid values raise :class:`SettingsError` with one line
    that says what to give instead.

    >>> FitSettings(poi_test=1.0, backend="numpy").test_stat
    'qtilde'
    >>> FitSettings(poi_test=-1, backend="numpy")
    Traceback (most recent call last):
    ...
    pyhf_dist.exceptions.SettingsError: POI value must be >= 0, got -1.0 (give e.g. --poi-test 1.0)
    """

    # The flag's text is read here, not by click: one message for the CLI and the Python API.
    poi_test: float = option(1.0, "Signal strength (POI value) tested; >= 0.", "--poi-test", type=str,
                             metavar="MU", show_default=True)
    test_stat: str = option("qtilde", "Test statistic: qtilde, q or q0.", "--test-stat",
                            type=CHOICE(TEST_STATISTICS), show_default=True)
    backend: str | None = option(
        None, "numpy: plain pyhf, the reference; jax: the compiled fast path (default when jax is installed).",
        "--backend", type=CHOICE(BACKENDS))
    modifier_settings: dict | None = option(
        None, "pyhf's modifier_settings (interpolation codes); None is normsys code4, histosys code4p.",
        "--interpcodes", to_options=_interpcodes_flag, metavar="NORMSYS,HISTOSYS",
        help="Interpolation codes of normsys,histosys [default: code4,code4p].")
    calculation: str = option("hypotest", "hypotest (CLs at poi_test) or upper_limit (95% CL limits on mu).",
                              "--upper-limit", to_options=_upper_limit_flag, is_flag=True,
                              help="Compute observed and expected 95% CL upper limits on mu instead of CLs.")
    calctype: str = option("asymptotics", "asymptotics, or toybased (pseudo-experiments split across workers).")
    ntoys: int = option(1000, "Pseudo-experiments per patch with calctype toybased.",
                               "--toys", to_options=_toys_flag, type=int, default=None,
                               help="Use N pseudo-experiments per patch (split across workers) instead of asymptotics.")
    seed: int = option(0, "Random seed of the pseudo-experiments.", "--seed", type=int, show_default=True)
    upper_limit_scan: tuple | None = option(
        None, "(start, stop, points): a grid of mu values for upper limits; None finds them by root-finding.",
        "--scan", to_options=_scan_flag, metavar="START,STOP,N",
        help="With --upper-limit: scan a grid of mu values instead of root-finding.")
    level: float = option(0.05, "Test size of the upper limits (0.05 for 95% CL).")
    require_fast: bool = option(
        False, "A patch the compiled fast path declines becomes a failed record saying why, instead of "
        "being fitted by plain pyhf (for benchmarks and CI).", "--require-fast", to_options=_true_flag("require_fast"),
        is_flag=True)
    match_pyhf: bool = option(
        False, "On the fast path, reproduce pyhf's own numbers (its starting points, and plain pyhf where its "
        "minimizer stalls) instead of the converged fits it certifies.", "--match-pyhf",
        to_options=_true_flag("match_pyhf"), is_flag=True)
    optimizer: str = option("scipy", "Plain pyhf's minimizer: scipy (SLSQP, pyhf's default) or minuit (MIGRAD).",
                            "--optimizer", type=CHOICE(OPTIMIZERS), show_default=True)

    def __post_init__(self):
        poi = _number(self.poi_test, "POI value")
        if poi < 0:
            raise SettingsError(f"POI value must be >= 0, got {poi} (give e.g. --poi-test 1.0)")
        object.__setattr__(self, "poi_test", poi)
        if self.test_stat not in TEST_STATISTICS:
            raise SettingsError(
                f"unknown test statistic {self.test_stat!r}: choose one of {', '.join(TEST_STATISTICS)}"
            )
        backend = default_backend() if self.backend is None else str(self.backend).lower()
        if backend not in BACKENDS:
            raise SettingsError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "jax" and importlib.util.find_spec("jax") is None:
            raise SettingsError('backend "jax" needs jax: pip install "pyhf-dist[jax]" (or use --backend numpy)')
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "modifier_settings", _check_modifier_settings(self.modifier_settings))
        if self.calculation not in CALCULATIONS:
            raise SettingsError(
                f"unknown calculation {self.calculation!r}: choose one of {', '.join(CALCULATIONS)}"
            )
        if self.calctype not in CALCTYPES:
            raise SettingsError(f"unknown calculator {self.calctype!r}: choose one of {', '.join(CALCTYPES)}")
        ntoys = int(_number(self.ntoys, "ntoys"))
        if ntoys < 1:
            raise SettingsError(f"ntoys (--toys) must be a positive integer, got {self.ntoys!r}")
        object.__setattr__(self, "ntoys", ntoys)
        seed = int(_number(self.seed, "seed"))
        if not 0 <= seed < 2**32:  # numpy's legacy random state takes 32-bit seeds
            raise SettingsError(f"seed (--seed) must be between 0 and 2**32 - 1, got {self.seed!r}")
        object.__setattr__(self, "seed", seed)
        if self.calctype == "toybased" and self.calculation == "upper_limit":
            raise SettingsError(
                "toy-based upper limits are not supported: drop --toys for upper limits, or compute "
                "toy-based CLs at chosen --poi-test values"
            )
        if self.test_stat == "q0" and self.calculation == "upper_limit":
            raise SettingsError(
                "upper limits need the test statistic qtilde or q: q0 tests the background-only "
                "hypothesis (discovery) and bounds no signal strength; drop --test-stat q0 for limits"
            )
        level = _number(self.level, "level")
        if not 0 < level < 1:
            raise SettingsError(f"level must be between 0 and 1, got {level}")
        object.__setattr__(self, "level", level)
        if self.upper_limit_scan is not None and self.calculation != "upper_limit":
            raise SettingsError("upper_limit_scan (--scan) goes with calculation='upper_limit' (--upper-limit)")
        if self.upper_limit_scan is not None:
            try:
                start, stop, points = self.upper_limit_scan
            except (TypeError, ValueError):
                raise SettingsError(
                    f"upper_limit_scan must be (start, stop, points), got {self.upper_limit_scan!r}"
                ) from None
            start, stop = _number(start, "scan start"), _number(stop, "scan stop")
            points = int(_number(points, "scan points"))
            if not (0 <= start < stop and points >= 2):
                raise SettingsError(
                    f"upper_limit_scan (--scan START,STOP,N) needs 0 <= start < stop and at least 2 points, "
                    f"got {self.upper_limit_scan!r}"
                )
            object.__setattr__(self, "upper_limit_scan", (start, stop, points))
        if not isinstance(self.require_fast, bool):
            raise SettingsError(f"require_fast must be True or False, got {self.require_fast!r}")
        if not isinstance(self.match_pyhf, bool):
            raise SettingsError(f"match_pyhf must be True or False, got {self.match_pyhf!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "minuit" and importlib.util.find_spec("iminuit") is None:
            raise SettingsError('optimizer "minuit" needs iminuit: pip install "pyhf-dist[minuit]" (or use --optimizer scipy)')
        if self.require_fast and not (self.fast_path or self.fast_toys):
            raise SettingsError(
                "require_fast needs the fast path, which covers hypotests and upper limits on backend jax: "
                "drop --require-fast, or use --backend jax"
            )

    @property
    def fast_path(self) -> bool:
        """Whether fits try the compiled fast path: the jax backend, asymptotic calculator, hypotests
        and upper limits (root-finding or grid). Toy-based hypotests have their own batched path
        (:attr:`fast_toys`); the numpy backend (the reference) is plain pyhf.

        >>> FitSettings(backend="jax").fast_path, FitSettings(backend="numpy").fast_path
        (True, False)
        >>> FitSettings(backend="jax", calculation="upper_limit").fast_path
        True
        >>> FitSettings(backend="jax", calctype="toybased").fast_path
        False
        """
        return self.backend == "jax" and self.calctype == "asymptotics" and self.calculation in ("hypotest", "upper_limit")

    @property
    def fits_together(self) -> bool:
        """Whether a worker may fit the patches of a pack together, in one compiled loop: the fast
        path's asymptotic hypotests and upper limits, with its certified fits (hypotests of signal
        points of one template always; patches of any structures where the worker has a GPU).

        >>> FitSettings(backend="jax").fits_together, FitSettings(backend="jax", match_pyhf=True).fits_together
        (True, False)
        >>> FitSettings(backend="jax", calculation="upper_limit").fits_together
        True
        """
        return self.fast_path and not self.match_pyhf

    @property
    def fast_toys(self) -> bool:
        """Whether toy-based hypotests fit their toys on the batched fast path (jax backend).

        >>> FitSettings(backend="jax", calctype="toybased").fast_toys, FitSettings(backend="jax").fast_toys
        (True, False)
        """
        return self.backend == "jax" and self.calculation == "hypotest" and self.calctype == "toybased"

    def to_dict(self) -> dict:
        """A JSON-able dictionary; ``FitSettings(**settings.to_dict())`` gives the settings back."""
        data = dataclasses.asdict(self)
        if data["upper_limit_scan"] is not None:
            data["upper_limit_scan"] = list(data["upper_limit_scan"])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "FitSettings":
        """Rebuild settings from :meth:`to_dict` output."""
        data = dict(data)
        if data.get("upper_limit_scan") is not None:
            data["upper_limit_scan"] = tuple(data["upper_limit_scan"])
        return cls(**data)

    def digest(self) -> str:
        """A hash of every setting that changes a result (used to key the journal).

        >>> FitSettings(backend="numpy").digest() == FitSettings(backend="numpy").digest()
        True
        """
        data = self.to_dict()
        if self.calctype != "toybased":
            data.pop("ntoys")
            data.pop("seed")
        if self.calculation != "upper_limit":
            data.pop("upper_limit_scan")
            data.pop("level")
        if not self.require_fast:  # off, results are those of a scan without the setting
            data.pop("require_fast")
        # Results of the fast path that reproduce pyhf (before certification, the only kind)
        # keep their digest; certified ones get another.
        data.pop("match_pyhf")
        if self.fast_path and not self.match_pyhf:
            data["answers"] = "certified"
        if self.optimizer == "scipy":
            data.pop("optimizer")
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_modifier_settings(settings: dict | None) -> dict:
    merged = json.loads(json.dumps(DEFAULT_MODIFIER_SETTINGS))
    if settings is None:
        return merged
    if not isinstance(settings, dict):
        raise SettingsError(f"modifier_settings must be a dict like {DEFAULT_MODIFIER_SETTINGS}, got {settings!r}")
    allowed = {"normsys": NORMSYS_CODES, "histosys": HISTOSYS_CODES}
    for modifier, options in settings.items():
        if modifier not in allowed or not isinstance(options, dict) or set(options) - {"interpcode"}:
            raise SettingsError(
                f"invalid modifier_settings entry {modifier!r}: {options!r}; "
                f"expected e.g. {DEFAULT_MODIFIER_SETTINGS}"
            )
        code = options.get("interpcode", merged[modifier]["interpcode"])
        if code not in allowed[modifier]:
            raise SettingsError(
                f"invalid {modifier} interpolation code {code!r}: choose one of {', '.join(allowed[modifier])} "
                "(e.g. --interpcodes code4,code4p)"
            )
        merged[modifier]["interpcode"] = code
    return merged
