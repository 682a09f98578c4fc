"""Which hospitals' data is a demonstration's, whose runs spend no lasting privacy budget.

Data the code generates or bundles is one, and so is a file that is, byte for byte,
shipped in this repository (SHIPPED_FILES) or a synthetic twin's (twin.py): judged from
the bytes alone, never the path or name, so any edit makes it your own data.
Entry points: is_demonstration, all_demonstration.
"""

import hashlib
from pathlib import Path

from securehealth.config import Settings

# SHA-256 of every patient file shipped in this repository (.gitattributes keeps
# git from converting their line endings): tests/test_demonstration.py checks each
# against the file it names.
SHIPPED_FILES = {
    "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8": (
        "data/uci-heart-disease/processed.cleveland.data"
    ),
    "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796": (
        "data/uci-heart-disease/processed.hungarian.data"
    ),
    "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314": (
        "data/uci-heart-disease/processed.switzerland.data"
    ),
    "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f": (
        "data/uci-heart-disease/processed.va.data"
    ),
    "7c6070bf721f6e8ce2496a91ffca1e8643019e869d990e31b0fc5ec6c79ad03f": (
        "examples/csv/hospital_0.csv"
    ),
    "2c5be84e5d90bf90c59c92a1b2727faa4ac7ad0876e4ddef92461658b900b3de": (
        "examples/csv/hospital_1.csv"
    ),
    "89a8e70aed63cc17821e1ba0bc33c5d856464cea01b2cd81a011e2a4bb0c9a69": (
        "examples/csv/hospital_2.csv"
    ),
}


def is_demonstration(own_file: Path | None, content: bytes | None = None) -> bool:
    """Whether a hospital's patients are a demonstration's.

    Parameters
    ----------
    own_file : Path or None
        The file its patients come from (data.own_file): None where the code generates
        them or scikit-learn bundles them.
    content : bytes, optional
        The file's bytes as read once for both the judgement and the training
        (data.read_once), else read here.

    Returns
    -------
    bool
        True for generated or bundled patients, a shipped file or a twin's file. False
        for any other, and for a file that cannot be read (it then fails where it is
        read for training).
    """
    if own_file is None:
        return True
    try:
        content = Path(own_file).read_bytes() if content is None else content
    except OSError:
        return False
    if hashlib.sha256(content).hexdigest() in SHIPPED_FILES:
        return True
    from securehealth.data.twin import is_twin  # the data dictionary's reader: when needed

    return is_twin(own_file, content)


def hospitals_demonstrating(cfg: Settings) -> list[bool]:
    """For each hospital of a simulation on this machine, whether its data is a demonstration's."""
    from securehealth.data import own_file

    return [is_demonstration(own_file(cfg, h)) for h in range(cfg.num_clients)]


def all_demonstration(cfg: Settings) -> bool:
    """Whether every hospital of a simulation on this machine is a demonstration.

    Only then may a tool train on their rows outside any ledger (settings.check_accounted).
    """
    return all(hospitals_demonstrating(cfg))
