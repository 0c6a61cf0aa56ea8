"""``python -m spacedkd_fast.train``: see ``--help``."""

import os
import sys

from .cli import main
from .stop import claim_process

if __name__ == "__main__":
    claim_process()  # this process is the trainer's: its first Ctrl-C asks for a clean stop
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`... --list-recipes | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    sys.exit(status)
