"""Where the shared data folder is, and the seeded splits the loaders share."""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Environment variable that overrides the default data folder.
DATA_ENV_VAR = "PLC_DATA_DIR"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the shared data.

    Resolution order: ``path`` when given, else ``$PLC_DATA_DIR`` when set,
    else ``shared/data`` beside the repository checkout (``../shared/data``
    relative to the repository root).

    :param path: an explicit folder, or ``None``.
    :returns: the folder (it is not checked to exist; the loaders do that).

    Example::

        >>> from pyro_linconstr.datasets import data_dir
        >>> data_dir("/tmp/somewhere").as_posix()
        '/tmp/somewhere'
    """
    if path is not None:
        return Path(path)
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`FileNotFoundError` that says
    what was expected and how to point the loader at it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: file not found: {path}. The data are not shipped with pyro_linconstr; "
            f"pass the folder that holds it (path=...) or set the environment variable "
            f"{DATA_ENV_VAR} (default: ../shared/data next to the repository)."
        )
    return path


def random_split(
    num: int, seed: int, fractions: tuple[float, float, float], what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded train/validation/test partition of ``range(num)`` (``what`` names the caller)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"{what}: fractions must be >= 0 and sum to 1, got {fractions}.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num, generator=g)
    n_tr = int(round(fractions[0] * num))
    n_va = int(round(fractions[1] * num))
    return perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
