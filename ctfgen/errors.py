"""The one error type the `ctfgen` command prints as a single `error:` line (exit status 2).

Everything the library raises because of what a user gave it (a bad value, a missing or
mismatched file, a folder that must not be overwritten) is a `CtfgenError`; anything else
is a bug and keeps its traceback. It subclasses ValueError so callers may catch either.
"""

from __future__ import annotations

import signal


class CtfgenError(ValueError):
    """Bad input: an argument, a file or a folder the user gave."""


class Stopped(Exception):
    """A long stage stopped early on SIGTERM or Ctrl-C after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal (143 for SIGTERM), so schedulers see it."""
        return 128 + self.signum
