"""A zygote whose children report what they find (tests/test_zygote.py).

It preloads as the server's real zygote does (pinning.preload, then forget_this_copy), so that
PyTorch, NumPy and Flower are loaded before every fork. Each message then prints, as JSON on
its standard output: its pid, what an earlier message could have left behind, draws from
Python's, NumPy's and PyTorch's global generators, and the weights DP-SGD trains from the
same start on the same rows (the product's own noise and Poisson batches). Then it leaves
marks of its own for the next message to find. A message asked to "wait" says its pid and
waits, to be killed; one asked to "mark" leaves a file "marked" in its working folder.
"""

import json
import os
import random
import socket
import sys
import time

from securehealth.deployment import zygote

MARK = "left-by-an-earlier-message"


def prepare():
    """Preload as the server's zygote does; return what each message runs."""
    from securehealth.deployment import pinning

    pinning.preload("flwr-serverapp")
    pinning.forget_this_copy()
    return report


def report():
    """Print what this message finds and draws, then leave marks behind."""
    import numpy as np
    import torch

    if sys.argv[1:] == ["wait"]:
        print(json.dumps({"pid": os.getpid()}), flush=True)
        time.sleep(300)
    if sys.argv[1:] == ["mark"]:
        open("marked", "w").close()

    found = {
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "setting": os.environ.get("PROBE_SETTING"),
        "folder": os.getcwd(),
        "app_modules_at_start": sorted(m for m in sys.modules if m.startswith("securehealth")),
        "marks": [
            hasattr(np, "_probe_mark"),
            MARK in os.environ,
            "securehealth.privacy.dpsgd" in sys.modules,
        ],
        "python": random.random(),
        "numpy": float(np.random.random()),
        "torch": float(torch.rand(1)),
        "dp_sgd": trained_weights(),
    }
    np._probe_mark = MARK
    os.environ[MARK] = "1"
    print(json.dumps(found))


def trained_weights():
    """DP-SGD of the product from a fixed start on fixed rows: differs only by noise and batches."""
    import numpy as np
    import torch

    from securehealth import settings
    from securehealth.model import build_model
    from securehealth.privacy import dpsgd

    cfg = settings.resolve({})
    rows = np.random.default_rng(0)
    x = rows.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    torch.manual_seed(0)  # the same start in every message
    model = build_model(4, ())
    dpsgd.train_private(model, x, y, cfg, noise_multiplier=1.0)
    return [float(value) for value in torch.cat([p.flatten() for p in model.parameters()])]


if __name__ == "__main__":  # the listening socket's fd, the pid of the process to end with
    zygote.serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]), prepare)
