r"""Diffusion models (DDPM, DDIM) whose samples obey a linear law ``A x_0 = b``.

A diffusion model generates ``x_0`` by a chain of Gaussian reverse transitions
``p(x_s | x_t) = N(mu_theta(x_t), Sigma_theta(x_t))`` from noise ``x_T``. The
law is on the clean image ``x_0``; the forward process
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` carries it to every step as a
*known Gaussian chain of the constrained coordinates* ``z_t = A x_t``:

.. math::

    z_t \mid b \sim N\big(\sqrt{\bar\alpha_t}\, b,\ (1 - \bar\alpha_t) A A^\top\big),

and the forward posterior of the DDIM family (DDPM is ``sigma^2 = beta~_t``,
the posterior variance), applied to ``A``,

.. math::

    z_s \mid z_t, b \sim N\Big(\sqrt{\bar\alpha_s}\, b
        + \sqrt{1 - \bar\alpha_s - \sigma^2}\,
          \frac{z_t - \sqrt{\bar\alpha_t}\, b}{\sqrt{1 - \bar\alpha_t}},\
        \sigma^2 A A^\top\Big),

ends at ``z_0 = b`` exactly. The constrained sampler draws the target ``z_s``
of every step from this chain (:func:`sample_law_marginal`,
:func:`sample_law_posterior`: the row-space part of ``x_s`` follows the forward
process exactly, so the network sees inputs distributed as in training), and
draws ``x_s`` from the model's transition *conditioned* on ``A x_s = z_s``
(:func:`constrained_reverse_step`, exact sampling by
:func:`~pyro_linconstr.constrain`). The last step conditions on ``A x_0 = b``,
so every sample obeys the law to rounding.

The same decomposition gives the training objective. The forward posterior
``q(x_s | x_t, x_0)`` splits into the chain of ``z_s`` above (the same for the
data and the model) and its conditional on ``A x_s = z_s``; the variational
bound of the constrained model is the sum over steps of
:func:`reverse_step_kl`, the KL divergence between the two *conditioned*
Gaussians on the subspace ``{A x = z_s}`` (at ``z_s = A x_s`` of a forward
draw), plus the exact constrained likelihood of ``x_0`` at the last step.
Errors of the model's mean along the rows of ``A`` cost nothing: conditioning
supplies that part.

**Isotropic variance.** With ``Sigma = sigma^2 I``, conditioning a Gaussian on
``A x = z`` is the orthogonal projection of its mean plus projected noise, and
:func:`reverse_step_kl` is ``||(I - P)(mu_q - mu_theta)||^2 / (2 sigma^2)``
with ``P = A^T (A A^T)^{-1} A``: in the noise parametrisation, ``w_t`` times it
is the simple loss ``||(I - P)(eps - eps_theta)||^2`` restricted to the
null space of ``A`` (``w_t`` in :func:`reverse_step_kl`). With per-pixel
variances ``Sigma = diag(s)`` (learned, as in improved DDPM), conditioning
moves each pixel by ``s_i A^T (A diag(s) A^T)^{-1} (z - A mu)``: the residual
of a block goes where the model is uncertain, which a projection cannot do.

**Deterministic steps (DDIM, eta = 0).** A step with ``sigma = 0`` is a point
mass, and a point mass off the subspace has no conditional. The limit of the
conditioned step as ``Sigma = eps^2 diag(s)``, ``eps -> 0``, is the conditional
mean ``mu + diag(s) A^T (A diag(s) A^T)^{-1} (z - A mu)``, a projection in
the metric ``diag(s)^{-1}`` (the orthogonal projection when ``s`` is constant):
use :attr:`mean` of :func:`constrained_reverse_step`.

**References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning Deep
Generative Models under Hard Linear Equality Constraints", NeSy 2026 (the
constrained distribution of a Gaussian reverse step); J. Ho, A. Jain, P. Abbeel,
"Denoising Diffusion Probabilistic Models", NeurIPS 2020; J. Song, C. Meng,
S. Ermon, "Denoising Diffusion Implicit Models", ICLR 2021; A. Nichol,
P. Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021
(learned variances); J. Choi et al., "ILVR", ICCV 2021 (the low-pass
replacement that a projection at every step generalises).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from pyro_linconstr.distributions import constrain
from pyro_linconstr.ops.operators import LinearOperator, as_operator

__all__ = [
    "constrained_reverse_step",
    "reverse_step_kl",
    "sample_law_marginal",
    "sample_law_posterior",
]


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _validating() -> bool:
    """Value checks follow torch's switch (``pyro.enable_validation`` sets it too):
    on by default, off in a tuned sampling loop; shape checks always run."""
    return torch.distributions.Distribution._validate_args


def _check_last_dim(fn: str, name: str, value: torch.Tensor, size: int, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.dim() < 1 or value.shape[-1] != size:
        raise ValueError(
            f"{fn}: {name} must have shape (..., {size}) ({what}), got {tuple(value.shape)}."
        )


def _not_finite(name: str, value: torch.Tensor):
    return ~torch.isfinite(value).all(), f"{name} has non-finite entries (nan or inf)."


def _outside_unit(name: str, value: torch.Tensor, below_one: bool = False):
    """``abar`` is a product of ``1 - beta``: in ``[0, 1]`` (``< 1`` where it divides)."""
    high = (value >= 1) if below_one else (value > 1)
    bad = (~torch.isfinite(value) | (value < 0) | high).any()
    interval = "[0, 1)" if below_one else "[0, 1]"
    return bad, f"{name} must lie in {interval} (a cumulative product of 1 - beta)."


def _raise_first(fn: str, checks) -> None:
    """Raise the message of the first failing ``(bad, message)`` check, with one host sync
    for all of them (a sampler calls these functions at every step). Callers build the
    checks only while :func:`_validating`."""
    bad = torch.stack([b.reshape(()) for b, _ in checks]).tolist()
    for failed, (_, message) in zip(bad, checks):
        if failed:
            raise ValueError(f"{fn}: {message}")


def _trailing(value: torch.Tensor) -> torch.Tensor:
    """A per-batch scalar ``(...,)`` as ``(..., 1)`` (broadcasts against ``(..., k)``)."""
    return value.unsqueeze(-1) if value.dim() > 0 else value


def constrained_reverse_step(
    loc: torch.Tensor,
    variance: torch.Tensor | float,
    A: torch.Tensor | LinearOperator,
    b: torch.Tensor,
):
    r"""The reverse transition ``N(loc, diag(variance))`` conditioned on ``A x = b``.

    A thin layer over :func:`~pyro_linconstr.constrain` for the Gaussian steps
    of DDPM / DDIM samplers: :meth:`sample` is exact (every draw obeys the law
    to rounding), :meth:`log_prob` is the exact density on the subspace, and
    :attr:`mean` is the conditional mean (the ``eta -> 0`` limit of a DDIM step).

    :param torch.Tensor loc: the model's mean ``(..., n)`` (flattened images).
    :param variance: per-pixel variances ``(..., n)``, or a per-step scalar
        ``(...,)`` / ``float`` (isotropic); positive.
    :param A: ``(m, n)`` tensor or operator, e.g. :meth:`~pyro_linconstr.GroupSum.blocks`.
    :param torch.Tensor b: the step's target ``(..., m)``, e.g. from
        :func:`sample_law_posterior`; ``b`` of the law itself at the last step.
    :returns: a :class:`~pyro_linconstr.distributions.ConstrainedGaussian` with
        event shape ``(n,)``.

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> from pyro_linconstr.infer.diffusion import constrained_reverse_step
        >>> A = plc.GroupSum.blocks((4, 4), 2)          # 2x2 block sums of a 4x4 image
        >>> b = 4 * torch.tensor([0.1, 0.2, 0.3, 0.4])   # block averages 0.1 .. 0.4
        >>> step = constrained_reverse_step(torch.zeros(16), torch.rand(16) + 0.1, A, b)
        >>> x = step.sample()
        >>> torch.allclose(A.matvec(x) / 4, b / 4, atol=1e-6)
        True
    """
    variance = _as_tensor(variance, loc)
    if _validating() and not bool((torch.isfinite(variance) & (variance > 0)).all()):
        raise ValueError(
            "constrained_reverse_step: variance must be finite and positive; a deterministic "
            "step (DDIM, eta = 0) is the conditional mean: use .mean of a step with any "
            "positive variance of the same shape."
        )
    if variance.dim() < loc.dim():  # a per-step scalar (...,): isotropic
        variance = _trailing(variance)
    scale = variance.sqrt().expand(loc.shape)
    return constrain(dist.Normal(loc, scale).to_event(1), A, b)


def sample_law_marginal(
    A: torch.Tensor | LinearOperator,
    b: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Draw ``z_t = A x_t`` of the forward process given ``A x_0 = b``.

    ``z_t = sqrt(abar_t) b + sqrt(1 - abar_t) A eps`` with ``eps ~ N(0, I_n)``,
    i.e. ``N(sqrt(abar_t) b, (1 - abar_t) A A^T)``, in ``O(n)`` for a
    structured ``A`` (no ``m x m`` factorization). The first target of a
    constrained sampler (``t = T``).

    :param A: ``(m, n)`` tensor or operator.
    :param torch.Tensor b: ``(..., m)``, the law of ``x_0``.
    :param alpha_bar: ``abar_t`` in ``[0, 1]``, a float or a tensor ``(...,)``.
    :param noise: optional ``eps`` of shape ``(..., n)`` (default: drawn).
    :returns: ``(..., m)``.
    """
    A = as_operator(A)
    fn = "sample_law_marginal"
    _check_last_dim(fn, "b", b, A.num_rows, "the rows of A")
    abar = _as_tensor(alpha_bar, b)
    if _validating():
        _raise_first(fn, [_not_finite("b", b), _outside_unit("alpha_bar", abar)])
    abar = _trailing(abar)
    if noise is None:
        noise = torch.randn(b.shape[:-1] + (A.num_cols,), dtype=b.dtype, device=b.device)
    else:
        _check_last_dim(fn, "noise", noise, A.num_cols, "the columns of A")
    return abar.sqrt() * b + (1 - abar).sqrt() * A.matvec(noise)


def sample_law_posterior(
    A: torch.Tensor | LinearOperator,
    b: torch.Tensor,
    z_t: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    alpha_bar_s: torch.Tensor | float,
    variance: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Draw the next target ``z_s = A x_s`` given ``z_t = A x_t`` and ``A x_0 = b`` (``s < t``).

    ``z_s ~ N(sqrt(abar_s) b + sqrt(1 - abar_s - sigma^2) (z_t - sqrt(abar_t) b)
    / sqrt(1 - abar_t), sigma^2 A A^T)``: the forward posterior of the DDIM
    family ``q_sigma(x_s | x_t, x_0)`` seen through ``A``. It needs ``x_0``
    only through ``b``, so a sampler can follow the exact forward chain of the
    constrained coordinates while the rest of ``x`` is generated. Any
    ``sigma^2`` keeps the marginals ``N(sqrt(abar_s) b, (1 - abar_s) A A^T)``;
    with ``abar_s = 1`` (the last step) ``z_s = b``.

    :param A: ``(m, n)`` tensor or operator.
    :param torch.Tensor b: ``(..., m)``.
    :param torch.Tensor z_t: ``(..., m)``, the current ``A x_t``.
    :param alpha_bar_t: ``abar_t``, a float or a tensor ``(...,)``.
    :param alpha_bar_s: ``abar_s >= abar_t``, the same.
    :param variance: ``sigma^2`` (a float or ``(...,)``, at most ``1 - abar_s``).
        Default: the DDPM posterior variance
        ``(1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)``; DDIM with
        parameter ``eta`` uses ``eta^2`` times it.
    :param noise: optional ``eps`` of shape ``(..., n)`` (default: drawn).
    :returns: ``(..., m)``.
    """
    A = as_operator(A)
    fn = "sample_law_posterior"
    _check_last_dim(fn, "b", b, A.num_rows, "the rows of A")
    _check_last_dim(fn, "z_t", z_t, A.num_rows, "the rows of A")
    abar_t = _as_tensor(alpha_bar_t, b)
    abar_s = _as_tensor(alpha_bar_s, b)
    if variance is not None:
        variance = _as_tensor(variance, b)
    if _validating():
        checks = [
            _not_finite("b", b),
            _not_finite("z_t", z_t),
            _outside_unit("alpha_bar_t", abar_t, below_one=True),
            _outside_unit("alpha_bar_s", abar_s),
            (
                (abar_s < abar_t).any(),
                "alpha_bar_s must be >= alpha_bar_t (s < t is the less noisy step); "
                "were the two swapped?",
            ),
        ]
        if variance is not None:
            # sigma^2 <= 1 - abar_s up to rounding (the clamp below only absorbs rounding)
            slack = 16 * torch.finfo(b.dtype).eps
            ok = torch.isfinite(variance) & (variance >= 0) & (variance <= 1 - abar_s + slack)
            checks.append(
                (
                    ~ok.all(),
                    "variance (sigma^2) must lie in [0, 1 - alpha_bar_s]; DDIM uses "
                    "eta^2 times the default (DDPM) variance, 0 <= eta <= 1.",
                )
            )
        _raise_first(fn, checks)
    abar_t, abar_s = _trailing(abar_t), _trailing(abar_s)
    if variance is None:
        variance = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    else:
        variance = _trailing(variance)
    if noise is None:
        noise = torch.randn(z_t.shape[:-1] + (A.num_cols,), dtype=b.dtype, device=b.device)
    else:
        _check_last_dim(fn, "noise", noise, A.num_cols, "the columns of A")
    keep = (1 - abar_s - variance).clamp_min(0).sqrt() / (1 - abar_t).sqrt()
    mean = abar_s.sqrt() * b + keep * (z_t - abar_t.sqrt() * b)
    return mean + variance.sqrt() * A.matvec(noise)


def reverse_step_kl(
    target_loc: torch.Tensor,
    target_variance: torch.Tensor | float,
    loc: torch.Tensor,
    variance: torch.Tensor | float,
    A: torch.Tensor | LinearOperator,
    b: torch.Tensor,
) -> torch.Tensor:
    r"""``KL(q || p)`` of the forward posterior and the model step, both conditioned on ``A x = b``.

    ``q = N(target_loc, target_variance) | A x = b`` (the forward posterior
    ``q(x_s | x_t, x_0)``, usually isotropic with the DDPM posterior variance)
    and ``p = N(loc, variance) | A x = b`` (the model's step): the term of step
    ``t`` in the variational bound of the constrained diffusion model, with ``b``
    the constrained coordinates ``A x_s`` of a forward draw of ``x_s`` (see the
    module docstring). Computed by the closed form registered for two
    :class:`~pyro_linconstr.distributions.ConstrainedGaussian` on the same
    subspace (``O(n)`` with a :class:`~pyro_linconstr.GroupSum`, in float64),
    differentiable in every argument. Training the mean through it ignores the
    model's errors along the rows of ``A``.

    For an isotropic model with ``variance = target_variance = v``, it equals
    ``||(I - P)(target_loc - loc)||^2 / (2 v)``; with the DDPM noise
    parametrisation ``loc = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) /
    sqrt(alpha_t)`` and ``v = beta_t``, ``2 alpha_t (1 - abar_t) / beta_t`` times
    it is the simple loss ``||(I - P)(eps - eps_theta)||^2`` of the constrained
    model.

    :param torch.Tensor target_loc: ``(..., n)``.
    :param target_variance: positive, ``(..., n)`` or a per-step scalar ``(...,)`` / float.
        For the last step, whose target is the data point ``x_0`` itself, use
        ``-constrained_reverse_step(loc, variance, A, b).log_prob(x_0)`` instead.
    :param torch.Tensor loc: ``(..., n)``, the model's mean.
    :param variance: positive, ``(..., n)`` or ``(...,)`` / float, the model's variances.
    :param A: ``(m, n)`` tensor or operator.
    :param torch.Tensor b: ``(..., m)``.
    :returns: ``(...,)``, in nats.

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> from pyro_linconstr.infer.diffusion import reverse_step_kl
        >>> A = plc.GroupSum.blocks((2, 2), 2)          # one sum over 4 pixels
        >>> b = torch.tensor([1.0])
        >>> mu = torch.tensor([0.2, 0.3, 0.1, 0.4])
        >>> round(float(reverse_step_kl(mu, 0.5, mu + 1.0, 0.5, A, b)), 9)  # shift along A: free
        0.0
    """
    q = constrained_reverse_step(target_loc, target_variance, A, b)
    p = constrained_reverse_step(loc, variance, A, b)
    return kl_divergence(q, p)
