"""Write a finished run's report again: report.md and its plots, from the run's
metrics.json and model.pt (the server writes it at the end of every run; run this
after adding the audit or baselines, say):

    python report.py --run-dir runs/<run>
"""

import sys

from securehealth.results import finished_run_argument


def main(argv: list[str] | None = None) -> int:
    run_dir = finished_run_argument(__doc__, argv)[0]
    from securehealth.report import write_report  # plots and the model: after --help

    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
