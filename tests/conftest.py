"""Shared fixtures: a world-size-1 gloo group with megatron-core model parallelism initialised."""

import os
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mcore_world1():
    """Initialise torch.distributed (gloo, world 1) and megatron-core's parallel state once."""
    from prores_megatron.cpu_shim import install_cpu_shim

    install_cpu_shim()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.set_num_threads(1)
    yield parallel_state
