"""Entry point for distributed training: ``torchrun --nproc_per_node N -m unisegtext.train --config C``.

Same options as ``unisegtext train``; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
selects DDP with nccl on GPU and gloo on CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from unisegtext.cli.train import configure, run
    from unisegtext.errors import UniSegError

    parser = argparse.ArgumentParser(prog="python -m unisegtext.train", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return run(args)
    except UniSegError as exc:
        print(f"unisegtext train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
