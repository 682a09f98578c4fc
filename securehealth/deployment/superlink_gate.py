"""Flower's `flower-superlink`, with everything but the hospitals' Fleet API kept to
this machine.

Flower 1.42 serves all of a SuperLink's APIs on one port: the Fleet API that
SuperNodes use (/v1/fleet/...), but also the Control API (/v1/control/...: submit,
stop and list runs, read their logs, register SuperNodes), unauthenticated in the
open-source edition, and the Runtime API (/v1/runtime/...) that the ServerApp
process uses. The server's port must be reachable by the hospitals, so this
launcher adds two middlewares to Flower's app: a request from any address other
than loopback may reach only /v1/fleet/ and /health, anything else is answered 403;
and a Fleet API request larger than the run's largest honest message (its bound is
in SECUREHEALTH_FLEET_BODY_LIMIT, set by the launcher from the run's model) is
answered 413 before Flower reads it. `python server.py` itself reaches its SuperLink
over 127.0.0.1. Flower 1.42 has no hook for this, so the launcher wraps its app
factory (flwr is pinned; tests/test_security.py proves the refusals; the wrapping
is in securehealth/flower.py).

Run as: python -m securehealth.deployment.superlink_gate [flower-superlink's arguments]
"""

import ipaddress
import os
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from securehealth.flower import wrap_superlink_app

if TYPE_CHECKING:
    from starlette.applications import Starlette

NETWORK_PATHS = ("/v1/fleet/", "/health")  # what hospitals on other machines need
BODY_LIMIT_VARIABLE = "SECUREHEALTH_FLEET_BODY_LIMIT"
# What one Fleet API request carries besides the model's weights, at the most: a
# hospital's privacy report (its releases at most admission.RELEASES_LIMIT, 1 MB of
# characters, its reasons 1,000 each), the operating point's histograms, SecAgg+'s
# keys and shares, and Flower's framing (measured: a few kB).
PROTOCOL_ALLOWANCE = 4_000_000
# A weight as it travels: SecAgg+'s masked integers take 8 bytes, counted twice for
# Flower's encoding of the arrays.
BYTES_PER_WEIGHT = 16


def fleet_body_limit(weights: int) -> int:
    """The most bytes a Fleet API request of a run whose model has `weights` weights
    needs: its largest message, a training reply."""
    return PROTOCOL_ALLOWANCE + BYTES_PER_WEIGHT * weights


def from_loopback(client: tuple[str, int] | None) -> bool:
    """Whether an ASGI scope's client (host, port) is this machine."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class LocalControlOnly:
    """ASGI middleware: only the Fleet API and the health check answer the network."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and not scope["path"].startswith(NETWORK_PATHS)
            and not from_loopback(scope.get("client"))
        ):
            refusal = JSONResponse(
                {
                    "detail": "only the Fleet API is served to the network; the Control "
                    "and Runtime APIs answer on this machine's loopback only"
                },
                status_code=403,
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BoundedFleetBodies:
    """ASGI middleware: a Fleet API request with a body over `limit` bytes is answered
    413, before any of it is read where it declares its length, else as soon as what
    arrived passes the limit; the app then gets the body whole, so no request holds
    more than `limit` bytes of the server's memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/fleet/"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        pieces, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            pieces.append(message.get("body", b""))
            size += len(pieces[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(pieces), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # only a disconnect can follow
            replayed = True
            return body

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        refusal = JSONResponse(
            {"detail": f"a Fleet API request is at most {self.limit} bytes in this run"},
            status_code=413,
        )
        await refusal(scope, receive, send)


def gate(app: "Starlette") -> "Starlette":
    """Flower's SuperLink app behind LocalControlOnly (outermost), then
    BoundedFleetBodies, before its own handling."""
    limit = int(os.environ.get(BODY_LIMIT_VARIABLE, fleet_body_limit(0)))
    app.add_middleware(BoundedFleetBodies, limit=limit)
    app.add_middleware(LocalControlOnly)
    return app


def main() -> None:
    wrap_superlink_app(gate)


if __name__ == "__main__":
    main()
