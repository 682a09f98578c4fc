"""The machinery of the tools that train their own copies of the federation in this process.

Used by audit.py, sweep.py, bench.py, benchmark.py and simulation.py's --baselines; never imported
by the Flower apps, and not shipped to the hospitals.
"""
