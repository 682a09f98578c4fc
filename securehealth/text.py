"""Values quoted in one-line messages, cut to a readable length and free of control characters.

A value from a file, a flag or another machine is shown by its start only, so that a message stays
one readable line and never echoes a huge field back to whoever sent it; text another machine
wrote is shown without the control characters a terminal would obey.
"""

import re

QUOTE_LIMIT = 40  # characters of a value a message shows
MESSAGE_LIMIT = 2000  # characters of a one-line error message shown (its start and end)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 controls: escapes, bells, newlines


def quoted(value: object) -> str:
    """`value` as repr() writes it, cut to its first QUOTE_LIMIT characters.

    A longer value is shown by its start, followed by its length.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= QUOTE_LIMIT:
        return repr(value)
    return f"{text[:QUOTE_LIMIT]!r}... ({len(text)} characters)"


def untrusted(text: str, limit: int) -> str:
    """Text another machine sent (a reason, an error), made safe for a console and a record.

    Every character a terminal does not print as itself (controls and terminal escapes,
    bidi overrides, zero-width characters, line separators) is shown as a space, runs of
    spaces as one (none can forge a line of its own), and no more than its first `limit`
    characters are kept (its length said when it was longer).
    """
    text = str(text)
    shown = " ".join("".join(c if c.isprintable() else " " for c in text[:limit]).split())
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def shortened(message: str) -> str:
    """`message` on one line of at most about MESSAGE_LIMIT characters, without control characters.

    Control characters go because a value in the message may hold terminal escapes. Where a
    library echoed a huge value in it, its start (what is wrong) and its end (how to fix it) are
    kept, around the length of what was left out.
    """
    message = CONTROL.sub(" ", message)
    if len(message) <= MESSAGE_LIMIT:
        return message
    half = MESSAGE_LIMIT // 2
    return f"{message[:half]} ... ({len(message)} characters) ... {message[-half:]}"
