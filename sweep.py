"""The privacy-utility curve: the federated DP model's ROC-AUC and accuracy on the
server's reference test set at several privacy budgets, averaged over seeds, beside
FedAvg and the pooled model without DP.

    python sweep.py [--epsilons 0.5,1,2,4,8] [--seeds 3] [--name value ...]

Each point trains the federation in this process: the real hospitals (Opacus
DP-SGD, calibrated noise, privacy ledger) and Flower's FedAvg combination, without
the runtime's processes, which would cost 20 s a point. Writes sweep.json,
sweep.md and sweep.png into a new run directory.
"""

import sys

from securehealth.tools.sweep import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
