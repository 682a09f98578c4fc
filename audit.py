"""The privacy audit.

`python audit.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-audit` is the same command.
"""

import sys

from securehealth.commands import audit

if __name__ == "__main__":
    sys.exit(audit())
