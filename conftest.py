import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_state():
    """Seed, clear the param store and turn validation on for every test and doctest (as Pyro's
    tests do)."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
