"""A deployed hospital's warm worker as its ClientApp sees it: `RelayClient` and the framing.

Flower starts a fresh ClientApp process for every message, so client.py keeps one process with
the training stack loaded (deployment/worker.py) and the ClientApp relays its messages to it over
a Unix socket only the hospital's user can open. The worker trains with its own node config,
never one the message brings. A message is an 8-byte length and a JSON header, then an 8-byte
length and the arrays as NumPy's .npz without pickles.
"""

import io
import json
import os
import socket
import struct
import time

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from securehealth.local_socket import peer_uid, socket_address

NODE_CONFIG_KEY = "worker-socket"  # client.py names the socket in the node config
LENGTH = struct.Struct("!Q")
MAX_PART = 64 << 20  # bytes: a header or a model's weights larger than this is refused


def send(connection: socket.socket, header: dict, arrays: NDArrays = ()) -> None:
    """One framed message: header (JSON) and arrays."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    for part in (json.dumps(header).encode(), buffer.getvalue()):
        connection.sendall(LENGTH.pack(len(part)) + part)


def receive(connection: socket.socket, deadline: float | None = None) -> tuple[dict, NDArrays]:
    """One framed message, read whole from `connection`.

    Parameters
    ----------
    connection : socket.socket
        The connected Unix socket.
    deadline : float, optional
        A time.monotonic() value by which all of the message must have arrived.

    Returns
    -------
    tuple[dict, NDArrays]
        The header and the arrays.

    Raises
    ------
    ConnectionError
        The other end closed the connection, or a part is larger than MAX_PART.
    TimeoutError
        The message took longer than `deadline`.
    """

    def part():
        return _read(
            connection, LENGTH.unpack(_read(connection, LENGTH.size, deadline))[0], deadline
        )

    header, blob = json.loads(part()), part()
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        arrays = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    return header, arrays


def _read(connection, size, deadline):
    if size > MAX_PART:
        raise ConnectionError(f"a relayed message of {size} bytes is more than {MAX_PART}")
    data = bytearray()
    while len(data) < size:
        if deadline is not None:
            if time.monotonic() >= deadline:
                raise TimeoutError("a relayed message took too long to arrive")
            connection.settimeout(deadline - time.monotonic())
        chunk = connection.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the hospital's worker closed the connection")
        data += chunk
    return bytes(data)


class RelayClient(NumPyClient):
    """The ClientApp's side: each fit and evaluate is done by the hospital's worker."""

    def __init__(self, socket_path: str, context: Context):
        self.socket_path, self.context = socket_path, context

    def _call(self, kind: str, parameters: NDArrays, config: dict[str, Scalar]) -> tuple:
        request = {
            "kind": kind,
            "run_id": self.context.run_id,
            "node_id": self.context.node_id,
            "run_config": dict(self.context.run_config),
            "config": dict(config),
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            try:
                connection.connect(socket_address(self.socket_path))
            except OSError:
                raise ValueError(
                    "this hospital's worker does not answer: is its client.py still running?"
                ) from None
            if peer_uid(connection) != os.getuid():
                raise ValueError("the socket named as this hospital's worker is another user's")
            try:
                send(connection, request, parameters)
                reply, arrays = receive(connection)
            except ConnectionError:  # closed on us (broken pipe, reset, cut short)
                raise ValueError("this hospital's worker gave no answer") from None
        if "error" in reply:
            raise ValueError(reply["error"])
        return arrays, *reply["result"]

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        weights, patients, report = self._call("fit", parameters, config)
        return weights, patients, report

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        _, loss, patients, metrics = self._call("evaluate", parameters, config)
        return loss, patients, metrics
