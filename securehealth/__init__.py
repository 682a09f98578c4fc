"""SecureHealth-ML: hospitals train one diagnosis model together, with differential privacy.

This package is the machinery behind the scripts at the top of the repository (simulation.py,
server.py, client.py, audit.py, sweep.py, bench.py, report.py, predict.py).
docs/explanation/architecture.md maps its modules, one per concept.
"""
