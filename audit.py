"""The privacy audit: evidence about the DP training that would come out differently
if the training or its accounting were wrong.

    python audit.py --self-test [--canaries 10000] [--name value ...]
        the one-run canary audit of the product and of deliberately broken versions
        of it (half the noise, no noise, noise for one round used for all; shuffled
        batches, reported), on generated or bundled data, in a new run directory
        (audit.json, audit.md, audit.png); PASS, FAIL or INCONCLUSIVE, exit 0 only
        on PASS
    python audit.py --run-dir runs/<run>
        the same canary audit with a finished run's settings (the audited hospital
        samples at its patients' rate, for their steps), and a membership-
        inference attack on the run's model; writes audit.json, audit.png and the
        audit section of report.md; exit 1 only on FAIL

The canary audit (Steinke, Nasr and Jagielski, 2023; Mahloujifar, Melis and
Chaudhuri, 2025) plants canaries, each in a version chosen by a secret coin, trains
once, guesses the coins from what an attacker sees (the server's view of each
round's update: white-box; model.pt: black-box), and turns the correct guesses into
a lower bound on the epsilon really spent, set beside the claimed one: a variant
passes if the white-box bound, at 95% confidence, is at most its claim. It trains
its own copies with scratch ledgers: no hospital's budget is spent.

The membership-inference attack (loss threshold, Yeom et al., 2018) tells the
hospitals' training patients from their held-out ones; it is set beside two models
trained without DP and the most any attack can achieve at the run's epsilon. An
attack near chance shows only that this attack failed.
"""

import sys

from securehealth.tools.audit import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
