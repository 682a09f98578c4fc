"""The hospital's Flower ClientApp (`app`), the same in simulation and deployment.

It trains the shared model on the hospital's own patients with DP-SGD (Opacus) and sends back
only the new weights and a privacy report (scalars). What a hospital decides for itself is in
node.py, its training in hospital.py.
"""

import json

from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import NDArrays, Scalar

from securehealth import operating_point
from securehealth.node import hospital_mod, open_hospital
from securehealth.privacy.report import REASON_LIMIT
from securehealth.relay import NODE_CONFIG_KEY, RelayClient
from securehealth.results import RunStatus
from securehealth.text import untrusted


class HospitalClient(NumPyClient):
    """Flower's view of a hospital: a training round per fit, and two requests as evaluate.

    The evaluate requests are the server's request for the operating point's histograms
    (answered with them, noised and accounted for) and its notice that the run has ended (with
    the final model and threshold), answered with an acknowledgement only: the hospital's
    figures on its own patients stay home.
    """

    def __init__(self, hospital):
        self.hospital = hospital

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return self.hospital.train_round(parameters, int(config["server_round"]))

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        rounds = int(config["server_round"])
        if config.get("task") == operating_point.TASK:
            histograms, report = self.hospital.release_operating_point(parameters, rounds)
            if histograms is not None:
                report["histograms"] = json.dumps(histograms.tolist())
            return 0.0, 0, report
        threshold = float(config["threshold"])
        reason = untrusted(config.get("reason", ""), REASON_LIMIT)  # the server's words
        said = config["run-status"]  # the server's word: only a status it may send
        status = RunStatus(said) if said in set(RunStatus) else RunStatus.FAILED
        self.hospital.end_of_run(parameters, status, rounds, reason, threshold)
        return 0.0, 0, {}


def client_fn(context: Context) -> Client:
    """The client for this node: its hospital, checked for this run (node.open_hospital).

    In deployment, a relay to the hospital's warm worker in client.py's process
    (securehealth/relay.py).
    """
    worker = context.node_config.get(NODE_CONFIG_KEY)
    if worker:
        return RelayClient(worker, context).to_client()
    return HospitalClient(open_hospital(context)).to_client()


app = ClientApp(client_fn=client_fn, mods=[hospital_mod])
