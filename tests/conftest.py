import os

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def processor():
    """The multilingual base processor (tokenizer with the restored merge, feature extractor)."""
    from pyro_blora.base_models.loading import load_processor

    return load_processor("base")


@pytest.fixture(scope="session")
def english_processor():
    """The English-only tiny.en processor."""
    from pyro_blora.base_models.loading import load_processor

    return load_processor("tiny.en")
