"""The two kinds of failure a user is told about in one sentence, without a traceback.

UserError: a problem in the user's input (a bad path, flag or data file, unapproved data); the
message names the problem and the fix; exit code 2. RunFailed: a run that cannot go on for a
reason the message states (the loss became NaN, the disk filled up); exit code 1. The runner
that prints them (and everything else) is nanostoney.cli.run_main.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""


class RunFailed(Exception):
    """A run stopped for a reason the message states; what it had finished is intact."""


def run_main(main):
    """The runner, under the name scripts have always imported (it lives in nanostoney.cli)."""
    from nanostoney.cli import run_main as run  # lazy: cli imports this module
    run(main)
