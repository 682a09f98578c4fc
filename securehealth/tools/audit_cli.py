"""`python audit.py`: the privacy audit's command line.

Its usage text is in securehealth/commands.py; the audit itself (audit.py, canary_audit.py) is
loaded once the arguments are read. Entry point: `main`.
"""

import sys

from securehealth import data, display, settings
from securehealth.data.demonstration import all_demonstration
from securehealth.results import (
    METRICS_FILE,
    RunDirError,
    finished_run_argument,
    new_run_dir,
    read_json,
    write_atomic,
    write_json,
)
from securehealth.tools.canaries import CANARIES, AuditError


def self_test(description: str, argv: list[str]) -> int:
    """`--self-test`: the canary audit on bundled or generated data, in a new run directory.

    Writes audit.json, audit.md and audit.png; returns the exit status, 0 only if it passes.
    """
    parser = settings.make_parser(description)
    _add_audit_flags(parser)
    cfg, args = settings.parse(parser, argv, simulation=True)
    from securehealth.report import AUDIT_FILE, AUDIT_PLOT, audit_table, canary_audit_section
    from securehealth.tools import canary_audit  # the training stack, once arguments are read

    data.locate(cfg)
    try:
        if not all_demonstration(cfg):  # it trains outside any ledger
            raise settings.SettingsError(
                "the self-test trains on data generated or shipped with this code only, "
                "never on your own patients: choose --dataset synthetic, or audit a "
                "finished run of yours with --run-dir"
            )
        canary_audit.check_settings(cfg, args.canaries)
        run_dir = new_run_dir(cfg.run_dir, AUDIT_FILE, args.overwrite)
    except (settings.SettingsError, data.DataError, AuditError, RunDirError) as error:
        parser.error(str(error))
    console = display.make_console()
    try:
        with console.status(
            f"Training the product and {len(canary_audit.VARIANTS) - 1} variants with canaries"
        ):
            result = canary_audit.run(cfg, args.canaries)
    except (AuditError, data.DataError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    write_json(run_dir / AUDIT_FILE, {"canary_audit": result})
    canary_audit.plot(result, run_dir / AUDIT_PLOT)
    page = "\n\n".join(["# Privacy self-test", *canary_audit_section(result)]) + "\n"
    write_atomic(run_dir / "audit.md", page.encode())
    console.print(audit_table(result))
    console.print(result["summary"])
    console.print(f"Table and plot: {run_dir / 'audit.md'}, {run_dir / AUDIT_PLOT}")
    return 0 if result["outcome"] == "PASS" else 1


def _add_audit_flags(parser):
    """Add --self-test and --canaries to `parser`."""
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="audit the product and deliberately broken versions of it on bundled or "
        "generated data; exit 0 only if the audit passes the product and catches each "
        "broken version",
    )
    parser.add_argument(
        "--canaries",
        type=settings.positive_int,
        default=CANARIES,
        help=f"white-box canaries in the audited hospital [default: {CANARIES}]",
    )


def _add_run_audit_flags(parser):
    """Add a finished run's audit flags: the unaccounted-spend one, and the audit's."""
    settings.add_unaccounted_flag(parser)
    _add_audit_flags(parser)


def main(description: str, argv: list[str] | None = None) -> int:
    """`python audit.py`: --self-test, or the audit of a finished run (--run-dir).

    Returns the exit status: 1 only where the canary audit fails, 2 on an error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--self-test" in argv:
        return self_test(description, argv)
    run_dir, args = finished_run_argument(description, argv, _add_run_audit_flags)
    from securehealth.report import audit_table, write_report
    from securehealth.tools.audit import run_audit  # the training stack, once arguments are read

    console = display.make_console()
    try:
        cfg = settings.resolve(read_json(run_dir / METRICS_FILE)["config"])
        settings.check_accounted(cfg, args.unaccounted_privacy_spend, "the audit")
    except settings.SettingsError as error:
        print(f"audit.py: error: {error}", file=sys.stderr)
        return 2
    try:
        with console.status("Auditing: canaries, and membership inference on the model"):
            result = run_audit(run_dir, args.canaries)
    except data.DataError as error:  # e.g. a deployment: the rows stayed home
        print(f"audit.py: error: the audit needs every hospital's rows: {error}", file=sys.stderr)
        return 2
    except AuditError as error:
        print(f"audit.py: error: {error}", file=sys.stderr)
        return 2
    write_report(run_dir)  # again, with the audit in it
    console.print(audit_table(result["canary_audit"]))
    console.print(result["canary_audit"]["summary"])
    console.print(result["membership_inference"]["verdict"])
    return 1 if result["canary_audit"]["outcome"] == "FAIL" else 0
