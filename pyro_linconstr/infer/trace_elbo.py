r"""``Trace_ELBO`` whose constrained latent sites use a chosen gradient estimator."""

from __future__ import annotations

from pyro import poutine
from pyro.distributions.util import is_identically_zero
from pyro.infer.trace_elbo import Trace_ELBO, _compute_log_r
from pyro.poutine.messenger import Messenger

from pyro_linconstr.infer.estimators import (
    EstimatedDistribution,
    EstimatorMessenger,
    ScoreBaseline,
    check_estimator,
    check_num_particles,
    particle_dim,
)


class ConstrainedTrace_ELBO(Trace_ELBO):
    r"""``Trace_ELBO`` in which a chosen estimator differentiates constrained latents.

    The ELBO ``E_q[log p(x, y) - log q(x)]`` and everything about it
    (particles, vectorized particles, plates, observed sites, unconstrained
    sites) is :class:`pyro.infer.Trace_ELBO`'s. Only at guide sites whose
    distribution is a constrained distribution ``q_phi(x | A x = b)``
    (:func:`~pyro_linconstr.constrain`) does ``estimator`` decide how the
    sample carries gradient (:mod:`pyro_linconstr.infer.estimators`):

    * ``"reparam"``: pathwise through the exact sample; the objective *is*
      ``Trace_ELBO`` (same values and gradients for the same seed), except that
      a family without ``rsample`` raises instead of silently falling back to
      a baseline-free score function;
    * ``"marginal"``: the exact sample forward, the Jacobian of
      ``E_q[x | A x = b]`` backward (biased, low variance);
    * ``"score"``: the score function ``(log r - c) grad log q(x | A x = b)``
      with ``log r = log p - log q`` Rao-Blackwellized over plates as in
      ``Trace_ELBO``, and a baseline ``c``: leave-one-out over vectorized
      particles, else a running average per site
      (:class:`~pyro_linconstr.infer.estimators.ScoreBaseline`).

    :param str estimator: ``"marginal"`` (default), ``"reparam"`` or ``"score"``.
    :param int num_particles: particles per estimate.
    :param bool vectorize_particles: draw the particles in one vectorized pass.
    :param kwargs: passed on to :class:`pyro.infer.Trace_ELBO`.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_linconstr as plc
        >>> from torch.distributions import constraints
        >>> A, b = torch.ones(1, 3), torch.ones(1)
        >>> def model(y):
        ...     prior = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        ...     x = pyro.sample("x", plc.constrain(prior, A, b))
        ...     pyro.sample("y", dist.Normal(x, 0.5).to_event(1), obs=y)
        >>> def guide(y):
        ...     loc = pyro.param("loc", torch.zeros(3))
        ...     scale = pyro.param("scale", torch.ones(3), constraint=constraints.positive)
        ...     pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b))
        >>> elbo = plc.infer.ConstrainedTrace_ELBO(
        ...     estimator="marginal", num_particles=4, vectorize_particles=True
        ... )
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        >>> y = torch.tensor([2.0, 0.0, -1.0])
        >>> for _ in range(150):
        ...     _ = svi.step(y)
        >>> q = plc.constrain(dist.Normal(pyro.param("loc"), pyro.param("scale")).to_event(1), A, b)
        >>> exact = torch.tensor([5.0, 0.2, -2.2]) / 3  # the posterior mean on sum(x) = 1
        >>> # within the posterior's spread (sd 0.37) after 150 noisy steps; 1.3 before them
        >>> bool((q.mean - exact).abs().max() < 0.5)
        True

    **References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning
    Deep Generative Models under Hard Linear Equality Constraints",
    NeSy 2026 (arXiv:2502.05416).
    """

    def __init__(
        self,
        estimator: str = "marginal",
        num_particles: int = 1,
        vectorize_particles: bool = False,
        **kwargs,
    ) -> None:
        self.estimator = check_estimator(estimator)
        check_num_particles(num_particles, "ConstrainedTrace_ELBO")
        super().__init__(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **kwargs
        )
        self.baseline = ScoreBaseline()

    def _get_trace(self, model, guide, args, kwargs):
        if isinstance(poutine.unwrap(guide), Messenger):
            if self.estimator != "reparam":
                raise NotImplementedError(
                    "ConstrainedTrace_ELBO: GuideMessenger guides support only estimator='reparam'."
                )
        else:
            guide = EstimatorMessenger(self.estimator)(guide)
        return super()._get_trace(model, guide, args, kwargs)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        if self.estimator != "score":
            return loss, surrogate_loss
        # Trace_ELBO added (log_r * score).sum() to the surrogate ELBO; subtract the baseline.
        log_r = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or not isinstance(site["fn"], EstimatedDistribution):
                continue
            score = site["score_parts"].score_function
            if is_identically_zero(score):
                continue
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            reward = log_r.sum_to(site["cond_indep_stack"])
            c = self.baseline(name, reward, particle_dim(site))
            surrogate_loss = surrogate_loss + (c * score).sum()
        return loss, surrogate_loss
