r"""How a sample of a constrained site carries gradient.

A sample ``x ~ p_theta(x | A x = b)`` enters a loss ``l(x)``; the estimators
differ only in the gradient they attach to ``x`` (the forward value is always
the exact constrained sample):

``"reparam"`` (constrained reparametrization, CR)
    ``x = x(theta, eps)`` is the exact sample itself, differentiated pathwise
    (``d.rsample()``). Unbiased; needs a family with ``rsample``.

``"marginal"`` (marginal expectation, ME, the paper's main estimator)
    the forward pass uses the exact sample ``x_s`` and the backward pass the
    Jacobian of the conditional mean ``m = E[x | A x = b]`` (``d.mean``):

    .. math:: x = x_s + (m - \operatorname{stop\_gradient}(m)),
        \qquad \frac{\partial x}{\partial\theta} := \frac{\partial m}{\partial\theta}.

    This is the straight-through form ``m + (x_s - m).detach()`` written so that
    the forward value is bit-for-bit ``x_s`` (constraint exactness and integer
    counts are kept). Biased, low variance; any family with a differentiable
    ``mean`` (also the discrete ones).

``"score"`` (score function, REINFORCE)
    ``x`` is detached and the gradient is
    ``(l(x) - c) grad log p_theta(x | A x = b)`` with a baseline ``c`` that does
    not depend on ``x`` (:class:`ScoreBaseline`). Unbiased for any family.

``"closed_form"`` (only :class:`~pyro_linconstr.infer.ExpectedLoss`)
    the exact expected loss from the conditional marginals
    (:func:`expected_abs_error`, :func:`expected_sq_error`).

**References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning Deep
Generative Models under Hard Linear Equality Constraints", NeSy 2026
(arXiv:2502.05416), section "Gradient estimators".
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution, Independent

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.infer.distributed import all_reduce_mean, distributed_active

SAMPLE_ESTIMATORS = ("reparam", "marginal", "score")
ESTIMATORS = SAMPLE_ESTIMATORS + ("closed_form",)


def check_estimator(estimator: str, allowed: tuple[str, ...] = SAMPLE_ESTIMATORS) -> str:
    """Return ``estimator`` or raise a ``ValueError`` listing the ``allowed`` names."""
    if estimator not in allowed:
        extra = ""
        if estimator == "closed_form":
            extra = " ('closed_form' exists only for ExpectedLoss, which has an expected loss)"
        raise ValueError(
            f"unknown estimator {estimator!r}; choose one of {', '.join(map(repr, allowed))}"
            + extra
            + "."
        )
    return estimator


def check_num_particles(num_particles: int, who: str) -> int:
    """Return ``num_particles`` or raise a ``ValueError`` naming ``who`` (an int >= 1)."""
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"{who}: num_particles must be an int >= 1, got {num_particles!r}.")
    return num_particles


def constrained_base(fn: Distribution) -> ConstrainedDistribution | None:
    """The :class:`~pyro_linconstr.distributions.ConstrainedDistribution` inside ``fn``.

    Looks through Pyro's ``MaskedDistribution`` / ``ExpandedDistribution``
    (``poutine.mask``, ``.mask()``, plate broadcasting), ``Independent`` and
    :class:`EstimatedDistribution`; returns ``None`` for an unconstrained site.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> d = plc.constrain(dist.Normal(torch.zeros(3), 1.0).to_event(1),
        ...                   torch.ones(1, 3), torch.zeros(1))
        >>> constrained_base(d.mask(False)) is d
        True
        >>> constrained_base(dist.Normal(0.0, 1.0)) is None
        True
    """
    while True:
        if isinstance(fn, ConstrainedDistribution):
            return fn
        if isinstance(
            fn, (MaskedDistribution, ExpandedDistribution, Independent, EstimatedDistribution)
        ):
            fn = fn.base_dist
            continue
        return None


def distribution_mask(fn: Distribution) -> torch.Tensor | bool | None:
    """The mask of the ``MaskedDistribution`` wrappers around a site's ``fn`` (batch-shaped).

    Only wrappers outside any ``Independent`` count (their masks have the
    site's batch shape); ``None`` when there is none.
    """
    mask = None
    while isinstance(fn, (MaskedDistribution, ExpandedDistribution, EstimatedDistribution)):
        if isinstance(fn, MaskedDistribution):
            m = fn._mask
            mask = m if mask is None else (mask & m)
        fn = fn.base_dist
    return mask


def estimated_sample(
    fn: Distribution, estimator: str, sample_shape: torch.Size = torch.Size()
) -> torch.Tensor:
    """Draw an exact sample of ``fn`` that carries ``estimator``'s gradient.

    :param fn: a constrained distribution, possibly wrapped (masked, expanded).
    :param str estimator: ``"reparam"``, ``"marginal"`` or ``"score"``.
    :param torch.Size sample_shape: as for :meth:`~torch.distributions.Distribution.sample`.
    :returns: ``sample_shape + fn.batch_shape + fn.event_shape``; the pathwise
        sample (``"reparam"``), the exact sample with the gradient of
        ``fn.mean`` (``"marginal"``) or a detached sample (``"score"``).
    :raises ValueError: ``"reparam"`` on a family without ``rsample``.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> loc = torch.zeros(3, requires_grad=True)
        >>> d = plc.constrain(dist.Normal(loc, 1.0).to_event(1), torch.ones(1, 3), torch.ones(1))
        >>> x = estimated_sample(d, "marginal")
        >>> torch.equal(x.detach(), x.detach()), bool((x.sum() - 1).abs() < 1e-5)
        (True, True)
        >>> x.sum().backward()  # d(sum m)/d loc = 0: the projection kills the sum direction
        >>> loc.grad.abs().max() < 1e-6
        tensor(True)
    """
    estimator = check_estimator(estimator)
    if estimator == "reparam":
        if not fn.has_rsample:
            family = type(constrained_base(fn) or fn).__name__
            raise ValueError(
                f"estimator='reparam' needs a family with rsample, but {family} has none; "
                "use estimator='marginal' or 'score'."
            )
        return fn.rsample(sample_shape)
    with torch.no_grad():
        x = fn.sample(sample_shape)
    if estimator == "score":
        return x
    m = fn.mean
    return x + (m - m.detach()).to(x.dtype if x.is_floating_point() else m.dtype)


class EstimatedDistribution(TorchDistribution):
    """Wraps a constrained site's ``fn`` so that Pyro samples it with an estimator.

    ``"marginal"``: ``has_rsample`` is true and :meth:`rsample` returns the exact
    sample with the gradient of the conditional mean, so ``Trace_ELBO`` treats
    the site as reparametrized. ``"score"``: ``has_rsample`` is false, so
    ``Trace_ELBO`` uses the score function ``log_prob`` of the site.
    Everything else (``log_prob``, shapes, support, moments) is the wrapped
    distribution's.

    :param fn: the site's distribution.
    :param str estimator: ``"marginal"`` or ``"score"``.
    """

    arg_constraints = {}

    def __init__(self, base_dist: Distribution, estimator: str) -> None:
        self.base_dist = base_dist
        self.estimator = check_estimator(estimator, ("marginal", "score"))
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.estimator == "marginal"

    @property
    def support(self):
        return self.base_dist.support

    def expand(self, batch_shape, _instance=None):
        return EstimatedDistribution(self.base_dist.expand(batch_shape), self.estimator)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return estimated_sample(self.base_dist, self.estimator, sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base_dist.log_prob(value)

    @property
    def mean(self) -> torch.Tensor:
        return self.base_dist.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base_dist.variance


class EstimatorMessenger(Messenger):
    """Samples the constrained latent sites of a guide with an estimator.

    At every non-observed sample site whose ``fn`` is (or wraps) a
    :class:`~pyro_linconstr.distributions.ConstrainedDistribution`, replaces
    ``fn`` by :class:`EstimatedDistribution` (``"marginal"``, ``"score"``) or,
    for ``"reparam"``, only checks that the family has ``rsample``. Other
    sites are untouched. Used by
    :class:`~pyro_linconstr.infer.ConstrainedTrace_ELBO` around the guide.

    :param str estimator: ``"reparam"``, ``"marginal"`` or ``"score"``.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_linconstr as plc
        >>> from pyro import poutine
        >>> def guide():
        ...     base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        ...     pyro.sample("x", plc.constrain(base, torch.ones(1, 3), torch.zeros(1)))
        >>> tr = poutine.trace(EstimatorMessenger("score")(guide)).get_trace()
        >>> tr.nodes["x"]["fn"].has_rsample
        False
    """

    def __init__(self, estimator: str) -> None:
        super().__init__()
        self.estimator = check_estimator(estimator)

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        if constrained_base(fn) is None or isinstance(fn, EstimatedDistribution):
            return
        if self.estimator == "reparam":
            if not fn.has_rsample:
                raise ValueError(
                    f"site {msg['name']!r}: estimator='reparam' needs a family with rsample, "
                    f"but {type(constrained_base(fn)).__name__} has none; use "
                    "estimator='marginal' or 'score'."
                )
            return
        msg["fn"] = EstimatedDistribution(fn, self.estimator)


class ScoreBaseline:
    """Baselines ``c`` for the score-function estimator ``(f(x) - c) grad log p(x)``.

    * **leave-one-out** over vectorized particles: particle ``i`` of ``N``
      gets ``c_i = (sum_j f_j - f_i) / (N - 1)``, the mean cost of the
      *other* particles (independent of ``x_i``, so unbiased);
    * otherwise a **running average** per site, ``c <- decay c + (1 - decay) f``,
      updated after use, so ``c`` depends only on earlier samples (unbiased).
      The first sample of a site uses ``c = 0``; a cost whose shape changed
      (e.g. another subsample size) uses the scalar mean of the average.

    **Several processes.** When ``torch.distributed`` is initialised (or a
    ``process_group`` is given), the running average is the same on every
    process: each update averages the cost over all elements of all
    processes (one ``all_reduce`` of two float64 numbers per site and step),
    so the average is a scalar per site, whatever each process's batch shape.
    It is still updated after use, so the estimator stays unbiased. The
    leave-one-out baseline is local (a process's own particles). Every process
    must evaluate the same score sites in the same order (the same model),
    as for any collective. Under ``torch.no_grad`` (``ExpectedLoss.loss``, a
    log written by one process) it neither communicates nor updates.

    :param float decay: the running average's decay, in ``[0, 1)``.
    :param process_group: the processes that share the average (default: all
        of them when ``torch.distributed`` is initialised, else none).

    Example::

        >>> baseline = ScoreBaseline()
        >>> baseline("x", torch.tensor([1.0, 2.0, 6.0]), particle_dim=-1)
        tensor([4.0000, 3.5000, 1.5000])
        >>> baseline("y", torch.tensor(2.0)), baseline("y", torch.tensor(4.0))
        (tensor(0.), tensor(2.))
    """

    def __init__(self, decay: float = 0.9, process_group=None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ScoreBaseline: decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.process_group = process_group
        self._average: dict[str, torch.Tensor] = {}

    def __call__(
        self, name: str, cost: torch.Tensor, particle_dim: int | None = None
    ) -> torch.Tensor:
        """Baseline for ``cost`` (detached) at site ``name``.

        :param torch.Tensor cost: the per-element cost ``f`` (batch-shaped).
        :param particle_dim: the (negative) dim of vectorized particles in
            ``cost``, or ``None``.
        """
        cost = cost.detach()
        if particle_dim is not None and cost.dim() >= -particle_dim:
            n = cost.shape[particle_dim]
            if n > 1:
                return (cost.sum(particle_dim, keepdim=True) - cost) / (n - 1)
        stat = cost
        if distributed_active(self.process_group):
            if not torch.is_grad_enabled():  # e.g. loss() for a log on one process
                old = self._average.get(name)
                return torch.zeros_like(cost) if old is None else old.mean().expand(cost.shape)
            stat = all_reduce_mean(cost, self.process_group)
        old = self._average.get(name)
        if old is None:
            self._average[name] = stat
            return torch.zeros_like(cost)
        if old.shape != stat.shape:
            old = old.mean().expand(stat.shape)
        self._average[name] = self.decay * old + (1 - self.decay) * stat
        return old.expand(cost.shape)


def particle_dim(site: dict) -> int | None:
    """The dim of the vectorized-particle plate in a site's batch shape, if any."""
    for frame in site["cond_indep_stack"]:
        if frame.name == "num_particles_vectorized" and frame.vectorized:
            return frame.dim
    return None


# ---------------------------------------------------------------- closed forms
def expected_abs_error(m: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""``E|x - y|`` for ``x ~ N(m, v)``, elementwise.

    .. math::
        \mathbb{E}|x - y| = \sqrt{2v/\pi}\, e^{-(m-y)^2 / (2v)}
            + (m - y)\,\operatorname{erf}\!\big((m - y)/\sqrt{2v}\big),

    and ``|m - y|`` where ``v = 0`` (a coordinate fixed by the constraint).

    Example::

        >>> expected_abs_error(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.zeros(2))
        tensor([0.7979, 1.0000])
    """
    d = m - y
    pos = v > 0
    v_safe = torch.where(pos, v, torch.ones_like(v))
    val = (2 * v_safe / math.pi).sqrt() * torch.exp(-(d**2) / (2 * v_safe)) + d * torch.erf(
        d / (2 * v_safe).sqrt()
    )
    return torch.where(pos, val, d.abs())


def expected_sq_error(m: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""``E(x - y)^2 = (m - y)^2 + v`` for ``x ~ N(m, v)``, elementwise.

    Example::

        >>> expected_sq_error(torch.tensor([1.0]), torch.tensor([0.5]), torch.zeros(1))
        tensor([1.5000])
    """
    return (m - y) ** 2 + v
