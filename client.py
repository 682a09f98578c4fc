"""A hospital in a deployment: `python client.py --client-id N`.

`python client.py --help` gives its usage (kept in securehealth/commands.py); the
installed console script `securehealth-client` is the same command. Its Flower
ClientApp is securehealth/clientapp.py.
"""

import sys

if __name__ == "__main__":
    from securehealth.commands import client

    sys.exit(client())
