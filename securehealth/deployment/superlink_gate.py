"""Flower's `flower-superlink`, with everything but the hospitals' Fleet API kept to
this machine.

Flower 1.42 serves all of a SuperLink's APIs on one port: the Fleet API that
SuperNodes use (/v1/fleet/...), but also the Control API (/v1/control/...: submit,
stop and list runs, read their logs, register SuperNodes), unauthenticated in the
open-source edition, and the Runtime API (/v1/runtime/...) that the ServerApp
process uses. The server's port must be reachable by the hospitals, so this
launcher adds one middleware to Flower's app: a request from any address other
than loopback may reach only /v1/fleet/ and /health; anything else is answered 403.
`python server.py` itself reaches its SuperLink over 127.0.0.1. Flower 1.42 has no
hook for this, so the launcher wraps its app factory (flwr is pinned;
tests/test_security.py proves the refusal; the wrapping is in securehealth/flower.py).

Run as: python -m securehealth.deployment.superlink_gate [flower-superlink's arguments]
"""

import ipaddress
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from securehealth.flower import wrap_superlink_app

if TYPE_CHECKING:
    from starlette.applications import Starlette

NETWORK_PATHS = ("/v1/fleet/", "/health")  # what hospitals on other machines need


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


def gate(app: "Starlette") -> "Starlette":
    """Flower's SuperLink app with LocalControlOnly outermost, before its own handling."""
    app.add_middleware(LocalControlOnly)
    return app


def main() -> None:
    wrap_superlink_app(gate)


if __name__ == "__main__":
    main()
