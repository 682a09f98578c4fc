"""The run's report for a privacy officer and a clinician: report.md and its plots.

`write_report` makes report.md and the PNG plots in a run directory from its metrics.json
and model.pt. The server writes it at the end of every run; report.py writes it again.
"""

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # matplotlib without pyplot: files, no screen
from sklearn.metrics import roc_curve

from securehealth import clinical, display, settings
from securehealth import data as datasets
from securehealth.display import (
    METRICS,
    PRIVACY_COLUMNS,
    fmt,
    guarantee_text,
    privacy_cells,
    privacy_title,
)
from securehealth.model import load_model, predict_risk
from securehealth.privacy.ledger import OPERATING_POINT_SHARE
from securehealth.results import METRICS_FILE, MODEL_FILE, read_json, write_atomic

REPORT_FILE = "report.md"
AUDIT_FILE = "audit.json"  # written by audit.py
AUDIT_PLOT = "audit.png"
PLOTS = {
    "performance": "performance_per_round.png",
    "epsilon": "epsilon_per_round.png",
    "roc": "roc_curve.png",
    "calibration": "calibration.png",
}
CALIBRATION_BINS = 10  # of predicted risk, for the reliability diagram


def _figure(width, height):
    """A figure of `width` by `height` inches with one set of axes."""
    figure = Figure(figsize=(width, height), layout="tight")
    return figure, figure.subplots()


def plot_performance(metrics: dict[str, Any], path: Path) -> None:
    """Plot the global model's AUC and accuracy per round (and the pooled baselines) to `path`."""
    rounds = [r["round"] for r in metrics["rounds"]]
    figure, axes = _figure(7, 4.2)
    for key, label in (("auc", "ROC-AUC"), ("accuracy", "Accuracy")):
        axes.plot(rounds, [r["global"][key] for r in metrics["rounds"]], marker="o", label=label)
    for name, values in metrics.get("baselines", {}).items():
        if name.startswith("Pooled"):
            axes.axhline(values["auc"], linestyle="--", color="grey", label=f"ROC-AUC, {name}")
    axes.set(
        title="Global model on the server's reference test set",
        xlabel="Federated round",
        ylabel="Score (0 to 1)",
        ylim=(0, 1.02),
    )
    axes.set_xticks(rounds)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=150)


def plot_epsilon(metrics: dict[str, Any], path: Path) -> None:
    """Plot each hospital's cumulative epsilon per round, with its budget, to `path`."""
    figure, axes = _figure(7, 4.2)
    budgets = set()
    for hospital in metrics["privacy"]["hospitals"]:
        points = [
            (r["round"], r["hospitals"][hospital])
            for r in metrics["rounds"]
            if hospital in r["hospitals"]
        ]
        if points:
            axes.plot(
                [p[0] for p in points],
                [p[1]["epsilon"] for p in points],
                marker="o",
                label=f"Hospital {hospital}",
            )
            budgets.add(points[-1][1]["epsilon_budget"])
    for budget in sorted(budgets):
        axes.axhline(budget, linestyle="--", color="red", label=f"Budget, epsilon {budget:g}")
    axes.set(
        title=f"Privacy spent, cumulative (delta {metrics['privacy']['delta']:g}, "
        f"{metrics['privacy']['adjacency']})",
        xlabel="Federated round",
        ylabel="Epsilon spent",
        ylim=(0, max(budgets, default=1) * 1.1),
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=150)


def plot_roc(
    y: np.ndarray, risk: np.ndarray, auc: float | None, threshold: float, path: Path
) -> None:
    """Plot the ROC curve of `risk` against labels `y`, marking the operating point.

    Parameters
    ----------
    y : np.ndarray
        The reference test set's labels (0 healthy, 1 sick).
    risk : np.ndarray
        The final model's predicted risk for each of those patients.
    auc : float or None
        The ROC-AUC shown in the legend.
    threshold : float
        The decision threshold; the point it gives is marked in red.
    path : Path
        Where the PNG is saved.
    """
    false_positive, true_positive, _ = roc_curve(y, risk)
    figure, axes = _figure(5, 5)
    axes.plot(false_positive, true_positive, label=f"Final global model (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="Chance")
    at = risk >= threshold
    axes.scatter(
        [(at & (y == 0)).sum() / max((y == 0).sum(), 1)],
        [(at & (y == 1)).sum() / max((y == 1).sum(), 1)],
        color="red",
        zorder=3,
        label=f"Operating point (threshold {threshold:.3g})",
    )
    _save_unit_square(
        figure,
        axes,
        path,
        title="ROC curve, reference test set",
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        legend="lower right",
    )


def plot_calibration(y: np.ndarray, risk: np.ndarray, brier: float, path: Path) -> None:
    """Plot the reliability diagram of `risk` against labels `y` to `path`.

    The observed share of sick patients against the predicted risk, in CALIBRATION_BINS
    bins of equal width (scikit-learn's calibration_curve); a calibrated model lies on
    the diagonal. `brier` is the Brier score shown in the legend.
    """
    from sklearn.calibration import calibration_curve

    observed, predicted = calibration_curve(y, risk, n_bins=CALIBRATION_BINS)
    figure, axes = _figure(5, 5)
    axes.plot(predicted, observed, marker="o", label=f"Final global model (Brier {brier:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="Perfectly calibrated")
    _save_unit_square(
        figure,
        axes,
        path,
        title="Calibration, reference test set",
        xlabel="Predicted risk",
        ylabel="Observed share with the disease",
        legend="upper left",
    )


def _save_unit_square(figure, axes, path, *, title, xlabel, ylabel, legend):
    """Label a plot of rates or risks (0 to 1 on both axes), and save it."""
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(loc=legend)
    figure.savefig(path, dpi=150)


def operating_point_section(metrics: dict[str, Any]) -> list[str]:
    """Return report.md's operating-point section, one paragraph per item.

    How the decision threshold was chosen and what it does on the reference set:
    sensitivity and specificity with 95 % intervals, the confusion counts, the
    prevalence and the majority-class baseline.
    """
    final, point = metrics["final"]["global"], metrics.get("operating_point")
    confusion = clinical.Confusion(
        *(final[name] for name in clinical.Confusion.__dataclass_fields__)
    )
    found, missed = confusion.true_positives, confusion.false_negatives
    alarms, cleared = confusion.false_positives, confusion.true_negatives
    sensitivity, specificity = confusion.sensitivity_interval(), confusion.specificity_interval()
    lines = ["### Operating point", display.operating_point_text(metrics)]
    if point is not None and point["chosen"]:
        lines.append(
            f"How: after the last round each hospital scored its own training patients "
            f"with the final model and released per-class histograms of the scores with "
            f"Gaussian noise, charged to its privacy ledger (the last release in the "
            f"privacy table: it would cost {OPERATING_POINT_SHARE:.0%} of the budget left "
            f"alone, and training was calibrated for the rest). The server summed them, "
            f"fitted each class's scores with a normal distribution and put the threshold "
            f"where the fit meets the target; the fit expected sensitivity "
            f"{point['expected_sensitivity']:.2f} and specificity "
            f"{point['expected_specificity']:.2f}. The reference test set played no part "
            f"in the choice; the figures per round, before it was made, are at 0.5."
        )
    lines += [
        _table(
            ["", "Called sick", "Called healthy", "Total"],
            [
                ["Sick", found, missed, confusion.positives],
                ["Healthy", alarms, cleared, confusion.negatives],
            ],
        ),
        f"Sensitivity {final['sensitivity']:.3f} (95% CI {sensitivity[0]:.3f} to "
        f"{sensitivity[1]:.3f}); specificity {final['specificity']:.3f} (95% CI "
        f"{specificity[0]:.3f} to {specificity[1]:.3f}); Wilson intervals over the "
        f"reference patients. {_predictive_values_text(confusion)}",
    ]
    if final["accuracy"] < confusion.majority_accuracy:
        lines.append(
            f"Accuracy {final['accuracy']:.3f} is below the {confusion.majority_accuracy:.3f} "
            f"of calling everyone the majority class: where one class is much more common, "
            f"accuracy rewards calling everyone that class. Read sensitivity and "
            f"specificity instead (the run warns when their sum is at most 1, that "
            f"baseline's)."
        )
    if point is not None and point["chosen"]:
        lines += _fit_against_reference(point, sensitivity, specificity)
    return lines


def _predictive_values_text(confusion: clinical.Confusion) -> str:
    """PPV and NPV in words, at the reference set's prevalence."""
    ppv, npv = confusion.predictive_values()
    parts = [
        f"{share:.1%} of those called {called} are {truly} ({name})"
        for share, called, truly, name in (
            (ppv, "sick", "sick", "PPV"),
            (npv, "healthy", "healthy", "NPV"),
        )
        if share is not None
    ]
    return (
        f"At this prevalence ({confusion.prevalence:.1%}), " + " and ".join(parts) + "; "
        "at another hospital's prevalence these two differ, sensitivity and specificity "
        "do not."
        if parts
        else ""
    )


def _fit_against_reference(point, sensitivity, specificity) -> list[str]:
    """Return a line where the fit's expectation lies outside the reference set's 95 % interval.

    The figures a clinician should trust are the reference set's.
    """
    outside = [
        f"{name} {expected:.2f}, outside the reference set's 95% CI {low:.2f} to {high:.2f}"
        for name, expected, (low, high) in (
            ("sensitivity", point["expected_sensitivity"], sensitivity),
            ("specificity", point["expected_specificity"], specificity),
        )
        if not low <= expected <= high
    ]
    if not outside:
        return []
    return [
        "**The fit and the reference set disagree:** the fit expected "
        + " and ".join(outside)
        + ". The hospitals' training patients (whose noised scores chose the threshold) "
        "and the reference patients differ in case mix, or the fit was off under the "
        "noise; the reference figures above are the ones measured on patients."
    ]


def subgroup_section(final: dict[str, Any]) -> list[str]:
    """Return report.md's subgroup section, one paragraph per item.

    The figures in each subgroup the data dictionary marks, with 95 % intervals, and
    the gaps found (clinical.subgroup_figures).

    Parameters
    ----------
    final : dict
        The final global model's figures on the reference set (metrics.json's
        `final.global`).

    Returns
    -------
    list of str
        The section's heading and paragraphs; empty for a run whose metrics.json has
        no subgroup figures.
    """
    if "subgroups" not in final:
        return []
    lines = ["### Subgroups"]
    if not final["subgroups"]:
        return lines + [
            'The data dictionary marks no feature with "subgroups" '
            "(docs/how-to/your-own-csv.md, Subgroups), so no subgroup figures are shown."
        ]
    return lines + [_subgroup_table(final["subgroups"]), *_subgroup_notes(final)]


def _subgroup_cell(figure):
    """A subgroup's figure with its 95 % interval, or "n/a" where there is none."""
    if figure is None:
        return "n/a"
    value, (low, high) = figure
    return f"{value:.3f} ({low:.2f} to {high:.2f})"


def _subgroup_table(subgroups):
    """The table of each subgroup's patients, AUC, sensitivity and specificity."""
    return _table(
        ["Subgroup", "Patients (sick)", "AUC (95% CI)", "Sensitivity", "Specificity"],
        [
            [
                g["subgroup"],
                f"{g['patients']} ({g['positives']})",
                *(_subgroup_cell(g[name]) for name in ("auc", "sensitivity", "specificity")),
            ]
            for g in subgroups
        ],
    )


def _subgroup_notes(final):
    """The gaps found, what "n/a" means, the patients in no subgroup, and how to read it."""
    gaps = [f"{g['subgroup']}: {gap}" for g in final["subgroups"] for gap in g["gaps"]]
    rule = (
        f"a figure {clinical.SUBGROUP_GAP:.2f} or more below all reference patients', "
        f"with its 95% interval below it too"
    )
    everyone = sum(final[name] for name in clinical.Confusion.__dataclass_fields__)
    unrecorded = [
        f"{n} have no recorded {feature}"
        for feature, n in final.get("subgroups_unrecorded", {}).items()
        if n
    ]
    return [
        f"**Gaps** ({rule}): " + "; ".join(gaps) + "."
        if gaps
        else f"No gap ({rule}). Small subgroups have wide intervals: read them first.",
        f"n/a: the subgroup lacks a class, or (AUC) has fewer than "
        f"{clinical.MIN_CLASS} patients of one; a sensitivity or specificity is "
        f"flagged only from at least {clinical.MIN_CLASS} patients of its class."
        + (
            f" Of the {everyone} reference patients, " + ", ".join(unrecorded) + ", and "
            "are in none of that feature's subgroups."
            if unrecorded
            else ""
        ),
        "At one threshold, sensitivity and specificity differ between subgroups whose "
        "risk differs from the rest (an age band, say: a low-risk group has few patients "
        "above the threshold, a high-risk group many), and the AUC within a band of a "
        "risk factor is lower because that factor no longer tells its patients apart. A "
        "gap says where the model's calls are weaker; whether that is the case mix or "
        "unfairness needs a clinician's reading.",
    ]


def _table(header, rows):
    """A Markdown table: `header`, then `rows`."""
    return display.markdown_table([header, *rows])


def _metric_rows(named):
    """A table row of clinical metrics for each (name, metrics)."""
    return [[name, *(fmt(values[key]) for key, _ in METRICS)] for name, values in named]


def _audit_section(audit):
    """The canary audit (audit.py), then the membership-inference attack."""
    canaries = audit.get("canary_audit")
    sections = canary_audit_section(canaries) if canaries else []
    attack = audit.get("membership_inference") if canaries else audit  # an earlier audit.json
    if attack:
        sections += _membership_inference_section(attack)
    return sections


def canary_audit_section(canaries: dict[str, Any]) -> list[str]:
    """Return the canary audit's section: what it did, its table, verdict and plot."""
    product = canaries["variants"]["product"]
    return [
        "## Privacy audit: canaries in one run",
        f"Each variant trained the audit's own federation ({canaries['dataset']}, "
        f"{canaries['rounds']} rounds, {canaries['adjacency']}), with canaries in hospital "
        f"{canaries['audited_hospital']}'s rows, which it sampled at its "
        f"{product['patients']} patients' rate ({product['sample_rate']:.3g}, "
        f"{product['steps']} steps). A lower bound is the least epsilon the guesses about "
        f"the canaries prove, at {canaries['confidence']:.0%} confidence; a correct "
        f"training's stays at or below its claim. The verdict rests on the white-box "
        f"bound alone (a server that sees each round's update, without SecAgg+; "
        f"{canaries['guess_share']:.0%} of the canaries guessed), by the Gaussian "
        f"analysis where the reported releases lie within the Gaussian curve at the "
        f"claim, else by the (eps, delta) one; the other bounds are figures. Black-box: "
        f"anyone holding model.pt.",
        audit_table(canaries),
        f"**{canaries['summary']}**",
        f"![Canary audit]({AUDIT_PLOT})",
    ]


def _membership_inference_section(audit):
    """The membership-inference attack's section: what it tried, its table and verdict."""

    def interval(summary):
        return f"{summary['mean']:.3f} ({summary['low']:.3f} to {summary['high']:.3f})"

    return [
        "## Membership-inference audit",
        f"The {audit['attack']} tried to tell the hospitals' training patients "
        f"({audit['members']}) from their held-out patients ({audit['non_members']}), "
        f"in {audit['repetitions']} balanced draws; 95% intervals in brackets. An AUC "
        f"of 0.5 is chance; the advantage is that of the best threshold found after "
        f"the fact, so even a coin-flip attack shows some on this few patients.",
        _table(
            ["Model", "Attack ROC-AUC", "Attack advantage (TPR - FPR)"],
            [
                [name, interval(m["auc"]), interval(m["advantage"])]
                for name, m in audit["models"].items()
            ]
            + [
                [
                    f"Most any attack can reach at epsilon {audit['epsilon']:.3g}, delta "
                    f"{audit['delta']:g}",
                    f"{audit['bound']['auc']:.3f}",
                    f"{audit['bound']['advantage']:.3f}",
                ]
            ],
        ),
        audit["verdict"],
    ]


def audit_table(canaries: dict[str, Any]) -> str:
    """Return a Markdown table of the canary audit's lower bounds beside each claimed epsilon."""
    rows = []
    for v in canaries["variants"].values():
        used = v["epsilon_of_noise_used"]
        threats = v["threat_models"]
        rows.append(
            [
                v["description"],
                f"{v['claimed_epsilon']:.3g}",
                "not known" if used is None else f"{used:.3g}",
                f"{v['lower_bound']:.2f} ({v['analysis']})",
                v["verdict"],
                f"{threats['white-box']['gaussian']['epsilon']:.2f} / "
                f"{threats['white-box']['epsilon-delta']['epsilon']:.2f}",
                f"{threats['black-box']['gaussian']['epsilon']:.2f} / "
                f"{threats['black-box']['epsilon-delta']['epsilon']:.2f}",
            ]
        )
    return _table(
        [
            "Variant",
            "Claimed epsilon",
            "Epsilon of the noise used",
            "Lower bound (white-box; analysis)",
            "Verdict",
            "White-box (Gaussian / (eps, delta))",
            "Black-box (Gaussian / (eps, delta))",
        ],
        rows,
    )


def hospital_evaluations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Return the simulated hospitals' own evaluations of the final model, {hospital: metrics}.

    In deployment these stay at the hospitals; a simulation's run directory holds them.
    """
    found = {}
    for path in sorted(Path(run_dir, "hospitals").glob("hospital-*/evaluation.json")):
        found[path.parent.name.split("-")[1]] = read_json(path)[-1]
    return found


def write_report(run_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write report.md and the plots for a finished run.

    Parameters
    ----------
    run_dir : str or Path
        The run directory, holding metrics.json and model.pt; the report and plots are
        written there.
    metrics : dict, optional
        The run's metrics.json, read from `run_dir` if not given.

    Returns
    -------
    Path
        The path of report.md.
    """
    run_dir = Path(run_dir)
    metrics = metrics or read_json(run_dir / METRICS_FILE)
    cfg = settings.resolve(metrics["config"])
    _write_plots(run_dir, metrics, cfg)
    sections = [
        *_summary_section(run_dir, metrics, cfg),
        *_privacy_section(metrics["privacy"], cfg),
        *_performance_section(metrics),
        *_hospital_section(run_dir, cfg),
    ]
    if (run_dir / AUDIT_FILE).exists():
        sections += _audit_section(read_json(run_dir / AUDIT_FILE))
    sections += [
        "## Settings",
        _table(["Setting", "Value"], [[k, f"`{v}`"] for k, v in metrics["config"].items()]),
    ]
    path = run_dir / REPORT_FILE
    write_atomic(path, ("\n\n".join(sections) + "\n").encode())
    return path


def _write_plots(run_dir, metrics, cfg):
    """Save the four plots into the run directory, scoring the reference set with model.pt."""
    model, _ = load_model(run_dir / MODEL_FILE)
    test_x, test_y, _ = datasets.reference_test_set(cfg)
    risk = predict_risk(model, test_x)
    final = metrics["final"]["global"]
    plot_performance(metrics, run_dir / PLOTS["performance"])
    plot_epsilon(metrics, run_dir / PLOTS["epsilon"])
    plot_roc(test_y, risk, final["auc"], final["threshold"], run_dir / PLOTS["roc"])
    plot_calibration(test_y, risk, final["brier"], run_dir / PLOTS["calibration"])


def _summary_section(run_dir, metrics, cfg):
    """The title, the run's status and data, and its warnings."""
    data = metrics["data"]
    return [
        f"# SecureHealth-ML run report: {run_dir.name}",
        f"Status: **{metrics['status']}**. Data: {data['name']} ({len(data['inputs'])} model "
        f"inputs, encoded from the data dictionary's declared ranges and categories, never "
        f"from statistics of a hospital's rows). {cfg.num_clients} hospitals, "
        f"{len(metrics['rounds'])} rounds of federated averaging.",
        *(
            [
                "**Do not use this model for patients as it stands:** "
                + "; ".join(metrics["warnings"])
                + "."
            ]
            if metrics.get("warnings")
            else []
        ),
    ]


def _privacy_section(privacy, cfg):
    """The guarantee in words, each hospital's spending, what is not covered, and the plot."""
    hospitals = privacy["hospitals"]
    return [
        "## Privacy",
        guarantee_text(privacy).replace("differential privacy", "**differential privacy**")
        + " In words: whatever anyone learns from everything a hospital sent out, the "
        "final model included, would be almost as likely had any one patient's record "
        f"been different (e^epsilon is 2.72 at epsilon 1; delta is {privacy['delta']:g}).",
        f"**{privacy_title(privacy)}**",
        _table(
            PRIVACY_COLUMNS,
            [privacy_cells(datasets.hospital_name(cfg, h), p) for h, p in hospitals.items()],
        ),
        "Epsilon is computed by Google's dp-accounting from every release the hospital "
        "made from these patients, in every run (metrics.json lists them under "
        "`privacy.hospitals.<i>.releases`: noise multiplier, sample rate, steps), so "
        "anyone can recompute it. What is not covered: a hospital's participation and its "
        "number of training patients (they weight the average, and are public under "
        "replace-one adjacency); a patient with several records counts as several "
        "patients; the noise comes from a pseudo-random generator seeded from the "
        f"operating system, not a cryptographically secure one (secure_rng: "
        f"{privacy['secure_rng']}).",
        *(
            # The hospital's own words, as code: no Markdown or HTML of theirs is rendered.
            f"**Hospital {h}:** `{p['ledger_reset'].replace('`', chr(39))}`"
            for h, p in hospitals.items()
            if p.get("ledger_reset")
        ),
        "![Epsilon per round](" + PLOTS["epsilon"] + ")",
    ]


def _performance_section(metrics):
    """The final model's figures beside the baselines, its operating point, subgroups and plots."""
    final, data = metrics["final"]["global"], metrics["data"]
    sections = [
        "## Model performance",
        f"On the server's reference test set ({data['test_patients']} patients: "
        f"{data['test_set']}), decision threshold {final['threshold']:.3g}:",
        _table(
            ["Model", *(title for _, title in METRICS)],
            _metric_rows([("Federated, DP", final), *metrics.get("baselines", {}).items()]),
        ),
        *operating_point_section(metrics),
        "![ROC curve](" + PLOTS["roc"] + ")",
        *subgroup_section(final),
        *_calibration_section(final),
        "![AUC and accuracy per round](" + PLOTS["performance"] + ")",
    ]
    if metrics.get("baselines"):
        sections.append(
            "Baselines, trained in the same process on the same data: *Pooled data, no "
            "DP* is the upper bound nobody can have in reality; *FedAvg, no DP* the same "
            "federation without privacy; *Hospital N alone, DP* each hospital on its own "
            "at its own budget."
        )
    return sections


def _calibration_section(final):
    """The Brier score, how calibrated the risks are, and the reliability diagram."""
    return [
        "### Calibration",
        f"Brier score {final['brier']:.3f} (0 is perfect; "
        f"{final['prevalence'] * (1 - final['prevalence']):.3f} for always predicting the "
        f"prevalence). "
        + (
            clinical.Calibration(**final["calibration"]).text()
            if "calibration" in final
            else "Risks from a model trained with DP noise are often compressed towards "
            "the middle: read them as a ranking, and the decision at the operating point, "
            "rather than as probabilities, unless this diagram lies on its diagonal."
        ),
        "![Calibration](" + PLOTS["calibration"] + ")",
    ]


def _hospital_section(run_dir, cfg):
    """Each simulated hospital's own evaluation of the final model (none in deployment)."""
    evaluations = hospital_evaluations(run_dir)
    if not evaluations:
        return []
    return [
        "### At each hospital",
        "Each hospital evaluated the final model on its own held-out patients. These "
        "figures are not covered by the DP guarantee, so in deployment they stay at "
        "the hospital; this simulation holds every hospital, so they are shown here.",
        _table(
            ["Hospital", "Held-out patients", *(t for _, t in METRICS)],
            [
                [
                    datasets.hospital_name(cfg, h),
                    e["patients"],
                    *(fmt(e[k]) for k, _ in METRICS),
                ]
                for h, e in evaluations.items()
            ],
        ),
    ]
