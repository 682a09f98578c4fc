"""Scoring new patients with a finished run's model (predict.py).

Its model.pt holds the weights, the decision threshold and the data dictionary that encodes the
inputs, so new patients are checked and encoded exactly as the training patients were. Entry
points: `predictions`, `main`.
"""

import csv
import io
import json
import sys
from argparse import ArgumentParser
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securehealth import display
from securehealth.data import DataError, Schema
from securehealth.data.csv_files import read_csv
from securehealth.results import (
    METRICS_FILE,
    MODEL_FILE,
    RunDirError,
    check_new_output,
    finished_run_argument,
    read_json,
    spreadsheet_safe,
    write_atomic,
)


def model_schema(saved: dict[str, Any]) -> Schema:
    """The data dictionary stored in model.pt, missing values encoded as in training.

    A model trained with "drop" cannot score a patient with a gap: that is an error naming the
    line, never a patient silently left out.
    """
    mode = saved.get("missing_values", "fail")
    spec = json.loads(saved["data_dictionary"])
    return Schema(spec, "the run's data dictionary (model.pt)", "fail" if mode == "drop" else mode)


@dataclass(frozen=True)
class Scored:
    """New patients scored by a run's model, with the decision rule in words.

    `rows`: one a patient (its file line, patient id if declared, risk, and decision at the
    threshold, which each row states too); `metrics`: the clinical metrics if the file has
    labels; `warnings`: what the run warned about.
    """

    rows: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    rule: str
    warnings: list[str]


def predictions(run_dir: Path, data: Path) -> Scored:
    """Score the patients of `data` with the model of `run_dir`.

    Parameters
    ----------
    run_dir : Path
        A finished run's directory (model.pt, metrics.json).
    data : Path
        A CSV of patients, label column optional.

    Returns
    -------
    Scored
        The rule says where its threshold came from; the warnings are the run's (metrics.json).

    Raises
    ------
    DataError
        The file does not fit the run's data dictionary, or model.pt's inputs do not.
    """
    from securehealth.model import (  # PyTorch: after --help
        clinical_metrics,
        load_model,
        predict_risk,
    )

    model, saved = load_model(run_dir / MODEL_FILE)
    schema = model_schema(saved)
    if schema.input_names != saved["input_names"]:
        raise DataError(f"{run_dir / MODEL_FILE}: its inputs do not match its data dictionary")
    x, y, ids = read_csv(data, schema, labelled=False)
    risk, threshold = predict_risk(model, x), saved["decision_threshold"]
    rows = [
        {
            "line": i + 2,  # the header is line 1
            **({schema.patient_id: ids[i]} if schema.patient_id else {}),
            "risk": round(float(r), 6),
            "prediction": schema.decision(r >= threshold),
            "threshold": threshold,
        }
        for i, r in enumerate(risk)
    ]
    run = read_json(run_dir / METRICS_FILE)
    point = run.get("operating_point")
    if point is None:
        source = "the run's fixed decision threshold"
    elif point["chosen"]:
        source = f"the run's operating point, chosen for the {point['target']}"
    else:
        source = "a provisional threshold: the run chose no operating point"
    return Scored(
        rows,
        clinical_metrics(y, risk, threshold) if y is not None else None,
        f"{schema.label} {schema.decision(True)} where the risk is at least {threshold:.4g}, "
        f"{source} (model.pt)",
        run.get("warnings", []),
    )


def add_arguments(parser: ArgumentParser) -> None:
    """Add predict.py's flags to `parser`: --data, --output and --overwrite."""
    parser.add_argument("--data", required=True, help="a CSV of patients, label column optional")
    parser.add_argument("--output", default="", help="where to write the risks [default: stdout]")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it exists (never a run's file)",
    )


def main(description: str, argv: list[str] | None = None) -> int:
    """`python predict.py`: score new patients (exit 2, one line, on bad input)."""
    run_dir, args = finished_run_argument(description, argv, add_arguments)
    try:
        if args.output:
            check_new_output(Path(args.output), args.overwrite)
        scored = predictions(run_dir, Path(args.data))
    except (DataError, RunDirError) as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(scored.rows[0]) if scored.rows else ["line"])
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in scored.rows)
    summary = sys.stdout if args.output else sys.stderr  # the CSV may be on stdout
    if args.output:
        write_atomic(Path(args.output), table.getvalue().encode())
        print(f"{len(scored.rows)} patients scored: {args.output}")
    else:
        print(table.getvalue(), end="")
    print(f"Decision: {scored.rule}", file=summary)
    if scored.warnings:
        print(
            f"Warning: the run finished with warnings: {'; '.join(scored.warnings)}; do not "
            f"use this model for patients as it stands (its report.md)",
            file=sys.stderr,
        )
    if scored.metrics:
        print(f"Against their labels: {display.metrics_text(scored.metrics)}", file=summary)
    return 0
