"""Sparse laws (torch.sparse_coo / sparse_csr A) against dense and closed-form oracles.

Oracles: the dense path of the library (same A as a dense tensor), the closed
forms of DESIGN.md section 2 evaluated with numpy/scipy on a full-row-rank
description of the same subspace (a network's incidence matrix without one
node per component), brute-force rank via numpy, and torch.autograd.gradcheck.
Tests that must not form the m x n matrix make SparseOperator.to_dense raise.
"""

import math
import pickle
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch.distributions import biject_to

import pyro_linconstr as plc
from pyro_linconstr.ops import SparseOperator, as_operator
from pyro_linconstr.ops import redundancy as redundancy_module
from pyro_linconstr.ops.conditioning import Conditioning

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta", "ignore:Sparse invariant checks"
)


# ---------------------------------------------------------------------------- problems
def incidence(edges: torch.Tensor, num_nodes: int, dtype=F64) -> torch.Tensor:
    """Node-edge incidence matrix (sparse COO): edge e = (u, v) leaves u (-1), enters v (+1)."""
    n = edges.shape[0]
    rows = torch.cat([edges[:, 0], edges[:, 1]])
    cols = torch.arange(n).repeat(2)
    vals = torch.cat([-torch.ones(n), torch.ones(n)]).to(dtype)
    A = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (num_nodes, n))
    return A.coalesce()


def grid_edges(R: int, C: int) -> torch.Tensor:
    nodes = torch.arange(R * C).reshape(R, C)
    right = torch.stack([nodes[:, :-1].reshape(-1), nodes[:, 1:].reshape(-1)], 1)
    down = torch.stack([nodes[:-1, :].reshape(-1), nodes[1:, :].reshape(-1)], 1)
    return torch.cat([right, down])


def random_network(num_nodes: int, extra: int, seed: int) -> torch.Tensor:
    """A connected random graph without bridges: a random ring through every node plus
    ``extra`` random chords, edges in random directions.

    Without bridges no flow is forced by the law alone (a bridge carries exactly the net
    injection of one side, often 0, and a forced 0 has no relative accuracy to speak of).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_nodes, generator=g)
    ring = torch.stack([perm, perm.roll(-1)], 1)
    u = torch.randint(0, num_nodes, (extra,), generator=g)
    v = (u + 1 + torch.randint(0, num_nodes - 1, (extra,), generator=g)) % num_nodes
    edges = torch.cat([ring, torch.stack([u, v], 1)])
    flip = torch.rand(edges.shape[0], generator=g) < 0.5
    return torch.where(flip.unsqueeze(-1), edges.flip(-1), edges)


def random_sparse(m: int, n: int, seed: int, density: float = 0.3, dtype=F64) -> torch.Tensor:
    """A sparse m x n matrix of full row rank (a random pattern plus a diagonal band)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, n, generator=g, dtype=dtype)
    D = D * (torch.rand(m, n, generator=g) < density)
    D[torch.arange(m), torch.arange(m) * (n // m)] += 2.0
    return D.to_sparse()


def layout(A: torch.Tensor, kind: str) -> torch.Tensor:
    return A.to_sparse_csr() if kind == "csr" else A


def gaussian(kind: str, n: int, seed: int, dtype=F64, batch=()):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch + (n,), generator=g, dtype=F64)
    s = torch.rand(batch + (n,), generator=g, dtype=F64) + 0.3
    W = 0.5 * torch.randn(n, 2, generator=g, dtype=F64)
    if kind == "diag":
        base = dist.Normal(loc.to(dtype), s.sqrt().to(dtype)).to_event(1)
        cov = torch.diag_embed(s)
    elif kind == "lowrank":
        base = dist.LowRankMultivariateNormal(loc.to(dtype), W.to(dtype), s.to(dtype))
        cov = W @ W.T + torch.diag_embed(s)
    else:
        L = torch.diag_embed(s.sqrt()) + 0.2 * torch.tril(
            torch.randn(n, n, generator=g, dtype=F64), -1
        )
        base = dist.MultivariateNormal(loc.to(dtype), scale_tril=L.to(dtype))
        cov = L @ L.transpose(-1, -2)
    return base, loc, cov


@pytest.fixture
def no_dense(monkeypatch):
    """Make any m x n densification of a SparseOperator an error."""

    def boom(self):
        raise AssertionError("SparseOperator.to_dense called on the sparse path")

    monkeypatch.setattr(SparseOperator, "to_dense", boom)


def exact_bound(A_dense: torch.Tensor, x: torch.Tensor, b: torch.Tensor, dtype) -> torch.Tensor:
    """``|A x - b| <= c eps (|A||x| + |b|)`` row by row, ``c = 8 sqrt(n)`` (float64 check)."""
    A64, x64, b64 = A_dense.to(F64), x.to(F64), b.to(F64)
    resid = (x64 @ A64.T - b64).abs()
    scale = x64.abs() @ A64.abs().T + b64.abs()
    bound = 8 * math.sqrt(A64.shape[-1]) * torch.finfo(dtype).eps * scale
    return resid <= bound


def closed_form(loc, cov, A, b):
    """Mean, covariance and log-density (DESIGN.md section 2) for a full-row-rank A (numpy)."""
    loc, cov, A, b = (np.asarray(t, dtype=np.float64) for t in (loc, cov, A, b))
    S = A @ cov @ A.T
    K = cov @ A.T
    mean = loc + K @ np.linalg.solve(S, b - A @ loc)
    C = cov - K @ np.linalg.solve(S, K.T)
    logdet_AAt = np.linalg.slogdet(A @ A.T)[1]

    def log_prob(x):
        return (
            scipy.stats.multivariate_normal(loc, cov).logpdf(x)
            - scipy.stats.multivariate_normal(A @ loc, S).logpdf(b)
            - 0.5 * logdet_AAt
        )

    return mean, C, log_prob


# ------------------------------------------------------------------- the operator
@pytest.mark.parametrize("kind", ["coo", "csr"])
def test_products_equal_the_dense_matrix(kind):
    D = random_sparse(5, 12, seed=0).to_dense()
    A = layout(D.to_sparse(), kind)
    op = as_operator(A)
    assert isinstance(op, SparseOperator) and op.batch_shape == torch.Size()
    assert (op.num_rows, op.num_cols, op.dtype) == (5, 12, F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 12, generator=g, dtype=F64)
    y = torch.randn(3, 2, 5, generator=g, dtype=F64)
    X = torch.randn(3, 12, 4, generator=g, dtype=F64)
    Y = torch.randn(3, 5, 4, generator=g, dtype=F64)
    s = torch.rand(3, 12, generator=g, dtype=F64)
    M = torch.randn(3, 5, 5, generator=g, dtype=F64)
    torch.testing.assert_close(op.matvec(x), x @ D.T)
    torch.testing.assert_close(op.rmatvec(y), y @ D)
    torch.testing.assert_close(op.matmul(X), D @ X)
    torch.testing.assert_close(op.rmatmul(Y), D.T @ Y)
    torch.testing.assert_close(op.abs_matvec(x), x.abs() @ D.abs().T)
    torch.testing.assert_close(op.weighted_gram(s), (D * s.unsqueeze(-2)) @ D.T)
    torch.testing.assert_close(op.quad_diag(M), ((M @ D) * D).sum(-2))
    torch.testing.assert_close(op.gram_logdet(), torch.logdet(D @ D.T))
    torch.testing.assert_close(op.to_dense(), D)
    # empty batches, and products that follow their input's dtype
    assert op.matvec(torch.zeros(0, 12, dtype=F64)).shape == (0, 5)
    assert op.rmatvec(torch.zeros(0, 5, dtype=F64)).shape == (0, 12)
    x32 = x.float()
    torch.testing.assert_close(op.matvec(x32), (x @ D.T).float())
    # dtype versions share their caches and are returned once per dtype
    assert op.to(torch.float32) is op.to(torch.float32)
    assert op.to(torch.float32).to(F64) is op
    assert op.to(torch.float32).dtype == torch.float32


def test_coalesces_duplicate_entries_like_to_dense():
    idx = torch.tensor([[0, 0, 1, 0], [1, 1, 2, 0]])
    A = torch.sparse_coo_tensor(idx, torch.tensor([1.0, 2.0, -1.0, 0.5]), (2, 3))
    op = as_operator(A)
    assert op.nnz == 3
    torch.testing.assert_close(op.to_dense(), A.to_dense())
    x = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(op.matvec(x), A.to_dense() @ x)


def test_gradients_gradcheck():
    op = as_operator(random_sparse(3, 7, seed=2, density=0.5))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    s = (torch.rand(2, 7, generator=g, dtype=F64) + 0.5).requires_grad_()
    M = torch.randn(3, 3, generator=g, dtype=F64, requires_grad=True)
    X = torch.randn(7, 2, generator=g, dtype=F64, requires_grad=True)
    for fn, inp in [
        (op.matvec, x),
        (op.rmatvec, y),
        (op.matmul, X),
        (op.weighted_gram, s),
        (op.quad_diag, M),
    ]:
        assert torch.autograd.gradcheck(fn, (inp,))
        assert torch.autograd.gradgradcheck(lambda t, fn=fn: fn(t).square(), (inp,))


def test_pairs_are_chunked_beyond_the_budget(monkeypatch):
    from pyro_linconstr.ops import sparse as sparse_module

    D = random_sparse(6, 20, seed=4, density=0.8)
    s = torch.rand(20, dtype=F64)
    M = torch.randn(6, 6, dtype=F64)
    full = as_operator(D)
    G, q = full.weighted_gram(s), full.quad_diag(M)
    monkeypatch.setattr(sparse_module, "PAIR_BUDGET", 7)
    op = SparseOperator(D)  # a new operator: its pairs are planned under the small budget
    assert op._pair_plan(s.device)["total"] > 7
    assert len(op._pair_plan(s.device)["bounds"]) > 1
    torch.testing.assert_close(op.weighted_gram(s), G)
    torch.testing.assert_close(op.quad_diag(M), q)


def test_as_operator_reuses_the_operator_until_the_tensor_changes():
    A = random_sparse(3, 7, seed=5)
    op = as_operator(A)
    assert as_operator(A) is op
    A.values().mul_(2.0)  # in place: the version counter moves, the cache is not used
    op2 = as_operator(A)
    assert op2 is not op
    torch.testing.assert_close(op2.to_dense(), A.to_dense())
    torch.testing.assert_close(op.to_dense(), A.to_dense() / 2)  # the old one kept its copy


# ------------------------------------------------------------- bad input, clearly
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda D: D.to_sparse_csc(), "layout torch.sparse_csc"),
        (lambda D: D.to_sparse_bsr((1, 1)), "layout torch.sparse_bsr"),
        (lambda D: D.unsqueeze(0).expand(2, 3, 4).to_sparse(), "batched sparse"),
        (lambda D: D.unsqueeze(0).expand(2, 3, 4).contiguous().to_sparse_csr(), "batched sparse"),
        (lambda D: D.unsqueeze(-1).to_sparse(2), "hybrid sparse"),
        (lambda D: D.long().to_sparse(), "floating-point values"),
        (lambda D: D.to(torch.complex64).to_sparse(), "floating-point values"),
        (lambda D: D.where(D == 0, torch.nan).to_sparse(), "non-finite"),
        (lambda D: D.where(D == 0, torch.inf).to_sparse_csr(), "non-finite"),
        (lambda D: D.to_sparse().requires_grad_(), "requires grad"),
    ],
)
def test_bad_sparse_input_is_a_clear_error(make, match):
    D = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    A = make(D)
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    with pytest.raises(ValueError, match=match):
        plc.constrain(base, A, torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        plc.project(torch.zeros(4), A, torch.zeros(3))


def test_shape_mismatch_names_the_columns():
    A = random_sparse(3, 7, seed=6)
    with pytest.raises(ValueError, match="A has 7 columns"):
        plc.constrain(dist.Normal(torch.zeros(6, dtype=F64), 1.0).to_event(1), A, torch.zeros(3))
    with pytest.raises(ValueError, match="m = 3"):
        plc.constrain(dist.Normal(torch.zeros(7, dtype=F64), 1.0).to_event(1), A, torch.zeros(4))


# --------------------------------------------------------- the Gaussian, vs dense
@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_gaussian_equals_the_dense_path(kind, fmt, monkeypatch):
    A = random_sparse(6, 15, seed=7)
    D = A.to_dense()
    base, loc, cov = gaussian(kind, 15, seed=8, batch=(2,))
    b = torch.randn(2, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    ds = plc.constrain(base, layout(A, fmt), b)
    dd = plc.constrain(base, D, b)
    x = dd.sample((4,))
    torch.testing.assert_close(ds.mean, dd.mean)
    torch.testing.assert_close(ds.log_prob(x), dd.log_prob(x))
    torch.testing.assert_close(ds.entropy(), dd.entropy())
    torch.testing.assert_close(ds.variance, dd.variance)
    y = ds.rsample((5,))
    assert exact_bound(D, y, b, F64).all()
    assert ds.support.check(y).all()
    # and the closed forms of DESIGN.md section 2 (numpy), batch element 0
    mean, C, log_prob = closed_form(loc[0], cov[0] if cov.dim() == 3 else cov, D, b[0])
    np.testing.assert_allclose(ds.mean[0].numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ds.variance[0].numpy(), np.diag(C), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(
        ds.log_prob(y)[:, 0].numpy(), log_prob(y[:, 0].numpy()), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_gaussian_never_densifies(kind, no_dense):
    A = random_sparse(8, 30, seed=10)
    base, loc, cov = gaussian(kind, 30, seed=11)
    b = torch.randn(8, generator=torch.Generator().manual_seed(12), dtype=F64)
    d = plc.constrain(base, A, b)
    x = d.rsample((3,))
    d.log_prob(x)
    _ = d.mean, d.variance, d.entropy()
    assert d.support.check(x).all()


def test_lowrank_densifies_only_for_its_variance(monkeypatch):
    A = random_sparse(8, 30, seed=13)
    base, loc, cov = gaussian("lowrank", 30, seed=14)
    b = torch.randn(8, generator=torch.Generator().manual_seed(15), dtype=F64)
    calls = []
    orig = SparseOperator.to_dense
    monkeypatch.setattr(SparseOperator, "to_dense", lambda self: calls.append(1) or orig(self))
    d = plc.constrain(base, A, b)
    x = d.rsample((3,))
    _ = d.log_prob(x), d.mean, d.entropy()
    assert not calls
    _ = d.variance  # LowRankCovariance.cross_matrix forms A Sigma (m x n): documented
    assert calls


def test_gradients_equal_the_dense_path():
    A = random_sparse(5, 14, seed=16)
    g = torch.Generator().manual_seed(17)
    b = torch.randn(5, generator=g, dtype=F64)
    loc0 = torch.randn(3, 14, generator=g, dtype=F64)
    raw0 = torch.randn(3, 14, generator=g, dtype=F64)
    grads = []
    for A_ in (A, A.to_dense()):
        loc, raw = loc0.clone().requires_grad_(), raw0.clone().requires_grad_()
        d = plc.constrain(dist.Normal(loc, raw.exp()).to_event(1), A_, b)
        pyro.set_rng_seed(0)
        x = d.rsample()
        (d.log_prob(x).sum() + x.square().sum()).backward()
        grads.append((loc.grad, raw.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_float32_samples_meet_the_documented_bound(no_dense):
    A = random_sparse(10, 40, seed=18, dtype=torch.float32)
    base, _, _ = gaussian("diag", 40, seed=19, dtype=torch.float32)
    b = torch.randn(3, 10, generator=torch.Generator().manual_seed(20))
    d = plc.constrain(base, A.to_sparse_csr(), b)
    x = d.sample((4,))
    assert x.dtype == torch.float32
    assert exact_bound(A.to_dense(), x, b, torch.float32).all()
    assert d.support.check(x).all()


# --------------------------------------------------------------------- networks
def grounded(A: torch.Tensor) -> np.ndarray:
    """The incidence matrix of a connected graph without its last node: full row rank."""
    return A.to_dense()[:-1].numpy()


@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_network_flows_balance_at_every_node(fmt, no_dense):
    edges = random_network(200, extra=150, seed=21)
    A = incidence(edges, 200)
    m, n = A.shape
    g = torch.Generator().manual_seed(22)
    injections = torch.randint(-3, 4, (m,), generator=g).to(F64)
    injections[-1] -= injections.sum()  # sources and sinks balance: sum b = 0 exactly
    loc = torch.randn(n, generator=g, dtype=F64)
    s = torch.rand(n, generator=g, dtype=F64) + 0.2
    d = plc.constrain(dist.Normal(loc, s.sqrt()).to_event(1), layout(A, fmt), injections)
    assert d._cond.kept is not None and d._cond.rank == m - 1  # one redundant node balance
    x = d.sample((3,))
    Ad = torch.from_numpy(np.asarray(A.to_sparse().to_dense()))  # to_dense of the tensor itself
    assert exact_bound(Ad, x, injections, F64).all()
    mean, C, log_prob = closed_form(loc, torch.diag(s), grounded(A), injections[:-1])
    np.testing.assert_allclose(d.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d.variance.numpy(), np.diag(C), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(d.log_prob(x).numpy(), log_prob(x.numpy()), rtol=1e-9, atol=1e-8)
    # b = 0: pure conservation
    d0 = plc.constrain(
        dist.Normal(loc, s.sqrt()).to_event(1), layout(A, fmt), torch.zeros(m, dtype=F64)
    )
    x0 = d0.sample((2,))
    assert exact_bound(Ad, x0, torch.zeros(m, dtype=F64), F64).all()


def test_grid_network_float32_never_densifies(no_dense):
    A = incidence(grid_edges(12, 12), 144, dtype=torch.float32)
    m, n = A.shape
    g = torch.Generator().manual_seed(23)
    loc = torch.randn(4, n, generator=g)
    scale = torch.rand(4, n, generator=g) + 0.5
    b = torch.zeros(4, m)
    b[:, 0], b[:, -1] = 2.0, -2.0  # one source, one sink per item
    d = plc.constrain(dist.Normal(loc, scale).to_event(1), A.to_sparse_csr(), b)
    x = d.rsample((2,))
    assert exact_bound(incidence(grid_edges(12, 12), 144).to_dense(), x, b, torch.float32).all()
    assert d.support.check(x).all()
    assert torch.isfinite(d.log_prob(x)).all() and torch.isfinite(d.variance).all()


def test_disconnected_network_drops_one_row_per_component(no_dense):
    e1 = random_network(30, extra=20, seed=24)
    e2 = random_network(20, extra=10, seed=25) + 30
    A = incidence(torch.cat([e1, e2]), 50)
    b = torch.zeros(50, dtype=F64)
    b[0], b[1] = 1.0, -1.0  # balanced inside the first component
    b[30], b[31] = 2.5, -2.5  # and inside the second
    base = dist.Normal(torch.zeros(A.shape[1], dtype=F64), 1.0).to_event(1)
    d = plc.constrain(base, A, b)
    assert d._cond.rank == 48
    x = d.sample((3,))
    assert exact_bound(A.to_sparse().to_dense(), x, b, F64).all()


@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_inconsistent_injections_are_a_clear_error(fmt):
    A = incidence(random_network(100, extra=60, seed=26), 100)
    b = torch.zeros(100, dtype=F64)
    b[3] = 1.0  # a source without a sink: no flow balances
    base = dist.Normal(torch.zeros(A.shape[1], dtype=F64), 1.0).to_event(1)
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.constrain(base, layout(A, fmt), b)
    # a second component that does not balance, while the first one does
    e = torch.cat([random_network(10, 5, seed=27), random_network(10, 5, seed=28) + 10])
    A2 = incidence(e, 20)
    b2 = torch.zeros(20, dtype=F64)
    b2[0], b2[1], b2[12] = 1.0, -1.0, 0.5
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.constrain(dist.Normal(torch.zeros(A2.shape[1], dtype=F64), 1.0).to_event(1), A2, b2)


def test_redundancy_analysis_runs_once_per_law(monkeypatch):
    calls = []
    orig = redundancy_module.pivoted_cholesky
    monkeypatch.setattr(
        redundancy_module,
        "pivoted_cholesky",
        lambda *a, **k: calls.append(1) or orig(*a, **k),
    )
    A = incidence(grid_edges(6, 7), 42)
    g = torch.Generator().manual_seed(29)
    for _ in range(3):  # an SVI loop: new parameters, the same law
        loc = torch.randn(A.shape[1], generator=g, dtype=F64)
        d = plc.constrain(dist.Normal(loc, 1.0).to_event(1), A, torch.zeros(42, dtype=F64))
        d.log_prob(d.rsample())
        _ = d.variance
    assert len(calls) == 1


def test_zero_row_needs_a_zero_target():
    D = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]], dtype=F64)
    base = dist.MultivariateNormal(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    d = plc.constrain(base, D.to_sparse(), torch.tensor([1.0, 0.0, 2.0], dtype=F64))
    keep = torch.tensor([0, 2])
    ref = plc.constrain(base, D[keep], torch.tensor([1.0, 2.0], dtype=F64))
    x = ref.sample((3,))
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.constrain(base, D.to_sparse(), torch.tensor([1.0, 0.5, 2.0], dtype=F64))


def test_square_law_is_an_error():
    A = (torch.eye(5, dtype=F64) + torch.diag(torch.ones(4, dtype=F64), 1)).to_sparse()
    base = dist.Normal(torch.zeros(5, dtype=F64), 1.0).to_event(1)
    with pytest.raises(ValueError, match="m >= n"):
        plc.constrain(base, A, torch.ones(5, dtype=F64))


def test_too_many_independent_rows_after_dropping():
    path = torch.stack([torch.arange(7), torch.arange(1, 8)], 1)  # a tree: 7 edges, rank 7
    A = incidence(path, 8)
    with pytest.raises(ValueError, match="m >= n after dropping redundant rows"):
        plc.constrain(dist.Normal(torch.zeros(7, dtype=F64), 1.0).to_event(1), A, torch.zeros(8))


# ------------------------------------------- the redundant-row path, dense A too
def test_dense_redundant_rows_equal_the_svd_path(monkeypatch):
    g = torch.Generator().manual_seed(31)
    A0 = torch.randn(4, 9, generator=g, dtype=F64)
    A = torch.cat([A0, 2 * A0[:1] - A0[2:3], 0.25 * A0[3:]])  # two redundant rows
    x_true = torch.randn(9, generator=g, dtype=F64)
    b = A @ x_true
    base, loc, cov = gaussian("lowrank", 9, seed=32)
    d = plc.constrain(base, A, b)
    assert d._cond.kept is not None and d._cond.rank == 4
    monkeypatch.setattr(Conditioning, "_reduce_rows", lambda self: False)
    ref = plc.constrain(base, A, b)
    assert ref._cond.row_map is not None  # the SVD fallback
    x = ref.sample((4,))
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.variance, ref.variance)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(d.entropy(), ref.entropy())
    y = d.sample((4,))
    assert exact_bound(A, y, b, F64).all()


def test_ill_conditioned_rows_are_not_dropped():
    """Nearly, not exactly, dependent rows: the SVD decides (and the law is kept)."""
    g = torch.Generator().manual_seed(33)
    A0 = torch.randn(3, 10, generator=g, dtype=F64)
    A = torch.cat([A0, A0[:1] + A0[1:2] + 1e-9 * torch.randn(1, 10, generator=g, dtype=F64)])
    b = torch.randn(4, generator=g, dtype=F64)  # consistent: A has full row rank
    base = dist.Normal(torch.zeros(10, dtype=F64), 1.0).to_event(1)
    assert redundancy_module.row_reduction(as_operator(A.to_sparse()), 2.2e-16) is None
    d = plc.constrain(base, A.to_sparse(), b)
    assert d._cond.kept is None and d._cond.rank == 4
    x = d.sample((3,))
    assert exact_bound(A, x, b, F64).all()


def test_pivoted_cholesky_reveals_the_rank():
    g = torch.Generator().manual_seed(34)
    for m, r, block in [(12, 5, 3), (40, 40, 8), (150, 90, 64)]:
        B = torch.randn(m, r, generator=g, dtype=F64)
        C = B @ B.T
        order, L, rest = redundancy_module.pivoted_cholesky(C, 1e-10 * float(C.diag().max()), block)
        assert order.numel() == r == np.linalg.matrix_rank(C.numpy())
        assert sorted(order.tolist() + rest.tolist()) == list(range(m))
        torch.testing.assert_close((L @ L.T)[order], C[order])
        torch.testing.assert_close(L[order], L[order].tril())
        # greedy pivoting: the pivots never increase
        piv = L[order].diagonal()
        assert (piv[1:] <= piv[:-1] * (1 + 1e-12)).all()


# ------------------------------------------------- project, chart, handler, pickle
@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_project_equals_the_dense_projection(fmt):
    A = incidence(random_network(40, extra=30, seed=35), 40)
    b = torch.zeros(40, dtype=F64)
    b[0], b[5] = 1.5, -1.5
    x = torch.randn(3, A.shape[1], generator=torch.Generator().manual_seed(36), dtype=F64)
    y = plc.project(x, layout(A, fmt), b)
    torch.testing.assert_close(y, plc.project(x, A.to_dense(), b))
    assert exact_bound(A.to_dense(), y, b, F64).all()
    # the orthogonal projection: x - y is orthogonal to the subspace (in the row space of A)
    resid = (x - y).numpy()
    P = scipy.linalg.orth(A.to_dense().numpy().T)
    np.testing.assert_allclose(P @ (P.T @ resid.T), resid.T, atol=1e-10)


def test_chart_works_for_moderate_sizes():
    """biject_to(support) densifies through the SVD (documented): a 6 x 6 grid, n = 60."""
    A = incidence(grid_edges(6, 6), 36)
    b = torch.zeros(36, dtype=F64)
    b[0], b[35] = 1.0, -1.0
    d = plc.constrain(dist.Normal(torch.zeros(60, dtype=F64), 1.0).to_event(1), A, b)
    t = biject_to(d.support)
    assert t.dim == 60 - 35
    z = torch.randn(4, t.dim, generator=torch.Generator().manual_seed(37), dtype=F64)
    x = t(z)
    assert d.support.check(x).all()
    torch.testing.assert_close(t.inv(x), z)
    assert (t.log_abs_det_jacobian(z, x) == 0).all()
    # the chart's density agrees with log_prob: an orthonormal chart, so log_prob(t(z)) is the
    # density of z, a Gaussian in z whose mean is t.inv(mean)
    zm = t.inv(d.mean)
    zm.requires_grad_()
    (grad,) = torch.autograd.grad(d.log_prob(t(zm)), zm)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)


def test_linear_constraint_handler_with_a_sparse_law():
    A = incidence(grid_edges(4, 5), 20, dtype=torch.float32).to_sparse_csr()
    b = torch.zeros(20)
    b[0], b[19] = 1.0, -1.0

    def model():
        return pyro.sample("flow", dist.Normal(torch.zeros(31), 1.0).to_event(1))

    with plc.LinearConstraint(A, b, site="flow"):
        tr = pyro.poutine.trace(model).get_trace()
    x = tr.nodes["flow"]["value"]
    Ad = incidence(grid_edges(4, 5), 20).to_dense()
    assert exact_bound(Ad, x, b, torch.float32).all()
    assert torch.isfinite(tr.log_prob_sum())


def test_pickle_and_deepcopy():
    import copy

    A = incidence(random_network(15, extra=10, seed=38), 15).to_sparse_csr()
    base = dist.Normal(torch.zeros(A.shape[1], dtype=F64), 1.0).to_event(1)
    d = plc.constrain(base, A, torch.zeros(15, dtype=F64))
    x = d.sample((2,))
    for f in (lambda t: pickle.loads(pickle.dumps(t)), copy.deepcopy):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = f(d)
        torch.testing.assert_close(e.log_prob(x), d.log_prob(x))
        torch.testing.assert_close(e.mean, d.mean)
        y = e.sample()
        assert d.support.check(y).all()


@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_discrete_families_accept_a_sparse_sum_law(fmt):
    """Disjoint 0/1 rows (read through the dense matrix by the discrete families)."""
    D = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    A = layout(D.to_sparse(), fmt)
    for base, b in [
        (
            dist.Poisson(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])).to_event(1),
            torch.tensor([4.0, 3.0]),
        ),
        (
            dist.Bernoulli(torch.tensor([0.2, 0.6, 0.5, 0.7, 0.4])).to_event(1),
            torch.tensor([2.0, 1.0]),
        ),
    ]:
        ds, dd = plc.constrain(base, A, b), plc.constrain(base, D, b)
        x = dd.sample((6,))
        torch.testing.assert_close(ds.log_prob(x), dd.log_prob(x))
        torch.testing.assert_close(ds.mean, dd.mean)
        assert (ds.sample((4,)) @ D.T == b).all()
