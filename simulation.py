"""Train the diagnosis model across simulated hospitals on this machine.

`python simulation.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-simulation` is the same command.
"""

import sys

from securehealth.commands import simulation

if __name__ == "__main__":
    sys.exit(simulation())
