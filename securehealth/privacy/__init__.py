"""Record-level differential privacy for one hospital.

The accountant (epsilon of DP-SGD releases, dp-accounting's PLD), the privacy ledger
that holds every release on the hospital's patients to one budget, and DP-SGD training
itself (Opacus).
"""
