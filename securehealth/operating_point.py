"""The model's operating point: the decision threshold a clinician acts on, chosen for a target.

It comes from the hospitals' differentially private score histograms, never assumed (0.5 is an
accident for a model trained with DP noise) nor taken from test patients: each hospital releases
noisy, smoothed counts of its training patients' risk logits (`score_histogram`, `add_noise`); the
server checks each release (`Release.read`), fits each class with a normal distribution and puts
the threshold where the fit meets the `Target` (`choose`). See docs/how-to/operating-point.md.
"""

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# SciPy (its normal distribution and least squares) is imported where a histogram is
# made or fitted, not here: settings.py reads decision_threshold with this module.

# The grid: bins 0.5 wide on the logit of the predicted risk, from -8 to 8. Fixed,
# so that it says nothing about any hospital's patients.
GRID_EDGES = np.arange(-8.0, 8.0 + 1e-9, 0.5)
BINS = len(GRID_EDGES) - 1
# Each patient's count is spread over neighbouring bins as a normal curve of this
# width (logits), its logit first clipped into [-CLIP, CLIP]: a smoothed histogram.
# One patient then moves the vector of counts by far less than one whole count
# (kernel_norm(), about 0.43), so the same privacy needs far less noise; the fit
# below allows for the smoothing.
KERNEL_STD, CLIP = 0.75, 6.0
# What dp-accounting's Gaussian mechanism (the accountant's sample rate 1, one
# step) assumes one patient moves: replace-one moves a clipped sum by twice the clip.
ACCOUNTED_SENSITIVITY = {"replace-one": 2.0, "add-remove": 1.0}
# A class the noisy histograms hold fewer patients of than this gives no operating
# point: its fit would be noise.
MIN_CLASS_PATIENTS = 10
MIN_STD, MAX_STD = 0.1, 8.0  # the spread of a class's logits a fit may find
# Where the fit evaluates a class's normal distribution: fine cells over the clip range.
_CELL_EDGES = np.linspace(-CLIP, CLIP, 481)
_CELL_CENTRES = (_CELL_EDGES[:-1] + _CELL_EDGES[1:]) / 2


def kernel(logits: np.ndarray) -> np.ndarray:
    """Each patient's count spread over the bins (rows: patients), from its logit.

    The logit is first clipped into [-CLIP, CLIP]; a non-finite logit (from a model a server
    crafted) counts at 0, so that every patient counts exactly once.
    """
    from scipy.stats import norm

    x = np.clip(np.where(np.isfinite(logits), logits, 0.0), -CLIP, CLIP)
    return np.diff(norm.cdf((GRID_EDGES[None, :] - x[:, None]) / KERNEL_STD), axis=1)


@functools.cache
def kernel_norm() -> float:
    """The most one patient's spread count can weigh (L2), wherever its logit is.

    That is about 0.43 of a whole count: the largest over a fine scan of the clip range, rounded
    up by a millionth for the logits between its points.
    """
    scanned = np.linalg.norm(kernel(np.linspace(-CLIP, CLIP, 2401)), axis=1).max()
    return float(scanned) * (1 + 1e-6)


@functools.cache
def _cell_kernels() -> np.ndarray:
    """Spread counts of a patient at each fine cell's centre, for the fit."""
    return kernel(_CELL_CENTRES)


def histogram_sensitivity(adjacency: str) -> float:
    """How far one patient moves a hospital's histograms (both classes as one vector, L2).

    Replacing a record (`adjacency` replace-one) takes one spread count out and puts one in: at
    most sqrt 2 times kernel_norm(), as the counts are never negative. Adding or removing one
    (add-remove) moves one: kernel_norm().
    """
    return kernel_norm() * (math.sqrt(2) if adjacency == "replace-one" else 1.0)


def histogram_noise_std(noise_multiplier: float, adjacency: str) -> float:
    """The standard deviation of the noise on every count of an operating point's release.

    The ledger accounts the release as the Gaussian mechanism with `noise_multiplier` (sample
    rate 1, one step); this std gives the histograms the same ratio of noise to one patient's
    effect.
    """
    return noise_multiplier * histogram_sensitivity(adjacency) / ACCOUNTED_SENSITIVITY[adjacency]


def score_histogram(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Spread counts of patients per class over the bins of GRID_EDGES.

    Parameters
    ----------
    logits : np.ndarray
        Each patient's risk logit under the model.
    labels : np.ndarray
        Each patient's label (0 or 1).

    Returns
    -------
    np.ndarray
        Two rows of BINS counts: row 0 the negative patients, row 1 the positive.
    """
    labels = np.asarray(labels, dtype=int)
    spread = kernel(np.asarray(logits, dtype=float))
    return np.stack([spread[labels == label].sum(axis=0) for label in (0, 1)])


def add_noise(counts: np.ndarray, std: float, random: np.random.Generator) -> np.ndarray:
    """The counts with independent Gaussian noise of `std` on each."""
    return counts + random.normal(0.0, std, counts.shape)


@dataclass(frozen=True)
class Target:
    """What the operating point aims at: Youden's J, or a stated sensitivity or specificity.

    `kind` is `youden` (the largest sensitivity + specificity - 1, for when neither error is
    worse than the other), or `sensitivity` or `specificity`, at least `value`.
    """

    kind: str
    value: float | None = None

    @classmethod
    def parse(cls, setting: str) -> "Target | None":
        """The decision_threshold setting's target, or None for a fixed threshold (a number).

        A target is "auto", or "sensitivity:V" or "specificity:V" with V strictly between 0
        and 1 (e.g. "sensitivity:0.9").
        """
        if setting == "auto":
            return cls("youden")
        found = re.fullmatch(r"(sensitivity|specificity):(0?\.\d+|1(\.0*)?)", setting)
        if found and 0 < float(found[2]) < 1:
            return cls(found[1], float(found[2]))
        return None

    def __str__(self) -> str:
        return "largest Youden's J" if self.value is None else f"{self.kind} {self.value:g}"


TASK = "operating-point"  # the server's request for a hospital's histograms
PROVISIONAL_THRESHOLD = 0.5  # figures of a round's model before its point is chosen


def fixed_threshold(setting: str) -> float | None:
    """The decision_threshold setting's fixed threshold, or None where it names a target.

    A fixed threshold is a risk strictly between 0 and 1.
    """
    try:
        value = float(setting)
    except ValueError:
        return None
    return value if 0 < value < 1 else None


def setting_problem(setting: str) -> str | None:
    """Why `setting` is no decision_threshold (None if it is one)."""
    if Target.parse(setting) or fixed_threshold(setting) is not None:
        return None
    return (
        "must be auto, sensitivity:V or specificity:V (V between 0 and 1, e.g. "
        "sensitivity:0.9), or a fixed risk between 0 and 1"
    )


def working_threshold(setting: str) -> float:
    """The threshold a model's figures use before its operating point is chosen.

    That is the setting's fixed threshold, else PROVISIONAL_THRESHOLD.
    """
    fixed = fixed_threshold(setting)
    return PROVISIONAL_THRESHOLD if fixed is None else fixed


@dataclass(frozen=True)
class ClassFit:
    """A normal distribution fitted to one class's logits: patients, mean, std."""

    patients: float
    mean: float
    std: float

    def share_above(self, logit: float) -> float:
        """The share of the class whose logits are above `logit`."""
        from scipy.stats import norm

        return float(norm.sf(logit, self.mean, self.std))


def expected_counts(patients: float, mean: float, std: float) -> np.ndarray:
    """The spread counts a class of `patients` with normal logits would give."""
    from scipy.stats import norm

    cells = np.diff(norm.cdf(_CELL_EDGES, mean, std))
    cells[0] += norm.cdf(-CLIP, mean, std)  # clipped into the end cells
    cells[-1] += norm.sf(CLIP, mean, std)
    return patients * (cells @ _cell_kernels())


def fit_class(counts: np.ndarray) -> ClassFit:
    """The normal distribution whose expected spread counts best fit one class's noisy counts.

    The fit is by least squares: the maximum-likelihood fit when the noise is Gaussian and the
    same on every count. It starts from every whole logit, so that a spike of noise cannot hold
    it.
    """
    from scipy import optimize

    def residuals(p):
        patients, mean, log_std = p
        return expected_counts(patients, mean, math.exp(log_std)) - counts

    total = max(float(np.clip(counts, 0, None).sum()), 1.0)
    lower = [0.0, -CLIP, math.log(MIN_STD)]
    upper = [np.inf, CLIP, math.log(MAX_STD)]
    fits = [
        optimize.least_squares(residuals, [total, start, 0.0], bounds=(lower, upper))
        for start in np.arange(-CLIP + 1, CLIP)
    ]
    patients, mean, log_std = min(fits, key=lambda fit: fit.cost).x
    return ClassFit(float(patients), float(mean), float(math.exp(log_std)))


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen decision threshold (a risk, and its logit) and what the fit expects of it.

    The expected sensitivity and specificity are the fitted classes'; `histograms` is how many
    hospitals' releases the fit came from.
    """

    threshold: float
    logit: float
    target: str
    expected_sensitivity: float
    expected_specificity: float
    histograms: int
    negatives: ClassFit
    positives: ClassFit

    def as_record(self) -> dict[str, Any]:
        """The operating point as a plain dict, for the run's record."""
        return asdict(self)

    @property
    def auc(self) -> float:
        """The ROC-AUC of the two fitted classes, computed from the DP histograms alone.

        Binormal: the chance that a positive's logit is above a negative's.
        """
        from scipy.stats import norm

        spread = math.hypot(self.positives.std, self.negatives.std)
        return float(norm.cdf((self.positives.mean - self.negatives.mean) / spread))


class NoOperatingPoint(ValueError):
    """The histograms cannot give an operating point; the message says why."""


def drowned(noise_std: float, patients: int) -> bool:
    """Whether noise of `noise_std` on every count would drown a hospital's `patients`.

    Such a release says nothing, so a hospital does not make it and the server does not take it.
    """
    return noise_std > patients


class ReleaseProblem(ValueError):
    """A hospital's reply cannot be used as its operating point's release."""


# A count more than this many noise standard deviations outside what a hospital's
# patients could give is not noise: the reply is refused.
NOISE_BOUND = 6.0


@dataclass(frozen=True)
class Release:
    """One hospital's noisy histograms and the noise on each count."""

    histograms: np.ndarray
    noise_std: float

    @classmethod
    def of(cls, histograms: np.ndarray, releases: list[dict[str, Any]]) -> "Release":
        """The release whose histograms these are, its noise from the hospital's report.

        Parameters
        ----------
        histograms : np.ndarray
            The hospital's noisy histograms.
        releases : list[dict[str, Any]]
            The releases its privacy report lists.

        Raises
        ------
        ReleaseProblem
            The report does not list exactly one operating point's release this run, with a
            known adjacency and a finite, positive noise multiplier.
        """
        mine = [r for r in releases if r["this_run"] and r["mechanism"] == TASK]
        if len(mine) != 1:
            raise ReleaseProblem(f"its report lists {len(mine)} operating-point releases, not 1")
        noise, adjacency = mine[0]["noise_multiplier"], mine[0]["adjacency"]
        if adjacency not in ACCOUNTED_SENSITIVITY or not (0 < noise < math.inf):
            raise ReleaseProblem(f"its release's noise {noise!r} or adjacency {adjacency!r}")
        return cls(np.asarray(histograms, dtype=float), histogram_noise_std(noise, adjacency))

    @classmethod
    def read(cls, text: Any, releases: list[dict[str, Any]], patients: int) -> "Release":
        """A release read from a hospital's reply, refused unless its counts could be real.

        Parameters
        ----------
        text : Any
            The reply's histograms, as JSON text.
        releases : list[dict[str, Any]]
            The releases the hospital's privacy report lists (see `of`).
        patients : int
            The hospital's training patients.

        Raises
        ------
        ReleaseProblem
            The histograms are not 2 finite rows of BINS counts; the release's noise is unknown
            or larger than the patients (it would only drown the others); or a count, or their
            total, is beyond NOISE_BOUND standard deviations of what its patients could give.
        """
        try:
            histograms = np.array(json.loads(text), dtype=float)
        except (TypeError, ValueError, OverflowError, RecursionError):  # e.g. 10**400
            raise ReleaseProblem("its histograms are not a list of numbers") from None
        if histograms.shape != (2, BINS) or not np.isfinite(histograms).all():
            raise ReleaseProblem(f"its histograms are not 2 finite rows of {BINS} counts")
        release = cls.of(histograms, releases)
        margin = NOISE_BOUND * release.noise_std
        if drowned(release.noise_std, patients):
            raise ReleaseProblem(f"its noise (std {release.noise_std:.3g}) exceeds its patients")
        if histograms.min() < -margin or histograms.max() > patients + margin:
            raise ReleaseProblem("its histograms hold counts its patients cannot give")
        if abs(histograms.sum() - patients) > margin * math.sqrt(histograms.size) + patients * 0.01:
            raise ReleaseProblem(f"its histograms do not add up to its {patients} patients")
        if histograms.sum() > patients:  # no more weight than its patients (post-processing)
            return replace(release, histograms=histograms * (patients / histograms.sum()))
        return release


def choose(released: list[Release], target: Target) -> OperatingPoint:
    """The operating point for `target` from the hospitals' releases.

    Raises
    ------
    NoOperatingPoint
        There is no release, the fit fails, or a class holds too few patients to be told from
        the noise (least_patients).
    """
    if not released:
        raise NoOperatingPoint("no hospital released its score histograms")
    counts = np.sum([r.histograms for r in released], axis=0)
    noise_std = math.sqrt(sum(r.noise_std**2 for r in released))
    try:
        negatives, positives = fit_class(counts[0]), fit_class(counts[1])
    except ValueError as error:  # counts the fit cannot use
        raise NoOperatingPoint(f"the fit failed ({error})") from None
    for name, fitted in (("negative", negatives), ("positive", positives)):
        least = least_patients(fitted, noise_std)
        if fitted.patients < least:
            raise NoOperatingPoint(
                f"the hospitals' histograms hold about {fitted.patients:.0f} {name} "
                f"patients, too few under their noise to place a threshold (it takes "
                f"{least:.0f} at that noise)"
            )
    logit = _threshold_logit(negatives, positives, target)
    return OperatingPoint(
        threshold=float(1 / (1 + math.exp(-logit))),
        logit=logit,
        target=str(target),
        expected_sensitivity=positives.share_above(logit),
        expected_specificity=1 - negatives.share_above(logit),
        histograms=len(released),
        negatives=negatives,
        positives=positives,
    )


def least_patients(fitted: ClassFit, noise_std: float) -> float:
    """The fewest patients a fitted class must hold to be told from the noise.

    That is at least MIN_CLASS_PATIENTS, and three times the noise on the total of the bins it
    spans (within two of its observed standard deviations either side), which a fit to pure
    noise rarely reaches.
    """
    observed = math.hypot(fitted.std, KERNEL_STD)
    spanned = max(1.0, 4 * observed / (GRID_EDGES[1] - GRID_EDGES[0]))
    return max(MIN_CLASS_PATIENTS, 3 * noise_std * math.sqrt(spanned))


def _threshold_logit(negatives: ClassFit, positives: ClassFit, target: Target) -> float:
    from scipy import optimize
    from scipy.stats import norm

    if target.kind == "sensitivity":
        return float(norm.ppf(1 - target.value, positives.mean, positives.std))
    if target.kind == "specificity":
        return float(norm.ppf(target.value, negatives.mean, negatives.std))

    def youden(logit):
        return -(positives.share_above(logit) - negatives.share_above(logit))

    low, high = sorted((negatives.mean, positives.mean))
    found = optimize.minimize_scalar(youden, bounds=(low - 1e-6, high + 1e-6), method="bounded")
    return float(np.clip(found.x, GRID_EDGES[0] - 2, GRID_EDGES[-1] + 2))


def choose_without_noise(
    model: "torch.nn.Module", rows: list[tuple[np.ndarray, np.ndarray]], target: Target
) -> float:
    """The threshold chosen as the server chooses it, from histograms without noise.

    For the baselines, which are not private: the histograms are of `model`'s scores on each
    (x, y) of `rows`. Where none can be chosen, PROVISIONAL_THRESHOLD.
    """
    import torch

    with torch.no_grad():
        histograms = [
            score_histogram(model.eval()(torch.as_tensor(x)).squeeze(-1).numpy(), y)
            for x, y in rows
        ]
    try:
        return choose([Release(h, 0.0) for h in histograms], target).threshold
    except NoOperatingPoint:
        return PROVISIONAL_THRESHOLD
