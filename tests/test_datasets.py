"""Tests of the real-data loaders (skipped when ../shared/data is absent)."""

import numpy as np
import pytest
import torch

from pyro_linconstr.datasets import (
    CHEMPROCESS_BENCHMARKS,
    data_dir,
    load_chemprocess,
    load_mof_charges,
    split_crystals,
    split_rows,
)

DATA = data_dir()
needs_mof = pytest.mark.skipif(
    not (DATA / "mof_charges.npz").is_file(), reason=f"no MOF data in {DATA}"
)
needs_chem = pytest.mark.skipif(
    not (DATA / "chemprocess").is_dir(), reason=f"no chemprocess data in {DATA}"
)


@pytest.fixture(scope="module")
def mof():
    if not (DATA / "mof_charges.npz").is_file():
        pytest.skip(f"no MOF data in {DATA}")
    return load_mof_charges()


# ---------------------------------------------------------------- paths
def test_env_var_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PLC_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir("/elsewhere").as_posix() == "/elsewhere"


def test_missing_mof_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="mof_charges.npz.*PLC_DATA_DIR"):
        load_mof_charges(tmp_path)


def test_missing_chemprocess_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmark_plant.csv.*PLC_DATA_DIR"):
        load_chemprocess("plant", tmp_path)
    with pytest.raises(KeyError, match="unknown benchmark"):
        load_chemprocess("reactor", tmp_path)


def test_missing_file_via_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PLC_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mof_charges()


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("split,fracs", [(split_crystals, (7, 1, 2)), (split_rows, (6, 2, 2))])
def test_splits_partition_and_are_seeded(split, fracs):
    n = 1000
    tr, va, te = split(n, seed=3)
    assert (len(tr), len(va), len(te)) == tuple(100 * f for f in fracs)
    allidx = torch.cat([tr, va, te]).sort().values
    assert torch.equal(allidx, torch.arange(n))
    tr2, _, _ = split(n, seed=3)
    tr3, _, _ = split(n, seed=4)
    assert torch.equal(tr, tr2)
    assert not torch.equal(tr.sort().values, tr3.sort().values)
    with pytest.raises(ValueError, match="sum to 1"):
        split(n, fractions=(0.5, 0.1, 0.1))


# ---------------------------------------------------------------- MOF
def test_mof_shapes(mof):
    C, N, E = 2266, 334103, 399032
    assert mof.num_crystals == C and mof.num_atoms == N
    assert mof.node_ptr.shape == (C + 1,) and mof.edge_ptr.shape == (C + 1,)
    assert mof.charge.dtype == torch.float64 and mof.charge.shape == (N,)
    assert mof.element.shape == (N,) and int(mof.element.max()) < 74 and int(mof.element.min()) >= 0
    assert mof.edge_index.shape == (2, 2 * E) and mof.edge_dist.shape == (2 * E,)
    assert mof.crystal.shape == (N,)
    assert torch.equal(torch.bincount(mof.crystal), torch.diff(mof.node_ptr))
    # directed edges stay within one crystal, both directions present, no self-loops
    src, dst = mof.edge_index
    assert torch.equal(mof.crystal[src], mof.crystal[dst])
    assert bool((src != dst).all())
    assert torch.equal(mof.edge_index[:, :E], mof.edge_index[:, E:].flip(0))
    assert float(mof.edge_dist.min()) > 0.4 and float(mof.edge_dist.max()) < 4.6
    assert mof.element_symbols[0] == "C"


def test_mof_charges_are_neutral_to_rounding(mof):
    net = mof.net_charge()
    # README: all crystals within 3.2e-5 e (labels are multiples of 1e-6 e)
    assert float(net.abs().max()) <= 3.2e-5 + 1e-12
    assert float(net.abs().max()) > 1e-5  # the raw labels are *not* exactly neutral
    q = mof.neutral_charge()
    assert float(mof.net_charge().abs().max()) == float(net.abs().max())  # unchanged
    neutral = torch.zeros(mof.num_crystals, dtype=torch.float64).index_add(0, mof.crystal, q)
    assert float(neutral.abs().max()) < 1e-12
    assert float((q - mof.charge).abs().max()) <= 3.2e-5


def test_mof_batch_matches_whole_graph(mof):
    crystals = [4, 0, 2265, 100]
    bt = mof.batch(crystals)
    n = int(sum(mof.node_ptr[c + 1] - mof.node_ptr[c] for c in crystals))
    assert bt["element"].shape == (n,) and int(bt["num_groups"]) == 4
    for k, c in enumerate(crystals):
        a, b = int(mof.node_ptr[c]), int(mof.node_ptr[c + 1])
        sel = bt["group"] == k
        assert torch.equal(bt["charge"][sel], mof.charge[a:b])
        assert torch.equal(bt["element"][sel], mof.element[a:b])
        assert torch.equal(bt["atom"][sel], torch.arange(a, b))
    src, dst = bt["edge_index"]
    assert torch.equal(bt["group"][src], bt["group"][dst])
    num_e = sum(int(mof.edge_ptr[c + 1] - mof.edge_ptr[c]) for c in crystals)
    assert bt["edge_index"].shape == (2, 2 * num_e) and bt["edge_dist"].shape == (2 * num_e,)
    # the local graph of crystal 0 (second in the batch) equals the README's reconstruction
    with np.load(DATA / "mof_charges.npz") as z:
        e0, e1 = z["edge_ptr"][0], z["edge_ptr"][1]
        bonds = z["edges"][e0:e1].astype(np.int64)
    off = int(mof.node_ptr[5] - mof.node_ptr[4])
    k = int(mof.edge_ptr[5] - mof.edge_ptr[4])
    got = bt["edge_index"][:, k : k + len(bonds)] - off
    assert np.array_equal(got.numpy(), bonds.T)


# ---------------------------------------------------------------- chemprocess
STATED = {"cstr": (1943, 3, 3, 2, 2.0e-9), "plant": (1541, 4, 5, 1, 3.8e-7)}
STATED["distillation"] = (6482, 5, 10, 2, 2.4e-9)


@needs_chem
@pytest.mark.parametrize("name", sorted(CHEMPROCESS_BENCHMARKS))
def test_chemprocess_shapes_and_mass_balance(name):
    rows, nx, ny, m, resid = STATED[name]
    d = load_chemprocess(name)
    assert d.x.shape == (rows, nx) and d.y.shape == (rows, ny)
    assert d.A.shape == (m, nx) and d.B.shape == (m, ny)
    assert len(d.columns) == nx + ny
    rel = d.relative_residual()
    assert rel.shape == (rows, m)
    # the stated largest relative residual, to the 2 digits the README gives
    assert float(rel.max()) <= resid * 1.05
    assert float(rel.max()) >= resid * 0.5  # the check is not vacuous


@needs_chem
@pytest.mark.parametrize("name", sorted(CHEMPROCESS_BENCHMARKS))
def test_chemprocess_scaling_keeps_the_law_linear(name):
    d = load_chemprocess(name)
    xs, ys = d.x_scaled, d.y_scaled
    assert float(xs.abs().max()) == 1.0 and float(ys.abs().max()) == 1.0
    lhs = ys @ d.B_scaled.T
    rhs = d.rhs(xs)
    assert lhs.shape == rhs.shape == (d.x.shape[0], d.A.shape[0])
    # the scaled system holds to the same relative residual as the raw data
    scale = xs.abs() @ d.A_scaled.abs().T + ys.abs() @ d.B_scaled.abs().T
    rel = (lhs - rhs).abs() / scale
    assert float(rel.max()) <= float(d.relative_residual().max()) + 1e-14
