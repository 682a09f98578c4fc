"""A deployed hospital's warm worker (see securehealth/relay.py): a thread of
`client.py` that keeps the training stack loaded and answers its ClientApps' relayed
training and end-of-run messages, one at a time, with the hospital's own node
config. Its socket lies in a private folder (0700) and it answers only processes of
the hospital's own user. It trains only with the code it started with, and refuses
once this copy's files have changed (the run's signature is checked against the
files): restart client.py to load them."""

import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import ERROR
from pathlib import Path
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
            relay.send(self.request, {"error": str(error)})


class Worker(socketserver.UnixStreamServer):
    """The hospital's training, served on a Unix socket."""

    def __init__(self, socket_path: Path, node_config: dict[str, Any]):
        self.node_config, self.code = node_config, app_digest()
        super().__init__(str(socket_path), _Handler)

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
    """Run the hospital's worker for the duration: yields its socket's path (for the
    node config), in a new private folder, with the training stack imported at once
    in the background, so that the first round does not wait for it. Yields None
    where it cannot run (no SO_PEERCRED, i.e. not Linux; a TMPDIR too long for a
    socket's path): the ClientApp then trains in its own process, as Flower runs it."""
    if not hasattr(socket, "SO_PEERCRED"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="securehealth-"))  # 0700: the user's own
    socket_path = folder / relay.SOCKET_NAME
    try:
        worker = Worker(socket_path, node_config)
    except OSError:
        folder.rmdir()
        yield None
        return
    threading.Thread(target=_load_training_stack, daemon=True).start()
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    try:
        yield str(socket_path)
    finally:
        worker.shutdown()
        worker.server_close()
        socket_path.unlink(missing_ok=True)
        folder.rmdir()


def _load_training_stack():
    import securehealth.hospital  # noqa: F401  (PyTorch, Opacus, scikit-learn, dp-accounting)
