import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaDA-layout checkpoint folder, written once per test session."""
    from unmask.testing import write_tiny_llada

    path = tmp_path_factory.mktemp("tiny_llada")
    write_tiny_llada(path, gen_length=16, block_length=8)
    return str(path)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny models, which are latency-bound: one CPU thread is faster, above all on a
    shared 2-core machine (the thread count is restored after each test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
