"""How patients are divided: into hospitals (bundled data sets), and within each
hospital into training rows (the only rows DP-SGD touches) and held-out rows
(evaluated at the hospital itself)."""

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
    """Row indices split into parts in proportion to `weights`, each class dealt out
    separately so that every part keeps the overall share of the disease."""
    parts = [[] for _ in weights]
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        cuts = np.round(np.cumsum(weights)[:-1] / np.sum(weights) * len(rows)).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
            part.extend(chunk)
    return [np.sort(np.array(part, dtype=int)) for part in parts]


def row_keys(x: np.ndarray, y: np.ndarray, patient_keys: np.ndarray | None = None) -> np.ndarray:
    """A stable pseudo-random key per patient: a hash of its key where the source
    gives one (a table's patient_id, else its row as written: csv_files.read_csv),
    else of its encoded row (bundled data sets). The hospital's held-out rule."""
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
    """Row indices (train, held out) of one hospital's rows, by their row_keys alone,
    so that the same patients are held out in every run, whatever the server's
    settings; which of them, so that one patient's record moves the training rows
    by no more than the hospital's adjacency allows:

    - replace-one: the test_size patients with the smallest keys. Replacing one
      record changes the training rows by at most one record and never their
      number (which is released).
    - add-remove: every patient whose key falls below test_fraction of the key
      range. Adding or removing one patient adds or removes at most that patient;
      a count-based cut would move when the count does, swapping another patient
      in or out as well.

    Not stratified by diagnosis, on purpose: per-class cuts move when a replaced
    record has the other diagnosis, pulling further patients across."""
    keys = row_keys(x, y, patient_keys)
    if adjacency == "add-remove":
        held = keys < np.uint64(int(test_fraction * 2**64))
        return np.flatnonzero(~held), np.flatnonzero(held)
    order = np.argsort(keys, kind="stable")
    n_test = test_size(len(y), test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
