"""A hospital's training and its own records, `Hospital`: loaded only to train or end a run.

DP-SGD against its privacy ledger, a privacy report for the server, and its evaluation of
every global model on its held-out patients, which stays here (node.open_hospital loads it).
A server may send any global model: the hospital checks it first (max_weight) and trains so
that what it sends back is private whatever it was sent (docs/explanation/threat-model.md).
"""

from datetime import UTC, datetime
from logging import ERROR
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log

from securehealth import data, operating_point
from securehealth.model import (
    build_model,
    clinical_metrics,
    get_weights,
    predict_risk,
    set_weights,
    weights_problem,
)
from securehealth.privacy import data_index, dpsgd
from securehealth.privacy.accountant import ACCOUNTANT, BudgetExhausted, NoiseBeyondLimit
from securehealth.privacy.ledger import (
    DP_SGD,
    OPERATING_POINT,
    LedgerError,
    PrivacyLedger,
    lasting_trace,
)
from securehealth.privacy.report import Adjacency, PrivacyReport, ReportedRelease, ReportStatus
from securehealth.privacy.schedule import noise_limit, sample_rate_and_steps
from securehealth.results import has_finished, read_json, write_json
from securehealth.state_directory import EVALUATION_FILE, StateDirectory

# What a release in the report to the server says: enough to recompute epsilon, and
# no run ids of other federations (they would link this hospital's participation).
RELEASE_KEYS = ("round", "noise_multiplier", "sample_rate", "steps", "adjacency")


class Hospital:
    """A hospital: DP-SGD rounds accounted in its privacy ledger, and its own evaluations.

    It evaluates every global model it receives on its own held-out patients. That
    evaluation stays in its state directory: it is not covered by the DP guarantee, so
    it is never sent.
    """

    def __init__(
        self,
        hospital,
        cfg,
        run_id,
        state_dir,
        data_file=None,
        schema_file=None,
        patients=None,
        ledger_dir=None,
        lasting=False,
        own_file=None,
        evaluates=True,
    ):
        """Load the hospital's patients and open its privacy ledger.

        Parameters
        ----------
        hospital : int
            This hospital's number.
        cfg : Settings
            The run's settings, with this hospital's own in place of the server's.
        run_id : int
            The Flower run it trains in.
        state_dir : str or Path
            Its state directory (node.hospital_state_dir), for its status file.
        data_file : str, optional
            The file of its patients; None where they are generated or bundled.
        schema_file : str, optional
            The data dictionary of its own CSV file.
        patients : tuple, optional
            ((x, y), (held-out x, y)) in place of the hospital's own data and held-out
            rule: for a benchmark's published split of public data only.
        ledger_dir : Path, optional
            Where its privacy ledger lives (node.ledger_dir); else in `state_dir`.
        lasting : bool
            Whether its ledger is known to this machine's index (privacy/data_index.py):
            node.open_hospital's are; tools' scratch ledgers and demonstrations' are not.
        own_file : Path, optional
            The file of its own patients, for that index to claim.
        evaluates : bool
            Whether it keeps an evaluation of the models on its held-out patients (a
            search's trials compare DP figures only, and keep none).

        Raises
        ------
        data.DataError
            When its data cannot be read, fails its dictionary or is too small.
        LedgerError
            When its ledger's directory cannot be written.
        """
        torch.set_num_threads(1)  # a tiny model: threads cost more than they give
        self.hospital, self.cfg, self.run_id = hospital, cfg, run_id
        self.state_dir, self.evaluates = Path(state_dir), evaluates
        (self.x, self.y), self.held_out = patients or data.hospital_data(
            cfg, hospital, data_file, schema_file
        )
        self.ledger = PrivacyLedger(
            ledger_dir or state_dir, cfg.epsilon, cfg.delta, cfg.adjacency, lasting, own_file
        )

    def train_round(
        self, parameters: list[np.ndarray], server_round: int
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """One round of DP-SGD from the server's global weights, accounted in the ledger.

        The global model is checked before any patient is touched. The hospital declines
        the round for a malformed model, for noise beyond what the server's
        max_update_norm allows, or for a budget that cannot pay for it.

        Parameters
        ----------
        parameters : list[np.ndarray]
            The global model's weights, as the server sent them.
        server_round : int
            The round, as the server numbers it.

        Returns
        -------
        tuple[list[np.ndarray], int, dict[str, Any]]
            The new weights, the number of training patients and the privacy report
            (Flower metrics); where it declines, the weights unchanged, 0 and a report
            saying why.

        Raises
        ------
        ValueError
            When it trains on more patients than the server's max_patients allows.
        LedgerError
            When its data is accounted in another privacy ledger on this machine.
        """
        if len(self.y) > self.cfg.max_patients:  # the server would reject the update
            raise ValueError(
                f"hospital {self.hospital} trains on {len(self.y)} patients, more than "
                f"the server's cap on one hospital's weight (max_patients "
                f"{self.cfg.max_patients}): the server's operator must raise max_patients"
            )
        problem = self._model_problem(parameters)
        if problem:  # decided on the arrays alone, before any patient is touched
            with self.ledger.transaction():
                reason = (
                    f"the server sent a malformed global model ({problem}); this hospital "
                    f"does not train on it (its bound on weights: max_weight "
                    f"{self.cfg.max_weight:g})"
                )
                return parameters, 0, self._report(ReportStatus.REFUSED, server_round, reason)
        provisional = operating_point.working_threshold(self.cfg.decision_threshold)
        self._evaluate_locally(parameters, server_round - 1, provisional)
        return self._private_round(parameters, server_round)

    def _private_round(
        self, parameters: list[np.ndarray], server_round: int
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train a round on a checked global model, unless the ledger refuses it (train_round)."""
        cfg = self.cfg
        sample_rate, steps = self.sampling()
        limit = noise_limit(self.sampled_patients, sum(p.size for p in parameters), cfg)
        # Read, check, train and record under the ledger's lock: a concurrent training
        # on the same patients waits, and sees this one's release.
        with self.ledger.transaction():
            self._note_dataset()
            try:
                sigma = self.ledger.noise_for_round(
                    self.run_id,
                    sample_rate,
                    steps,
                    cfg.rounds * steps,
                    limit,
                    operating_point=operating_point.Target.parse(cfg.decision_threshold)
                    is not None,
                )
            except NoiseBeyondLimit as refusal:
                reason = self._noise_refusal(refusal)
                return parameters, 0, self._report(ReportStatus.REFUSED, server_round, reason)
            except BudgetExhausted as refusal:
                return parameters, 0, self._report(ReportStatus.REFUSED, server_round, str(refusal))
            model = self._model(parameters)
            steps_taken = self._train(model, sigma, (sample_rate, steps))
            self.ledger.record(self.run_id, server_round, sigma, sample_rate, steps_taken)
            return get_weights(model), len(self.y), self._report(ReportStatus.TRAINED, server_round)

    def _note_dataset(self) -> None:
        """Record in the ledger which patients this training uses; LedgerError if claimed.

        A ledger index on the machine refuses data already accounted in another
        ledger; the paths it names stay in this hospital's own log.
        """
        try:
            self.ledger.note_dataset(
                data.fingerprint(self.x, self.y),
                len(self.y),
                # For the ledger index's claim on the hospital's own data file.
                data.patients_fingerprint(((self.x, self.y), self.held_out))
                if self.ledger.data_file is not None
                else "",
            )
        except data_index.DataClaimed as error:
            log(ERROR, "Hospital %s: %s", self.hospital, error)
            raise LedgerError(
                f"hospital {self.hospital}'s data is accounted in another privacy "
                f"ledger on its machine, so it does not train with this one (details in "
                f"its own log)"
            ) from None

    def _noise_refusal(self, refusal: NoiseBeyondLimit) -> str:
        """Why the noise this run needs is more than any update the server accepts."""
        cfg = self.cfg
        if refusal.least_epsilon is None:
            return (
                f"max_update_norm {cfg.max_update_norm:g} is too small for any "
                f"budget: even the least noise this hospital trains with would move the "
                f"model further than that a round, and the server would reject every "
                f"update; raise max_update_norm or lower learning_rate"
            )
        return (
            f"epsilon {cfg.epsilon:g} is too small for {cfg.rounds} rounds: the noise "
            f"it needs would move the model further than max_update_norm "
            f"{cfg.max_update_norm:g} a round, and the server would reject every "
            f"update; with {len(self.y)} training patients this hospital needs a budget of at "
            f"least {refusal.least_epsilon:.3g} for {cfg.rounds} rounds (or fewer "
            f"rounds)"
        )

    @property
    def sampled_patients(self) -> int:
        """The rows DP-SGD samples from, which set its sample rate and steps."""
        return len(self.y)

    def sampling(self) -> tuple[float, int]:
        """(Poisson sample rate, noisy steps) of one round."""
        return sample_rate_and_steps(self.sampled_patients, self.cfg)

    def _train(self, model: torch.nn.Module, sigma: float, sampling: tuple[float, int]) -> int:
        """One round of DP-SGD on the training patients; returns the steps taken."""
        return dpsgd.train_private(model, self.x, self.y, self.cfg, sigma, sampling=sampling)

    def release_operating_point(
        self, parameters: list[np.ndarray], server_round: int
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Release this run's noisy score histograms for its operating point (operating_point.py).

        This is the run's one release of it: the final model's scores of the training
        patients as per-class histograms with Gaussian noise, recorded in the ledger first.

        Parameters
        ----------
        parameters : list[np.ndarray]
            The final model's weights, as the server sent them.
        server_round : int
            The round, as the server numbers it.

        Returns
        -------
        tuple[np.ndarray or None, dict[str, Any]]
            The noisy histograms and the privacy report; or None and a report saying
            why not (no operating point reserved, already released, noise that would
            drown its patients, a malformed model).
        """
        with self.ledger.transaction():
            problem = self._model_problem(parameters)
            if problem:
                reason = f"the server sent a malformed final model ({problem})"
                return None, self._report(ReportStatus.DECLINED, server_round, reason)
            try:
                noise = self.ledger.operating_point_noise(self.run_id)
            except BudgetExhausted as refusal:
                return None, self._report(ReportStatus.DECLINED, server_round, str(refusal))
            std = operating_point.histogram_noise_std(noise, self.cfg.adjacency)
            if operating_point.drowned(std, len(self.y)):
                reason = (
                    f"its noise (std {std:.3g} a count) would drown its {len(self.y)} "
                    f"training patients: nothing released"
                )
                return None, self._report(ReportStatus.DECLINED, server_round, reason)
            counts = operating_point.score_histogram(self._logits(parameters), self.y)
            self.ledger.record(self.run_id, server_round, noise, 1.0, 1, OPERATING_POINT)
            random = np.random.default_rng(dpsgd.secret_seed())
            noisy = operating_point.add_noise(counts, std, random)
            return noisy, self._report(ReportStatus.RELEASED, server_round)

    @torch.no_grad()
    def _logits(self, parameters: list[np.ndarray]) -> np.ndarray:
        """The model's risk logit of every training patient, each scored on its own.

        In a batch, a float32 matrix product may compute a row differently by its
        position, and a crafted model can magnify that until one patient's record moves
        the others' scores.
        """
        model = self._model(parameters).eval()
        return np.array([model(row[None]).item() for row in torch.as_tensor(self.x)])

    def end_of_run(
        self,
        parameters: list[np.ndarray],
        status: str,
        rounds: int,
        reason: str,
        threshold: float,
    ) -> None:
        """Take the server's notice that the run has ended (serverapp.telling_hospitals).

        A finished run's final model is evaluated here, for this hospital alone, and the
        hospital's status file records how the run ended.

        Parameters
        ----------
        parameters : list[np.ndarray]
            The final model's weights.
        status : str
            The run's status (a results.RunStatus).
        rounds : int
            The number of rounds the server recorded.
        reason : str
            Why the run failed, in the server's words; empty if it did not.
        threshold : float
            The final model's decision threshold.
        """
        if has_finished(status):
            self._evaluate_locally(parameters, rounds, threshold)
        with self.ledger.transaction():
            self._report(status, rounds, reason)

    def _new_model(self) -> torch.nn.Module:
        """The run's model architecture, for this hospital's inputs."""
        return build_model(self.x.shape[1], self.cfg.hidden_layers)

    def _model_problem(self, parameters: list[np.ndarray]) -> str | None:
        """Why the server's global model cannot be used (None if it can).

        It is not shaped as the run's model, or a weight is beyond this hospital's
        max_weight.
        """
        return weights_problem(parameters, get_weights(self._new_model()), self.cfg.max_weight)

    def _model(self, parameters):
        """The global model, from arrays that weights_problem has passed."""
        model = self._new_model()
        set_weights(model, parameters)
        return model

    def _evaluate_locally(self, parameters, after_round, threshold):
        """Append the global model's clinical metrics on the held-out patients to its file.

        The model is the one after `after_round`, scored at `threshold`. Nothing of it
        reaches the server, not even whether it worked: a score that is not finite is
        taken as 0.5 (and counted), and any failure goes to this hospital's own log.
        """
        if not self.evaluates:
            return
        try:
            problem = self._model_problem(parameters)
            if problem:
                raise ValueError(f"the server sent a malformed global model ({problem})")
            x, y = self.held_out
            if not len(y):  # add-remove may hold out nobody of a small hospital
                return
            risk = predict_risk(self._model(parameters), x)
            finite = np.isfinite(risk)
            metrics = clinical_metrics(y, np.where(finite, risk, 0.5), float(threshold))
            path = self.ledger.directory / EVALUATION_FILE  # beside the run's ledger
            records = read_json(path) if path.exists() else []
            records = [
                r for r in records if r["run_id"] != str(self.run_id) or r["round"] != after_round
            ]
            records.append(
                {
                    "run_id": str(self.run_id),
                    "round": after_round,
                    "patients": len(y),
                    "non_finite_scores": int((~finite).sum()),
                    **metrics,
                }
            )
            write_json(path, records)
        except Exception as error:  # kept here: its text may quote patients' values
            log(
                ERROR,
                "Hospital %s could not evaluate the global model after round %d on its "
                "held-out patients: %s",
                self.hospital,
                after_round,
                error,
            )

    def _report(self, status: ReportStatus, server_round: int, reason: str = "") -> dict:
        """This hospital's privacy spending as Flower metrics for the server: no data.

        The same report goes to the hospital's status file, for its operator.
        """
        plan = self.ledger.data["plans"].get(str(self.run_id), {})
        releases = self.ledger.releases
        this_run = str(self.run_id)
        report = PrivacyReport(
            hospital=self.hospital,
            patients=len(self.y),
            status=status,
            reason=reason,
            epsilon=self.ledger.epsilon(),
            epsilon_budget=self.cfg.epsilon,
            delta=self.cfg.delta,
            adjacency=Adjacency(self.cfg.adjacency),
            accountant=ACCOUNTANT,
            noise_multiplier=plan.get("noise_multiplier", 0.0),
            sample_rate=plan.get("sample_rate", 0.0),
            steps=sum(
                r["steps"]
                for r in releases
                if r["run_id"] == this_run and r.get("mechanism", DP_SGD) == DP_SGD
            ),
            ledger_reset=self.ledger.reset_notice(),
            releases=tuple(
                ReportedRelease(
                    **{k: r[k] for k in RELEASE_KEYS},
                    mechanism=r.get("mechanism", DP_SGD),
                    this_run=r["run_id"] == this_run,
                )
                for r in releases
            ),
        ).to_metrics()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        status = {**report, "round": server_round, "utc": now, "ledger": str(self.ledger.path)}
        state = StateDirectory(self.state_dir)
        path = state.status_file
        if self.ledger.directory != self.state_dir and path.exists():  # a demonstration's run
            lasting = lasting_trace(read_json(path), state.ledger_file)
            status |= {"lasting": lasting} if lasting else {}
        write_json(path, status)
        return report
