"""Values quoted in one-line messages: a value from a file, a flag or another
machine is shown by its start only, so that a message stays one readable line and
never echoes a huge field back to whoever sent it."""

QUOTE_LIMIT = 40  # characters of a value a message shows


def quoted(value: object) -> str:
    """`value` as repr() writes it, cut to its first QUOTE_LIMIT characters (and its
    length said) when it is longer."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= QUOTE_LIMIT:
        return repr(value)
    return f"{text[:QUOTE_LIMIT]!r}... ({len(text)} characters)"
