"""Reset global torch/pyro state between sphinx-gallery tutorials (they share one process).

Referenced by name from ``sphinx_gallery_conf["reset_modules"]`` in ``conf.py``.
"""


def reset_torch(gallery_conf, fname, when=None):
    """Undo what one tutorial may have changed globally: default dtype, param store, seeds."""
    import pyro
    import torch

    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
