"""An empirical privacy audit of a finished run: a membership-inference attack on
the trained global model, set beside the most any attack can achieve under the
(epsilon, delta) the hospitals spent.

    python audit.py --run-dir runs/<run>     (writes audit.json, updates report.md)

The attack is the loss-threshold attack (Yeom et al., 2018): a patient whose
diagnosis the model predicts with a lower loss is guessed to have been trained on.
Members are the hospitals' training patients, non-members their held-out
patients, in equal numbers; the 95% intervals come from redrawing both (bootstrap). For
contrast the same attack runs on two models the audit trains without DP on the
same training patients: one with the run's own schedule, and one trained ten times
longer, which memorises more.

Only the bound is a guarantee: an attack at chance shows that this attack failed,
not that every attack would.
"""

import sys

from securehealth.tools.audit import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
