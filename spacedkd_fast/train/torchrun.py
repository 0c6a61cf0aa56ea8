"""``python -m spacedkd_fast.train.torchrun [torchrun options] -m spacedkd_fast.train ...``:
PyTorch's ``torchrun``, with the two things a job that is preempted and restarted needs.

1. **Exit status 143 on SIGTERM.** torchrun's agent answers SIGTERM by passing it to the workers
   (which save a checkpoint and stop, ``spacedkd_fast.train.stop``), waiting for them, and then
   ending with a traceback and status 1. Here it ends with ``128 + the signal`` (143), as the
   trainer does on its own, so that a batch script can tell "stopped, state saved" from a failure.
2. **Restarts that reconnect.** ``--max-restarts`` restarts every worker after one fails. By
   default the agent shares its rendezvous store with the workers, and the restarted workers can
   read the previous attempt's addresses from it and fail to connect (gloo: "connectFullMesh
   failed ... Connection refused"; PyTorch issue 135712). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
   gives every attempt a store of its own; it is set here unless the environment sets it.

Everything else is torchrun's: the same options, the same output.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        run(args)
    except SignalException as err:  # the workers were stopped with it (and saved) first
        print(f"torchrun: {err.sigval.name}: the workers were stopped with it",
              file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
