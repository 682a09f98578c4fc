"""Scoring new patients with a finished run's model (predict.py): its model.pt holds
the weights, the decision threshold and the data dictionary that encodes the inputs,
so new patients are checked and encoded exactly as the training patients were."""

import csv
import io
import json
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from model import clinical_metrics, load_model, predict_risk
from securehealth import display
from securehealth.data import DataError, Schema
from securehealth.data.csv_files import read_csv
from securehealth.results import MODEL_FILE, finished_run_argument, write_atomic


def model_schema(saved: dict[str, Any]) -> Schema:
    """The data dictionary stored in model.pt, missing values encoded as in training.
    A model trained with "drop" cannot score a patient with a gap: that is an error
    naming the line, never a patient silently left out."""
    mode = saved.get("missing_values", "fail")
    spec = json.loads(saved["data_dictionary"])
    return Schema(spec, "the run's data dictionary (model.pt)", "fail" if mode == "drop" else mode)


def predictions(run_dir: Path, data: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """One row per patient of `data` (its file line, patient id if declared, risk and
    decision at the model's threshold), and the clinical metrics if it has labels."""
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
        }
        for i, r in enumerate(risk)
    ]
    return rows, (clinical_metrics(y, risk, threshold) if y is not None else None)


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a CSV of patients, label column optional")
    parser.add_argument("--output", default="", help="where to write the risks [default: stdout]")


def main(description: str, argv: list[str] | None = None) -> int:
    run_dir, args = finished_run_argument(description, argv, add_arguments)
    try:
        rows, metrics = predictions(run_dir, Path(args.data))
    except DataError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["line"])
    writer.writeheader()
    writer.writerows(rows)
    summary = sys.stdout if args.output else sys.stderr  # the CSV may be on stdout
    if args.output:
        write_atomic(Path(args.output), table.getvalue().encode())
        print(f"{len(rows)} patients scored: {args.output}")
    else:
        print(table.getvalue(), end="")
    if metrics:
        print(f"Against their labels: {display.metrics_text(metrics)}", file=summary)
    return 0
