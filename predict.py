"""Score new patients with a finished run's model.

`python predict.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-predict` is the same command.
"""

import sys

from securehealth.commands import predict

if __name__ == "__main__":
    sys.exit(predict())
