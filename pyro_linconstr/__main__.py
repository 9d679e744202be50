"""Demo: ``python -m pyro_linconstr``.

Super-resolution that honours its input, on scikit-learn's offline digits
(``load_digits``, 8x8 images). A network sees the 4x4 low-resolution version
``b`` of a digit and predicts the 8x8 image ``x`` as a Gaussian (a mean and a
standard deviation per pixel). The law: every 2x2 block of ``x`` sums to its
low-resolution pixel, ``A x = b`` with ``A = plc.GroupSum`` over the 16 blocks
and one ``b`` per image. Two networks are trained by maximum likelihood with
the same budget, one with the law on the observed site (``plc.LinearConstraint``)
and one without; on held-out digits the demo compares four predictions: the
unconstrained mean, its orthogonal projection (``plc.project``), the
unconstrained Gaussian conditioned on the law after training
(``plc.constrain``), and the constrained network's conditional mean.
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from sklearn.datasets import load_digits
from torch import nn

import pyro_linconstr as plc

TOL = 1e-3  # a sample is off the law when some block sum misses b by more than this

# Pixel (r, c) of the 8x8 image lies in block (r // 2, c // 2); row g of A sums block g.
row, col = torch.arange(64) // 8, torch.arange(64) % 8
A = plc.GroupSum((row // 2) * 4 + col // 2, num_groups=16)


def load_data(seed):
    """Digits in [0, 1] (dequantized: ``(pixel + u) / 17``), split 80/20."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    x = (pixels + torch.rand(pixels.shape, generator=g)) / 17.0
    idx = torch.randperm(len(x), generator=g)
    return x[idx[len(x) // 5 :]], x[idx[: len(x) // 5]]


class Net(nn.Module):
    """``b (..., 16) -> (loc, scale)``, each ``(..., 64)``."""

    def __init__(self, hidden=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(16, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus()
        )
        self.head = nn.Linear(hidden, 2 * 64)

    def forward(self, b):
        loc, raw = self.head(self.body(b / 4)).chunk(2, -1)
        return torch.sigmoid(loc), nn.functional.softplus(raw) + 1e-3


def model(net, b, x=None):
    pyro.module("net", net)
    loc, scale = net(b)
    with pyro.plate("images", b.shape[0]):
        return pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)


def constrained_model(net, b, x=None):
    # The same model; the site "x" becomes N(loc, scale) conditioned on A x = b (one b per image).
    with plc.LinearConstraint(A, b, site="x"):
        return model(net, b, x)


def guide(net, b, x=None):  # no latent variables: SVI is maximum likelihood
    pass


def train(model_fn, x, steps, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = Net()
    svi = SVI(model_fn, guide, Adam({"lr": 3e-3}), plc.infer.ConstrainedTrace_ELBO())
    for _ in range(steps):
        batch = x[torch.randint(len(x), (128,))]
        svi.step(net, A.matvec(batch), batch)
    return net


@torch.no_grad()
def evaluate(name, net, x, how):
    """RMSE of the prediction, test NLL on the law, its largest |Ax - b|, samples off the law."""
    b = A.matvec(x)
    loc, scale = net(b)
    gaussian = dist.Normal(loc, scale).to_event(1)
    conditional = plc.constrain(gaussian, A, b)  # p(x | A x = b)
    nll = None  # only the conditioned Gaussians have a density on the law
    if how == "mean":
        pred, samples = loc, gaussian.sample((10,))
    elif how == "project":
        pred, samples = plc.project(loc, A, b), plc.project(gaussian.sample((10,)), A, b)
    else:
        pred, samples = conditional.mean, conditional.sample((10,))
        nll = -conditional.log_prob(x).mean().item()
    return {
        "name": name,
        "rmse": (pred - x).pow(2).mean().sqrt().item(),
        "nll": nll,
        "max_residual": (A.matvec(pred) - b).abs().max().item(),
        "off_law": ((A.matvec(samples) - b).abs().amax(-1) > TOL).double().mean().item(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyro_linconstr", description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="SVI steps per network")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    args = parser.parse_args(argv)
    t0 = time.time()
    x_train, x_test = load_data(args.seed)
    print(f"digits: {len(x_train)} train, {len(x_test)} test; {args.steps} steps per network")
    plain = train(model, x_train, args.steps, args.seed)
    constrained = train(constrained_model, x_train, args.steps, args.seed)
    rows = [
        evaluate("unconstrained: mean", plain, x_test, "mean"),
        evaluate("unconstrained + plc.project", plain, x_test, "project"),
        evaluate("unconstrained + plc.constrain", plain, x_test, "condition"),
        evaluate("constrained (LinearConstraint)", constrained, x_test, "condition"),
    ]
    print(f"{'prediction':32}{'RMSE':>8}{'NLL on Ax=b':>13}{'max |Ax-b|':>12}{'off law':>9}")
    for r in rows:
        nll = "-" if r["nll"] is None else f"{r['nll']:.2f}"
        print(
            f"{r['name']:32}{r['rmse']:8.4f}{nll:>13}{r['max_residual']:12.1e}{r['off_law']:9.3f}"
        )
    print(
        "RMSE: pixels in [0, 1]; NLL: nats per test image, density on the 48-dim subspace\n"
        "{x : Ax = b}; max |Ax-b|: over the test predictions; off law: fraction of samples\n"
        f"(10 per test image) with some block sum off by more than {TOL:g}."
    )
    print(f"total {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest, and leaves the others free
    main()
