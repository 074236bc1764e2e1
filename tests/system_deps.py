"""The system packages some tests drive for real, and one sentence when one is missing.

`scripts/install-system-deps.sh` installs them all (`make test` runs it). Should one be
absent anyway, the test that needs it fails with a sentence naming the package and that
script, not with a stack trace from deep inside selenium, redis or torch.
"""

from __future__ import annotations

import shutil

import pytest

INSTALL = "sudo scripts/install-system-deps.sh"


class MissingSystemPackage(RuntimeError):
    """A command the tests (or a script beside them) need is not installed."""

    def __init__(self, what: str, package: str) -> None:
        super().__init__(
            f"{what} is not installed (Debian package `{package}`): run `{INSTALL}` "
            "once, then run the tests again."
        )


def missing(what: str, package: str) -> None:
    """Fail the current test with the one sentence that says how to install `package`."""
    pytest.fail(str(MissingSystemPackage(what, package)), pytrace=False)


def require(command: str, package: str, *alternatives: str) -> str:
    """The path of `command` (or of the first alternative found), else fail the test."""
    for name in (command, *alternatives):
        path = shutil.which(name)
        if path:
            return path
    missing(f"the command `{command}`", package)
    raise AssertionError("unreachable")  # pytest.fail raised
