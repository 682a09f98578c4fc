"""Where the time goes, on this machine.

`python bench.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-bench` is the same command.
"""

import sys

from securehealth.commands import bench

if __name__ == "__main__":
    sys.exit(bench())
