"""A deployed hospital's warm worker (see securehealth/relay.py): a thread of `client.py`.

It keeps the training stack loaded and answers its ClientApps' relayed training and
end-of-run messages, one at a time, with the hospital's own node config, on a socket with a
random name in Linux's abstract namespace, to processes of the hospital's own user only
(`warm_worker`). It refuses once this copy's files have changed: restart client.py.
"""

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import ERROR
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common import log

from securehealth import relay
from securehealth.authorisation import app_digest
from securehealth.local_socket import peer_uid, random_name, socket_address

REQUEST_TIMEOUT = 60  # seconds a caller has to send its request (training may take longer)


class _Handler(socketserver.BaseRequestHandler):
    """One relayed request: answered if it comes from the hospital's own user."""

    def handle(self):
        """Receive the request, answer it, and send back the result or the error."""
        if peer_uid(self.request) != os.getuid():
            return  # not the hospital's own user: no answer
        try:  # a silent, slow or garbled caller does not hold up the next one
            request, parameters = relay.receive(self.request, time.monotonic() + REQUEST_TIMEOUT)
        except Exception:
            return
        self.request.settimeout(None)
        try:
            arrays, result = self.server.answer(request, parameters)
            relay.send(self.request, {"result": result}, arrays)
        except Exception as error:  # the ClientApp reports it, as from its own process
            log(ERROR, "Hospital worker: %s: %s", type(error).__name__, error)
            relay.send(self.request, {"error": said_to_the_server(error)})


def said_to_the_server(error: Exception) -> str:
    """Say what the server is told of an error at the hospital.

    Its own one-line text, but for a file that could not be read or written (a full disk)
    only why, never the hospital's paths.
    """
    if isinstance(error, OSError):
        return f"this hospital could not read or write a file of its own ({error.strerror})"
    return str(error)


class Worker(socketserver.UnixStreamServer):
    """The hospital's training, served on a Unix socket."""

    def __init__(self, address: str, node_config: dict[str, Any]):
        self.node_config, self.code = node_config, app_digest()
        super().__init__(address, _Handler)

    def answer(self, request: dict, parameters: list) -> tuple[list, list]:
        """Do a relayed fit or evaluate here, as the ClientApp would in its own process.

        Parameters
        ----------
        request : dict
            The relayed message: its kind ("fit" or "evaluate"), run and node ids, run
            config and config.
        parameters : list
            The global model's weights.

        Returns
        -------
        tuple[list, list]
            (arrays, scalars): the new weights (none for evaluate) and what the hospital
            reports.

        Raises
        ------
        ValueError
            Where this copy's files changed since client.py started.
        """
        if app_digest() != self.code:
            raise ValueError(
                "this hospital's copy of the app changed since its client.py started: "
                "restart client.py"
            )
        from securehealth.clientapp import HospitalClient  # the training stack: loaded once
        from securehealth.node import open_hospital

        context = Context(
            run_id=request["run_id"],
            node_id=request["node_id"],
            node_config=self.node_config,  # its own, never the message's
            state=RecordDict(),
            run_config=request["run_config"],
        )
        hospital = HospitalClient(open_hospital(context))
        if request["kind"] == "fit":
            weights, patients, report = hospital.fit(parameters, request["config"])
            return weights, [patients, report]
        loss, patients, metrics = hospital.evaluate(parameters, request["config"])
        return [], [loss, patients, metrics]


@contextmanager
def warm_worker(node_config: dict[str, Any]) -> Iterator[str | None]:
    """Run the hospital's worker for the duration; yield its socket's name, for the node config.

    The training stack is imported at once in the background, so that the first round
    does not wait for it. Yields None where it cannot run (no SO_PEERCRED or abstract
    sockets, i.e. not Linux): the ClientApp then trains in its own process, as Flower runs
    it.
    """
    if not hasattr(socket, "SO_PEERCRED"):
        yield None
        return
    name = random_name("worker")
    try:
        worker = Worker(socket_address(name), node_config)
    except OSError:
        yield None
        return
    threading.Thread(target=_load_training_stack, daemon=True).start()
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    try:
        yield name
    finally:
        worker.shutdown()
        worker.server_close()


def _load_training_stack():
    """Import the training stack, so that the first round finds it loaded."""
    import securehealth.hospital  # noqa: F401  (PyTorch, Opacus, scikit-learn, dp-accounting)
