"""Where the time goes, on this machine: prints a table of figures (each the median
of --repeats runs where it says so) and writes them to bench.json.

    python bench.py [--repeats 3] [--deploy-rounds 3] [--out DIR]

1. The default `python simulation.py`, split into start-up (imports, SuperLink,
   Ray, the ServerApp), the rounds and shutdown, beside the same job's training
   computed in this process without Flower (the floor): total / compute.
2. The default deployment (`server.py` and 3 `client.py` on loopback with TLS),
   with and without secure aggregation: end to end and per round.
3. A DP-SGD step (Opacus) against the same model's plain SGD step: the ratio.
4. Scaling: 3, 10, 50 and 100 hospitals; 4k, 40k, 400k and 1M patients (one round
   each), then 100 hospitals with 1M patients for the default rounds: wall time,
   time of the rounds, and peak memory (the sum of the resident memory of every
   process the run started).
"""

import sys

from securehealth.tools.bench import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
