"""The commands that the repository's scripts and the installed console scripts run.

`python simulation.py` and `securehealth-simulation` run `simulation`, and so on, with the
same flags and --help (docs/reference/cli.md). Each imports its machinery only once it runs,
so that --help answers at once.
"""

SIMULATION_USAGE = """\
Train the diagnosis model across simulated hospitals on this machine:

    python simulation.py [--name value ...]   (names and defaults: config.py)

It runs the same ServerApp and ClientApp (securehealth/serverapp.py, clientapp.py) as a real
deployment, on Flower's simulation runtime: a local SuperLink in simulation mode
with one simulated SuperNode per hospital on Ray, submitted with `flwr run`.
Results land in the run directory (see securehealth/results.py); Flower's own
logs in its flower/ folder.
"""

SERVER_USAGE = """\
The server: averages the hospitals' models (FedAvg, weighted by patients),
evaluates the global model on its own reference test set after every round, and
writes the run's results (securehealth/results.py). `app` is the Flower ServerApp.

It never computes a hospital's epsilon itself: each hospital accounts for its own
data and reports what it has spent; the server checks and records those reports.
Only nodes admitted as the run's hospitals take part, and in deployment the
ServerApp runs only a run its operator signed.

Run as a script, it is the deployment server: a TLS SuperLink that hospitals
(`python client.py --client-id N`) connect to, and one training run on it:

    python server.py make-certs              # once: a CA and server certificate
    python server.py [--host H] [--port P] [--name value ...]
"""

CLIENT_USAGE = """\
One hospital: trains the shared model on its own patients with DP-SGD (Opacus)
and sends back only the new weights and a privacy report (scalars). `app` is the
Flower ClientApp, run in simulation (simulation.py) and deployment alike; what a
hospital decides for itself (its budget, its held-out patients, secure
aggregation, which runs it takes part in) is in securehealth/node.py, and its
training in securehealth/hospital.py.

Run as a script, it is a hospital in a deployment: a SuperNode that connects to the
server (`python server.py`), trains when asked, and exits when the run ends:

    python client.py --client-id N [--server-address host:port] [--name value ...]

It runs only an app identical to its own copy, and only runs its server's operator
signed; its privacy ledger lives in its own state directory (--state-dir).
"""

PREDICT_USAGE = """\
Score new patients with a finished run's model: the predicted risk of each, and the
decision at the model's threshold, as a CSV. The patients' file is checked and
encoded by the data dictionary stored in the run's model.pt, like training data
(bad input: one line naming the file, line and column, exit 2); its label column is
optional, and where present the clinical metrics are printed too.

    python predict.py --run-dir runs/<run> --data patients.csv [--output risks.csv]
"""

REPORT_USAGE = """\
Write a finished run's report again: report.md and its plots, from the run's
metrics.json and model.pt (the server writes it at the end of every run; run this
after adding the audit or baselines, say):

    python report.py --run-dir runs/<run>
"""

SWEEP_USAGE = """\
The privacy-utility curve: the federated DP model's ROC-AUC and accuracy on the
server's reference test set at several privacy budgets, averaged over seeds, beside
FedAvg and the pooled model without DP.

    python sweep.py [--epsilons 0.5,1,2,4,8] [--seeds 3] [--name value ...]

Each point trains the federation in this process: the real hospitals (Opacus
DP-SGD, calibrated noise, privacy ledger) and Flower's FedAvg combination, without
the runtime's processes, which would cost 20 s a point. Writes sweep.json,
sweep.md and sweep.png into a new run directory. The curve trains outside the
hospitals' ledgers: free on a demonstration's data, refused on your own patients.

    python sweep.py --search-budget EPSILON [--grid "learning_rate=0.1,0.3 ..."]

An accounted hyper-parameter search on your own patients instead: one federation per
candidate, each scored from the hospitals' DP histograms, all of it charged to
their lasting ledgers (at most EPSILON of each hospital's budget, said before it
starts). Writes search.json and search.md.
"""

BENCHMARK_USAGE = """\
Published federated benchmarks, reproduced side by side on the shipped data.

    python benchmark.py flamby-heart [--seeds 5] [--epsilons 0.5,1,2,4] [--name value ...]
    python benchmark.py clinical [--seeds 5] [--name value ...]

flamby-heart: FLamby's Fed-Heart-Disease on the four UCI hospitals in
data/uci-heart-disease/, with FLamby's exact rows, per-hospital train/test split and
metric (accuracy at 0.5 on each hospital's test patients, averaged over the four):
our DP federation at several budgets, FedAvg and pooled training without DP, each
hospital alone, beside FLamby's published figures, with ROC-AUC too. Trains in this
process with the product's settings (nothing tuned on the test patients); writes
benchmark.json and benchmark.md into a new run directory.

clinical: whether the model is one a clinician can use, on every shipped data set:
the real simulation per data set and seed (with its baselines), its ROC-AUC and
its sensitivity, specificity and Brier score at the operating point it chose, on
the reference test set, beside FedAvg and pooled training without DP; writes
clinical.json and clinical.md; exits 1 where a data set misses a bar of
docs/results/clinical-benchmark.md.
"""

BENCH_USAGE = """\
Where the time goes, on this machine: prints a table of figures (each the best or the
median of --repeats runs where it says so) and writes them to bench.json.

    python bench.py [--repeats 3] [--out DIR]

1. The default jobs, 10 rounds with 3 hospitals, each timed until every process exits
   with every run file written: `python simulation.py` beside the minimal Flower app
   (benchmarks/minimal_flower_app: flwr and numpy, Flower's defaults), alternately;
   then the deployment (`server.py` and 3 `client.py` on loopback with TLS), with and
   without secure aggregation. The first table sets the best of each against the
   figures before issue 30 and its goals.
2. The simulation split into start-up (imports, SuperLink, Ray, the ServerApp), the
   rounds and shutdown, beside the same job's training computed in this process
   without Flower; the deployments' start-up and time per round.
3. One message's process, fresh as Flower starts it and forked from a zygote; what
   each zygote and a hospital's warm worker import once.
4. A DP-SGD step (Opacus) against the same model's plain SGD step: the ratio.
5. Scaling: 3, 10, 50 and 100 hospitals; 4k, 40k, 400k and 1M patients (one round
   each), then 100 hospitals with 1M patients for the default rounds: wall time,
   time of the rounds, and peak memory (the sum of the resident memory of every
   process the run started).
"""

AUDIT_USAGE = """\
The privacy audit: evidence about the DP training that would come out differently
if the training or its accounting were wrong.

    python audit.py --self-test [--canaries 10000] [--name value ...]
        the one-run canary audit of the product and of deliberately broken versions
        of it (half the noise, no noise, noise for one round used for all; shuffled
        batches, reported), on generated or bundled data, in a new run directory
        (audit.json, audit.md, audit.png); PASS, FAIL or INCONCLUSIVE, exit 0 only
        on PASS
    python audit.py --run-dir runs/<run>
        the same canary audit with a finished run's settings (the audited hospital
        samples at its patients' rate, for their steps), and a membership-
        inference attack on the run's model; writes audit.json, audit.png and the
        audit section of report.md; exit 1 only on FAIL

The canary audit (Steinke, Nasr and Jagielski, 2023; Mahloujifar, Melis and
Chaudhuri, 2025) plants canaries, each in a version chosen by a secret coin, trains
once, guesses the coins from what an attacker sees (the server's view of each
round's update: white-box; model.pt: black-box), and turns the correct guesses into
a lower bound on the epsilon really spent, set beside the claimed one: a variant
passes if the white-box bound, at 95% confidence, is at most its claim. It trains
its own copies with scratch ledgers: no hospital's budget is spent.

The membership-inference attack (loss threshold, Yeom et al., 2018) tells the
hospitals' training patients from their held-out ones; it is set beside two models
trained without DP and the most any attack can achieve at the run's epsilon. An
attack near chance shows only that this attack failed.
"""


def simulation() -> int:
    """Run `python simulation.py`, or the console script `securehealth-simulation`."""
    from securehealth.deployment.simulation_cli import main

    return main(SIMULATION_USAGE)


def server() -> int:
    """Run `python server.py`, or the console script `securehealth-server`."""
    from securehealth.deployment.server_cli import serve

    return serve(SERVER_USAGE)


def client() -> int:
    """Run `python client.py`, or the console script `securehealth-client`."""
    from securehealth.deployment.client_cli import join

    return join(CLIENT_USAGE)


def predict() -> int:
    """Run `python predict.py`, or the console script `securehealth-predict`."""
    from securehealth.tools.predict import main

    return main(PREDICT_USAGE)


def report() -> int:
    """Run `python report.py`, or the console script `securehealth-report`."""
    from securehealth.results import finished_run_argument

    run_dir = finished_run_argument(REPORT_USAGE)[0]
    from securehealth.report import write_report  # plots and the model: after --help

    print(write_report(run_dir))
    return 0


def sweep() -> int:
    """Run `python sweep.py`, or the console script `securehealth-sweep`."""
    from securehealth.tools.sweep import main

    return main(SWEEP_USAGE)


def benchmark() -> int:
    """Run `python benchmark.py`, or the console script `securehealth-benchmark`."""
    from securehealth.tools.benchmark import main

    return main(BENCHMARK_USAGE)


def bench() -> int:
    """Run `python bench.py`, or the console script `securehealth-bench`."""
    from securehealth.tools.bench import main

    return main(BENCH_USAGE)


def audit() -> int:
    """Run `python audit.py`, or the console script `securehealth-audit`."""
    from securehealth.tools.audit_cli import main

    return main(AUDIT_USAGE)
