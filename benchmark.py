"""Published federated benchmarks, reproduced on the shipped data.

`python benchmark.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-benchmark` is the same command.
"""

import sys

from securehealth.commands import benchmark

if __name__ == "__main__":
    sys.exit(benchmark())
