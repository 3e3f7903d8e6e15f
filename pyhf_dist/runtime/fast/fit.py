"""pyhf's asymptotic hypotests on the compiled likelihood, from certified fits.

The fits are :class:`~pyhf_dist.runtime.fast.problem.FitProblem`'s (L-BFGS-B on the compiled likelihood).
The test statistics and p-values are pyhf's (``pyhf.infer.calculators.AsymptoticCalculator``,
``pyhf.infer.test_statistics``): the same five fits, the same Asimov dataset (expected main and
auxiliary data at the conditional fit of the Asimov POI value), the same clipping and branches.

**Certified answers** (the default): the answer is the converged maximum-likelihood fit, the
lowest ``-2 log L`` within pyhf's bounds, and every fit is checked before its number is used
(:class:`Fit` is its certificate):

* its projected gradient is small (:data:`~pyhf_dist.runtime.fast.problem.ACCEPT_GRADIENT`, in units
  of one standard deviation);
* the free fit's ``-2 log L`` is not above any conditional fit's (the free fit's domain contains
  every conditional fit's): where it is, the free fit is refitted from that minimum;
* a second start reaches the same value: each fit to the observed data starts from pyhf's
  initial values (and, where the measurement sets others, from the constraints' centres) and
  from the minimum of another fit (the free fit from the conditional fit that makes the Asimov
  data, and every conditional fit from the free fit's minimum); a second start stops early once
  it is within :data:`~pyhf_dist.runtime.fast.problem.PROBE_RADIUS` of the first's minimum. The
  first conditional fit to the Asimov data gets a second start too, the free fit's minimum (the
  point the data were generated from), and so do all of them where two starts (or the check
  above) find different minima. Every fit starts where pyhf's starts, so where pyhf's fits
  converge, the numbers are pyhf's;
* in an upper-limit search (tens of POI values), a conditional fit at a further value starts
  from the minimum interpolated linearly between those of the nearest values already fitted to
  the same data: for the observed data as the second start, instead of the free fit's minimum;
  for the Asimov data as the only start (about half the evaluations of pyhf's start), with
  pyhf's start instead where it does not converge, and as well where two starts of this patch
  found different minima;
* a fit that does not converge is fitted harder: L-BFGS-B restarted, then MINUIT (iminuit's
  MIGRAD, where installed) on the compiled gradient.

Where pyhf's own minimizer (SciPy's SLSQP) stops at its starting point on a patch (cheaply
detected with one SLSQP iteration set up as pyhf's, :meth:`FitProblem.pyhf_stall`), the result
says how far above the minimum pyhf's fit would stop; the CLs values are the converged ones.

**pyhf's digits** (``match_pyhf=True``): the fits start where pyhf's start, from the suggested
initial values only, and :class:`FastPathUnsupported` is raised (the caller then runs plain pyhf
for the patch) where the number would not be pyhf's: a fit that does not converge; a model on
which pyhf's minimizer stalls at its starting point; a test statistic so close to zero that
pyhf's CLs are the rounding of its fits (:data:`NOISE_FLOOR`).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.problem import SAME_MINIMUM, Fit, FitProblem

__all__ = ["Fit", "FitProblem", "PoiScan", "asymptotic_cls", "asymptotic_statistic", "fit_name", "hypotest"]

#: Below this, a likelihood ratio is zero up to the precision of pyhf's fits (SLSQP stops at
#: changes of ~1e-6 in -2 log L), and the CLs computed from its square root are that noise:
#: only pyhf reproduces pyhf's number there.
NOISE_FLOOR = 1e-3
#: Above this, the best-fit POI lies far enough from the tested value (~0.003 standard
#: deviations) that pyhf's fits put it on the same side: a statistic set to zero for that
#: reason is zero in pyhf too, however small the likelihood ratio.
SIGN_FLOOR = 1e-5


class PoiScan:
    """pyhf's asymptotic hypotest of one patch at any number of POI values, fits shared.

    Of the five fits of a hypotest (``pyhf.infer.calculators.AsymptoticCalculator``), three do
    not depend on the tested value: the conditional fit at the Asimov POI value (which makes the
    Asimov dataset), the free fit to the observed data and the free fit to the Asimov data. They
    are made once here; each tested value then costs its two conditional fits
    (:meth:`statistics`). pyhf runs all five from the same starting points at every value, so
    the results are the same.

    Certified (the default; see the module): every fit is checked and the lowest minimum any
    start reaches is the answer. With ``match_pyhf``, every fit starts where pyhf's starts, from
    the suggested initial values (the POI set for the conditional fits), since HistFactory
    likelihoods can have several local minima (1Lbb patches have some 0.1 apart in -2 log L)
    and a fit started elsewhere can settle in another one than pyhf's; the one exception is the
    free fit to the Asimov data, whose global minimum is known: the parameters the data were
    generated from.

    Args:
        problem: The patch.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"`` (``q0`` tests ``mu = 0`` only).
        match_pyhf: Reproduce pyhf's own numbers (see the module).

    Attributes:
        fits: ``{name: Fit}`` of every fit made so far (``"observed free"``, ``"observed mu=0"``,
            ``"asimov free"``, ``"asimov mu=1"``, ...).
        pyhf_default: ``None``, or where pyhf's default minimizer stalls on this patch:
            ``{"stalls_at_start": True, "fit": name, "stops_above_minimum": gap}``.

    Raises:
        FastPathUnsupported: The Asimov POI value lies outside the POI bounds, a fit does not
            converge, or (``match_pyhf``) pyhf's own minimizer stalls on this patch.
    """

    def __init__(self, problem: FitProblem, test_stat: str, *, match_pyhf: bool = False):
        if test_stat not in ("qtilde", "q", "q0"):
            raise FastPathUnsupported(f"test statistic {test_stat!r}")
        self.problem = problem
        self.test_stat = test_stat
        self.match_pyhf = match_pyhf
        self.fits: dict[str, Fit] = {}
        self._conditionals: dict[str, dict[float, np.ndarray]] = {}  # data -> {POI value: minimum}
        poi = problem.poi_index
        self.bounds = (float(problem.lower[poi]), float(problem.upper[poi]))
        asimov_mu = 1.0 if test_stat == "q0" else 0.0
        if not self.bounds[0] <= asimov_mu <= self.bounds[1]:
            raise FastPathUnsupported("the Asimov POI value lies outside the POI bounds")
        main, aux = problem.main, problem.aux
        self._asimov_mu = asimov_mu
        certified = not match_pyhf
        #: Whether two starts of one fit found different minima (certified: more starts then).
        self.several_minima = False
        # The conditional fit at the Asimov POI value first: it makes the Asimov dataset and
        # tells whether pyhf's own fits get anywhere on this patch.
        background_name = fit_name("observed", asimov_mu)
        starts = {"init": problem.init}
        if certified and not np.array_equal(problem.nominal, problem.init):
            starts["nominal"] = problem.nominal
        background = self._fit(background_name, main, aux, starts, asimov_mu)
        if certified:
            starts[background_name] = background.theta
        free = self._fit("observed free", main, aux, starts)
        if certified:
            # The second start of the fit the Asimov data come from: the free fit's minimum.
            background = self._fit(background_name, main, aux, {"observed free": free.theta}, asimov_mu, known=background)
            self._settle_free("observed", background_name)
        self.pyhf_default = problem.pyhf_default(asimov_mu, background.value, background_name)
        if self.pyhf_default is not None and match_pyhf:
            raise FastPathUnsupported(
                "pyhf's minimizer stops at its starting point on this model (its CLs come from "
                "unconverged fits); plain pyhf reproduces them"
            )
        # Asimov data: expected main and auxiliary data at the conditional fit; its free fit is
        # that very point (every term is at its maximum there), so the fit from it converges at once.
        # Kept where the likelihood runs: every evaluation of every fit to it reads them.
        self._asimov = tuple(problem.functions.expected(background.theta, problem.layout))
        self._fit("asimov free", *self._asimov, {"generating point": background.theta})

    @property
    def asimov_data(self) -> tuple:
        """``(main, aux)`` of the Asimov dataset (expected data at the fit that makes it)."""
        return self._asimov

    @property
    def _muhat(self) -> float:
        return float(self.fits["observed free"].theta[self.problem.poi_index])

    @property
    def _muhat_a(self) -> float:
        return float(self.fits["asimov free"].theta[self.problem.poi_index])

    @property
    def shared_fits(self) -> list[str]:
        """Names of the fits every tested POI value shares: the free fits and the fit that made the Asimov data."""
        return ["observed free", fit_name("observed", self._asimov_mu), "asimov free"]

    @property
    def converged(self) -> bool:
        """Whether every fit made so far converged."""
        return all(found.converged for found in self.fits.values())

    def _fit(self, name, main, aux, starts, poi_value=None, known=None) -> Fit:
        """Fit (certified: fitted harder where needed), remember it under ``name``; raise where it did not converge."""
        found = self.problem.minimum(main, aux, starts, poi_value, harder=not self.match_pyhf, known=known)
        if not found.converged:
            raise FastPathUnsupported(f"a fit did not converge ({name})")
        self.several_minima = self.several_minima or bool(found.others)
        self.fits[name] = found
        return found

    def conditional(self, data: str, mu: float) -> Fit:
        """The fit at POI ``mu`` to the observed or Asimov data (certified, on a likelihood with
        several minima: also from a second start)."""
        name = fit_name(data, mu)
        if name in self.fits:
            return self.fits[name]
        problem = self.problem
        main, aux = (problem.main, problem.aux) if data == "observed" else self._asimov
        starts = {"init": problem.init}
        found = None
        if not self.match_pyhf:
            # An upper-limit search fits tens of POI values, most of them close together: from
            # the minimum interpolated between the nearest ones, a fit takes half the
            # evaluations it takes from pyhf's start.
            nearby = self._interpolated(data, mu)
            if data == "observed" or self.several_minima or nearby is None:
                # A second start. A conditional fit too high gives too large a test statistic:
                # a false exclusion. (The first fit to the Asimov data takes it too: from pyhf's
                # start alone, a 1Lbb patch's ends 0.023 above the minimum that the free fit's
                # minimum, the point the data were generated from, leads to.)
                if nearby is None:
                    starts[f"{data} free"] = self.fits[f"{data} free"].theta
                else:
                    starts["nearby minima"] = nearby
            elif nearby is not None:
                # Where no fit of this patch has found two minima, the Asimov fits' start decides
                # nothing but how long they take: one start, pyhf's only where it does not converge.
                found = self._converged_from(name, main, aux, nearby, mu)
        if found is None:
            found = self._fit(name, main, aux, starts, mu)
        self._conditionals.setdefault(data, {})[mu] = found.theta
        self._settle_free(data, name)
        return found

    def _converged_from(self, name: str, main, aux, start, mu: float) -> Fit | None:
        """The fit at ``mu`` from ``start`` alone, remembered under ``name`` where it converged."""
        found = self.problem.minimum(main, aux, {"nearby minima": start}, mu)
        if not found.converged:
            return None
        self.fits[name] = found
        return found

    def _interpolated(self, data: str, mu: float) -> np.ndarray | None:
        """The minimum at POI ``mu`` interpolated linearly between those of the nearest
        conditional fits to the same data on either side (beyond them: the nearest one's);
        ``None`` before the first."""
        fitted = self._conditionals.get(data, {})  # mu itself is not among them (its fit is named)
        if not fitted:
            return None
        below = [value for value in fitted if value < mu]
        above = [value for value in fitted if value > mu]
        if not (below and above):
            return fitted[min(fitted, key=lambda value: abs(value - mu))]
        low, high = max(below), min(above)
        weight = (mu - low) / (high - low)
        return (1.0 - weight) * fitted[low] + weight * fitted[high]

    def _settle_free(self, data: str, conditional_name: str) -> None:
        """Certified: a free fit above a conditional one has missed its minimum; refit it from there.

        The free fit's domain contains every conditional fit's, so at the true minimum its
        ``-2 log L`` is never higher. (A published record showed the miss: a free fit 2.8 above
        its own ``mu = 0`` fit gave ``CLs_obs`` 0.0045 instead of 0.0014.)
        """
        if self.match_pyhf:
            return
        name = f"{data} free"
        free, conditional = self.fits[name], self.fits[conditional_name]
        if free.value <= conditional.value + SAME_MINIMUM:
            return
        problem = self.problem
        main, aux = (problem.main, problem.aux) if data == "observed" else self._asimov
        again = self.problem.minimum(main, aux, {conditional_name: conditional.theta}, harder=True)
        self.several_minima = True
        if again.converged and again.value < free.value:
            self.fits[name] = again._replace(others={**again.others, free.start: free.value})

    def statistics(self, mu: float, observed: bool = True) -> dict:
        """The observed and Asimov test statistics at ``mu`` (two conditional fits).

        Args:
            mu: The tested POI value.
            observed: ``False`` skips the fit to the observed data (the expected CLs band
                depends on the Asimov statistic alone); ``qmu`` is then ``None``.

        Returns:
            ``{"qmu", "qmu_A"}`` as pyhf computes them, and ``"noisy_obs"``, ``"noisy_A"``
            (``match_pyhf`` only; else false): whether each is zero within the precision of
            pyhf's fits, where pyhf's value is the noise of its fits (:data:`NOISE_FLOOR`).
        """
        stat = self.test_stat
        stats = {"qmu": None, "qmu_A": None, "noisy_obs": False, "noisy_A": False}
        for data, key, noisy in (("asimov", "qmu_A", "noisy_A"), ("observed", "qmu", "noisy_obs")):
            if data == "observed" and not observed:
                continue
            tmu = self.conditional(data, mu).value - self.fits[f"{data} free"].value
            muhat = self._muhat if data == "observed" else self._muhat_a
            if not self.match_pyhf and mu == self._asimov_mu and stat != "q0":
                # The tested hypothesis is the background the Asimov data were made from (and,
                # for qtilde, the observed statistic is 0 whatever muhat): 0 exactly, not fit noise.
                tmu = 0.0 if data == "asimov" or stat == "qtilde" else tmu
            stats[key] = asymptotic_statistic(stat, mu, tmu, muhat)
            stats[noisy] = self.match_pyhf and _at_noise_level(stat, mu, tmu, muhat)
        return stats

    def statistics_many(self, mus, observed: bool = True) -> list[dict]:
        """:meth:`statistics` at each of ``mus`` (one after another; the fits are independent,
        so a batched engine can fit them together)."""
        return [self.statistics(float(mu), observed) for mu in mus]

    def certificate(self, fits: list[str] | None = None) -> dict:
        """``{"converged", "fits": {name: certificate}}`` (``fits``: which, default all);
        ``"pyhf_default"`` too where pyhf's default minimizer stalls on the patch."""
        names = list(self.fits) if fits is None else fits
        out = {
            "converged": self.converged,
            "fits": {name: self.fits[name].certificate() for name in names},
        }
        if self.pyhf_default is not None:
            out["pyhf_default"] = dict(self.pyhf_default)
        return out


def fit_name(data: str, mu: float) -> str:
    """The name of the conditional fit at ``mu`` to ``"observed"`` or ``"asimov"`` data, as the
    certificate shows it: short where that names the value exactly, in full where not (an upper
    limit's search tests values closer together than six digits tell apart).

    >>> fit_name("observed", 1.0), fit_name("asimov", 0.5), fit_name("observed", 1.4130750912)
    ('observed mu=1', 'asimov mu=0.5', 'observed mu=1.4130750912')
    """
    short = f"{mu:g}"
    return f"{data} mu={short if float(short) == mu else repr(float(mu))}"


def hypotest(problem: FitProblem, poi_test: float, test_stat: str, *, match_pyhf: bool = False) -> dict:
    """CLs (or CLs+b for ``q0``) observed and expected, as ``pyhf.infer.hypotest``, from the
    fits of :class:`PoiScan` (certified, or from pyhf's starting points with ``match_pyhf``).

    Returns:
        ``{"CLs_obs": float, "CLs_exp": [5 floats], "qmu": float, "qmu_A": float}`` and the
        fits' certificate (:meth:`PoiScan.certificate`: ``converged``, ``fits``, and
        ``pyhf_default`` where pyhf's own minimizer stalls on the patch).
    """
    if test_stat not in ("qtilde", "q", "q0"):
        raise FastPathUnsupported(f"test statistic {test_stat!r}")
    mu = 0.0 if test_stat == "q0" else float(poi_test)
    poi = problem.poi_index
    if not problem.lower[poi] <= mu <= problem.upper[poi]:
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    scan = PoiScan(problem, test_stat, match_pyhf=match_pyhf)
    stats = scan.statistics(mu)
    if stats["noisy_obs"] or stats["noisy_A"]:
        raise FastPathUnsupported(
            "a test statistic is zero within fit precision: its CLs are the last digits of "
            "pyhf's fits, which only plain pyhf reproduces"
        )
    result = asymptotic_cls(stats["qmu"], stats["qmu_A"], test_stat, powerless_is_one=not match_pyhf)
    result.update(qmu=stats["qmu"], qmu_A=stats["qmu_A"], **scan.certificate())
    return result


def _at_noise_level(test_stat, mu, tmu, muhat) -> bool:
    """Whether pyhf's test statistic here is the noise of its fits (see :data:`NOISE_FLOOR`)."""
    zeroed = muhat < 0 if test_stat == "q0" else muhat > mu
    return tmu < (SIGN_FLOOR if zeroed else NOISE_FLOOR)


def asymptotic_statistic(test_stat, mu, tmu, muhat) -> float:
    """pyhf's test statistic from ``tmu`` (conditional minus free ``-2 log L``) and ``muhat``."""
    tmu = max(tmu, 0.0)
    if test_stat == "q0":
        return 0.0 if muhat < 0 else tmu
    return 0.0 if muhat > mu else tmu


def asymptotic_cls(qmu: float, qmu_a: float, test_stat: str, *, powerless_is_one: bool = False) -> dict:
    """pyhf's asymptotic p-values from the observed and Asimov test statistics.

    Args:
        qmu, qmu_a: The observed and Asimov test statistics.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.
        powerless_is_one: Where the Asimov statistic is zero (a test without power: the
            likelihood does not depend on the POI) CLs is 1, which excludes nothing; pyhf divides
            0 by 0 there when its fits leave the observed statistic above zero, and gives NaN.

    >>> r = asymptotic_cls(0.0, 4.0, "qtilde")
    >>> round(r["CLs_obs"], 6), round(r["CLs_exp"][2], 6)
    (0.51164, 0.0455)
    >>> asymptotic_cls(1e-12, 0.0, "qtilde", powerless_is_one=True)["CLs_obs"]
    1.0
    """
    sqrtqmu, sqrtqmu_a = np.sqrt(qmu), np.sqrt(qmu_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        if powerless_is_one and sqrtqmu_a == 0:
            teststat = 0.0
        elif test_stat in ("q", "q0") or sqrtqmu <= sqrtqmu_a:
            teststat = sqrtqmu - sqrtqmu_a
        else:
            teststat = (sqrtqmu**2 - sqrtqmu_a**2) / (2 * sqrtqmu_a)

        def pvalues(value):
            clsb = ndtr(-(value + sqrtqmu_a))
            clb = ndtr(-value)
            return clsb, clb, clsb / clb

        clsb_obs, _, cls_obs = pvalues(teststat)
        expected = [pvalues(float(n)) for n in (2, 1, 0, -1, -2)]
    if test_stat == "q0":
        return {"CLs_obs": float(clsb_obs), "CLs_exp": [float(e[0]) for e in expected]}
    return {"CLs_obs": float(cls_obs), "CLs_exp": [float(e[2]) for e in expected]}
