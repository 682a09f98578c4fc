"""SecureHealth-ML's machinery, behind the scripts at the top level of the repository
(simulation.py, server.py, client.py, audit.py, sweep.py, bench.py, report.py, predict.py).
The README's "How the code is organised" lists one module per concept."""
