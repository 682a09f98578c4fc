"""Write a finished run's report again.

`python report.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-report` is the same command.
"""

import sys

from securehealth.commands import report

if __name__ == "__main__":
    sys.exit(report())
