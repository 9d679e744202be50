"""Where the data are, and the seeded splits the loaders share.

* Data that may be redistributed ship inside the package
  (:func:`packaged_data_dir`: the MOF charges and their README).
* Data that may not are downloaded on first use and cached
  (:mod:`pyro_linconstr.datasets.fetch`).
* ``$PLC_DATA_DIR`` (or a loader's ``path=`` argument) overrides both: the
  loaders then read that folder only, and never download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Environment variable that overrides where the loaders look for data.
DATA_ENV_VAR = "PLC_DATA_DIR"


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The data folder the user chose, if any.

    ``path`` when given, else ``$PLC_DATA_DIR`` when set, else ``None``:
    the loaders then use the copy shipped in the package (MOF) or the
    download cache (chemical process). There is no default folder outside
    the package.

    :param path: an explicit folder (or file), or ``None``.
    :returns: the folder (it is not checked to exist; the loaders do that), or ``None``.

    Example::

        >>> from pyro_linconstr.datasets import data_dir
        >>> data_dir("/tmp/somewhere").as_posix()
        '/tmp/somewhere'
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return None


def packaged_data_dir() -> Path:
    """The folder inside the installed package that holds the shipped data files.

    Example::

        >>> from pyro_linconstr.datasets import packaged_data_dir
        >>> (packaged_data_dir() / "mof_charges.npz").is_file()
        True
    """
    return Path(__file__).resolve().parent / "data"


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`FileNotFoundError` that says
    what was expected and where the loader looked (``path=`` or ``$PLC_DATA_DIR``)."""
    if not path.is_file():
        env = os.environ.get(DATA_ENV_VAR)
        now = f"{DATA_ENV_VAR}={env}" if env else "unset"
        raise FileNotFoundError(
            f"{what}: file not found: {path}. The folder comes from the path= argument or "
            f"{DATA_ENV_VAR} ({now}), which override the data "
            f"shipped with or downloaded by pyro_linconstr; nothing is downloaded then. Point "
            f"path= or {DATA_ENV_VAR} at the folder that holds the file, or leave both unset "
            f"to use the defaults."
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
