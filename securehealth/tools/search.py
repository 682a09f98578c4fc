"""An accounted hyper-parameter search (sweep.py --search-budget).

Which of a few candidate settings trains the best model on the hospitals' own patients, paid for
from their lasting privacy ledgers: every trial is trained and scored with DP releases recorded
in the ledgers, which compose them; picking the best is post-processing, free. Entry points:
`parse_grid`, `check_affordable`, `run_search`, `best`.
"""

import itertools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securehealth import data, operating_point, settings
from securehealth.config import Settings
from securehealth.privacy.accountant import epsilon_spent, nearly_spent
from securehealth.privacy.ledger import LedgerError, PrivacyLedger

DEFAULT_GRID = "learning_rate=0.1,0.3,1"
# What a search may vary: how the federation trains, never what protects the
# patients (the budget, delta, adjacency, clipping norm stay the hospitals').
SEARCHABLE = (
    "learning_rate",
    "momentum",
    "batch_size",
    "rounds",
    "local_epochs",
    "hidden_layers",
    "server_momentum",
    "aggregation",
)
# The scores need the operating point's release: a run with a fixed threshold makes
# none, so every trial chooses one for this target.
SCORED_TARGET = "auto"


@dataclass(frozen=True)
class SearchOutcome:
    """A search's trials, and what its releases alone cost each hospital.

    `epsilon_alone` is the epsilon of the search by itself; each ledger composes it with all
    the rest.
    """

    trials: list["Trial"]
    epsilon_alone: tuple[float, ...]


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome: its settings, its score, and each hospital's epsilon after it.

    The score is the binormal ROC-AUC of the DP histograms; None where no fit could be made
    (`unscored` says why).
    """

    changes: dict[str, Any]
    score: float | None
    epsilon_after: tuple[float, ...]
    unscored: str = ""  # why there is no score


def parse_grid(text: str, cfg: Settings) -> list[dict[str, Any]]:
    """The candidates of a grid such as "learning_rate=0.1,0.3 hidden_layers=,16".

    Parameters
    ----------
    text : str
        NAME=V1,V2 parts separated by spaces, NAME one of SEARCHABLE; an empty value is the
        setting's empty value.
    cfg : Settings
        The run's settings, which each candidate changes.

    Returns
    -------
    list of dict
        Every combination of the values, each checked as settings are.

    Raises
    ------
    settings.SettingsError
        A part or value is wrong (named), or the grid gives fewer than 2 or more than 20.
    """
    axes = []
    for part in text.split():
        name, _, values = part.partition("=")
        name = name.replace("-", "_")
        if name not in SEARCHABLE or not values:
            raise settings.SettingsError(
                f"--grid {part!r}: give NAME=V1,V2 with NAME one of {', '.join(SEARCHABLE)}"
            )
        axes.append([(name, value) for value in values.split(",")])
    candidates = [dict(combination) for combination in itertools.product(*axes)]
    if not 2 <= len(candidates) <= 20:
        raise settings.SettingsError(f"--grid gives {len(candidates)} candidates: give 2 to 20")
    for candidate in candidates:
        _trial_settings(cfg, candidate, cfg.epsilon)  # SettingsError for a bad value
    return candidates


def _trial_settings(cfg: Settings, changes: dict[str, Any], epsilon: float):
    """A trial's settings: the run's, the candidate's changes, its ledger target."""
    trial = {**vars(cfg), **changes, "decision_threshold": SCORED_TARGET, "epsilon": epsilon}
    return settings.resolve(trial)


def spent_before(homes: list[Path], cfg: Settings) -> list[float]:
    """Each hospital's epsilon in its ledger before the search."""
    spent = []
    for home in homes:
        ledger = PrivacyLedger(home, cfg.epsilon, cfg.delta, cfg.adjacency)
        with ledger.transaction():
            spent.append(ledger.epsilon())
    return spent


def check_affordable(
    cfg: Settings, before: list[float], search_budget: float, candidates: int
) -> None:
    """Check that every hospital can afford the search, and each candidate can train.

    Parameters
    ----------
    cfg : Settings
        The run's settings; cfg.epsilon is each hospital's lifetime budget.
    before : list of float
        Each hospital's epsilon before the search.
    search_budget : float
        The epsilon the search may add to each hospital's.
    candidates : int
        How many candidates share the search budget, evenly.

    Raises
    ------
    LedgerError
        A candidate's share is not enough to train on (over 1 % of what its ledger will
        hold), or a hospital has not the search budget left: one line naming each that has
        not, and what to do.
    """
    from securehealth.forecast import SPENT_BUDGET_ADVICE

    share = search_budget / candidates
    if any(nearly_spent(spent, spent + share) for spent in before):
        raise LedgerError(
            f"a candidate's share of the search budget ({share:.3g}) is less than 1 % of "
            f"what a hospital's ledger would then hold: no trial could train; give a "
            f"larger --search-budget or fewer candidates"
        )
    short = [
        f"hospital {h} has {max(cfg.epsilon - spent, 0):.4g} left"
        for h, spent in enumerate(before)
        if spent + search_budget > cfg.epsilon or nearly_spent(spent, cfg.epsilon)
    ]
    if short:
        spent_out = any(nearly_spent(spent, cfg.epsilon) for spent in before)
        raise LedgerError(
            f"the search would spend epsilon {search_budget:g} of each hospital's lifetime "
            f"budget of {cfg.epsilon:g}, but {'; '.join(short)}: "
            + (
                SPENT_BUDGET_ADVICE
                if spent_out
                else "give a smaller --search-budget, and keep the rest for the training run"
            )
        )


def run_search(
    cfg: Settings,
    candidates: list[dict[str, Any]],
    search_budget: float,
    homes: list[Path],
    lasting: list[bool],
    files: list[Path | None],
    advance: Callable[[], None] = lambda: None,
) -> SearchOutcome:
    """Every candidate's trial, in order, each hospital paying from its ledger.

    A trial is the federation trained with the candidate's settings by the real hospitals
    (Opacus DP-SGD, each hospital's ledger calibrating the noise), then scored from their DP
    histograms (`_score`). The search budget is split evenly: trial k of K may take each
    hospital's ledger up to what it held before plus k/K of the budget; a first trial that
    cannot be scored stops the search (the others would not be either), spending only its share.

    Parameters
    ----------
    cfg, candidates, search_budget
        As for `check_affordable`, which is checked again here.
    homes : list of Path
        The hospitals' ledger folders.
    lasting : list of bool
        Whether each ledger is lasting (your own patients: known to this machine's index with
        its data file) or a demonstration's scratch one.
    files : list of Path or None
        Each hospital's data file as read once and judged (data.read_once), trained on
        whatever happens to the file meanwhile.
    advance : callable
        Called after each trial.
    """
    import torch

    torch.set_num_threads(1)
    before = spent_before(homes, cfg)
    check_affordable(cfg, before, search_budget, len(candidates))
    # A ledger plans each run id once: every search's trials are runs of their own.
    search_id = f"search-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    trials = []
    for k, changes in enumerate(candidates, 1):
        budgets = [spent + search_budget * k / len(candidates) for spent in before]
        trial, hospitals = _trial(cfg, changes, f"{search_id}-{k}", budgets, homes, lasting, files)
        trials.append(trial)
        advance()
        if trial.score is None and k == 1:  # every trial gets the same share: none would score
            break
    return SearchOutcome(trials, tuple(_epsilon_alone(h.ledger, search_id) for h in hospitals))


def _trial(cfg, changes, run_id, budgets, homes, lasting, files):
    """One candidate trained and scored, each hospital's ledger up to its `budgets` entry.

    Returns the Trial and the hospitals that trained it.
    """
    import torch

    from securehealth.hospital import Hospital  # the training stack
    from securehealth.model import build_model, get_weights
    from securehealth.tools.federation import federate

    hospitals = [
        Hospital(
            h,
            _trial_settings(cfg, changes, budgets[h]),
            run_id,
            home,
            None if files[h] is None else str(files[h]),
            lasting=lasting[h],
            evaluates=False,  # figures without DP: the search compares DP ones only
            own_file=data.own_file(cfg, h) if lasting[h] else None,
        )
        for h, home in enumerate(homes)
    ]
    trial_cfg = hospitals[0].cfg
    torch.manual_seed(cfg.seed)  # the server's initial model, the same for every trial
    model = build_model(hospitals[0].x.shape[1], trial_cfg.hidden_layers)
    weights = federate(
        get_weights(model),
        [lambda w, r, h=h: h.train_round(w, r)[:2] for h in hospitals],
        trial_cfg,
    )
    score, unscored = _score(hospitals, weights, trial_cfg)
    return Trial(changes, score, _epsilons(hospitals), unscored), hospitals


def _epsilon_alone(ledger: PrivacyLedger, search_id: str) -> float:
    """The epsilon of a search's releases by themselves, in one hospital's ledger."""
    with ledger.transaction():
        mine = [r for r in ledger.releases if r["run_id"].startswith(search_id)]
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in mine]
    return epsilon_spent(history, ledger.delta, ledger.adjacency) if history else 0.0


def _score(
    hospitals: list[Any], weights: list[Any], trial_cfg: Settings
) -> tuple[float | None, str]:
    """The trial's score, the binormal ROC-AUC of the hospitals' DP histograms, and why not.

    The score is that of the operating point's release (operating_point.py); None, with the
    reasons, where there is none.
    """
    import json

    released, declined = [], []
    for hospital in hospitals:
        histograms, report = hospital.release_operating_point(weights, trial_cfg.rounds)
        if histograms is None:
            declined.append(f"hospital {hospital.hospital}: {report.get('reason', '')}")
        else:
            released.append(operating_point.Release.of(histograms, json.loads(report["releases"])))
    try:
        point = operating_point.choose(released, operating_point.Target.parse(SCORED_TARGET))
    except operating_point.NoOperatingPoint as error:
        return None, "; ".join([str(error), *declined])
    return point.auc, ""


def _epsilons(hospitals: list[Any]) -> tuple[float, ...]:
    """Each hospital's epsilon, as its ledger holds it."""
    spent = []
    for hospital in hospitals:
        with hospital.ledger.transaction():
            spent.append(hospital.ledger.epsilon())
    return tuple(spent)


def best(trials: list[Trial]) -> Trial | None:
    """The trial with the highest score (the first of equals); None if none beat chance.

    Chance is 0.5: a noisy fit can score a useless model near 0.
    """
    scored = [t for t in trials if t.score is not None and math.isfinite(t.score)]
    useful = [t for t in scored if t.score > 0.5]
    return max(useful, key=lambda t: t.score) if useful else None
