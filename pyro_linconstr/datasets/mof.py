"""Charge-neutral partial charges of 2,266 metal-organic frameworks.

The archive ``mof_charges.npz`` ships inside the package
(``pyro_linconstr/datasets/data/``, with ``README-mof_charges.md`` giving its
layout, origin, MIT licence and what to cite). It holds the crystal graphs
and DDEC partial charges of Raza, Sturluson, Simon & Fern (2020), "Message
passing neural networks for partial charge assignment to metal-organic
frameworks", *J. Phys. Chem. C* 124, 19070. The physical law is one linear
equality per crystal: the charges of its atoms sum to zero, i.e. ``A x = 0``
with ``A = plc.GroupSum(crystal, num_crystals)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_linconstr.datasets.paths import (
    data_dir,
    packaged_data_dir,
    random_split,
    require_file,
)

MOF_FILE = "mof_charges.npz"
NUM_ELEMENTS = 74


@dataclass
class MOFCharges:
    """Whole-dataset tensors of the MOF charge data (all crystals, global atom indices).

    :ivar torch.Tensor element: ``(N,)`` int64 element index in ``[0, 74)``
        (column of the one-hot node feature).
    :ivar torch.Tensor charge: ``(N,)`` DDEC charges in e (float64, lossless).
    :ivar torch.Tensor node_ptr: ``(C + 1,)`` CSR offsets: the atoms of crystal
        ``c`` are ``node_ptr[c]:node_ptr[c + 1]``.
    :ivar torch.Tensor crystal: ``(N,)`` crystal index of each atom.
    :ivar torch.Tensor edge_index: ``(2, 2E)`` directed edges (both directions
        of every bond), global atom indices.
    :ivar torch.Tensor edge_dist: ``(2E,)`` bond length in Angstrom of each
        directed edge.
    :ivar torch.Tensor edge_ptr: ``(C + 1,)`` offsets of each crystal's bonds
        among the ``E`` undirected bonds (directed edge ``k`` and ``k + E`` are
        the two directions of bond ``k``).
    :ivar names: ``(C,)`` CoRE MOF refcodes.
    :ivar element_symbols: ``(74,)`` chemical symbols of the element indices.
    """

    element: torch.Tensor
    charge: torch.Tensor
    node_ptr: torch.Tensor
    crystal: torch.Tensor
    edge_index: torch.Tensor
    edge_dist: torch.Tensor
    edge_ptr: torch.Tensor
    names: np.ndarray
    element_symbols: np.ndarray

    @property
    def num_crystals(self) -> int:
        """Number of crystals ``C``."""
        return self.node_ptr.numel() - 1

    @property
    def num_atoms(self) -> int:
        """Number of atoms ``N``."""
        return self.element.numel()

    @property
    def num_elements(self) -> int:
        """Width of the one-hot element feature (74)."""
        return NUM_ELEMENTS

    def net_charge(self) -> torch.Tensor:
        """Sum of the stored charges per crystal, ``(C,)`` float64 (about 0)."""
        out = torch.zeros(self.num_crystals, dtype=torch.float64)
        return out.index_add(0, self.crystal, self.charge.double())

    def neutral_charge(self) -> torch.Tensor:
        """The charges projected onto the sum-to-zero subspace of each crystal.

        The stored labels are rounded to 1e-6 e, so they are neutral only to
        3.2e-5 e; a model with a hard constraint ``sum = 0`` is compared with
        these projected labels (the README's recommendation). Float64.
        """
        sizes = torch.diff(self.node_ptr).double()
        shift = self.net_charge() / sizes
        return self.charge.double() - shift[self.crystal]

    def batch(self, crystals: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Gather a mini-batch of whole crystals as one disconnected graph.

        :param crystals: crystal indices.
        :returns: a dict with ``atom (n,)`` (global atom indices),
            ``element (n,)``, ``charge (n,)`` (float64),
            ``group (n,)`` (position of the atom's crystal in ``crystals``),
            ``num_groups`` (int, as a 0-dim tensor), ``edge_index (2, e)``
            (local to the batch) and ``edge_dist (e,)``.
        """
        crystals = torch.as_tensor(np.asarray(crystals), dtype=torch.long)
        starts, ends = self.node_ptr[crystals], self.node_ptr[crystals + 1]
        sizes = ends - starts
        group = torch.repeat_interleave(torch.arange(crystals.numel()), sizes)
        offs = torch.cumsum(sizes, 0) - sizes
        atom = starts[group] + torch.arange(int(sizes.sum())) - offs[group]
        e_starts, e_ends = self.edge_ptr[crystals], self.edge_ptr[crystals + 1]
        e_sizes = e_ends - e_starts
        e_group = torch.repeat_interleave(torch.arange(crystals.numel()), e_sizes)
        e_offs = torch.cumsum(e_sizes, 0) - e_sizes
        bond = e_starts[e_group] + torch.arange(int(e_sizes.sum())) - e_offs[e_group]
        num_bonds = self.edge_index.shape[1] // 2
        directed = torch.cat([bond, bond + num_bonds])
        shift = (offs - starts)[torch.cat([e_group, e_group])]
        edge_index = self.edge_index[:, directed] + shift
        return {
            "atom": atom,
            "element": self.element[atom],
            "charge": self.charge[atom],
            "group": group,
            "num_groups": torch.tensor(crystals.numel()),
            "edge_index": edge_index,
            "edge_dist": self.edge_dist[directed],
        }


def mof_file(path: str | os.PathLike | None = None) -> Path:
    """The ``mof_charges.npz`` that :func:`load_mof_charges` reads (checked to exist).

    :param path: as for :func:`load_mof_charges`.
    :raises FileNotFoundError: when ``path`` / ``$PLC_DATA_DIR`` lacks the file.
    """
    root = data_dir(path)
    if root is None:
        return require_file(packaged_data_dir() / MOF_FILE, "load_mof_charges")
    p = root if root.suffix == ".npz" else root / MOF_FILE
    return require_file(p, "load_mof_charges")


def load_mof_charges(path: str | os.PathLike | None = None) -> MOFCharges:
    """Load ``mof_charges.npz`` as torch tensors.

    By default the copy shipped inside the package is read
    (:func:`~pyro_linconstr.datasets.packaged_data_dir`); ``path`` or the
    environment variable ``PLC_DATA_DIR`` override it.

    :param path: the folder holding ``mof_charges.npz`` (or the file itself);
        default ``$PLC_DATA_DIR`` when set, else the shipped copy.
    :raises FileNotFoundError: when ``path`` / ``$PLC_DATA_DIR`` lacks the file.

    Example::

        >>> from pyro_linconstr.datasets import load_mof_charges
        >>> d = load_mof_charges()  # doctest: +SKIP
        >>> d.num_crystals, d.num_atoms, d.edge_index.shape  # doctest: +SKIP
        (2266, 334103, torch.Size([2, 798064]))
        >>> float(d.net_charge().abs().max()) <= 3.2e-5 + 1e-12  # doctest: +SKIP
        True
    """
    p = mof_file(path)
    with np.load(p, allow_pickle=False) as z:
        node_ptr = torch.from_numpy(z["node_ptr"].astype(np.int64))
        edge_ptr = torch.from_numpy(z["edge_ptr"].astype(np.int64))
        element = torch.from_numpy(z["element"].astype(np.int64))
        charge = torch.from_numpy(z["charge"].astype(np.float64))
        edges = torch.from_numpy(z["edges"].astype(np.int64))
        dist = torch.from_numpy(z["edge_dist"].astype(np.float64))
        names = z["names"]
        symbols = z["element_symbols"]
    sizes = torch.diff(node_ptr)
    crystal = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    e_crystal = torch.repeat_interleave(torch.arange(sizes.numel()), torch.diff(edge_ptr))
    glob = edges + node_ptr[e_crystal].unsqueeze(1)  # (E, 2) global (src, dst)
    edge_index = torch.cat([glob.T, glob.T.flip(0)], dim=1)
    return MOFCharges(
        element=element,
        charge=charge,
        node_ptr=node_ptr,
        crystal=crystal,
        edge_index=edge_index,
        edge_dist=torch.cat([dist, dist]),
        edge_ptr=edge_ptr,
        names=names,
        element_symbols=symbols,
    )


def split_crystals(
    num_crystals: int, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random train/validation/test split of crystal indices (70/10/20 by default).

    :param int num_crystals: number of crystals ``C``.
    :param int seed: seed of the permutation (split ``k`` of a study uses seed ``k``).
    :param fractions: train, validation, test fractions (summing to 1).
    :returns: three sorted int64 tensors of crystal indices that partition ``range(C)``.

    Example::

        >>> from pyro_linconstr.datasets import split_crystals
        >>> tr, va, te = split_crystals(10, seed=0)
        >>> len(tr), len(va), len(te)
        (7, 1, 2)
    """
    tr, va, te = random_split(num_crystals, seed, fractions, "split_crystals")
    return tr.sort().values, va.sort().values, te.sort().values
