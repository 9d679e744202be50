"""The cost of the value checks in a constrained diffusion sampler.

:mod:`pyro_linconstr.infer.diffusion` checks its arguments' values (``alpha_bar``
in ``[0, 1]``, a finite ``b`` and ``z_t``, a positive step variance) while
validation is on, which costs a host sync per check. This script runs the same
constrained DDPM sampling loop (``sample_law_posterior`` for the target of each
step, then an exact draw of ``constrained_reverse_step``) with validation off
(the baseline) and on, alternately, and prints the ratio; "on" also runs
torch's own argument checks of the Normal and the constrained family's. The
network is left out (a fixed linear map stands in for it), so the ratio is an
upper bound on what validation adds to a real sampler, whose network dominates
a step; a tuned sampling loop turns validation off
(``pyro.enable_validation(False)``).

Run: ``python benchmarks/diffusion_checks.py [--device cuda] [--size 28]``.
"""

import argparse

import pyro
import torch
from _timing import paired_ratio, paired_times

import pyro_linconstr as plc
from pyro_linconstr.infer.diffusion import (
    constrained_reverse_step,
    sample_law_marginal,
    sample_law_posterior,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=14, help="image side (2x2 blocks)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n = args.size**2
    A = plc.GroupSum.blocks((args.size, args.size), 2, device=dev)
    b = A.matvec(torch.rand(args.batch, n, device=dev))
    t = torch.linspace(0, 1, args.steps + 1, device=dev)
    abar = (
        torch.cos((t + 0.008) / 1.008 * torch.pi / 2) ** 2
        / torch.cos(torch.tensor(0.008 / 1.008 * torch.pi / 2, device=dev)) ** 2
    )
    abar = abar.clamp(1e-5, 1.0)
    abar[0] = 1.0
    mix = torch.eye(n, device=dev) * 0.9  # stands in for the network's mean

    def sample(validate: bool):
        with pyro.validation_enabled(validate):
            x = torch.randn(args.batch, n, device=dev)
            z = sample_law_marginal(A, b, abar[-1])
            for i in range(args.steps, 0, -1):
                at, as_ = abar[i], abar[i - 1]
                z = sample_law_posterior(A, b, z, at, as_)
                var = (1 - as_) / (1 - at) * (1 - at / as_) + 1e-8
                x = constrained_reverse_step(x @ mix, var, A, z).sample()
        return x

    base, cand = paired_times(
        lambda: sample(False), lambda: sample(True), repeats=args.repeats, warmup=1
    )
    ratio, q1, q3 = paired_ratio()
    print(
        f"constrained DDPM sampling loop: {args.steps} steps, batch {args.batch}, "
        f"{args.size}x{args.size} images, 2x2 block law, {dev}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"{'':32s} {'seconds':>8s} {'ratio':>7s}")
    print(f"{'validation off (no checks)':32s} {base:8.4f} {1.0:7.2f}")
    print(f"{'validation on (value checks)':32s} {cand:8.4f} {ratio:7.2f}")
    print(f"ratio per adjacent pair: median {ratio:.2f}, quartiles {q1:.2f}-{q3:.2f}")


if __name__ == "__main__":
    main()
