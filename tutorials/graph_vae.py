"""
A graph VAE that generates charge-neutral partial charges
=========================================================

A generative model of the partial charges of a metal-organic framework (MOF):
given a crystal graph, it draws whole charge assignments, one charge per atom,
and the charges of every crystal must sum to zero. The model is a variational
autoencoder over graphs:

* a latent ``z`` per crystal, ``p(z) = N(0, I)``;
* an **encoder**: a gated graph network over the crystal with its true charges
  as node inputs, pooled per crystal, gives ``q(z | crystal, charges)``;
* a **decoder**: a gated graph network over the crystal graph, conditioned on
  ``z``, gives each atom a Gaussian charge ``N(mu_i, s_i)``;
* the **law**: ``sum_i q_i = 0`` per crystal, one row of
  ``plc.GroupSum(crystal, num_crystals)`` with ``b = 0``.

We compare four ways to make the decoder obey the law, with the same networks,
training budget and splits (Li, Sahu, Van den Broeck & Zeng, NeSy 2026, compare
the same four in their VAE tables):

* **unconstrained**: the decoder's Gaussian on ``R^n``, law ignored;
* **constraint layer** (Stoian et al. 2024, "Constr Layer" in the paper): the
  decoder's sample is repaired by the layer: with the atoms in their stored
  order as the layer's variable order, the last atom of each crystal takes
  minus the sum of the others (the smallest change in L1 distance, all of it
  on one atom), trained through the exact density of the repaired sample;
* **constrained reparametrization** (CR): the decoder's distribution
  conditioned on the law, sampled exactly, and the data observed through
  isotropic noise on the law's subspace; trained with
  ``plc.infer.ConstrainedTrace_ELBO(estimator="reparam")``, gradients
  pathwise through the exact sample;
* **ours**: the decoder's distribution conditioned on the law with
  ``plc.LinearConstraint``, ``p(q | z, A q = 0)``, trained through its exact
  likelihood with ``Trace_ELBO``.

Data: the DDEC charges of 2,266 CoRE MOF crystals of Raza, Sturluson, Simon &
Fern, *J. Phys. Chem. C* 124 (2020) 19070, shipped with the package. Set
``PLC_SMOKE=1`` for a quick run (300 crystals, 3 epochs, about 10 CPU seconds);
the full mode (``PLC_SMOKE=0``: 2 splits x 4 methods x 30 epochs on all crystals)
took 1,056 CPU seconds on one thread (about 130 s per run, a sixth of it the
evaluation). ``PLC_GVAE_SPLITS``, ``PLC_GVAE_FIRST_SPLIT``, ``PLC_GVAE_EPOCHS``,
``PLC_GVAE_PARTICLES``, ``PLC_GVAE_SAMPLES`` and ``PLC_GVAE_METHODS`` (e.g.
``ours,layer``) change the budget; ``PLC_TAG`` is appended to the output names.
"""

# %%
# Setup
# -----
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_linconstr as plc
from pyro_linconstr._tutorial import env_int, env_subset, output_dir, smoke_mode
from pyro_linconstr.datasets import load_mof_charges, split_crystals

SMOKE = smoke_mode()  # PLC_SMOKE=1 (or true/yes/on): a quick run
NUM_SPLITS = env_int("PLC_GVAE_SPLITS", 1 if SMOKE else 2, minimum=1)
FIRST_SPLIT = env_int("PLC_GVAE_FIRST_SPLIT", 0)
SPLITS = list(range(FIRST_SPLIT, FIRST_SPLIT + NUM_SPLITS))
EPOCHS = env_int("PLC_GVAE_EPOCHS", 3 if SMOKE else 30, minimum=1)
PARTICLES = env_int("PLC_GVAE_PARTICLES", 16 if SMOKE else 32, minimum=2)  # K of the IWAE
SAMPLES = env_int("PLC_GVAE_SAMPLES", 20 if SMOKE else 50, minimum=2)  # prior draws per crystal
MAX_CRYSTALS = 300 if SMOKE else None
CHANNELS, STEPS, LATENT = 32, 4, 8  # the MOF tutorial's network size
LR, BATCH_CRYSTALS, EVAL_CRYSTALS = 0.005, 32, 16
INIT_LOG_VARIANCE = -5.0  # decoder variance starts near 7e-3 e^2 (sd 0.08 e)
CHARGE_SCALE = 0.5  # encoder input: charges / 0.5 e
VIOLATION_TOL = 1e-4  # a sampled crystal violates the law when |net charge| > 1e-4 e
OUT = output_dir(globals().get("__file__"))  # tutorials/output/
# process-wide settings, restored at the end (sphinx-gallery runs every tutorial in one process)
_saved = (torch.get_num_threads(), torch.distributions.Distribution._validate_args)
torch.set_num_threads(env_int("PLC_THREADS", 1, minimum=1))
torch.distributions.Distribution.set_default_validate_args(False)
T0, CPU0 = time.time(), time.process_time()

data = load_mof_charges()
labels = data.neutral_charge()  # float64, neutral to rounding (see the MOF tutorial)
print(
    f"{data.num_crystals} crystals, {data.num_atoms} atoms; splits {SPLITS}, {EPOCHS} epochs, "
    f"K = {PARTICLES} importance samples, {SAMPLES} prior draws per crystal"
)

# %%
# Encoder and decoder: gated graph networks in plain torch
# --------------------------------------------------------
# A mini-batch of crystals is one disconnected graph (``data.batch``);
# message passing is an ``index_add`` over directed bonds, as in the MOF
# tutorial (element embedding + sigmoid, a GRU cell for ``STEPS`` rounds,
# ReLU). The decoder's graph network runs on a leading dimension of particles
# (``K`` latents per crystal at once). Both the encoder's pooling and the
# decoder's broadcast of ``z`` to the atoms go through the batch's ``group``
# index (the crystal of each atom).


class GatedGraph(nn.Module):
    """``STEPS`` rounds of gated message passing on node states ``h`` of shape ``(..., n, C)``."""

    def __init__(self, channels: int = CHANNELS, steps: int = STEPS):
        super().__init__()
        self.message = nn.Linear(channels, channels, bias=False)
        self.gru = nn.GRUCell(channels, channels)
        self.steps = steps

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        shape = h.shape
        for _ in range(self.steps):
            m = torch.zeros_like(h).index_add(-2, dst, self.message(h).index_select(-2, src))
            h = self.gru(m.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])).reshape(shape)
        return torch.relu(h)


def per_crystal(v: torch.Tensor, group: torch.Tensor, num: int) -> torch.Tensor:
    """Sums ``(..., G)`` of per-atom values ``(..., n)`` over each crystal."""
    return v.new_zeros(v.shape[:-1] + (num,)).index_add(-1, group, v)


class Encoder(nn.Module):
    """``q(z | crystal, charges)``: graph network with the charges as node inputs, mean-pooled."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(data.num_elements, CHANNELS)
        self.charge = nn.Linear(1, CHANNELS)
        self.graph = GatedGraph()
        self.head = nn.Linear(CHANNELS, 2 * LATENT)

    def forward(self, bt, q):
        h = torch.sigmoid(self.embed(bt["element"]) + self.charge(q.unsqueeze(-1) / CHARGE_SCALE))
        h = self.graph(h, bt["edge_index"])
        G, group = int(bt["num_groups"]), bt["group"]
        sizes = torch.bincount(group, minlength=G).unsqueeze(-1)
        pooled = h.new_zeros(G, CHANNELS).index_add(0, group, h) / sizes
        loc, raw = self.head(pooled).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-3


class Decoder(nn.Module):
    """``(mu, s)`` of every atom's charge given the crystal graph and ``z`` ``(..., G, L)``.

    ``s = exp(.)``, no floor (the MOF tutorial explains why). ``log_tau`` is the
    noise scale of the CR model only (the other three never read it).
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(data.num_elements, CHANNELS)
        self.latent = nn.Linear(LATENT, CHANNELS)
        self.graph = GatedGraph()
        self.mu_head = nn.Linear(CHANNELS, 1)
        self.s_head = nn.Linear(CHANNELS, 1)
        nn.init.constant_(self.s_head.bias, INIT_LOG_VARIANCE)
        self.log_tau = nn.Parameter(torch.tensor(0.5 * INIT_LOG_VARIANCE))

    def forward(self, bt, z):
        zi = self.latent(z).index_select(-2, bt["group"])  # (..., n, C)
        h = self.graph(torch.sigmoid(self.embed(bt["element"]) + zi), bt["edge_index"])
        return self.mu_head(h).squeeze(-1), torch.exp(self.s_head(h).squeeze(-1))


# %%
# The constraint layer of Stoian et al. (2024)
# --------------------------------------------
# The layer of "How realistic is your synthetic data?" (ICLR 2024) takes the
# variables in a fixed order and moves each one, in turn, to the nearest value
# that the constraints allow given the variables before it. For one equality
# ``sum_i q_i = 0`` per crystal (two inequalities) only the last variable of each
# crystal is constrained given the others, so the layer sets it to minus their
# sum and leaves every other atom as the decoder drew it: a repair whose L1
# distance ``|sum_i q_i|`` is the smallest possible. We use the atoms' stored
# order. The repaired distribution is a Gaussian on the crystal's subspace (the
# first ``n_g - 1`` atoms of a crystal are free), whose density with respect to
# the subspace's surface measure is the product of their Gaussians divided by
# ``sqrt(n_g)``, the volume factor of the chart ``u -> (u, -sum u)``. That is the
# same measure as the density of ``plc.constrain`` (checked below against an
# orthonormal chart), so its likelihood compares with ours.


def last_atoms(group: torch.Tensor, num: int) -> torch.Tensor:
    """Index of the last atom of each crystal, ``(G,)``."""
    idx = torch.arange(group.numel())
    return torch.zeros(num, dtype=torch.long).scatter_reduce(0, group, idx, "amax")


def constraint_layer(x, group, num, last):
    """The layer's repair: each crystal's last atom takes minus the sum of the others."""
    total = per_crystal(x, group, num)
    return x.index_copy(-1, last, x.index_select(-1, last) - total)


class ConstraintLayerGaussian(dist.TorchDistribution):
    """``constraint_layer(x)`` for ``x ~ N(loc, scale^2)``: samples, density on the subspace."""

    arg_constraints = {}
    support = dist.constraints.real_vector
    has_rsample = True

    def __init__(self, loc, scale, group, num):
        self.loc, self.scale, self.group, self.num = loc, scale, group, num
        self.last = last_atoms(group, num)
        self.free = torch.ones(group.numel(), dtype=torch.bool).index_fill(0, self.last, False)
        self.sizes = torch.bincount(group, minlength=num)
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        x = dist.Normal(self.loc, self.scale).rsample(sample_shape)
        return constraint_layer(x, self.group, self.num, self.last)

    @property
    def mean(self):
        return constraint_layer(self.loc, self.group, self.num, self.last)

    def log_prob_per_crystal(self, x):
        lp = dist.Normal(self.loc, self.scale).log_prob(x) * self.free
        return per_crystal(lp, self.group, self.num) - 0.5 * self.sizes.to(lp.dtype).log()

    def log_prob(self, x):
        return self.log_prob_per_crystal(x).sum(-1)


# The oracle: in orthonormal coordinates ``c = H^T x`` of one crystal's plane
# ``{sum x = 0}`` the layer's output is the Gaussian ``N(H^T J m, H^T J S J^T H)``
# with ``J = [I; -1^T]`` (``m``, ``S`` the first ``n - 1`` atoms' mean and variances).
_g = torch.Generator().manual_seed(0)
_n = 6
_loc, _scale = torch.randn(_n, generator=_g, dtype=torch.float64), torch.rand(_n, generator=_g)
_scale = _scale.double() + 0.2
_cl = ConstraintLayerGaussian(_loc, _scale, torch.zeros(_n, dtype=torch.long), 1)
_x = _cl.sample((3,))
_H = torch.linalg.svd(torch.ones(1, _n, dtype=torch.float64))[2][1:].T  # (n, n - 1)
_J = torch.cat([torch.eye(_n - 1, dtype=torch.float64), -torch.ones(1, _n - 1).double()])
_chart = dist.MultivariateNormal(
    _H.T @ _J @ _loc[:-1], _H.T @ _J @ torch.diag(_scale[:-1] ** 2) @ _J.T @ _H
)
assert torch.allclose(_cl.log_prob(_x), _chart.log_prob(_x @ _H), atol=1e-9)
assert float(_x.sum(-1).abs().max()) < 1e-12

# %%
# The four models in Pyro
# -----------------------
# One ``pyro.plate`` over the crystals of a batch for ``z``; the charges of all
# atoms are one site ``"q"`` with an event of size ``n``. The four models
# differ only in the distribution of ``"q"``:
#
# * unconstrained: ``Normal(mu, sqrt(s)).to_event(1)``;
# * layer: the repaired distribution above;
# * ours: the same Normal under ``plc.LinearConstraint(GroupSum, 0, site="q")``,
#   which replaces it by the exact conditional ``p(q | z, A q = 0)``;
# * CR: the exact conditional is a latent site ``"x"`` and the data are
#   ``q ~ N(x, tau^2 I)`` conditioned on the law (isotropic noise on the plane,
#   ``tau`` learned). Its guide draws ``x`` from the same conditional, so the
#   ELBO's reconstruction term is ``E_{x ~ p(x | z, Ax = 0)} log p(q | x)``, an
#   expected loss differentiated pathwise through the exact sample: the
#   constrained reparametrization of the paper. ``estimator="marginal"``
#   would give its marginal-expectation estimator.


def make_model(method, enc, dec):
    cache = {}  # the decoder runs once per step when guide and model share z

    def decode(bt, z):
        if cache.get("z") is not z:
            cache["z"], cache["out"] = z, dec(bt, z)
        return cache["out"]

    def model(bt, q):
        pyro.module("decoder", dec)
        G, group = int(bt["num_groups"]), bt["group"]
        with pyro.plate("crystals", G):
            z = pyro.sample("z", dist.Normal(q.new_zeros(LATENT), 1.0).to_event(1))
        mu, s = decode(bt, z)
        base = dist.Normal(mu, s.sqrt()).to_event(1)
        A, zero = plc.GroupSum(group, G), mu.new_zeros(G)
        if method == "unconstrained":
            pyro.sample("q", base, obs=q)
        elif method == "layer":
            pyro.sample("q", ConstraintLayerGaussian(mu, s.sqrt(), group, G), obs=q)
        elif method == "ours":
            with plc.LinearConstraint(A, zero, site="q"):
                pyro.sample("q", base, obs=q)
        else:  # cr
            x = pyro.sample("x", plc.constrain(base, A, zero))
            noise = dist.Normal(x, dec.log_tau.exp()).to_event(1)
            pyro.sample("q", plc.constrain(noise, A, zero), obs=q)

    def guide(bt, q):
        pyro.module("encoder", enc)
        G, group = int(bt["num_groups"]), bt["group"]
        loc, scale = enc(bt, q)
        with pyro.plate("crystals", G):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        if method == "cr":
            mu, s = decode(bt, z)
            base = dist.Normal(mu, s.sqrt()).to_event(1)
            pyro.sample("x", plc.constrain(base, plc.GroupSum(group, G), mu.new_zeros(G)))

    return model, guide


OBJECTIVES = {
    "unconstrained": pyro.infer.Trace_ELBO(),
    "layer": pyro.infer.Trace_ELBO(),
    "cr": plc.infer.ConstrainedTrace_ELBO(estimator="reparam"),
    "ours": pyro.infer.Trace_ELBO(),
}
METHODS = {
    "unconstrained": "VAE, unconstrained",
    "layer": "VAE + constraint layer",
    "cr": "VAE + constrained reparametrization",
    "ours": "VAE + constrained distribution (ours)",
}
METHODS = {k: METHODS[k] for k in env_subset("PLC_GVAE_METHODS", METHODS)}

# %%
# Held-out log-likelihood on one footing
# --------------------------------------
# Per test crystal, the importance-weighted estimate with ``K`` draws of the
# encoder, ``log (1/K) sum_k p(z_k) p(q | z_k) / q(z_k | q)``, where
# ``p(q | z)`` is a density on the crystal's neutral plane with respect to its
# surface measure for every method:
#
# * ours: ``log N(q; mu, s) - log N(0; sum mu, sum s) - 1/2 log n_g`` (the
#   package's ``log_prob``, checked against it below);
# * layer: the repaired density above;
# * CR: ``x`` is drawn with ``z`` (joint importance sampling of
#   ``(z, x) ~ q(z | q) p(x | z, A x = 0)``, the same ``K``) and ``p(q | x)`` is
#   the isotropic Gaussian on the plane;
# * unconstrained: its density lives on ``R^n`` and is zero on the plane, so we
#   score *its own conditional* ``p(q | A q = 0) = p(q) / p(A q = 0)``, the
#   ratio of two importance-sampling estimates from the same particles, minus
#   ``1/2 log n_g`` (as ``tutorials/constrained_vae.py`` does). It can be scored
#   but not sampled exactly; its samples are the decoder's, which violate the law.
#
# Predictions draw ``SAMPLES`` latents per crystal from the **prior**
# ``N(0, I)`` (the model generates charges for a graph it has never seen
# charged): the *conditional mean* is the average over these draws of each
# model's mean given ``z`` (``mu``; the layer's repair of ``mu``; the
# conditional mean of ``p(q | z, A q = 0)`` for ours and CR), and one charge
# sample is drawn per latent draw. The spread is the per-atom standard deviation
# of those samples; calibration is the fraction of test atoms whose DDEC charge
# lies inside the central 90% interval (5% and 95% quantiles) of its samples.


def make_batches(crystals, batch_size, shuffle_gen=None):
    if shuffle_gen is not None:
        crystals = crystals[torch.randperm(len(crystals), generator=shuffle_gen)]
    out = []
    for i in range(0, len(crystals), batch_size):
        bt = data.batch(crystals[i : i + batch_size])
        out.append((bt, labels[bt["atom"]]))
    return out


def gaussian_on_plane(q, mu, s, group, G):
    """``log p(q | A q = 0)`` per crystal of the diagonal Gaussian ``N(mu, s)``."""
    sizes = torch.bincount(group, minlength=G).to(q.dtype)
    lp = per_crystal(dist.Normal(mu, s.sqrt()).log_prob(q), group, G)
    sums = dist.Normal(per_crystal(mu, group, G), per_crystal(s, group, G).sqrt())
    return lp - sums.log_prob(torch.zeros_like(lp)) - 0.5 * sizes.log()


def conditional(mu, s, group, G):
    """``p(q | A q = 0)`` of ``N(mu, s)`` with the package (exact samples, mean)."""
    base = dist.Normal(mu, s.sqrt()).to_event(1)
    return plc.constrain(base, plc.GroupSum(group, G), mu.new_zeros(G))


@torch.no_grad()
def evaluate(method, enc, dec, crystals, keep_first=False):
    lls, kls, abs_err, n_atoms = [], [], 0.0, 0
    sds, covered, viol_max, viol_count, n_sampled = [], 0, 0.0, 0, 0
    mean_viol, first = 0.0, None
    log_K = math.log(PARTICLES)
    for bt, y in make_batches(crystals, EVAL_CRYSTALS):
        G, group = int(bt["num_groups"]), bt["group"]
        sizes = torch.bincount(group, minlength=G).double()
        loc, scale = enc(bt, y.float())
        qz = dist.Normal(loc.double(), scale.double()).to_event(1)
        z = qz.sample((PARTICLES,))  # (K, G, L)
        log_w = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - qz.log_prob(z)
        kls.append(0.5 * (loc.double() ** 2 + qz.variance - 1 - qz.variance.log()).sum(-1))
        mu, s = (t.double() for t in dec(bt, z.float()))
        if method == "ours":
            log_lik = gaussian_on_plane(y, mu, s, group, G)
            exact = conditional(mu[0], s[0], group, G).log_prob(y)
            assert torch.allclose(log_lik[0].sum(), exact, rtol=1e-6, atol=1e-6 * G)
        elif method == "layer":
            log_lik = ConstraintLayerGaussian(mu, s.sqrt(), group, G).log_prob_per_crystal(y)
        elif method == "cr":
            x = conditional(mu, s, group, G).sample()
            tau2 = torch.full_like(x, float(dec.log_tau.exp()) ** 2)
            log_lik = gaussian_on_plane(y, x, tau2, group, G)
        else:
            log_lik = per_crystal(dist.Normal(mu, s.sqrt()).log_prob(y), group, G)
        ll = torch.logsumexp(log_w + log_lik, 0) - log_K
        if method == "unconstrained":  # its own conditional: divide by p(A q = 0)
            sums = dist.Normal(per_crystal(mu, group, G), per_crystal(s, group, G).sqrt())
            log_pb = sums.log_prob(torch.zeros_like(log_w))
            ll = ll - (torch.logsumexp(log_w + log_pb, 0) - log_K) - 0.5 * sizes.log()
        lls.append(ll)

        # predictions from the prior
        z = torch.randn(SAMPLES, G, LATENT)
        mu, s = (t.double() for t in dec(bt, z))
        if method == "unconstrained":
            means = mu
            draws = dist.Normal(mu, s.sqrt()).sample()
        elif method == "layer":
            cl = ConstraintLayerGaussian(mu, s.sqrt(), group, G)
            means, draws = cl.mean, cl.sample()
        else:
            cond = conditional(mu, s, group, G)
            means, draws = cond.mean, cond.sample()
            if method == "cr":
                tau = float(dec.log_tau.exp())
                draws = conditional(draws, torch.full_like(draws, tau**2), group, G).sample()
        pred = means.mean(0)
        abs_err += float((pred - y).abs().sum())
        n_atoms += y.numel()
        mean_viol = max(mean_viol, float(per_crystal(pred, group, G).abs().max()))
        net = per_crystal(draws, group, G).abs()  # (SAMPLES, G)
        viol_max = max(viol_max, float(net.max()))
        viol_count += int((net > VIOLATION_TOL).sum())
        n_sampled += net.numel()
        sds.append(draws.std(0))
        lo, hi = torch.quantile(draws, torch.tensor([0.05, 0.95], dtype=draws.dtype), dim=0)
        covered += int(((y >= lo) & (y <= hi)).sum())
        if keep_first and first is None:
            n0 = int(sizes[0])
            first = (y[:n0], pred[:n0], lo[:n0], hi[:n0], bt["element"][:n0])
    return {
        "ll": float(torch.cat(lls).mean()),
        "kl": float(torch.cat(kls).mean()),
        "mad": abs_err / n_atoms,
        "mean_viol": mean_viol,
        "viol_max": viol_max,
        "viol_rate": viol_count / n_sampled,
        "sd": float(torch.cat(sds).mean()),
        "cover": covered / n_atoms,
        "first": first,
    }


# %%
# Training
# --------
# Same budget for every method: ``EPOCHS`` passes over the training crystals in
# batches of ``BATCH_CRYSTALS``, one particle, Adam (learning rate 0.005,
# annealed to 0 by a cosine schedule), the same initial networks per split; the
# parameters after the last epoch are evaluated (no early stopping, so the
# validation crystals are not used). The package's objectives are used through
# ``differentiable_loss`` (per atom), so every method shares one torch optimizer.


def train(method, split):
    tr, va, te = split_crystals(data.num_crystals, seed=split)
    if MAX_CRYSTALS is not None:
        tr, te = tr[: int(0.7 * MAX_CRYSTALS)], te[: MAX_CRYSTALS // 5]
    torch.manual_seed(1000 + split)  # same initial networks for every method
    pyro.clear_param_store()
    enc, dec = Encoder(), Decoder()
    model, guide = make_model(method, enc, dec)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    shuffle = torch.Generator().manual_seed(split)
    pyro.set_rng_seed(split)
    t_start = time.process_time()
    for _ in range(EPOCHS):
        for bt, y in make_batches(tr, BATCH_CRYSTALS, shuffle):
            loss = OBJECTIVES[method].differentiable_loss(model, guide, bt, y.float()) / y.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    train_seconds = time.process_time() - t_start
    pyro.set_rng_seed(100 + split)
    out = evaluate(method, enc, dec, te, keep_first=split == SPLITS[0])
    out["train_s"] = train_seconds
    return out


# %%
# Run every method on every split
# -------------------------------

results = {k: [] for k in METHODS}
for split in SPLITS:
    for method in METHODS:
        t1 = time.process_time()
        r = train(method, split)
        r["seconds"] = time.process_time() - t1  # CPU seconds of this process
        results[method].append(r)
        print(
            f"split {split} {method:13s} LL/crystal {r['ll']:9.2f}  KL {r['kl']:5.2f}  "
            f"MAD {r['mad']:.4f}  sd {r['sd']:.4f}  90% cover {r['cover']:.3f}  "
            f"max|net| {r['viol_max']:.1e}  "
            f"(CPU {r['train_s']:.0f} s training + {r['seconds'] - r['train_s']:.0f} s evaluation)",
            flush=True,
        )

# %%
# Results
# -------
# Mean ± standard deviation over splits. LL: held-out importance-weighted
# log-likelihood per test crystal (nats, higher is better; a density on each
# crystal's neutral plane for all four, see above), with ``K`` importance
# samples; KL: ``KL(q(z | crystal) || p(z))`` per crystal (how much the latent
# is used); MAD (e) of the conditional mean averaged over prior draws;
# ``max|net|`` (e) of that mean and of the sampled crystals, and the fraction of
# sampled crystals with ``|net charge| > 1e-4`` e; sd: mean per-atom standard
# deviation of the sampled charges (e); 90% cover: fraction of test atoms inside
# the central 90% interval of their samples (0.90 is calibrated).


def mean_std(values, fmt):
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std()) if len(values) > 1 else float("nan")
    return f"{fmt.format(float(t.mean()))} ± {fmt.format(sd)}"


mode = ("smoke" if SMOKE else "full") + os.environ.get("PLC_TAG", "")
n_desc = f"{MAX_CRYSTALS} crystals" if MAX_CRYSTALS else "all 2,266 crystals"
lines = [
    f"Graph VAE on MOF charges ({mode}: split(s) {SPLITS[0]}-{SPLITS[-1]}, {EPOCHS} epochs, "
    f"{n_desc}, K = {PARTICLES}, {SAMPLES} prior draws, {CHANNELS} channels x {STEPS} steps, "
    f"latent {LATENT})",
    f"{'method':38s} {'test LL/crystal':>18s} {'KL':>6s} {'MAD (e)':>17s} {'max|net| mean':>13s} "
    f"{'max|net| samp':>13s} {'viol':>5s} {'sd (e)':>7s} {'90% cover':>15s} {'s/run':>6s}",
]
for k, name in METHODS.items():
    r = results[k]
    lines.append(
        f"{name:38s} {mean_std([x['ll'] for x in r], '{:.1f}'):>18s} "
        f"{sum(x['kl'] for x in r) / len(r):6.2f} "
        f"{mean_std([x['mad'] for x in r], '{:.4f}'):>17s} "
        f"{max(x['mean_viol'] for x in r):13.1e} {max(x['viol_max'] for x in r):13.1e} "
        f"{sum(x['viol_rate'] for x in r) / len(r):5.2f} "
        f"{sum(x['sd'] for x in r) / len(r):7.4f} "
        f"{mean_std([x['cover'] for x in r], '{:.3f}'):>15s} "
        f"{sum(x['seconds'] for x in r) / len(r):6.0f}"
    )

# %%
# Paired differences against each baseline
# ----------------------------------------
# Every method starts from the same networks on the same split, so the per-split
# difference ``ours - baseline`` removes most of the spread between splits:
# mean ± standard error over splits, and on how many splits ours is better
# (higher LL, lower MAD, coverage closer to 0.90).

if "ours" in METHODS and NUM_SPLITS > 1:
    ours = results["ours"]
    lines += ["", f"paired differences ours - baseline over {NUM_SPLITS} splits"]
    for k, name in METHODS.items():
        if k == "ours":
            continue
        parts = []
        for key, better, label in (
            ("ll", lambda d: d > 0, "LL"),
            ("mad", lambda d: d < 0, "MAD"),
            ("cover", None, "|cover - 0.9|"),
        ):
            if better is None:
                d = torch.tensor(
                    [abs(a[key] - 0.9) - abs(b[key] - 0.9) for a, b in zip(ours, results[k])]
                )
                wins = int((d < 0).sum())
            else:
                d = torch.tensor([a[key] - b[key] for a, b in zip(ours, results[k])])
                wins = int(better(d).sum())
            se = float(d.std()) / len(d) ** 0.5
            parts.append(f"{label} {float(d.mean()):+.4g} ± {se:.2g} ({wins}/{len(d)})")
        lines.append(f"vs {name:35s} " + "; ".join(parts))
lines += ["", "per split: " + " ".join(str(s) for s in SPLITS)]
for k, name in METHODS.items():
    lines.append(
        f"{name:38s} LL "
        + " ".join(f"{x['ll']:.1f}" for x in results[k])
        + "  MAD "
        + " ".join(f"{x['mad']:.4f}" for x in results[k])
        + "  cover "
        + " ".join(f"{x['cover']:.3f}" for x in results[k])
    )
lines.append(
    f"total {time.time() - T0:.0f} s wall, {time.process_time() - CPU0:.0f} s CPU on "
    f"{torch.get_num_threads()} thread(s); s/run: CPU seconds per run (training + evaluation)"
)
table = "\n".join(lines)
print(table)
(OUT / f"graph_vae_results_{mode}.txt").write_text(table + "\n")

# %%
# One held-out crystal
# --------------------
# The DDEC charge of every atom of the first test crystal (black) against each
# model's conditional mean (dot) and the central 90% interval of its samples
# (bar), atoms sorted by their DDEC charge.

fig, axes = plt.subplots(1, len(METHODS), figsize=(3.2 * len(METHODS), 3.2), sharey=True)
axes = [axes] if len(METHODS) == 1 else list(axes)
for ax, (k, name) in zip(axes, METHODS.items()):
    y0, pred0, lo0, hi0, _ = results[k][0]["first"]
    order = torch.argsort(y0)
    pos = torch.arange(len(order))
    ax.vlines(pos, lo0[order], hi0[order], color="tab:blue", alpha=0.5, lw=2)
    ax.plot(pos, pred0[order], ".", color="tab:blue", ms=4)
    ax.plot(pos, y0[order], "k_", ms=6)
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("atom (sorted by DDEC charge)", fontsize=7)
axes[0].set_ylabel("charge (e)")
fig.tight_layout()
fig.savefig(OUT / f"graph_vae_crystal_{mode}.png", dpi=110)
print(f"table and figure in {OUT}")

# %%
# What the full run shows
# -----------------------
# In the full-mode run (splits 0-1) and a run of split 2
# (``PLC_GVAE_FIRST_SPLIT=2 PLC_GVAE_SPLITS=1``; the documentation's "Full-mode
# results" page pools the three), the conditioned decoder has the highest
# held-out log-likelihood on every split, samples that are neutral to rounding
# error (``|net charge| < 1e-13`` e) and a 90% interval that covers 88-89% of
# the test atoms. The three baselines each lose in a way the table measures:
#
# * **unconstrained**: every sampled crystal violates neutrality (by up to
#   17 e); scored by its own conditional on the neutral plane it is close to
#   ours (4 ± 2 nats per crystal below, on all three splits), and its MAD is
#   higher on all three;
# * **constraint layer**: the repair is neutral, but one atom per crystal
#   absorbs the whole net error of the others, so its MAD is the worst of the
#   four and its interval for that atom is wide (the figure above);
# * **constrained reparametrization**: its MAD is level with ours (0.0313 e
#   for both over three splits; ours better on two of them), but the isotropic
#   noise ``tau`` that its reconstruction term needs has one width for every
#   atom: its samples spread more (sd 0.057-0.064 e against 0.040-0.042 e),
#   cover 93-95% instead of 90%, and its likelihood is about 67 nats per
#   crystal below ours.
#
# The latent carries little (KL 0.03-0.6 nats per crystal): the crystal graph
# already determines most of each charge, and the rest is per-atom noise that
# the decoder's variances model.

torch.set_num_threads(_saved[0])
torch.distributions.Distribution.set_default_validate_args(_saved[1])
