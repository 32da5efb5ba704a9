"""The entry points (python -m scripts.X). A Ctrl-C during the seconds of importing torch ends the
process quietly with 130 (nothing written yet) instead of a traceback from inside an import;
nanostoney.cli.run_main puts Python's own Ctrl-C back once the script runs."""
import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    name = os.path.splitext(os.path.basename(sys.argv[0] or "nanostoney"))[0]
    try:
        sys.stderr.write(f"interrupted: {name} stopped by Ctrl-C while starting; nothing was written.\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # keep a handler someone else set
    signal.signal(signal.SIGINT, _interrupted_while_starting)
