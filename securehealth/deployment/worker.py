"""A deployed hospital's warm worker (see securehealth/relay.py): a thread of
`client.py` that keeps the training stack loaded and answers its ClientApps' relayed
training and end-of-run messages, one at a time, with the hospital's own node
config. Its socket has a random name in Linux's abstract namespace, so that no file
is left behind however client.py ends, and it answers only processes of the
hospital's own user (as the ClientApp talks only to a worker of that user). It
trains only with the code it started with, and refuses once this copy's files have
changed (the run's signature is checked against the files): restart client.py to
load them."""

import os
import secrets
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

REQUEST_TIMEOUT = 60  # seconds a caller has to send its request (training may take longer)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        if relay.peer_uid(self.request) != os.getuid():
            return  # not the hospital's own user: no answer
        try:  # a silent, slow or garbled caller does not hold up the next one
            request, parameters = relay.receive(self.request, time.monotonic() + REQUEST_TIMEOUT)
        except Exception:
            return
        self.request.settimeout(None)
        try:
            arrays, result = self.server.answer(request, parameters)
            relay.send(self.request, {"result": result}, arrays)
        except Exception as error:  # the ClientApp reports it to the server, as before
            log(ERROR, "Hospital worker: %s: %s", type(error).__name__, error)
            relay.send(self.request, {"error": said_to_the_server(error)})


def said_to_the_server(error: Exception) -> str:
    """What the server is told of an error at the hospital: its own one-line text,
    but for a file that could not be read or written (a full disk) only why, never
    the hospital's paths."""
    if isinstance(error, OSError):
        return f"this hospital could not read or write a file of its own ({error.strerror})"
    return str(error)


class Worker(socketserver.UnixStreamServer):
    """The hospital's training, served on a Unix socket."""

    def __init__(self, address: str, node_config: dict[str, Any]):
        self.node_config, self.code = node_config, app_digest()
        super().__init__(address, _Handler)

    def answer(self, request: dict, parameters: list) -> tuple[list, list]:
        """(arrays, scalars) of a relayed fit or evaluate, done here as the ClientApp
        would do it in its own process."""
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
    """Run the hospital's worker for the duration: yields its socket's name (for the
    node config), with the training stack imported at once in the background, so
    that the first round does not wait for it. Yields None where it cannot run (no
    SO_PEERCRED or abstract sockets, i.e. not Linux): the ClientApp then trains in
    its own process, as Flower runs it."""
    if not hasattr(socket, "SO_PEERCRED"):
        yield None
        return
    name = f"{relay.ABSTRACT}securehealth-worker-{secrets.token_hex(16)}"
    try:
        worker = Worker(relay.socket_address(name), node_config)
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
    import securehealth.hospital  # noqa: F401  (PyTorch, Opacus, scikit-learn, dp-accounting)
