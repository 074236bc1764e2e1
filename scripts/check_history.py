"""Fail on development history in the project's own text: the project speaks of itself.

Code, comments, docs and output describe the project as it is. How it got there (numbered
rounds of work, issue numbers, the developers' own machines) belongs in git history and
issue notes.
This scans every tracked text file (or the paths given) and prints each offending line.

    python scripts/check_history.py            # every tracked file; exit 1 on a finding
    python scripts/check_history.py README.md docs/
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each marker with why it is history, not description. Case-insensitive.
MARKERS: dict[str, re.Pattern[str]] = {
    "a numbered round of work": re.compile(r"\bsessions?[\s_-]*\d+", re.IGNORECASE),
    "an issue number": re.compile(r"\b(issues?|tasks?)[\s_-]*(#|no\.?\s*)?\d+\b", re.IGNORECASE),
    "a machine of the developers": re.compile(
        r"\b(our|my)\s+(dev|development)\b|\bdev\s+(machine|cpu|box|host)\b", re.IGNORECASE
    ),
    "a first-person account": re.compile(
        r"\bI (tried|measured|ran|count|chose|decided|think|found|left|kept|saw)\b"
        r"|\bwe (tried|measured|ran|decided|found) (last|earlier|before)\b"
    ),
}

# Files whose text is data about the outside world, or this check's own patterns.
EXEMPT = {"scripts/check_history.py"}
EXEMPT_SUFFIXES = {".png", ".jpg", ".ico", ".gguf", ".safetensors"}


def tracked_files(paths: list[str]) -> list[Path]:
    """Tracked files under `paths` (default: the whole repository)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def findings(files: list[Path]) -> list[str]:
    """One line per marker found: ``path:line: what it is: the line``."""
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if rel in EXEMPT or path.suffix in EXEMPT_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for what, pattern in MARKERS.items():
                if pattern.search(line):
                    found.append(f"{rel}:{number}: {what}: {line.strip()[:160]}")
    return found


def main(argv: list[str]) -> int:
    found = findings(tracked_files(argv))
    for line in found:
        print(line)
    if found:
        print(
            f"{len(found)} line(s) narrate development history; say what the project is "
            "and does today, and leave how it got there to git history.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
