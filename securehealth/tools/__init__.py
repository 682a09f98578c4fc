"""The machinery of the tools (audit.py, sweep.py, bench.py and simulation.py's
--baselines): they train their own copies in this process. Never imported by the
Flower apps, and not shipped to the hospitals."""
