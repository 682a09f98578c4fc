"""The diagnosis model, the exchange of its weights, its clinical evaluation, and model.pt.

The model is logistic regression by default, or a small MLP; either outputs a risk logit. Its
weights travel between hospitals and server as NumPy arrays (get_weights, set_weights).
"""

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torch import nn

from securehealth.results import write_atomic

if TYPE_CHECKING:
    from securehealth.data.schema import Schema


def build_model(in_features: int, hidden_layers: Sequence[int]) -> nn.Sequential:
    """The diagnosis model: an MLP with `hidden_layers`, or logistic regression without any.

    It has no BatchNorm, which is not compatible with per-patient DP gradients.
    """
    layers, width = [], in_features
    for hidden in hidden_layers:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's weights as NumPy arrays, in state-dict order.

    Pass the plain model, not Opacus' wrapper, whose keys carry a `_module.` prefix.
    """
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays from get_weights() into the model, checking the architecture."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"expected {len(state)} weight arrays, got {len(weights)}")
    for (name, current), array in zip(state.items(), weights, strict=True):
        if tuple(current.shape) != tuple(np.shape(array)):
            raise ValueError(
                f"weight {name} has shape {np.shape(array)}, model needs {tuple(current.shape)}"
            )
    model.load_state_dict({k: torch.as_tensor(w) for k, w in zip(state, weights, strict=True)})


def arrays_like(tensors: Sequence[bytes], expected: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Decode a model sent as .npy bytes, each array's header checked before it is read.

    Whoever sent the bytes chose the header: an array is decoded only if its header
    names the shape of `expected`'s array, a floating-point type and exactly the bytes
    that follow, so that a header cannot make the reader allocate more than was sent.

    Raises
    ------
    ValueError
        The bytes are not arrays shaped like `expected`; the message says how.
    """
    if len(tensors) != len(expected):
        raise ValueError(f"{len(tensors)} weight arrays where the model has {len(expected)}")
    pairs = enumerate(zip(tensors, expected, strict=True))
    return [_array_like(index, tensor, want) for index, (tensor, want) in pairs]


def _array_like(index: int, tensor: bytes, want: np.ndarray) -> np.ndarray:
    """One array of `arrays_like`, from its bytes."""
    try:
        stream = io.BytesIO(tensor)
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }[version]
        shape, fortran_order, dtype = read_header(stream)
    except Exception:  # the sender chose the bytes: any failure to read them is theirs
        raise ValueError(f"weight array {index} is not a .npy array") from None
    if not all(type(length) is int for length in shape) or shape != want.shape:
        raise ValueError(f"weight array {index} has shape {shape}, the model's is {want.shape}")
    if dtype.kind != "f":
        raise ValueError(f"weight array {index} holds {dtype}, not floating-point numbers")
    if len(tensor) - stream.tell() != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"weight array {index} does not hold the bytes its header says")
    flat = np.frombuffer(tensor, dtype=dtype, offset=stream.tell())
    return flat.reshape(want.shape, order="F" if fortran_order else "C").copy()


def weights_problem(
    weights: list[np.ndarray], expected: list[np.ndarray], max_magnitude: float = math.inf
) -> str | None:
    """Why `weights` are not a model shaped like `expected`, or None if they are.

    The answer depends on the arrays alone, so that it says nothing about anyone's patients.

    Returns
    -------
    str or None
        The first problem found: a wrong number or shape of arrays, numbers that are not
        floating-point, NaN or infinite values, or a value beyond `max_magnitude`.
    """
    if len(weights) != len(expected):
        return f"{len(weights)} weight arrays where the model has {len(expected)}"
    for i, (got, want) in enumerate(zip(weights, expected, strict=True)):
        if np.shape(got) != want.shape:
            return f"weight array {i} has shape {np.shape(got)}, the model's is {want.shape}"
        if not np.issubdtype(np.asarray(got).dtype, np.floating):
            return f"weight array {i} holds {np.asarray(got).dtype}, not floating-point numbers"
        if not np.isfinite(got).all():
            return f"weight array {i} holds NaN or infinite values"
        if got.size and np.abs(got).max() > max_magnitude:
            return f"weight array {i} holds values beyond {max_magnitude:g} in magnitude"
    return None


@torch.no_grad()
def predict_risk(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted probability of the disease for each row of x."""
    model.eval()
    return torch.sigmoid(model(torch.as_tensor(x)).squeeze(-1)).numpy()


def clinical_metrics(
    y_true: np.ndarray, risk: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """What clinicians read of a model's predicted risks, computed with scikit-learn.

    Parameters
    ----------
    y_true : np.ndarray
        Each patient's label (1: has the disease).
    risk : np.ndarray
        Each patient's predicted risk.
    threshold : float
        The decision threshold: a risk at or above it is called positive.

    Returns
    -------
    dict[str, float | None]
        Discrimination (`auc`, None when only one class is present), the figures at the
        threshold (accuracy, sensitivity, specificity, precision, f1), the calibration of the
        risks (`brier`, log `loss`) and the `threshold` itself.
    """
    predicted = (risk >= threshold).astype(int)
    both_classes = len(np.unique(y_true)) == 2
    return {
        "auc": float(roc_auc_score(y_true, risk)) if both_classes else None,
        "accuracy": float(accuracy_score(y_true, predicted)),
        "sensitivity": float(recall_score(y_true, predicted, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(y_true, predicted, pos_label=0, zero_division=0)),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "brier": float(brier_score_loss(y_true, risk, pos_label=1)),
        "loss": float(log_loss(y_true, np.clip(risk, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "threshold": threshold,
    }


def save_model(
    path: Path,
    model: nn.Module,
    hidden_layers: Sequence[int],
    schema: "Schema",
    threshold: float,
) -> None:
    """Write model.pt atomically: the weights and what is needed to rebuild and use them.

    That is the model's hidden layers and inputs, the data dictionary and missing-value mode that
    encode them, and the decision threshold.
    """
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hidden_layers": list(hidden_layers),
            "input_names": schema.input_names,
            "data_dictionary": json.dumps(schema.spec),
            "missing_values": schema.missing_values,
            "decision_threshold": threshold,
        },
        buffer,
    )
    write_atomic(path, buffer.getvalue())


def load_model(path: Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """Rebuild the model saved in model.pt; returns (model, everything saved)."""
    saved = torch.load(path, weights_only=True)
    model = build_model(len(saved["input_names"]), saved["hidden_layers"])
    model.load_state_dict(saved["state_dict"])
    return model, saved
