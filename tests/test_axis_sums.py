"""AxisSums: products, kept rows, margins and the Gaussian conditioning against dense oracles."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_linconstr as plc
from pyro_linconstr.ops.conditioning import trusted_condition
from pyro_linconstr.ops.numerics import exactness_constant

CASES = [
    ((5,), (0,)),
    ((4, 5), (0,)),
    ((4, 5), (-1,)),
    ((4, 5), (0, 1)),
    ((3, 4, 5), (0, 1, 2)),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), (1,)),
    ((2, 3, 4, 2), (1, 3)),
]


def full_margins_matrix(shape, axes):
    """Dense oracle: every margin over every axis (redundant rows included), from the identity."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n, *shape))
    rows = [eye.sum(1 + (a % len(shape))).reshape(n, -1).T for a in axes]
    return torch.cat(rows, 0)


def null_dim(shape, axes):
    axes = {a % len(shape) for a in axes}
    return math.prod(s - 1 if d in axes else s for d, s in enumerate(shape))


@pytest.mark.parametrize("shape,axes", CASES)
def test_products_match_dense(shape, axes):
    A = plc.AxisSums(shape, axes, dtype=torch.float64)
    D = A.to_dense()
    n, m = A.num_cols, A.num_rows
    assert D.shape == (m, n) and A.batch_shape == () and A.dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A.matvec(x), x @ D.T)
    torch.testing.assert_close(A.rmatvec(y), y @ D)
    torch.testing.assert_close(A.abs_matvec(x), x.abs() @ D.T)
    X = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(2, m, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A.matmul(X), D @ X)
    torch.testing.assert_close(A.rmatmul(Y), D.T @ Y)
    s = torch.rand(2, n, generator=g, dtype=torch.float64) + 0.1
    G = (D * s.unsqueeze(-2)) @ D.T
    if A.diagonal_gram:
        torch.testing.assert_close(A.weighted_gram(s), G.diagonal(dim1=-2, dim2=-1))
        torch.testing.assert_close(torch.diag_embed(A.weighted_gram(s)), G)
    else:
        torch.testing.assert_close(A.weighted_gram(s), G)
    M = torch.randn(2, m, m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A.quad_diag(M), ((M @ D) * D).sum(-2))
    torch.testing.assert_close(A.gram_logdet(), torch.logdet(D @ D.T))
    # margins of the event-shaped input equal those of the flat one
    x_ev = x.reshape(2, 3, *shape)
    for a, got in zip(A.axes, A.margins(x_ev)):
        torch.testing.assert_close(got, x_ev.sum(a - len(shape)))
    assert A.to(torch.float32).to_dense().dtype == torch.float32


@pytest.mark.parametrize("shape,axes", CASES)
def test_kept_rows_are_independent_and_span_every_margin(shape, axes):
    A = plc.AxisSums(shape, axes, dtype=torch.float64)
    D = A.to_dense()
    full = full_margins_matrix(shape, axes)
    n = math.prod(shape)
    assert A.num_rows == n - null_dim(shape, axes) == A.num_cols - A.null_dim()
    assert int(torch.linalg.matrix_rank(D)) == A.num_rows  # full row rank
    assert int(torch.linalg.matrix_rank(torch.cat([D, full]))) == A.num_rows  # same row space
    if len(A.axes) == 2 and len(shape) == 2:
        assert A.num_rows == shape[0] + shape[1] - 1


def test_row_layout_of_a_table():
    """Column sums first, then the first r - 1 row sums (documented order)."""
    r, c = 3, 4
    A = plc.AxisSums((r, c), (1, 0))  # order of axes does not matter
    assert A.axes == (0, 1)
    x = torch.arange(12.0).reshape(r, c)
    torch.testing.assert_close(A.matvec(x.reshape(-1)), torch.cat([x.sum(0), x.sum(1)[:-1]]))


@pytest.mark.parametrize("shape,axes", [((4, 5), (0, 1)), ((3, 4, 5), (0, 1, 2))])
def test_gram_and_quad_diag_gradients(shape, axes):
    A = plc.AxisSums(shape, axes)
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(2, A.num_cols, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    M = torch.randn(A.num_rows, A.num_rows, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(A.weighted_gram, (s,))
    assert torch.autograd.gradgradcheck(A.weighted_gram, (s,))
    assert torch.autograd.gradcheck(A.quad_diag, (M,))


# ------------------------------------------------------------------ margins
def test_rhs_maps_margins_to_kept_rows():
    A = plc.AxisSums((3, 4, 5), (0, 2), dtype=torch.float64)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(A.rhs(A.margins(x)), A.matvec(x.reshape(6, -1)))
    torch.testing.assert_close(A.rhs(list(A.margins(x))), A.matvec(x.reshape(6, -1)))
    # leading dims broadcast; a flat tensor of kept rows passes through
    m0, m2 = A.margins(x[0])
    assert A.rhs((m0, m2.expand(2, 3, 4))).shape == (2, A.num_rows)
    b = torch.zeros(A.num_rows)
    assert A.rhs(b) is b


def test_rhs_consistency_is_necessary_and_sufficient():
    """Margins whose totals agree are the margins of some x (the chart reaches them)."""
    r, c = 4, 6
    A = plc.AxisSums((r, c), (0, 1), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    col = torch.randn(c, generator=g, dtype=torch.float64)
    row = torch.randn(r, generator=g, dtype=torch.float64)
    row = row - row.mean() + col.sum() / r  # same grand total
    b = A.rhs((col, row))
    x = plc.transforms.AffineSubspaceTransform(A, b)(torch.zeros(A.null_dim(), dtype=torch.float64))
    x = x.reshape(r, c)
    torch.testing.assert_close(x.sum(0), col)
    torch.testing.assert_close(x.sum(1), row)  # the dropped row sum holds too
    with pytest.raises(ValueError, match="inconsistent margins.*axis 0.*axis 1"):
        A.rhs((col, row + 1e-3))


def test_rhs_errors():
    A = plc.AxisSums((3, 4), (0, 1))
    with pytest.raises(ValueError, match="tuple of 2 tensors"):
        A.rhs((torch.zeros(4),))
    with pytest.raises(ValueError, match=r"margin over axis 0 must have shape \(\.\.\., 4\)"):
        A.rhs((torch.zeros(3), torch.zeros(3)))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 6\)"):
        A.rhs(torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        A.rhs((torch.full((4,), math.nan), torch.zeros(3)))
    # float32 margins of float32 data pass (tolerance scales with eps and the totals)
    x = torch.randn(50, 3, 4) * 1e3
    A.rhs(A.margins(x))


@pytest.mark.parametrize(
    "shape,axes,match",
    [
        ((3, 4), (2,), r"axis 2 is outside the event.*\[-2, 1\]"),
        ((3, 4), (-3,), "outside the event"),
        ((3, 4), (0, -2), "duplicate axes"),
        ((3, 4), (1, 1), "duplicate axes"),
        ((3, 4), (), "axes is empty"),
        ((3, 4), (0.0,), "must be ints"),
        ((3, 4), "01", "must be ints"),
        ((1, 4), (0,), "axis 0 has size 1"),
        ((), (0,), "non-empty tuple"),
        ((3, 0), (0,), "positive ints"),
        ((3, -4), (0,), "positive ints"),
        (None, (0,), "tuple of positive ints"),
    ],
)
def test_bad_input_errors(shape, axes, match):
    with pytest.raises(ValueError, match=match):
        plc.AxisSums(shape, axes)


# --------------------------------------------------------- conditioning
def _no_dense(self):
    raise AssertionError("AxisSums.to_dense called: the m x n matrix was formed")


def _problem(shape, axes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g, dtype=dtype)
    scale = torch.rand(shape, generator=g, dtype=dtype) + 0.3
    A = plc.AxisSums(shape, axes)
    target = torch.randn((2, *shape), generator=g, dtype=dtype)  # two margin sets (a batch)
    return loc, scale, A, target


@pytest.mark.parametrize(
    "shape,axes", [((4, 5), (0, 1)), ((3, 4, 5), (0, 1, 2)), ((3, 4, 5), (2,))]
)
def test_conditioning_equals_dense_path_with_redundant_rows(shape, axes, monkeypatch):
    """Mean, variance, log_prob and entropy equal those of a dense A of *all* margins
    (redundant rows dropped by the library) with the same margins."""
    loc, scale, A, target = _problem(shape, axes)
    base = dist.Normal(loc, scale).to_event(len(shape))
    full = full_margins_matrix(shape, A.axes)
    b_full = target.reshape(2, -1) @ full.T
    ref = plc.constrain(base, full, b_full)
    monkeypatch.setattr(plc.AxisSums, "to_dense", _no_dense)  # never a dense fallback
    d = plc.constrain(base, A, A.rhs(A.margins(target)))
    assert d.batch_shape == (2,) and d.event_shape == shape
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.variance, ref.variance)
    x = d.sample((3,))
    assert x.shape == (3, 2, *shape)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(d.entropy(), ref.entropy())
    for a, got, want in zip(A.axes, A.margins(x), A.margins(target.expand(3, 2, *shape))):
        torch.testing.assert_close(got, want, msg=f"margin over axis {a}")


def test_single_axis_uses_the_diagonal_path():
    loc, scale, A, target = _problem((4, 6), (1,))
    d = plc.constrain(dist.Normal(loc, scale).to_event(2), A, A.matvec(target.reshape(2, -1)))
    assert A.diagonal_gram and d._cond.gram_diag is not None
    dense = plc.constrain(dist.Normal(loc, scale).to_event(2), A.to_dense(), d.b)
    torch.testing.assert_close(d.variance, dense.variance)
    x = d.sample()
    torch.testing.assert_close(d.log_prob(x), dense.log_prob(x))


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_other_covariances_through_the_generic_path(kind):
    shape, axes = (3, 4), (0, 1)
    loc, scale, A, target = _problem(shape, axes)
    n = A.num_cols
    W = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    if kind == "lowrank":
        base = dist.LowRankMultivariateNormal(loc.reshape(-1), W, scale.reshape(-1) ** 2)
    else:
        cov = W @ W.T + torch.diag(scale.reshape(-1) ** 2)
        base = dist.MultivariateNormal(loc.reshape(-1), cov)
    b = A.matvec(target.reshape(2, -1))
    d, ref = plc.constrain(base, A, b), plc.constrain(base, A.to_dense(), b)
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.variance, ref.variance)
    x = d.sample()
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


def test_gradients_equal_the_dense_path():
    shape, axes = (3, 4, 2), (0, 1)
    loc, scale, A, target = _problem(shape, axes)
    b = A.matvec(target[0].reshape(-1))
    x = plc.constrain(dist.Normal(loc, scale).to_event(3), A, b).sample()

    def objective(op):
        lp, sc = loc.clone().requires_grad_(), scale.clone().requires_grad_()
        d = plc.constrain(dist.Normal(lp, sc).to_event(3), op, b)
        (d.log_prob(x) + d.variance.sum() + d.mean.square().sum()).backward()
        return lp.grad, sc.grad

    for got, want in zip(objective(A), objective(A.to_dense())):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_grid_spread_variances_no_dense_fallback(dtype, monkeypatch):
    """80 x 80, both axes, variances spanning 1e-6..1e6: the Cholesky path is trusted
    (no SVD of a dense A, no m x n matrix), samples meet the exactness bound and the
    variances meet the documented bound against a float64 dense oracle."""
    r = c = 80
    g = torch.Generator().manual_seed(0)
    var = torch.empty(r, c, dtype=torch.float64).uniform_(-6, 6, generator=g)
    var = 10.0**var
    loc = torch.randn(r, c, generator=g, dtype=torch.float64) * var.sqrt()
    A = plc.AxisSums((r, c), (0, 1))
    b = A.matvec((torch.randn(r, c, generator=g, dtype=torch.float64) * var.sqrt()).reshape(-1))
    dense = A.to_dense().double()

    monkeypatch.setattr(plc.AxisSums, "to_dense", _no_dense)
    d = plc.constrain(dist.Normal(loc.to(dtype), var.sqrt().to(dtype)).to_event(2), A, b.to(dtype))
    x = d.rsample((3,))
    eps = torch.finfo(dtype).eps
    c_n = exactness_constant(r * c)
    x64 = x.double().reshape(3, -1)
    resid = (A.matvec(x64) - b).abs()
    assert bool((resid <= c_n * eps * (A.abs_matvec(x64) + b.abs())).all())
    assert torch.isfinite(d.log_prob(x)).all()
    v = d.variance.double().reshape(-1)
    s = var.reshape(-1)
    K = dense * s  # A Sigma, m x n (oracle only)
    v_ref = s - (K * torch.linalg.solve((dense * s) @ dense.T, K)).sum(0)
    kappa, eps64 = trusted_condition(torch.float64), torch.finfo(torch.float64).eps
    assert bool(((v - v_ref).abs() <= c_n * (eps * v_ref + kappa * eps64 * s)).all())


def test_handler_project_and_param_accept_axis_sums():
    A = plc.AxisSums((3, 4), (0, 1))
    b = A.rhs((torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.5, 1.0, 0.5])))

    def model():
        return pyro.sample("x", dist.Normal(torch.zeros(3, 4), 1.0).to_event(2))

    with plc.LinearConstraint(A, b, site="x"):
        x = model()
    assert x.shape == (3, 4)
    torch.testing.assert_close(x.sum(1), torch.tensor([0.5, 1.0, 0.5]))
    y = plc.project(torch.randn(5, 12), A, b)
    torch.testing.assert_close(A.matvec(y), b.expand(5, -1), atol=1e-5, rtol=1e-5)
    p = pyro.param("p", torch.zeros(3, 4), constraint=plc.constraints.affine_subspace(A, b, (3, 4)))
    torch.testing.assert_close(A.matvec(p.reshape(-1)), b)
