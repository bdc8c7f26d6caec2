"""Shared pytest fixtures: a CLI main run in two gloo processes, as `torchrun --nproc_per_node 2` would; a script run
by Triton's CPU interpreter."""
import os
import socket
import subprocess
import sys

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


@pytest.fixture
def triton_interpreter():
    """run(code): the finished process of `python -c code` under Triton's CPU interpreter, in a fresh process
    (TRITON_INTERPRET is read when a kernel is defined), so that the GPU kernels run on the CPU."""
    def run(code):
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                              capture_output=True, text=True)
    return run
