"""One kind of error for things the user can fix: bad paths, bad flags, unapproved data.

Scripts wrap their main() in run_main so such errors print one sentence and exit with code 2,
instead of a traceback that hides the fix.
"""
import sys


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""


def run_main(main):
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
