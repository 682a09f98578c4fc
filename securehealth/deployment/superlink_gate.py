"""Flower's `flower-superlink`, with everything but the hospitals' Fleet API kept to this machine.

Two middlewares wrap Flower's app: a request from any address other than loopback may
reach only /v1/fleet/ and /health, anything else is answered 403 (`LocalControlOnly`); and a
Fleet API request larger than the run's largest honest message is answered 413 before Flower
reads it (`BoundedFleetBodies`). Why: docs/explanation/threat-model.md.

Run as: python -m securehealth.deployment.superlink_gate [flower-superlink's arguments]
"""

import asyncio
import ipaddress
import os
from collections import Counter
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
# The bodies being received from one address hold at most this many times the limit
# together (a hospital sends one message at a time, most of them small), and each
# must arrive within BODY_TIMEOUT seconds of its headers.
IN_FLIGHT_LIMITS = 2
BODY_TIMEOUT = 60
DISCONNECTED = "disconnected"


def fleet_body_limit(weights: int) -> int:
    """Return the most bytes a Fleet API request needs in a run whose model has `weights` weights.

    That is its largest message, a training reply.
    """
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
    """ASGI middleware: a Fleet API request with a body over `limit` bytes is answered 413.

    It is refused before any of it is read where it declares its length, else as soon as
    what arrived passes the limit; the app then gets the body whole. The bodies being
    received from one address hold at most IN_FLIGHT_LIMITS times `limit` bytes together
    (a body that would pass it is answered 503), and one that stalls for BODY_TIMEOUT
    seconds is answered 408, so that many connections each sending almost `limit` bytes
    and then waiting cannot fill the server's memory, nor, from one address, crowd out the
    hospitals at others.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.in_flight = Counter()  # address -> bytes of its bodies being received

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/fleet/"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._refuse(scope, receive, send, 413, f"at most {self.limit} bytes")
            return
        pieces, source = [], (scope.get("client") or ("",))[0]
        try:
            refusal = await self._receive(receive, pieces, source)
        finally:
            self.in_flight[source] -= sum(map(len, pieces))
            if self.in_flight[source] == 0:  # no body of its is arriving: forget it
                del self.in_flight[source]
        if refusal == DISCONNECTED:
            return
        if refusal:
            await self._refuse(scope, receive, send, *refusal)
            return
        body = {"type": "http.request", "body": b"".join(pieces), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # only a disconnect can follow
            replayed = True
            return body

        await self.app(scope, replay, send)

    async def _receive(
        self, receive, pieces: list[bytes], source: str
    ) -> tuple[int, str] | str | None:
        """Read a body from `source` into `pieces`, counted in self.in_flight as it arrives.

        Returns None when it is whole, DISCONNECTED, or the (status, why) to refuse it with.
        """
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT
        size, more = 0, True
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return 408, f"its body did not arrive within {BODY_TIMEOUT} s"
            if message["type"] == "http.disconnect":
                return DISCONNECTED
            piece = message.get("body", b"")
            if size + len(piece) > self.limit:
                return 413, f"at most {self.limit} bytes"
            if self.in_flight[source] + len(piece) > IN_FLIGHT_LIMITS * self.limit:
                return 503, "too many requests are arriving at once from here; try again"
            pieces.append(piece)
            size += len(piece)
            self.in_flight[source] += len(piece)
            more = message.get("more_body", False)
        return None

    async def _refuse(self, scope, receive, send, status: int, why: str):
        """Answer the request with `status`, saying `why`."""
        refusal = JSONResponse({"detail": f"a Fleet API request: {why}"}, status_code=status)
        await refusal(scope, receive, send)


def gate(app: "Starlette") -> "Starlette":
    """Put Flower's SuperLink app behind LocalControlOnly (outermost), then BoundedFleetBodies."""
    limit = int(os.environ.get(BODY_LIMIT_VARIABLE, fleet_body_limit(0)))
    app.add_middleware(BoundedFleetBodies, limit=limit)
    app.add_middleware(LocalControlOnly)
    return app


def main() -> None:
    """Run `flower-superlink` with the command line's arguments, its app gated."""
    wrap_superlink_app(gate)


if __name__ == "__main__":
    main()
