"""torchrun, without the launcher's own traceback when a worker fails cleanly.

`python -m torchtitan_like.launch <torchrun args> -m torchtitan_like.train ...` runs exactly
`torch.distributed.run` (torchrun). When a worker exits non-zero, torchrun raises ChildFailedError
and Python prints the launcher's stack: noise after our one-line error. Here that becomes one line
and the worker's exit code.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        signal = f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
        print(f"run_train: rank {rank} exited with code {failure.exitcode}{signal}; its error is above", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
