"""The :class:`LinearConstraint` effect handler: one line makes a site obey ``A x = b``."""

from __future__ import annotations

from types import TracebackType

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from pyro_linconstr.constraints import affine_subspace, residual_tolerance
from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.registry import constrain
from pyro_linconstr.infer.estimators import constrained_base
from pyro_linconstr.ops.operators import LinearOperator, as_operator

__all__ = ["LinearConstraint"]

# Key in ``msg["infer"]`` recording ``(base, A, b)`` of a site constrained by a handler,
# so that a second handler on the same site can stack its rows onto the first.
_RECORD = "_linear_constraint"


class LinearConstraint(Messenger):
    r"""Condition the sample site ``site`` on the linear law ``A x = b``.

    The site's distribution ``fn`` is replaced by
    :func:`plc.constrain(fn, A, b) <pyro_linconstr.constrain>`, the model's
    own distribution conditioned on ``A x = b``:

    * **latent site**: samples satisfy the constraint exactly, and
      ``Predictive``, ``poutine.trace/replay/condition/block/scale/mask``,
      AutoGuides and ``MCMC`` (``NUTS``, ``HMC``) work unchanged, because
      ``biject_to(fn.support)`` is the
      :class:`~pyro_linconstr.transforms.AffineSubspaceTransform` (an
      orthonormal chart of the subspace, Jacobian 1);
    * **observed site** (``obs=`` or ``poutine.condition``): the
      log-likelihood is the exact constrained density
      ``log p(x | A x = b)``, so ``Trace_ELBO`` or maximum likelihood train
      the model through it. An observation that violates the constraint by
      more than :func:`~pyro_linconstr.constraints.residual_tolerance` is a
      ``ValueError`` naming the site and the residual; clean rounded data
      with :func:`~pyro_linconstr.project` first.

    **Plates.** Leading dims of ``A``, ``b`` and the site's batch shape
    broadcast, so one ``b`` per datum (shape ``(N, m)`` in a plate of size
    ``N`` at ``dim=-1``) works. Under a subsampling plate
    (``subsample_size=``) give the full-size ``b``: the handler selects the
    current subsample (as :func:`pyro.subsample` does). Caveat: an AutoGuide
    builds its transforms once, from its prototype trace, so a *latent* site
    whose ``b`` changes per datum needs a plate without subsampling under an
    AutoGuide (MCMC and ``Predictive`` have no such limit).

    **Several handlers.** Nest one handler per site. Two handlers on the
    *same* site **stack**: the site is conditioned on both laws at once,
    ``[A1; A2] x = [b1; b2]`` (the same distribution as conditioning on one
    and then the other). The stacked ``A`` is dense (a stack of
    :class:`~pyro_linconstr.GroupSum` is no longer a disjoint group sum);
    redundant rows of a consistent stack are dropped by
    :func:`~pyro_linconstr.constrain`, an inconsistent stack is its
    ``ValueError``. A site whose distribution is already a constrained
    distribution built inside the model with ``plc.constrain`` cannot be
    stacked (its base is unknown): a ``ValueError`` says so.

    **Errors.** A site that never occurs while the handler is active is a
    ``ValueError`` when the handler exits normally (a typo must not silently
    leave the model unconstrained; note that ``poutine.block`` *inside* the
    handler hides the site from it). An unsupported family, or ``A``, ``b``
    that do not fit the site, re-raise the error of
    :func:`~pyro_linconstr.constrain` with the site's name.

    :param A: tensor ``(..., m, n)`` or an operator such as
        :class:`~pyro_linconstr.GroupSum`; ``n`` is the number of entries of
        the site's event.
    :param torch.Tensor b: right-hand side ``(..., m)``.
    :param str site: the name of the sample site to constrain.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_linconstr as plc
        >>> def model():
        ...     return pyro.sample("x", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        >>> with plc.LinearConstraint(torch.ones(1, 4), torch.tensor([2.0]), site="x"):
        ...     x = model()
        >>> round(float(x.sum()), 4)
        2.0
        >>> @plc.LinearConstraint(torch.ones(1, 4), torch.zeros(1), site="x")
        ... def centred():
        ...     return model()
        >>> trace = pyro.poutine.trace(centred).get_trace()
        >>> type(trace.nodes["x"]["fn"]).__name__
        'ConstrainedGaussian'

    **References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning
    Deep Generative Models under Hard Linear Equality Constraints",
    NeSy 2026 (arXiv:2502.05416).
    """

    def __init__(self, A: torch.Tensor | LinearOperator, b: torch.Tensor, site: str = "x") -> None:
        super().__init__()
        if not isinstance(site, str):
            raise TypeError(f"LinearConstraint: site must be a site name (str), got {site!r}.")
        if not isinstance(b, torch.Tensor):
            raise TypeError(
                f"LinearConstraint: b must be a torch.Tensor of shape (..., m), "
                f"got {type(b).__name__}."
            )
        as_operator(A)  # fail early on a bad A
        self.A = A
        self.b = b
        self.site = site
        self._seen = False

    def __enter__(self) -> LinearConstraint:
        self._seen = False
        return super().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and not self._seen:
            raise ValueError(
                f"LinearConstraint: no sample site named {self.site!r} occurred while the "
                "handler was active; check the site name (and that no poutine.block inside "
                "the handler hides it)."
            )

    def _pyro_sample(self, msg: Message) -> None:
        if msg["name"] != self.site or type(msg["fn"]).__name__ == "_Subsample":
            return
        self._seen = True
        fn = msg["fn"]
        A = _subsample(self.A, 2, msg)
        b = _subsample(self.b, 1, msg)
        base = fn
        if isinstance(fn, ConstrainedDistribution):
            record = msg["infer"].get(_RECORD)
            if record is None:
                raise ValueError(
                    f"LinearConstraint: site {self.site!r} already has a constrained "
                    f"distribution ({type(fn).__name__}) built in the model, whose base is "
                    "unknown to the handler; constrain the base with one handler per law, "
                    "or stack all rows into one A."
                )
            base = record["base"]
            A, b = _stack(record["A"], record["b"], A, b, self.site)
        try:
            new_fn = constrain(base, A, b)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise type(e)(f"LinearConstraint at site {self.site!r}: {e}") from e
        batch_shape = torch.broadcast_shapes(new_fn.batch_shape, fn.batch_shape)
        if batch_shape != new_fn.batch_shape:
            new_fn = new_fn.expand(batch_shape)
        msg["fn"] = new_fn
        msg["infer"] = {**msg["infer"], _RECORD: {"base": base, "A": A, "b": b}}

    def _pyro_post_sample(self, msg: Message) -> None:
        if msg["name"] != self.site or not msg["is_observed"]:
            return
        support = getattr(msg["fn"], "support", None)
        if isinstance(support, affine_subspace) and msg["value"] is not None:
            _check_observation(support, msg["value"], self.site)
            # checked once here, with the site's name in the message: log_prob need not redo it
            fn = constrained_base(msg["fn"])
            if fn is not None:
                fn.mark_valid(msg["value"])


def _subsample(value, event_dim: int, msg: Message):
    """Select the current subsample of a full-size per-datum ``A`` or ``b``."""
    if not isinstance(value, torch.Tensor):
        return value
    for frame in msg["cond_indep_stack"]:
        full = frame.full_size
        if frame.dim is None or full is None or frame.size == full:
            continue
        d = frame.dim - event_dim
        if value.dim() >= -d and value.shape[d] == full:
            return pyro.subsample(value, event_dim=event_dim)
    return value


def _stack(A1, b1: torch.Tensor, A2, b2: torch.Tensor, site: str):
    """``[A1; A2]`` (dense) and ``[b1; b2]``, broadcasting their leading dims."""
    D1, D2 = as_operator(A1).to_dense(), as_operator(A2).to_dense()
    if D1.shape[-1] != D2.shape[-1]:
        raise ValueError(
            f"LinearConstraint at site {site!r}: stacked handlers disagree on n "
            f"({D1.shape[-1]} vs {D2.shape[-1]} columns of A)."
        )
    dtype = torch.promote_types(D1.dtype, D2.dtype)
    batch_A = torch.broadcast_shapes(D1.shape[:-2], D2.shape[:-2])
    batch_b = torch.broadcast_shapes(b1.shape[:-1], b2.shape[:-1])
    A = torch.cat(
        [
            D1.to(dtype).expand(batch_A + D1.shape[-2:]),
            D2.to(dtype).expand(batch_A + D2.shape[-2:]),
        ],
        dim=-2,
    )
    b_dtype = torch.promote_types(b1.dtype, b2.dtype)
    b = torch.cat(
        [
            b1.to(b_dtype).expand(batch_b + b1.shape[-1:]),
            b2.to(b_dtype).expand(batch_b + b2.shape[-1:]),
        ],
        dim=-1,
    )
    return A, b


def _check_observation(support: affine_subspace, value: torch.Tensor, site: str) -> None:
    """Raise when an observed value is off the subspace beyond the documented tolerance."""
    ok = support.check(value)
    if bool(ok.all()):
        return
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    n, k = support.A.num_cols, support.event_dim
    x = value.reshape(value.shape[: value.dim() - k] + (n,)).to(torch.float64)
    resid = support.residual(value).abs()
    tol = residual_tolerance(
        support.A.to(torch.float64), x, support.b.to(torch.float64), torch.finfo(dtype).eps
    )
    ratio = resid / tol.clamp_min(torch.finfo(torch.float64).tiny)
    worst = int(ratio.argmax())
    r_worst = float(resid.flatten()[worst])
    t_worst = float(tol.broadcast_to(resid.shape).flatten()[worst])
    raise ValueError(
        f"LinearConstraint: the observed value at site {site!r} violates A x = b: "
        f"max |A x - b| = {float(resid.max()):.3g} (worst row: residual {r_worst:.3g} > "
        f"tolerance {t_worst:.3g} of plc.constraints.residual_tolerance; non-finite entries "
        "also fail). Real data is often rounded: clean it with plc.project(value, A, b)."
    )
