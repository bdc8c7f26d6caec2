"""Shared pytest fixture: a CLI main run in two gloo processes, as `torchrun --nproc_per_node 2` would."""
import os
import socket

import pytest
import torch


def _run_rank(rank, port, main, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(argv)


@pytest.fixture
def two_ranks():
    """run(main, argv): main(argv) in two processes that find each other through a free local port."""
    def run(main, argv):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_run_rank, args=(port, main, argv), nprocs=2)
    return run
