"""The privacy-utility curve.

`python sweep.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-sweep` is the same command.
"""

import sys

from securehealth.commands import sweep

if __name__ == "__main__":
    sys.exit(sweep())
