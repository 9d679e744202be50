"""Loaders for the tutorials' real scientific data.

The data live outside the repository (``../shared/data`` next to it, or the
folder named by the environment variable ``PLC_DATA_DIR``); the loaders never
copy or download anything and raise :class:`FileNotFoundError` with a clear
message when a file is missing.

* :func:`load_mof_charges`, :func:`split_crystals`: DDEC partial charges of
  2,266 metal-organic frameworks (Raza et al. 2020), one sum-to-zero law per
  crystal.
* :func:`load_chemprocess`, :func:`split_rows`: the three mass-balance
  surrogate benchmarks of KKT-hPINN (Chen et al. 2024), ``A x + B y = 0`` per
  row.
"""

from pyro_linconstr.datasets.chemprocess import (
    CHEMPROCESS_BENCHMARKS,
    ChemProcessData,
    load_chemprocess,
    split_rows,
)
from pyro_linconstr.datasets.mof import MOFCharges, load_mof_charges, split_crystals
from pyro_linconstr.datasets.paths import data_dir

__all__ = [
    "CHEMPROCESS_BENCHMARKS",
    "ChemProcessData",
    "MOFCharges",
    "data_dir",
    "load_chemprocess",
    "load_mof_charges",
    "split_crystals",
    "split_rows",
]
