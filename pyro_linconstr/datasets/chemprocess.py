"""Chemical-process surrogate benchmarks with mass balances ``A x + B y = 0``.

Three Aspen Plus data sets published with KKT-hPINN (H. Chen, G. E. Constante
Flores, C. Li, "Physics-informed neural networks with hard linear equality
constraints", *Comput. Chem. Eng.* 189 (2024) 108764; cite it when you use
the data). The upstream repository states no licence, so the CSVs are not
shipped: they are downloaded on first use from ``li-group/KKThPINN`` at a
pinned commit, checked against pinned SHA-256s and cached
(:mod:`pyro_linconstr.datasets.fetch`); ``PLC_DATA_DIR`` or ``path=`` point
at a local copy instead. Every row satisfies the linear
mass balance ``A x + B y = 0``; a surrogate ``y = f(x)`` must therefore satisfy
``B y = -A x``, a linear law whose right-hand side differs for each row.

Scaling each column by its maximum absolute value (``x = Dx x'``,
``y = Dy y'``) keeps the law linear: ``(A Dx) x' + (B Dy) y' = 0``, which is
what :attr:`ChemProcessData.A_scaled` and :attr:`ChemProcessData.B_scaled` hold.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from pyro_linconstr.datasets.fetch import fetch_chemprocess
from pyro_linconstr.datasets.paths import data_dir, random_split, require_file

#: ``name -> (file, nx, A, B)`` with the matrices of the data README.
CHEMPROCESS_BENCHMARKS: dict[str, tuple[str, int, list[list[float]], list[list[float]]]] = {
    "cstr": (
        "benchmark_CSTR.csv",
        3,
        [[0, 1, -1], [0, 1, 0]],
        [[0, -1, 1], [-1, -1, 0]],
    ),
    "plant": (
        "benchmark_plant.csv",
        4,
        [[1, 1, 1, -1]],
        [[-1, 0, -1, 0, -1]],
    ),
    "distillation": (
        "benchmark_distillation.csv",
        5,
        [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]],
        [[-1, 0, 0, 0, 0, 0, -1, -1, 0, 0], [0, -1, 0, 0, 0, 0, 0, 0, -1, -1]],
    ),
}


@dataclass
class ChemProcessData:
    """One benchmark: raw and MaxAbs-scaled inputs/outputs and the mass balance.

    :ivar str name: ``"cstr"``, ``"plant"`` or ``"distillation"``.
    :ivar list columns: CSV column names (inputs first).
    :ivar torch.Tensor x: ``(N, nx)`` raw inputs (float64).
    :ivar torch.Tensor y: ``(N, ny)`` raw outputs (float64).
    :ivar torch.Tensor A: ``(m, nx)`` raw constraint matrix on the inputs.
    :ivar torch.Tensor B: ``(m, ny)`` raw constraint matrix on the outputs.
    :ivar torch.Tensor x_scale: ``(nx,)`` max |x| per column (``Dx``).
    :ivar torch.Tensor y_scale: ``(ny,)`` max |y| per column (``Dy``).
    """

    name: str
    columns: list[str]
    x: torch.Tensor
    y: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    x_scale: torch.Tensor
    y_scale: torch.Tensor

    @property
    def x_scaled(self) -> torch.Tensor:
        """``x' = x / Dx``, entries in ``[-1, 1]``."""
        return self.x / self.x_scale

    @property
    def y_scaled(self) -> torch.Tensor:
        """``y' = y / Dy``, entries in ``[-1, 1]``."""
        return self.y / self.y_scale

    @property
    def A_scaled(self) -> torch.Tensor:
        """``A Dx``: the law on scaled data is ``A_scaled x' + B_scaled y' = 0``."""
        return self.A * self.x_scale

    @property
    def B_scaled(self) -> torch.Tensor:
        """``B Dy``."""
        return self.B * self.y_scale

    def rhs(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """The per-row right-hand side ``b = -A_scaled x'`` of ``B_scaled y' = b``."""
        return -(x_scaled @ self.A_scaled.T.to(x_scaled.dtype))

    def relative_residual(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """``|A x + B y| / (|A||x| + |B||y|)`` per row and constraint (raw units).

        :returns: ``(N, m)`` float64.
        """
        x = self.x if x is None else x
        y = self.y if y is None else y
        r = x @ self.A.T + y @ self.B.T
        scale = x.abs() @ self.A.abs().T + y.abs() @ self.B.abs().T
        return r.abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)


def load_chemprocess(name: str, path: str | os.PathLike | None = None) -> ChemProcessData:
    """Load one chemical-process benchmark.

    The CSV is looked for, in order: in ``path`` when given, else in
    ``$PLC_DATA_DIR`` when set (a folder holding ``chemprocess/`` or the CSVs
    themselves; nothing is downloaded then), else in the download cache
    (:func:`~pyro_linconstr.datasets.cache_dir`, hash verified), else it is
    downloaded from the pinned upstream commit into the cache.

    :param str name: ``"cstr"``, ``"plant"`` or ``"distillation"`` (case-insensitive).
    :param path: the folder holding ``chemprocess/`` (or ``chemprocess/``
        itself); default ``$PLC_DATA_DIR``, else the cache.
    :raises KeyError: for an unknown benchmark name.
    :raises FileNotFoundError: when ``path`` / ``$PLC_DATA_DIR`` lacks the CSV.
    :raises ~pyro_linconstr.datasets.DownloadError: (a :class:`ConnectionError`)
        when the CSV is not cached and cannot be downloaded, e.g. offline.
    :raises ~pyro_linconstr.datasets.ChecksumMismatchError: when the download
        is corrupt.

    Example::

        >>> from pyro_linconstr.datasets import load_chemprocess
        >>> d = load_chemprocess("plant")  # doctest: +SKIP
        >>> d.x.shape, d.y.shape, d.A.shape, d.B.shape  # doctest: +SKIP
        (torch.Size([1541, 4]), torch.Size([1541, 5]), torch.Size([1, 4]), torch.Size([1, 5]))
        >>> bool(d.relative_residual().max() < 4e-7)  # doctest: +SKIP
        True
    """
    key = name.lower()
    if key not in CHEMPROCESS_BENCHMARKS:
        raise KeyError(
            f"load_chemprocess: unknown benchmark {name!r}; "
            f"choose one of {sorted(CHEMPROCESS_BENCHMARKS)}."
        )
    fname, nx, A, B = CHEMPROCESS_BENCHMARKS[key]
    root = data_dir(path)
    if root is None:
        f = fetch_chemprocess(fname)
    else:
        folder = root if (root / fname).is_file() else root / "chemprocess"
        f = require_file(folder / fname, "load_chemprocess")
    with open(f, newline="") as fh:
        reader = csv.reader(fh)
        columns = next(reader)
        values = np.array([[float(v) for v in row] for row in reader if row], dtype=np.float64)
    data = torch.from_numpy(values)
    x, y = data[:, :nx].contiguous(), data[:, nx:].contiguous()
    return ChemProcessData(
        name=key,
        columns=columns,
        x=x,
        y=y,
        A=torch.tensor(A, dtype=torch.float64),
        B=torch.tensor(B, dtype=torch.float64),
        x_scale=x.abs().amax(0),
        y_scale=y.abs().amax(0),
    )


def split_rows(
    num_rows: int, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random train/validation/test split of row indices (60/20/20 by default, as KKT-hPINN).

    :param int num_rows: number of rows.
    :param int seed: seed of the permutation (run ``k`` uses seed ``k``).
    :param fractions: train, validation, test fractions (summing to 1).
    :returns: three int64 tensors that partition ``range(num_rows)``.

    Example::

        >>> from pyro_linconstr.datasets import split_rows
        >>> tr, va, te = split_rows(10, seed=1)
        >>> len(tr), len(va), len(te)
        (6, 2, 2)
    """
    return random_split(num_rows, seed, fractions, "split_rows")
