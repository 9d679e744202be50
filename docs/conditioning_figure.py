"""Figure of docs/conditioning.rst: conditioning vs orthogonal projection in 2-D.

A heteroscedastic Gaussian ``N(mu, diag(s))`` and the law ``x1 + x2 = 1``.
Conditioning (``plc.constrain``) moves the uncertain coordinate; the orthogonal
projection moves both coordinates equally and ignores the variances.
"""

import matplotlib.pyplot as plt
import pyro.distributions as dist
import torch

import pyro_linconstr as plc

torch.manual_seed(0)
mu = torch.tensor([0.1, 0.2])
sd = torch.tensor([0.08, 0.35])
A, b = torch.ones(1, 2), torch.tensor([1.0])
base = dist.Normal(mu, sd).to_event(1)
cond = plc.constrain(base, A, b)


def project(y):
    return y + (b - y.sum(-1, keepdim=True)) / 2


y = base.sample((400,))
x_cond = cond.sample((400,))
x_proj = project(y)

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
g1, g2 = torch.meshgrid(
    torch.linspace(-0.4, 1.2, 200), torch.linspace(-0.6, 1.4, 200), indexing="ij"
)
dens = base.log_prob(torch.stack([g1, g2], -1)).exp()
ax.contour(g1, g2, dens, levels=6, colors="0.6", linewidths=0.8)
ax.plot([-0.4, 1.2], [1.4, -0.2], "k-", lw=1, label="$x_1 + x_2 = 1$")
ax.scatter(*y.T, s=3, c="0.7", label="model samples $y$")
ax.scatter(*x_proj.T, s=6, c="tab:orange", label="projection of $y$")
ax.scatter(*x_cond.T, s=6, c="tab:blue", label="conditioned $p(x\\mid Ax=b)$")
ax.plot(*mu, "k+", ms=10)
ax.plot(*cond.mean, "o", c="tab:blue", mec="k", ms=8)
ax.plot(*project(mu), "s", c="tab:orange", mec="k", ms=8)
ax.set(xlim=(-0.4, 1.2), ylim=(-0.6, 1.4), xlabel="$x_1$ (sd 0.08)", ylabel="$x_2$ (sd 0.35)")
ax.set_aspect("equal")
ax.legend(fontsize=7, loc="lower left")
ax.set_title("samples and means", fontsize=9)

# Densities along the line, parametrised by x1.
t = torch.linspace(-0.3, 1.1, 400)
pts = torch.stack([t, 1 - t], -1)
ax2.plot(t, cond.log_prob(pts).exp(), c="tab:blue", label="conditioned (plc.constrain)")
# The projection of y is Gaussian on the line with the variance of (y1 - y2) / sqrt(2).
c_mean = (project(mu)[0] - project(mu)[1]) / 2**0.5
c_sd = (sd.pow(2).sum() / 2).sqrt()
ax2.plot(
    t,
    dist.Normal(c_mean, c_sd).log_prob((t - (1 - t)) / 2**0.5).exp(),
    c="tab:orange",
    label="orthogonal projection",
)
ax2.set(xlabel="$x_1$ on the line $x_1 + x_2 = 1$", ylabel="density w.r.t. arc length")
ax2.legend(fontsize=7)
ax2.set_title("density on the constraint line", fontsize=9)
fig.tight_layout()
