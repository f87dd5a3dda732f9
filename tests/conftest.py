import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaDA-layout checkpoint folder, written once per test session."""
    from unmask.testing import write_tiny_llada

    path = tmp_path_factory.mktemp("tiny_llada")
    write_tiny_llada(path, gen_length=16, block_length=8)
    return str(path)
