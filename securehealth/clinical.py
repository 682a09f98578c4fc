"""What a clinician needs beside a model's figures, and when to tell them plainly
that the model is not usable: the confusion counts at its decision threshold with
95 % confidence intervals, the prevalence and the majority-class baseline, and the
warnings that make a run end "finished with warnings" (results.py)."""

from dataclasses import dataclass

import numpy as np

# A model below this ROC-AUC on the reference set is reported as not useful.
MIN_USEFUL_AUC = 0.6
CONFIDENCE = 0.95  # of the intervals shown for sensitivity and specificity


@dataclass(frozen=True)
class Confusion:
    """The reference patients by truth and by the model's call at its threshold."""

    true_positives: int
    false_negatives: int
    false_positives: int
    true_negatives: int

    @classmethod
    def at(cls, y: np.ndarray, risk: np.ndarray, threshold: float) -> "Confusion":
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


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """SciPy's Wilson score interval of a proportion, at CONFIDENCE; (0, 1) with no
    trials."""
    if trials == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def usefulness_warnings(
    final: dict, confusion: Confusion, hospitals: int, trained: int, operating_point: dict | None
) -> list[str]:
    """Why a finished run's model should not be taken as a success, in words (empty
    if none applies): it calls every patient the same, its AUC is below
    MIN_USEFUL_AUC, it tells the classes apart no better than calling everyone the
    majority class (sensitivity + specificity at most 1, that baseline's sum),
    fewer hospitals trained in the last round than the run started with, or no
    operating point could be chosen."""
    found = []
    called_positive = confusion.true_positives + confusion.false_positives
    if called_positive in (0, confusion.positives + confusion.negatives):
        kind = "negative" if called_positive == 0 else "positive"
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
