"""The deployment server: `python server.py --help` for its usage.

The installed console script `securehealth-server` is the same command; the
ServerApp it runs is securehealth/serverapp.py.
"""

import sys

from securehealth.commands import server

if __name__ == "__main__":
    sys.exit(server())
