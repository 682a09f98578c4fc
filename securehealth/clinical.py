"""What a clinician needs beside a model's figures, and when to say plainly it is not usable.

The confusion counts at the decision threshold with 95 % confidence intervals (`Confusion`), the
calibration (`Calibration`), the figures in each subgroup the data dictionary marks
(`subgroup_figures`), and the warnings that make a run end "finished with warnings"
(`usefulness_warnings`, read by results.py).
"""

import math
from dataclasses import dataclass

import numpy as np

from securehealth.data.schema import Subgroup

# A model below this ROC-AUC on the reference set is reported as not useful.
MIN_USEFUL_AUC = 0.6
CONFIDENCE = 0.95  # of the intervals shown for sensitivity, specificity and AUC
# A subgroup's AUC, sensitivity or specificity at least this much below the whole
# reference set's, and below it beyond chance (its interval's upper end is), is a gap.
SUBGROUP_GAP = 0.10
# A subgroup's AUC is given only with this many patients of each class (with fewer,
# its interval, Hanley and McNeil's, collapses where every pair is ordered alike),
# and its sensitivity or specificity is flagged only with this many of its class:
# among dozens of subgroups, a few tiny ones fall short by chance alone.
MIN_CLASS = 10
# The figures' names in words.
FIGURE_NAMES = {"auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity"}


@dataclass(frozen=True)
class Confusion:
    """The reference patients by truth and by the model's call at its threshold."""

    true_positives: int
    false_negatives: int
    false_positives: int
    true_negatives: int

    @classmethod
    def at(cls, y: np.ndarray, risk: np.ndarray, threshold: float) -> "Confusion":
        """The counts for labels `y` and predicted risks `risk` at `threshold`."""
        called, sick = risk >= threshold, y == 1
        return cls(
            int((called & sick).sum()),
            int((~called & sick).sum()),
            int((called & ~sick).sum()),
            int((~called & ~sick).sum()),
        )

    @property
    def positives(self) -> int:
        return self.true_positives + self.false_negatives

    @property
    def negatives(self) -> int:
        return self.false_positives + self.true_negatives

    @property
    def prevalence(self) -> float:
        return self.positives / max(self.positives + self.negatives, 1)

    @property
    def majority_accuracy(self) -> float:
        """The accuracy of calling every patient the more common class."""
        return max(self.prevalence, 1 - self.prevalence)

    def sensitivity_interval(self) -> tuple[float, float]:
        return wilson_interval(self.true_positives, self.positives)

    def specificity_interval(self) -> tuple[float, float]:
        return wilson_interval(self.true_negatives, self.negatives)

    @property
    def called_positive(self) -> int:
        return self.true_positives + self.false_positives

    @property
    def called_negative(self) -> int:
        return self.true_negatives + self.false_negatives

    def predictive_values(self) -> tuple[float | None, float | None]:
        """(PPV, NPV) at this reference set's prevalence.

        They are the share sick among those called sick, and healthy among those called
        healthy; each is None where nobody is called so.
        """
        ppv = self.true_positives / self.called_positive if self.called_positive else None
        npv = self.true_negatives / self.called_negative if self.called_negative else None
        return ppv, npv


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """SciPy's Wilson score interval of a proportion, at CONFIDENCE; (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class Calibration:
    """How far the predicted risks are from the observed ones.

    Calibration-in-the-large is the mean predicted risk against the share observed. The
    calibration slope is that of the logistic regression of the outcome on the risk's logit: 1 is
    calibrated, above 1 the risks are compressed towards the middle, below 1 too extreme.
    """

    mean_risk: float
    observed: float
    slope: float

    @classmethod
    def of(cls, y: np.ndarray, risk: np.ndarray) -> "Calibration":
        """The calibration of predicted risks `risk` against labels `y`."""
        from sklearn.linear_model import LogisticRegression

        clipped = np.clip(risk.astype(float), 1e-6, 1 - 1e-6)
        logit = np.log(clipped / (1 - clipped)).reshape(-1, 1)
        fit = LogisticRegression(C=np.inf).fit(logit, y) if len(np.unique(y)) == 2 else None
        slope = float(fit.coef_[0, 0]) if fit is not None else float("nan")
        return cls(float(risk.mean()), float(y.mean()), slope)

    def text(self) -> str:
        """The two figures in words, for the report.

        The means are compared on the logit scale (0.06 against 0.02 is a threefold
        over-estimate, not a match).
        """
        gap = _logit(self.mean_risk) - _logit(self.observed)
        large = (
            f"the model {'over' if gap > 0 else 'under'}-estimates risk on average"
            if abs(gap) >= 0.2
            else "on average the risks match"
        )
        if not np.isfinite(self.slope):
            shape = "no calibration slope: the reference set has one class only"
        elif self.slope < -0.2:
            shape = (
                f"calibration slope {self.slope:.2f}, below 0: the risks are inverted, "
                f"higher for the healthy"
            )
        elif self.slope <= 0.2:
            shape = (
                f"calibration slope {self.slope:.2f}, near 0: the risks say almost "
                f"nothing about who is sick"
            )
        elif self.slope > 1.2:
            shape = (
                f"calibration slope {self.slope:.2f}, above 1: the risks are compressed "
                f"towards the middle, so read them as a ranking and use the decision at "
                f"the operating point rather than the risk itself"
            )
        elif self.slope < 0.8:
            shape = f"calibration slope {self.slope:.2f}, below 1: the risks are too extreme"
        else:
            shape = f"calibration slope {self.slope:.2f}, close to 1: their spread is right"
        return (
            f"Mean predicted risk {self.mean_risk:.3g} against {self.observed:.3g} "
            f"observed: {large}; {shape}."
        )


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def auc_interval(auc: float, positives: int, negatives: int) -> tuple[float, float]:
    """The ROC-AUC's interval at CONFIDENCE, from Hanley and McNeil's (1982) standard error.

    That standard error needs only the AUC and the two classes' sizes.
    """
    from scipy.stats import norm

    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    half = norm.ppf((1 + CONFIDENCE) / 2) * math.sqrt(max(variance, 0.0))
    return max(auc - half, 0.0), min(auc + half, 1.0)


@dataclass(frozen=True)
class SubgroupFigures:
    """A subgroup's figures at the run's threshold, each a (value, 95 % interval) or None.

    A figure is None where the subgroup lacks its class (the AUC: fewer than MIN_CLASS of
    either). `gaps` names, in words, those below the whole reference set's by SUBGROUP_GAP
    beyond chance, from at least MIN_CLASS patients of the class.
    """

    feature: str
    subgroup: str
    patients: int
    positives: int
    auc: tuple[float, tuple[float, float]] | None
    sensitivity: tuple[float, tuple[float, float]] | None
    specificity: tuple[float, tuple[float, float]] | None
    gaps: tuple[str, ...]


def subgroup_figures(
    subgroups: list[Subgroup], y: np.ndarray, risk: np.ndarray, threshold: float
) -> list[SubgroupFigures]:
    """Each subgroup's AUC, sensitivity and specificity with 95 % intervals, and their gaps.

    Parameters
    ----------
    subgroups : list[Subgroup]
        The subgroups the data dictionary marks, each with its members among the reference set.
    y : np.ndarray
        The reference patients' labels.
    risk : np.ndarray
        Their predicted risks.
    threshold : float
        The run's decision threshold.

    Returns
    -------
    list[SubgroupFigures]
        One per subgroup, its `gaps` saying where it falls short of the whole reference set's
        figures (SUBGROUP_GAP).
    """
    whole = _figures(y, risk, threshold)
    found = []
    for subgroup in subgroups:
        own = _figures(y[subgroup.members], risk[subgroup.members], threshold)
        patients, sick = int(subgroup.members.sum()), int(y[subgroup.members].sum())
        # The patients each figure is measured on (the AUC exists only with enough).
        counted = {"auc": MIN_CLASS, "sensitivity": sick, "specificity": patients - sick}
        gaps = tuple(
            f"{FIGURE_NAMES[name]} {value:.2f} (95% CI {low:.2f} to {high:.2f}) against "
            f"{whole[name][0]:.2f} for all reference patients"
            for name, figure in own.items()
            if figure is not None and whole[name] is not None and counted[name] >= MIN_CLASS
            for value, (low, high) in [figure]
            if value <= whole[name][0] - SUBGROUP_GAP and high < whole[name][0]
        )
        found.append(
            SubgroupFigures(
                subgroup.feature,
                subgroup.name,
                patients,
                sick,
                **own,
                gaps=gaps,
            )
        )
    return found


def _figures(y, risk, threshold):
    """The AUC, sensitivity and specificity of these patients, each (value, interval) or None."""
    from sklearn.metrics import roc_auc_score

    confusion = Confusion.at(y, risk, threshold)
    sick, healthy = confusion.positives, confusion.negatives
    auc = None
    if min(sick, healthy) >= MIN_CLASS:
        value = float(roc_auc_score(y, risk))
        auc = value, auc_interval(value, sick, healthy)
    return {
        "auc": auc,
        "sensitivity": (confusion.true_positives / sick, confusion.sensitivity_interval())
        if sick
        else None,
        "specificity": (confusion.true_negatives / healthy, confusion.specificity_interval())
        if healthy
        else None,
    }


def usefulness_warnings(
    final: dict, confusion: Confusion, hospitals: int, trained: int, operating_point: dict | None
) -> list[str]:
    """Why a finished run's model should not be taken as a success, in words.

    Subgroup gaps are flagged in the report, not here: at one threshold they come from the case
    mix as much as from the model.

    Parameters
    ----------
    final : dict
        The final model's figures on the reference set (model.clinical_metrics).
    confusion : Confusion
        Its confusion counts at the threshold.
    hospitals : int
        How many hospitals the run started with.
    trained : int
        How many trained in the last round.
    operating_point : dict or None
        The operating point's record (`chosen`, and `reason` where it was not), or None for a
        fixed threshold.

    Returns
    -------
    list[str]
        Empty if none applies; else each of: the model calls every patient the same, its AUC is
        below MIN_USEFUL_AUC, it tells the classes apart no better than calling everyone the
        majority class (sensitivity + specificity at most 1, that baseline's sum), fewer
        hospitals trained in the last round than the run started with, or no operating point
        could be chosen.
    """
    found = []
    if 0 in (confusion.called_positive, confusion.called_negative):
        kind = "negative" if confusion.called_positive == 0 else "positive"
        found.append(f"the model calls every reference patient {kind} at its threshold")
    if final["auc"] is not None and final["auc"] < MIN_USEFUL_AUC:
        found.append(f"its ROC-AUC {final['auc']:.3f} is below {MIN_USEFUL_AUC:g}")
    if final["sensitivity"] + final["specificity"] <= 1:
        found.append(
            f"its sensitivity {final['sensitivity']:.3f} plus specificity "
            f"{final['specificity']:.3f} is no better than calling everyone the majority "
            f"class (whose sum is 1)"
        )
    if trained < hospitals:
        found.append(f"only {trained} of the {hospitals} hospitals trained in the last round")
    if operating_point is not None and not operating_point["chosen"]:
        found.append(f"no operating point was chosen: {operating_point['reason']}")
    return found
