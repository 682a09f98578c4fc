"""A Unix socket for one user's processes: a name with no file, and who is at the other end.

The hospital's warm worker (relay.py) and the zygotes of Flower's commands
(deployment/zygote.py) listen on such sockets. Standard library only: a launcher that Flower
starts for every message imports it first.
"""

import secrets
import socket
import struct

ABSTRACT = "@"  # a socket name starting so is in Linux's abstract namespace (no file)
PEER_CREDENTIALS = struct.Struct("3i")  # Linux SO_PEERCRED: pid, uid, gid


def random_name(purpose: str) -> str:
    """A new socket name in Linux's abstract namespace nobody can guess, e.g. for a worker."""
    return f"{ABSTRACT}securehealth-{purpose}-{secrets.token_hex(16)}"


def socket_address(name: str) -> str:
    """The address to bind or connect to for a socket name.

    A name starting with ABSTRACT is in Linux's abstract namespace (a leading NUL byte, which a
    node config cannot carry), which leaves no file behind whatever ends the process that
    listens.
    """
    return "\0" + name[len(ABSTRACT) :] if name.startswith(ABSTRACT) else name


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux)."""
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size
    )
    return PEER_CREDENTIALS.unpack(credentials)[1]
