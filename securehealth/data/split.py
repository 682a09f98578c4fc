"""How patients are divided: into hospitals, and within each into training and held-out rows.

Hospitals are cut from the bundled data sets (hospital_sizes, stratified_parts); each
hospital's training rows are the only rows DP-SGD touches, its held-out rows are
evaluated at the hospital itself (held_out_split).
"""

import hashlib
from collections.abc import Sequence

import numpy as np

SIZE_PATTERN = (5, 3, 2)  # hospitals are large, medium, small, large, ...
SERVER_STREAM = 2**32 - 1  # random stream of the server's own reference patients


def hospital_sizes(num_patients: int, num_clients: int) -> list[int]:
    """Patients per hospital, following SIZE_PATTERN and summing to num_patients."""
    weights = np.array([SIZE_PATTERN[h % len(SIZE_PATTERN)] for h in range(num_clients)])
    sizes = np.floor(num_patients * weights / weights.sum()).astype(int)
    sizes[: num_patients - sizes.sum()] += 1  # hand out the rounding remainder
    return sizes.tolist()


def test_size(n: int, test_fraction: float) -> int:
    """Patients of a hospital of n held out from training (at least one)."""
    return max(1, round(n * test_fraction))


def stratified_parts(
    y: np.ndarray, weights: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices split into parts in proportion to `weights`, each class dealt separately.

    Every part thus keeps the overall share of the disease.
    """
    parts = [[] for _ in weights]
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        cuts = np.round(np.cumsum(weights)[:-1] / np.sum(weights) * len(rows)).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
            part.extend(chunk)
    return [np.sort(np.array(part, dtype=int)) for part in parts]


def row_keys(x: np.ndarray, y: np.ndarray, patient_keys: np.ndarray | None = None) -> np.ndarray:
    """A stable pseudo-random key per patient, on which the hospital's held-out rule cuts.

    Parameters
    ----------
    x : np.ndarray
        The encoded rows.
    y : np.ndarray
        Their labels.
    patient_keys : np.ndarray, optional
        The source's key per patient (a table's patient_id, else its row as written:
        csv_files.read_csv). Without them, the encoded rows are hashed (bundled data
        sets).

    Returns
    -------
    np.ndarray
        One uint64 hash per patient.
    """
    if patient_keys is not None:
        rows = [str(p).encode() for p in patient_keys]
    else:
        table = np.column_stack([x, y]).astype(np.float32)
        rows = [row.tobytes() for row in table]
    return np.array(
        [int.from_bytes(hashlib.blake2b(r, digest_size=8).digest(), "big") for r in rows],
        dtype=np.uint64,
    )


def held_out_split(
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    patient_keys: np.ndarray | None = None,
    adjacency: str = "replace-one",
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out) of one hospital's rows, by their row_keys alone.

    The same patients are held out in every run, whatever the server's settings; which
    of them is chosen so that one patient's record moves the training rows by no more
    than the hospital's adjacency allows:

    - replace-one: the test_size patients with the smallest keys. Replacing one
      record changes the training rows by at most one record and never their
      number (which is released).
    - add-remove: every patient whose key falls below test_fraction of the key
      range. Adding or removing one patient adds or removes at most that patient;
      a count-based cut would move when the count does, swapping another patient
      in or out as well.

    Not stratified by diagnosis, on purpose: per-class cuts move when a replaced
    record has the other diagnosis, pulling further patients across.

    Parameters
    ----------
    x, y : np.ndarray
        The hospital's encoded rows and their labels.
    test_fraction : float
        The share of its patients held out.
    patient_keys : np.ndarray, optional
        The source's key per patient (see row_keys).
    adjacency : str
        "replace-one" or "add-remove".

    Returns
    -------
    tuple of np.ndarray
        (training row indices, held-out row indices), each sorted.
    """
    keys = row_keys(x, y, patient_keys)
    if adjacency == "add-remove":
        held = keys < np.uint64(int(test_fraction * 2**64))
        return np.flatnonzero(~held), np.flatnonzero(held)
    order = np.argsort(keys, kind="stable")
    n_test = test_size(len(y), test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
