"""`python -m vera_export` and the `vera-export` script: a Ctrl-C while the CLI is still importing ends as quietly
as one during a command, with the same exit code."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: stopped by SIGINT before the command started; nothing was written\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
