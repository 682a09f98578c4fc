"""How many canaries the privacy audit plants, and the error it stops with.

Kept apart from the audit's training (PyTorch, Opacus), so that `audit.py --help` and a refused
audit answer at once.
"""

CANARIES = 10000  # white-box canaries; the audit's power grows with them
MIN_CANARIES, MAX_CANARIES = 10, 50000
BLACK_BOX_CANARIES = 100  # records: each one more also changes the model itself


class AuditError(Exception):
    """The audit cannot run at these settings; the message says why."""
