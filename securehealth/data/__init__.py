"""Patient data for a federation of hospitals, each source described by a data dictionary.

SOURCES maps the `dataset` setting to a module with `DESCRIPTION`, `load_schema`,
`hospital_rows` and `reference_set` (and `FILES` with `hospital_file` where hospitals
read files, `SITES` where the hospitals are fixed). Entry points: hospital_data,
reference_test_set, check_all, own_file and read_once.
"""

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from securehealth.config import Settings
from securehealth.data import breast_cancer, csv_files, heart_disease, synthetic
from securehealth.data.schema import DataError, Schema
from securehealth.data.split import held_out_split

SOURCES = {
    "synthetic": synthetic,
    "breast-cancer": breast_cancer,
    "heart-disease": heart_disease,
    "csv": csv_files,
}
MIN_TRAINING_PATIENTS = 10

__all__ = [
    "SOURCES",
    "DataError",
    "Schema",
    "check_all",
    "fingerprint",
    "hospital_data",
    "hospital_name",
    "load_schema",
    "locate",
    "own_file",
    "read_once",
    "patients_fingerprint",
    "reference_test_set",
    "single_class",
]


def load_schema(cfg: Settings, schema_file: str | None = None) -> Schema:
    """The data dictionary of the `dataset` setting's source."""
    return SOURCES[cfg.dataset].load_schema(cfg, schema_file)


def locate(cfg: Settings) -> None:
    """Make data_dir an absolute path, for Flower's processes.

    The path is the one given, or the folder a bundled data set ships in: Flower's
    processes run elsewhere, from an app bundle that carries no data files.
    """
    shipped = getattr(SOURCES[cfg.dataset], "SHIPPED_DIR", None)
    if cfg.data_dir or shipped:
        cfg.data_dir = str(Path(cfg.data_dir or shipped).resolve())


def hospital_data(
    cfg: Settings,
    hospital: int,
    data_file: str | None = None,
    schema_file: str | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One hospital's training and held-out patients.

    Parameters
    ----------
    cfg : Settings
        The run's settings (dataset, test_fraction, adjacency, ...).
    hospital : int
        The hospital's number.
    data_file : str, optional
        A deployed csv hospital's own file, in place of its source's.
    schema_file : str, optional
        A deployed csv hospital's own data dictionary.

    Returns
    -------
    tuple
        ((train_x, train_y), (test_x, test_y)).

    Raises
    ------
    DataError
        Where the data cannot be read or fails its dictionary, or leaves fewer than
        MIN_TRAINING_PATIENTS for training.
    """
    schema = load_schema(cfg, schema_file)
    x, y, ids, source = SOURCES[cfg.dataset].hospital_rows(cfg, hospital, schema, data_file)
    train, test = held_out_split(x, y, cfg.test_fraction, ids, cfg.adjacency)
    if len(train) < MIN_TRAINING_PATIENTS:
        raise DataError(
            f"{source}: {len(y)} patients leave {len(train)} for training after holding "
            f"out test_fraction {cfg.test_fraction:g}; DP-SGD needs at least "
            f"{MIN_TRAINING_PATIENTS}: add patients or lower test_fraction"
        )
    return (x[train], y[train]), (x[test], y[test])


def hospital_name(cfg: Settings, hospital: int | str) -> str:
    """A hospital's number, with its site's name where the data set has real sites.

    E.g. "0 (Cleveland)", from the source's SITE_NAMES.
    """
    names = getattr(SOURCES[cfg.dataset], "SITE_NAMES", ())
    return f"{hospital} ({names[int(hospital)]})" if names else str(hospital)


def own_file(cfg: Settings, hospital: int, data_file: str | None = None) -> Path | None:
    """The file a hospital's patients are read from, or None where there is none.

    That is the file its client.py names, else its source's file for it (data_dir's
    hospital_<i>.csv, a heart-disease site's file); None where the code generates the
    patients or scikit-learn bundles them. Its fingerprint says whether it is a
    demonstration (demonstration.py); if not, one lasting privacy ledger on this
    machine accounts for it.
    """
    source = SOURCES[cfg.dataset]
    if not getattr(source, "FILES", False):
        return None
    return Path(data_file or source.hospital_file(cfg, hospital)).resolve()


@contextmanager
def read_once(path: Path | None, cfg: Settings) -> Iterator[tuple[Path | None, bytes | None]]:
    """Read a hospital's data file once, so that what is judged a demonstration trains.

    What demonstration.py judges is then exactly what trains, whatever happens to the
    file meanwhile.

    Parameters
    ----------
    path : Path or None
        The hospital's own file (own_file), None where it has none.
    cfg : Settings
        The run's settings (for csv_files.check_size).

    Yields
    ------
    tuple
        (a private copy of its bytes to train from, the bytes); (None, None) without a
        file; (the path, None) where it cannot be read (reading it for training says
        why).

    Raises
    ------
    DataError
        Before it is read, for anything but a regular file (a pipe would block) or a
        file larger than a hospital's may be (csv_files.check_size).
    """
    if path is None:
        yield None, None
        return
    csv_files.check_size(path, cfg)
    try:
        content = path.read_bytes()
    except OSError:
        yield path, None
        return
    with tempfile.TemporaryDirectory(prefix="securehealth-") as private:
        copy = Path(private) / path.name
        copy.write_bytes(content)
        yield copy, content


def reference_test_set(cfg: Settings) -> tuple[np.ndarray, np.ndarray, str]:
    """The server's own test set, (x, y, what it is): the model is judged on it."""
    reference = SOURCES[cfg.dataset].reference_set(cfg, load_schema(cfg))
    if reference is not None:
        return reference
    # Simulation only: every hospital's held-out rows, pooled (docs/how-to/your-own-csv.md).
    held_out = [hospital_data(cfg, h)[1] for h in range(cfg.num_clients)]
    x = np.concatenate([h[0] for h in held_out])
    y = np.concatenate([h[1] for h in held_out])
    return (
        x,
        y,
        (
            f"the hospitals' held-out patients at test_fraction {cfg.test_fraction:g}, pooled "
            f"(no test.csv given)"
        ),
    )


def single_class(y: np.ndarray, hospital: int | str) -> str | None:
    """A warning where a hospital's training patients are all of one class, else None.

    DP-SGD on them can only push the shared model towards that class.
    """
    classes = np.unique(y)
    if len(classes) > 1:
        return None
    kind = "positive" if classes.size and classes[0] == 1 else "negative"
    return (
        f"hospital {hospital}: all {len(y)} training patients are {kind}; its updates "
        f"can only teach the model that class"
    )


def check_all(cfg: Settings, pool_held_out: bool = True) -> list[str]:
    """Load every hospital's data and the server's reference set once, before anything starts.

    Bad data then stops a launcher with one line rather than a failed run.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    pool_held_out : bool
        True in simulation (this machine holds every hospital's data); False for a
        deployed server, whose csv reference set must then be its own test.csv.

    Returns
    -------
    list of str
        Warnings (single_class).

    Raises
    ------
    DataError
        The first problem found, in one line.
    """
    test_file = csv_files.csv_paths(cfg)[2] if cfg.dataset == "csv" else None
    if test_file and not pool_held_out and not test_file.exists():
        raise DataError(
            f"{test_file}: file not found; the server needs its own reference test "
            f"set to evaluate the model (the hospitals' files stay at the hospitals)"
        )
    warnings = []
    if pool_held_out:  # simulation: this machine holds every hospital's data
        for hospital in range(cfg.num_clients):
            (_, y), _ = hospital_data(cfg, hospital)
            warnings.append(single_class(y, hospital))
    reference_test_set(cfg)
    return [w for w in warnings if w]


def patients_fingerprint(
    patients: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> str:
    """SHA-256 of all of a hospital's patients, whichever of them are held out.

    `patients` is ((training x, y), (held-out x, y)), hashed as encoded rows in sorted
    order: the same patients give the same fingerprint however their file orders or
    writes them.
    """
    (x, y), (held_x, held_y) = patients
    rows = np.column_stack([np.vstack([x, held_x]), np.concatenate([y, held_y])])
    ordered = rows[np.lexsort(rows.T[::-1])].astype(np.float32)
    return hashlib.sha256(np.ascontiguousarray(ordered).tobytes()).hexdigest()


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of a dataset's rows.

    It names a version of a hospital's data in its privacy ledger (which holds one
    budget for all of them).
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
