"""Type-check securehealth/ with mypy against a baseline of errors per file that only shrinks.

`python .ci/mypy_baseline.py` fails when a file has more errors than the baseline
(.ci/mypy-baseline.json) allows, or fewer (lower the baseline, so that the fixed
errors cannot come back: `python .ci/mypy_baseline.py --update`, which never raises
a count once the baseline exists).
"""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

BASELINE = Path(".ci/mypy-baseline.json")
UPDATE = "python .ci/mypy_baseline.py --update"
ERROR = re.compile(r"^(\S+?\.py):\d+: error:", re.M)


def errors_per_file() -> Counter[str]:
    """mypy's errors on securehealth/, counted by file."""
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "securehealth"], capture_output=True, text=True
    )
    if checked.returncode not in (0, 1):  # 2: mypy itself failed
        raise SystemExit(checked.stdout + checked.stderr)
    return Counter(ERROR.findall(checked.stdout))


def main(argv: list[str]) -> int:
    """Compare mypy's errors with the baseline (or lower the baseline with --update)."""
    allowed = Counter(json.loads(BASELINE.read_text())) if BASELINE.exists() else Counter()
    found = errors_per_file()
    if "--update" in argv:
        if BASELINE.exists() and found - allowed:
            print(f"more errors than the baseline allows in: {', '.join(sorted(found - allowed))}")
            return 1
        BASELINE.write_text(json.dumps(dict(sorted(found.items())), indent=2) + "\n")
        print(f"baseline: {found.total()} errors in {len(found)} files")
        return 0
    worse, better = found - allowed, allowed - found
    for path, extra in sorted(worse.items()):
        print(f"{path}: {extra} new mypy error(s); run `python -m mypy {path}` and fix them")
    for path, fixed in sorted(better.items()):
        print(f"{path}: {fixed} fewer error(s) than the baseline: lower it with {UPDATE}")
    print(f"mypy: {found.total()} errors in {len(found)} files (baseline {allowed.total()})")
    return 1 if worse or better else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
