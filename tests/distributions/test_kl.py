"""kl_divergence of constrained distributions: dense oracles, Monte Carlo, enumeration, ELBOs."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints, kl_divergence

import pyro_linconstr as plc

F64 = torch.float64
STRUCTURES = ["diag", "lowrank", "full"]


# --------------------------------------------------------------------------- helpers
def gaussian_base(kind, n, batch=(), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch + (n,), generator=g, dtype=F64)
    if kind == "diag":
        scale = 0.5 + torch.rand(batch + (n,), generator=g, dtype=F64)
        return dist.Normal(loc.to(dtype), scale.to(dtype)).to_event(1)
    if kind == "lowrank":
        W = 0.7 * torch.randn(batch + (n, 2), generator=g, dtype=F64)
        d = 0.3 + torch.rand(batch + (n,), generator=g, dtype=F64)
        return dist.LowRankMultivariateNormal(loc.to(dtype), W.to(dtype), d.to(dtype))
    M = torch.randn(batch + (n, n), generator=g, dtype=F64) / math.sqrt(n)
    cov = M @ M.transpose(-1, -2) + 0.3 * torch.eye(n, dtype=F64)
    return dist.MultivariateNormal(loc.to(dtype), covariance_matrix=cov.to(dtype))


def moments(base):
    """Mean and dense covariance of an unconstrained Gaussian base, in float64."""
    if isinstance(base, dist.Independent):
        s = base.base_dist.scale.to(F64)
        return base.base_dist.loc.to(F64), torch.diag_embed(s**2)
    return base.mean.to(F64), base.covariance_matrix.to(F64)


def law(op, n, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    if op == "groupsum":
        groups = torch.arange(n) * 3 // n  # three contiguous groups
        A = plc.GroupSum(groups, 3, dtype=dtype)
        b = torch.randn(3, generator=g, dtype=F64).to(dtype)
        return A, b, A.to_dense().to(F64)
    A = torch.randn(2, n, generator=g, dtype=F64).to(dtype)
    b = torch.randn(2, generator=g, dtype=F64).to(dtype)
    return A, b, A.to(F64)


def oracle_kl(base_p, base_q, A, b):
    """KL in the coordinates of an orthonormal null-space basis N, from explicit matrices."""
    A, b = A.to(F64), b.to(F64)
    _, s, Vh = torch.linalg.svd(A, full_matrices=True)
    r = int((s > 1e-10 * s[0]).sum())
    N = Vh[r:].T
    d = N.shape[1]

    def conditional(base):
        mu, Sigma = moments(base)
        K = Sigma @ A.T
        S = A @ K
        S_inv = torch.linalg.pinv(S, hermitian=True)
        mean = mu + K @ S_inv @ (b - A @ mu)
        C = Sigma - K @ S_inv @ K.T
        return mean, N.T @ C @ N

    mp, Cp = conditional(base_p)
    mq, Cq = conditional(base_q)
    delta = N.T @ (mq - mp)
    return 0.5 * (
        torch.linalg.solve(Cq, Cp).trace()
        - d
        + delta @ torch.linalg.solve(Cq, delta)
        + torch.logdet(Cq)
        - torch.logdet(Cp)
    )


# --------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("op", ["dense", "groupsum"])
@pytest.mark.parametrize("kp,kq", list(itertools.product(STRUCTURES, STRUCTURES)))
def test_gaussian_matches_dense_oracle(kp, kq, op, dtype):
    n = 7
    A, b, _ = law(op, n, dtype=dtype)
    base_p = gaussian_base(kp, n, seed=2, dtype=dtype)
    base_q = gaussian_base(kq, n, seed=3, dtype=dtype)
    kl = kl_divergence(plc.constrain(base_p, A, b), plc.constrain(base_q, A, b))
    assert kl.shape == () and kl.dtype == dtype
    oracle = oracle_kl(base_p, base_q, A.to_dense() if op == "groupsum" else A, b)
    tol = 1e-9 if dtype == F64 else 1e-5
    torch.testing.assert_close(kl.double(), oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("kp,kq", [("diag", "diag"), ("diag", "lowrank"), ("full", "diag")])
def test_rank_deficient_laws(kp, kq):
    """An empty group of a GroupSum and a redundant dense row are dropped by both laws."""
    base_p, base_q = gaussian_base(kp, 6, seed=16), gaussian_base(kq, 6, seed=17)
    G = plc.GroupSum(torch.tensor([0, 0, 2, 2, 2, 0]), 3, dtype=F64)  # group 1 is empty
    b = torch.tensor([1.0, 0.0, -2.0], dtype=F64)
    g = torch.Generator().manual_seed(18)
    A = torch.randn(2, 6, generator=g, dtype=F64)
    A = torch.cat([A, A[:1] + 2 * A[1:]])
    bA = A @ torch.randn(6, generator=g, dtype=F64)
    for op, rhs, dense in ((G, b, G.to_dense()), (A, bA, A)):
        kl = kl_divergence(plc.constrain(base_p, op, rhs), plc.constrain(base_q, op, rhs))
        torch.testing.assert_close(kl, oracle_kl(base_p, base_q, dense, rhs), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "kp,kq,op",
    [
        ("diag", "diag", "groupsum"),
        ("diag", "diag", "dense"),
        ("lowrank", "full", "dense"),
        ("full", "diag", "groupsum"),
        ("diag", "lowrank", "dense"),
    ],
)
def test_gaussian_matches_monte_carlo(kp, kq, op):
    n = 6
    A, b, _ = law(op, n)
    p = plc.constrain(gaussian_base(kp, n, seed=4), A, b)
    q = plc.constrain(gaussian_base(kq, n, seed=5), A, b)
    x = p.sample((20000,))
    ratio = p.log_prob(x) - q.log_prob(x)
    se = ratio.std() / math.sqrt(ratio.numel())
    assert abs(ratio.mean() - kl_divergence(p, q)) < 4 * se


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("op", ["dense", "groupsum"])
def test_kl_of_a_law_with_itself_is_zero(kind, op, dtype):
    n = 8
    A, b, _ = law(op, n, dtype=dtype)
    base = gaussian_base(kind, n, dtype=dtype)
    p = plc.constrain(base, A, b)
    again = plc.constrain(gaussian_base(kind, n, dtype=dtype), A, b)  # a separate object
    tol = 50 * n * torch.finfo(dtype).eps
    for q in (p, again):
        kl = kl_divergence(p, q)
        assert kl.dtype == dtype and abs(float(kl)) <= tol
    if kind == "diag":  # the diagonal path has no cancellation at all
        assert float(kl_divergence(p, again)) == 0.0


def test_diagonal_group_sum_is_linear_time_and_accurate_in_float32():
    """n = 200k entries in 2000 groups: no n x n (or m x n) matrix, float32 close to float64."""
    n, m = 200_000, 2000
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, m, (n,), generator=g).sort().values
    loc_p, loc_q = torch.randn(2, n, generator=g, dtype=F64)
    scale_p, scale_q = 0.5 + torch.rand(2, n, generator=g, dtype=F64)
    b = torch.randn(m, generator=g, dtype=F64)
    kls = {}
    for dtype in (torch.float32, F64):
        A = plc.GroupSum(groups, m)
        p = plc.constrain(dist.Normal(loc_p.to(dtype), scale_p.to(dtype)).to_event(1), A, b)
        q = plc.constrain(dist.Normal(loc_q.to(dtype), scale_q.to(dtype)).to_event(1), A, b)
        kls[dtype] = kl_divergence(p, q)
    assert kls[torch.float32].dtype == torch.float32
    torch.testing.assert_close(kls[torch.float32].double(), kls[F64], rtol=1e-5, atol=0)
    # against the per-group decomposition: each group is a small constrained Gaussian
    total = 0.0
    for gi in range(3):
        idx = (groups == gi).nonzero().squeeze(-1)
        base_p = dist.Normal(loc_p[idx], scale_p[idx]).to_event(1)
        base_q = dist.Normal(loc_q[idx], scale_q[idx]).to_event(1)
        ones = torch.ones(1, idx.numel(), dtype=F64)
        total += float(oracle_kl(base_p, base_q, ones, b[gi : gi + 1]))
    sub = (groups < 3).nonzero().squeeze(-1)
    A3 = plc.GroupSum(groups[sub], 3)
    p3 = plc.constrain(dist.Normal(loc_p[sub], scale_p[sub]).to_event(1), A3, b[:3])
    q3 = plc.constrain(dist.Normal(loc_q[sub], scale_q[sub]).to_event(1), A3, b[:3])
    assert abs(float(kl_divergence(p3, q3)) - total) < 1e-10 * max(1.0, total)


@pytest.mark.parametrize(
    "kp,kq,op",
    [("diag", "diag", "groupsum"), ("lowrank", "diag", "dense"), ("full", "lowrank", "dense")],
)
def test_gradcheck(kp, kq, op):
    n = 5
    A, b, _ = law(op, n)
    params = []
    for kind, seed in ((kp, 6), (kq, 7)):
        base = gaussian_base(kind, n, seed=seed)
        if kind == "diag":
            params += [base.base_dist.loc, base.base_dist.scale]
        elif kind == "lowrank":
            params += [base.loc, base.cov_factor, base.cov_diag]
        else:
            params += [base.loc, base.scale_tril]
    params = [t.detach().clone().requires_grad_() for t in params]

    def build(kind, ps):
        if kind == "diag":
            return dist.Normal(*ps[:2]).to_event(1), ps[2:]
        if kind == "lowrank":
            return dist.LowRankMultivariateNormal(*ps[:3]), ps[3:]
        return dist.MultivariateNormal(ps[0], scale_tril=ps[1].tril()), ps[2:]

    def f(*ps):
        base_p, rest = build(kp, list(ps))
        base_q, _ = build(kq, rest)
        return kl_divergence(plc.constrain(base_p, A, b), plc.constrain(base_q, A, b))

    assert torch.autograd.gradcheck(f, params)
    grads = torch.autograd.grad(f(*params), params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_batch_shapes_broadcast():
    n = 6
    g = torch.Generator().manual_seed(8)
    A = torch.randn(2, n, generator=g, dtype=F64)
    b = torch.randn(4, 2, generator=g, dtype=F64)  # one b per datum
    loc_p = torch.randn(3, 1, n, generator=g, dtype=F64)
    loc_q = torch.randn(4, n, generator=g, dtype=F64)
    scale_p = 0.5 + torch.rand(3, 1, n, generator=g, dtype=F64)
    W = torch.randn(4, n, 2, generator=g, dtype=F64)
    d_q = 0.5 + torch.rand(n, generator=g, dtype=F64)
    p = plc.constrain(dist.Normal(loc_p, scale_p).to_event(1), A, b)
    q = plc.constrain(dist.LowRankMultivariateNormal(loc_q, W, d_q), A, b)
    assert p.batch_shape == (3, 4) and q.batch_shape == (4,)
    kl = kl_divergence(p, q)
    assert kl.shape == (3, 4)
    for i, j in itertools.product(range(3), range(4)):
        bp = dist.Normal(loc_p[i, 0], scale_p[i, 0]).to_event(1)
        bq = dist.LowRankMultivariateNormal(loc_q[j], W[j], d_q)
        torch.testing.assert_close(kl[i, j], oracle_kl(bp, bq, A, b[j]), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(kl_divergence(p.expand((2, 3, 4)), q), kl.expand(2, 3, 4))


def test_invariant_under_equivalent_laws():
    """(A, b), (T A, T b), a GroupSum and its dense matrix describe one subspace."""
    n = 6
    g = torch.Generator().manual_seed(9)
    A = torch.randn(2, n, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    T = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=F64)
    base_p, base_q = gaussian_base("diag", n, seed=10), gaussian_base("full", n, seed=11)
    ref = kl_divergence(plc.constrain(base_p, A, b), plc.constrain(base_q, A, b))
    other = kl_divergence(plc.constrain(base_p, A, b), plc.constrain(base_q, T @ A, T @ b))
    torch.testing.assert_close(other, ref, rtol=1e-9, atol=0)
    # float32 p against a float64 q whose (A, b) was rounded differently
    p32 = plc.constrain(
        gaussian_base("diag", n, seed=10, dtype=torch.float32), A.float(), b.float()
    )
    mixed = kl_divergence(p32, plc.constrain(base_q, T @ A, T @ b))
    torch.testing.assert_close(mixed.double(), ref, rtol=1e-4, atol=1e-4)
    A_g = plc.GroupSum(torch.tensor([0, 0, 1, 1, 1, 2]), 3, dtype=F64)
    b_g = torch.randn(3, generator=g, dtype=F64)
    ref_g = kl_divergence(plc.constrain(base_p, A_g, b_g), plc.constrain(base_q, A_g, b_g))
    dense_g = kl_divergence(
        plc.constrain(base_p, A_g, b_g), plc.constrain(base_q, A_g.to_dense(), b_g)
    )
    torch.testing.assert_close(dense_g, ref_g, rtol=1e-9, atol=0)


def test_zero_sum_normal_on_a_table():
    """ZeroSumNormal (AxisSums over both axes of a 3 x 4 table, redundant margin dropped)."""
    g = torch.Generator().manual_seed(15)
    shape = (3, 4)
    scale_p, scale_q = 0.5 + torch.rand(2, *shape, generator=g, dtype=F64)
    loc_p = torch.randn(shape, generator=g, dtype=F64)
    p = plc.ZeroSumNormal(scale_p, shape, loc=loc_p)
    q = plc.ZeroSumNormal(scale_q, shape)
    A = plc.AxisSums(shape, (0, 1), dtype=F64).to_dense()
    oracle = oracle_kl(
        dist.Normal(loc_p.reshape(-1), scale_p.reshape(-1)).to_event(1),
        dist.Normal(torch.zeros(12, dtype=F64), scale_q.reshape(-1)).to_event(1),
        A,
        torch.zeros(A.shape[0], dtype=F64),
    )
    torch.testing.assert_close(kl_divergence(p, q), oracle, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="infinite"):
        kl_divergence(p, plc.ZeroSumNormal(scale_q, shape, zero_sum_axes=(1,)))


def test_different_supports_raise():
    n = 5
    A = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    base = gaussian_base("diag", n)
    p = plc.constrain(base, A, b)
    cases = {
        "b differs: row 1": plc.constrain(base, A, torch.tensor([1.0, 2.5], dtype=F64)),
        "different row spaces": plc.constrain(base, A[:, [1, 0, 3, 2, 4]], b),
        "rank of A is 2 for p and 1 for q": plc.constrain(base, A[:1], b[:1]),
        "same row space, but b differs": plc.constrain(base, 2 * A, 2 * b + 1e-3),
    }
    for message, q in cases.items():
        with pytest.raises(ValueError, match="infinite") as info:
            kl_divergence(p, q)
        assert message in str(info.value)
    # a batch where only one element differs names it
    bb = torch.stack([b, b, b + torch.tensor([0.0, 1.0], dtype=F64)])
    with pytest.raises(ValueError, match=r"batch index \(2,\)"):
        kl_divergence(p, plc.constrain(base, A, bb))
    # GroupSum: the same operator, a different total
    G = plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), 2)
    pg = plc.constrain(dist.Normal(torch.zeros(n), 1.0).to_event(1), G, torch.zeros(2))
    qg = plc.constrain(dist.Normal(torch.zeros(n), 1.0).to_event(1), G, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="infinite.*b differs: row 1"):
        kl_divergence(pg, qg)
    # within the support tolerance (a float32 rounding of b) is the same subspace
    p3 = plc.constrain(dist.Normal(torch.zeros(n), 1.0).to_event(1), G, torch.tensor([0.0, 3.0]))
    q3 = plc.constrain(
        dist.Normal(torch.zeros(n), 1.0).to_event(1), G, torch.tensor([0.0, 3 + 5e-7])
    )
    assert float(q3.b[1]) != 3.0 and torch.isfinite(kl_divergence(p3, q3))
    with pytest.raises(ValueError, match="event shapes differ"):
        kl_divergence(p, plc.constrain(gaussian_base("diag", 4), torch.ones(1, 4), torch.ones(1)))


# --------------------------------------------------------------------------- discrete
def support(groups, totals, upper):
    """Every integer x with 0 <= x_i <= upper_i and the group sums (all entries covered)."""
    ranges = [range(u + 1) for u in upper]
    rows = [
        x
        for x in itertools.product(*ranges)
        if all(
            sum(x[i] for i in range(len(x)) if groups[i] == g) == k for g, k in enumerate(totals)
        )
    ]
    return torch.tensor(rows, dtype=F64)


def brute_force_kl(base_p, base_q, xs):
    lp = base_p.log_prob(xs)
    lq = base_q.log_prob(xs)
    lp, lq = lp - lp.logsumexp(0), lq - lq.logsumexp(0)
    return (lp.exp() * (lp - lq)).sum()


def test_poisson_matches_enumeration():
    groups, totals = [0, 1, 0, 1, 1, 0], [3, 4]
    rp = torch.tensor([0.3, 1.7, 2.0, 0.5, 4.0, 1.1], dtype=F64)
    rq = torch.tensor([1.0, 0.2, 0.6, 2.5, 1.0, 3.0], dtype=F64)
    A = plc.GroupSum(torch.tensor(groups), 2)
    b = torch.tensor(totals, dtype=F64)
    p = plc.constrain(dist.Poisson(rp).to_event(1), A, b)
    q = plc.constrain(dist.Poisson(rq).to_event(1), A, b)
    xs = support(groups, totals, [max(totals)] * 6)
    oracle = brute_force_kl(dist.Poisson(rp).to_event(1), dist.Poisson(rq).to_event(1), xs)
    torch.testing.assert_close(kl_divergence(p, q), oracle)
    assert float(kl_divergence(p, p)) == 0.0
    # proportional rates within each group: the same multinomials
    q2 = plc.constrain(
        dist.Poisson(rp * torch.tensor([2.0, 5.0, 2.0, 5.0, 5.0, 2.0])).to_event(1), A, b
    )
    assert abs(float(kl_divergence(p, q2))) < 1e-14


def test_poisson_uncovered_entry_batch_and_relabelled_groups():
    # entry 2 is in no row: its Poisson KL adds to the multinomial part
    A = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=F64)
    b = torch.tensor([[3.0, 2.0], [1.0, 0.0]], dtype=F64)  # a batch of two totals
    rp = torch.tensor([0.5, 1.5, 2.5, 0.7], dtype=F64)
    rq = torch.tensor([1.2, 0.4, 0.9, 2.0], dtype=F64)
    p = plc.constrain(dist.Poisson(rp).to_event(1), A, b)
    q = plc.constrain(dist.Poisson(rq).to_event(1), A, b)
    kl = kl_divergence(p, q)
    assert kl.shape == (2,)
    free = kl_divergence(dist.Poisson(rp[2]), dist.Poisson(rq[2]))
    for i, tot in enumerate(([3, 2], [1, 0])):
        xs = support([0, 1, 0], tot, [3, 3, 3])
        covered = [0, 1, 3]
        oracle = brute_force_kl(
            dist.Poisson(rp[covered]).to_event(1), dist.Poisson(rq[covered]).to_event(1), xs
        )
        torch.testing.assert_close(kl[i], oracle + free)
    # the same partition with other group ids (rows swapped) is the same support
    q_swapped = plc.constrain(dist.Poisson(rq).to_event(1), A.flip(0), b.flip(-1))
    torch.testing.assert_close(kl_divergence(p, q_swapped), kl)


@pytest.mark.parametrize("family", ["Bernoulli", "Binomial"])
def test_bernoulli_binomial_match_enumeration(family):
    g = torch.Generator().manual_seed(12)
    groups, totals = [0, 0, 1, 0, 1, 1], [2, 3]
    lp = torch.randn(2, 6, generator=g, dtype=F64)  # a batch of two
    lq = torch.randn(6, generator=g, dtype=F64)
    if family == "Bernoulli":
        count = [1] * 6
        make = lambda logits: dist.Bernoulli(logits=logits).to_event(1)  # noqa: E731
    else:
        count = [2, 1, 3, 2, 1, 2]
        N = torch.tensor(count, dtype=F64)
        make = lambda logits: dist.Binomial(N, logits=logits).to_event(1)  # noqa: E731
    A = plc.GroupSum(torch.tensor(groups), 2)
    b = torch.tensor(totals, dtype=F64)
    p, q = plc.constrain(make(lp), A, b), plc.constrain(make(lq), A, b)
    kl = kl_divergence(p, q)
    assert kl.shape == (2,)
    xs = support(groups, totals, count)
    for i in range(2):
        torch.testing.assert_close(kl[i], brute_force_kl(make(lp[i]), make(lq), xs))
    assert (kl_divergence(p, p) == 0).all()


def test_discrete_gradients():
    A = plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), 2)
    b = torch.tensor([2.0, 3.0], dtype=F64)
    g = torch.Generator().manual_seed(13)
    rates = [(0.5 + torch.rand(5, generator=g, dtype=F64)).requires_grad_() for _ in range(2)]

    def poisson(rp, rq):
        return kl_divergence(
            plc.constrain(dist.Poisson(rp).to_event(1), A, b),
            plc.constrain(dist.Poisson(rq).to_event(1), A, b),
        )

    assert torch.autograd.gradcheck(poisson, rates)
    logits = [torch.randn(5, generator=g, dtype=F64).requires_grad_() for _ in range(2)]
    N = torch.tensor([2.0, 1.0, 3.0, 1.0, 2.0], dtype=F64)

    def binomial(lp, lq):
        return kl_divergence(
            plc.constrain(dist.Binomial(N, logits=lp).to_event(1), A, b),
            plc.constrain(dist.Binomial(N, logits=lq).to_event(1), A, b),
        )

    assert torch.autograd.gradcheck(binomial, logits)


def test_discrete_different_supports_raise():
    A = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2)
    rate = torch.ones(4)
    p = plc.constrain(dist.Poisson(rate).to_event(1), A, torch.tensor([2.0, 1.0]))
    cases = [
        (plc.constrain(dist.Poisson(rate).to_event(1), A, torch.tensor([2.0, 2.0])), "group 1"),
        (
            plc.constrain(
                dist.Poisson(rate).to_event(1),
                plc.GroupSum(torch.tensor([0, 1, 0, 1]), 2),
                torch.tensor([2.0, 1.0]),
            ),
            "partition the entries differently",
        ),
        (
            plc.constrain(
                dist.Poisson(rate).to_event(1),
                torch.tensor([[1.0, 1.0, 0.0, 0.0]]),
                torch.tensor([2.0]),
            ),
            "entry 2 is in a group under p only",
        ),
    ]
    for q, message in cases:
        with pytest.raises(ValueError, match="infinite") as info:
            kl_divergence(p, q)
        assert message in str(info.value)
    bern = dist.Bernoulli(logits=torch.zeros(4)).to_event(1)
    pb = plc.constrain(bern, A, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="infinite.*group totals differ"):
        kl_divergence(pb, plc.constrain(bern, A, torch.tensor([1.0, 2.0])))
    binom = dist.Binomial(torch.tensor([1.0, 1.0, 2.0, 1.0]), logits=torch.zeros(4)).to_event(1)
    with pytest.raises(ValueError, match="infinite.*total_count differs: entry 2"):
        kl_divergence(pb, plc.constrain(binom, A, torch.tensor([1.0, 1.0])))
    # a Binomial with total_count 1 is a Bernoulli
    ones = dist.Binomial(torch.ones(4), logits=torch.zeros(4)).to_event(1)
    assert float(kl_divergence(pb, plc.constrain(ones, A, torch.tensor([1.0, 1.0])))) == 0.0
    # different families are not registered
    with pytest.raises(NotImplementedError):
        kl_divergence(p, pb)


# --------------------------------------------------------------------------- ELBO
TAU = 0.7


def zero_sum_problem(n=5):
    A = torch.ones(1, n, dtype=F64)
    b = torch.zeros(1, dtype=F64)
    y = torch.tensor([1.5, -0.5, 0.8, 2.0, -1.0], dtype=F64)[:n]
    return A, b, y


def conjugate_model(A, b):
    @plc.LinearConstraint(A, b, site="x")
    def model(y=None):
        x = pyro.sample("x", dist.Normal(torch.zeros(A.shape[-1], dtype=F64), 1.0).to_event(1))
        if y is not None:
            pyro.sample("y", dist.Normal(x, TAU).to_event(1), obs=y)

    return model


def guide_of(A, b, loc0, scale0):
    def guide(y=None):
        loc = pyro.param("q_loc", loc0.clone())
        scale = pyro.param("q_scale", scale0.clone(), constraint=constraints.positive)
        pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b))

    return guide


def exact_neg_elbo(A, b, y, loc, scale):
    """-ELBO = -E_q[log N(y; x, tau^2)] + KL(q || prior), by dense float64 algebra."""
    prior = dist.Normal(torch.zeros_like(y), 1.0).to_event(1)
    q_base = dist.Normal(loc, scale).to_event(1)
    mu, Sigma = moments(q_base)
    K = Sigma @ A.T
    S = A @ K
    m = mu + K @ torch.linalg.solve(S, b - A @ mu)
    tr = (Sigma - K @ torch.linalg.solve(S, K.T)).trace()
    n = y.numel()
    e_lik = -0.5 * ((y - m) @ (y - m) + tr) / TAU**2 - 0.5 * n * math.log(2 * math.pi * TAU**2)
    return -e_lik + oracle_kl(q_base, prior, A, b)


def test_trace_mean_field_uses_the_closed_form():
    """Without observations the loss is KL(q || prior): deterministic, equal to the oracle,
    also inside a plate with one b per datum."""
    A = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 1.0]], dtype=F64)
    b = torch.tensor([[1.0, 0.5], [0.0, -1.0], [2.0, 0.0]], dtype=F64)
    g = torch.Generator().manual_seed(14)
    loc = torch.randn(3, 4, generator=g, dtype=F64)
    scale = 0.5 + torch.rand(3, 4, generator=g, dtype=F64)

    def model():
        with pyro.plate("data", 3), plc.LinearConstraint(A, b, site="x"):
            pyro.sample("x", dist.Normal(torch.zeros(4, dtype=F64), 1.0).to_event(1))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b))

    prior = dist.Normal(torch.zeros(4, dtype=F64), 1.0).to_event(1)
    oracle = sum(
        oracle_kl(dist.Normal(loc[i], scale[i]).to_event(1), prior, A, b[i]) for i in range(3)
    )
    elbo = TraceMeanField_ELBO()
    losses = [elbo.loss(model, guide) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    assert abs(losses[0] - float(oracle)) < 1e-10
    # Trace_ELBO estimates the same number, with noise
    mc = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    mc_loss = mc.loss(model, guide)
    assert mc_loss != losses[0] and abs(mc_loss - float(oracle)) < 0.05 * float(oracle)


def test_trace_mean_field_loss_is_unbiased():
    A, b, y = zero_sum_problem()
    model = conjugate_model(A, b)
    loc0 = torch.tensor([0.3, -0.2, 0.5, 1.0, 0.1], dtype=F64)
    scale0 = torch.tensor([0.6, 0.9, 0.7, 1.2, 0.5], dtype=F64)
    guide = guide_of(A, b, loc0, scale0)
    exact = float(exact_neg_elbo(A, b, y, loc0, scale0))
    elbo = TraceMeanField_ELBO()
    losses = torch.tensor([elbo.loss(model, guide, y) for _ in range(800)])
    assert abs(losses.mean() - exact) < 4 * losses.std() / math.sqrt(losses.numel())


def test_svi_with_trace_mean_field_reaches_the_exact_posterior():
    """Zero-sum prior, Gaussian likelihood: the posterior is
    constrain(N(y / (1 + tau^2), tau^2 / (1 + tau^2)), A, b), inside the guide family."""
    A, b, y = zero_sum_problem()
    model = conjugate_model(A, b)
    guide = guide_of(A, b, torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64))
    elbo = TraceMeanField_ELBO(num_particles=8, vectorize_particles=True)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.05 ** (1 / 600)})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(600):
        svi.step(y)
    q = plc.constrain(dist.Normal(pyro.param("q_loc"), pyro.param("q_scale")).to_event(1), A, b)
    # the exact posterior by dense linear algebra
    s = TAU**2 / (1 + TAU**2)
    mu, Sigma = y / (1 + TAU**2), s * torch.eye(5, dtype=F64)
    K = Sigma @ A.T
    S = A @ K
    post_mean = mu + K @ torch.linalg.solve(S, b - A @ mu)
    post_var = (Sigma - K @ torch.linalg.solve(S, K.T)).diagonal()
    assert (q.mean.detach() - post_mean).abs().max() < 0.06
    assert (q.variance.detach() - post_var).abs().max() < 0.05
