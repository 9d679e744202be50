"""Loaders for the tutorials' real scientific data.

Where the data come from:

* The MOF charges (MIT) ship inside the package, in
  ``pyro_linconstr/datasets/data/`` with their README (origin, licence,
  citation).
* The chemical-process CSVs state no licence upstream, so they are not
  redistributed: the first use downloads them from their upstream repository
  at a pinned commit, checks their SHA-256 and caches them
  (:func:`cache_dir`: ``$PLC_CACHE_DIR``, else the user cache folder).
  Offline, a :class:`DownloadError` names the URL, the cache path and the
  overrides.
* ``PLC_DATA_DIR`` (or a loader's ``path=`` argument) overrides both: the
  loaders read that folder only, never download, and raise
  :class:`FileNotFoundError` when a file is missing there.

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
from pyro_linconstr.datasets.fetch import (
    ChecksumMismatchError,
    DataFetchError,
    DownloadError,
    cache_dir,
)
from pyro_linconstr.datasets.mof import MOFCharges, load_mof_charges, mof_file, split_crystals
from pyro_linconstr.datasets.paths import data_dir, packaged_data_dir

__all__ = [
    "CHEMPROCESS_BENCHMARKS",
    "ChecksumMismatchError",
    "ChemProcessData",
    "DataFetchError",
    "DownloadError",
    "MOFCharges",
    "cache_dir",
    "data_dir",
    "load_chemprocess",
    "load_mof_charges",
    "mof_file",
    "packaged_data_dir",
    "split_crystals",
    "split_rows",
]
