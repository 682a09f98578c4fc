"""Published federated benchmarks, reproduced side by side on the shipped data.

    python benchmark.py flamby-heart [--seeds 5] [--epsilons 0.5,1,2,4] [--name value ...]
    python benchmark.py clinical [--seeds 5] [--name value ...]

flamby-heart: FLamby's Fed-Heart-Disease on the four UCI hospitals in
data/uci-heart-disease/, with FLamby's exact rows, per-hospital train/test split and
metric (accuracy at 0.5 on each hospital's test patients, averaged over the four):
our DP federation at several budgets, FedAvg and pooled training without DP, each
hospital alone, beside FLamby's published figures, with ROC-AUC too. Trains in this
process with the product's settings (nothing tuned on the test patients); writes
benchmark.json and benchmark.md into a new run directory.

clinical: whether the model is one a clinician can use, on every shipped data set:
the real simulation per data set and seed (with its baselines), its ROC-AUC and
its sensitivity, specificity and Brier score at the operating point it chose, on
the reference test set, beside FedAvg and pooled training without DP; writes
clinical.json and clinical.md; exits 1 where a data set misses the README's bars.
"""

import sys

from securehealth.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
