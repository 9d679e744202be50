r"""``ZeroSumNormal``: a Normal conditioned on summing to zero along chosen axes.

A shortcut for ``plc.constrain(Normal(loc, scale).expand(...).to_event(k),
plc.AxisSums(event_shape, axes), 0)``: the identifiable way to write group
effects (one effect per level of a factor, or per cell of a two-way table)
next to an intercept.
"""

from __future__ import annotations

import functools
import math
import numbers

import pyro.distributions as dist
import torch

from pyro_linconstr.distributions.gaussian import ConstrainedGaussian
from pyro_linconstr.ops.axis_sums import AxisSums, _check_event_shape

__all__ = ["ZeroSumNormal"]


def _zero_sum_axes(zero_sum_axes, event_shape: torch.Size) -> tuple[int, ...]:
    D = len(event_shape)
    if zero_sum_axes is None:
        return tuple(range(D))
    if isinstance(zero_sum_axes, bool):
        raise ValueError(
            f"ZeroSumNormal: zero_sum_axes must be an int or a tuple, got {zero_sum_axes!r}."
        )
    if isinstance(zero_sum_axes, numbers.Integral):
        k = int(zero_sum_axes)
        if not 1 <= k <= D:
            raise ValueError(
                f"ZeroSumNormal: zero_sum_axes={k} (an int counts the last axes, like PyMC's "
                f"n_zerosum_axes) must lie in [1, {D}] for event_shape {tuple(event_shape)}; "
                "to name axes, pass a tuple such as (0,)."
            )
        return tuple(range(D - k, D))
    try:
        return tuple(zero_sum_axes)  # AxisSums checks the axes
    except TypeError:
        raise ValueError(
            f"ZeroSumNormal: zero_sum_axes must be None, an int or a tuple of ints, "
            f"got {zero_sum_axes!r}."
        ) from None


def ZeroSumNormal(scale, event_shape, zero_sum_axes=None, loc=None, validate_args=None):
    r"""A Normal over ``event_shape`` conditioned on summing to zero along ``zero_sum_axes``.

    Returns the :class:`~pyro_linconstr.distributions.ConstrainedGaussian`

    .. code-block:: python

        plc.constrain(
            dist.Normal(loc, scale).expand(batch_shape + event_shape).to_event(len(event_shape)),
            plc.AxisSums(event_shape, axes),
            torch.zeros(m),
        )

    With a scalar ``scale`` ``sigma`` and ``loc = 0`` this is the
    ``ZeroSumNormal`` of PyMC and NumPyro: mean 0, marginal variance
    ``sigma^2 prod_a (1 - 1/s_a)`` over the zero-sum axes ``a`` (sizes
    ``s_a``), and density w.r.t. the surface measure of the zero-sum subspace
    ``-|x|^2 / (2 sigma^2) - d (log sigma + log(2 pi) / 2)`` with
    ``d = prod_a (s_a - 1) * prod_other s_b`` its dimension (their ``logp``).
    Two extensions:

    * ``scale`` may differ per element (any shape broadcasting with
      ``event_shape``; leading dims are batch dims). The result is still the
      Normal conditioned on the zero sums, so an entry with a small scale
      moves little and one with a large scale absorbs the correction;
    * a ``loc`` may be given: the base is ``Normal(loc, scale)`` before
      conditioning. The mean is then ``loc`` corrected onto the subspace (its
      scale-weighted projection; ``loc`` itself when it already sums to zero).

    With one ``scale`` per event (a scalar, or a tensor of size 1 along the
    event dims) and no ``loc``, :meth:`log_prob` is that closed form (the
    general formula without its solves, which NUTS calls at every step).

    Samples are exact (every margin zero to rounding), :meth:`rsample`
    is reparametrized in ``loc`` and ``scale``, and ``biject_to(d.support)``
    is an ``O(n)`` orthonormal chart (a Helmert basis per axis), so NUTS and
    AutoGuides work on such a latent. Cost: ``O(n)`` for one axis; for ``k``
    axes ``O(n k^2 + m^3)`` with ``m`` the number of independent margins
    (``r + c - 1`` for a ``r x c`` table), never an ``m x n`` matrix.

    :param scale: standard deviation(s) before conditioning, a float or a
        tensor broadcasting with ``event_shape`` (extra leading dims are batch
        dims), positive.
    :param event_shape: the shape of one draw (a tuple of positive ints).
    :param zero_sum_axes: which event axes sum to zero. ``None`` (default):
        all of them, as NumPyro does. An ``int`` ``k``: the *last* ``k`` event
        axes, like PyMC's ``n_zerosum_axes``. A tuple: those event axes
        (negative ones count from the end of the event), e.g. ``(0,)`` for the
        first axis only. Every zero-sum axis needs size >= 2.
    :param loc: the mean before conditioning (default 0), broadcasting like ``scale``.
    :param validate_args: as for any Pyro distribution.
    :raises ValueError: for a bad ``event_shape``, axes outside the event or
        repeated, a ``scale``/``loc`` that does not broadcast with
        ``event_shape``, or (when validating) a non-positive ``scale``.

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> d = plc.ZeroSumNormal(2.0, (3, 4))  # zero-sum rows and columns
        >>> x = d.sample()
        >>> bool(x.sum(0).abs().max() < 1e-5 and x.sum(1).abs().max() < 1e-5)
        True
        >>> round(float(d.variance[0, 0]), 6)  # 4 * (1 - 1/3) * (1 - 1/4)
        2.0

    **References:** PyMC ``pm.ZeroSumNormal`` (``n_zerosum_axes``); NumPyro
    ``dist.ZeroSumNormal(scale, event_shape)``; Stan's ``sum_to_zero_matrix``.
    """
    event_shape = _check_event_shape(event_shape)
    axes = _zero_sum_axes(zero_sum_axes, event_shape)
    scale = torch.as_tensor(scale, dtype=_float_dtype(scale, loc))
    no_loc = loc is None
    loc = torch.zeros((), dtype=scale.dtype) if no_loc else torch.as_tensor(loc)
    if not loc.is_floating_point():
        loc = loc.to(scale.dtype)
    try:
        full = torch.broadcast_shapes(scale.shape, loc.shape, event_shape)
    except RuntimeError:
        full = None
    D = len(event_shape)
    if full is None or full[len(full) - D :] != event_shape:
        raise ValueError(
            f"ZeroSumNormal: scale {tuple(scale.shape)} and loc {tuple(loc.shape)} must "
            f"broadcast with event_shape {tuple(event_shape)} (their last dims the event's, "
            "or 1; extra leading dims are batch dims)."
        )
    dtype = torch.promote_types(scale.dtype, loc.dtype)
    A = _axis_sums(event_shape, tuple(axes), dtype, scale.device)
    base = dist.Normal(loc, scale, validate_args=False).expand(full).to_event(D)  # checked below
    b = torch.zeros(A.num_rows, dtype=dtype, device=scale.device)
    # decided from the shapes alone: one scale per event and no loc (the peers' case)
    uniform = no_loc and all(s == 1 for s in scale.shape[max(scale.dim() - D, 0) :])
    family = _UniformZeroSumNormal if uniform else ConstrainedGaussian
    return family(base, A, b, validate_args=validate_args)


class _UniformZeroSumNormal(ConstrainedGaussian):
    r"""The peers' case, ``loc = 0`` and one ``sigma`` per event: ``log_prob`` in closed form.

    On the subspace the conditional mean is 0 and ``Sigma = sigma^2 I``, so
    ``log p(x) = -|x|^2 / (2 sigma^2) - d log sigma - (d / 2) log(2 pi)`` with
    ``d = n - m``, the general formula of
    :class:`~pyro_linconstr.distributions.ConstrainedGaussian` evaluated
    without its solves (NUTS calls it at every leapfrog step). Everything
    else is inherited.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args and not self.is_marked_valid(value):
            self._validate_sample(value)
        x = self._flat(value).to(self._loc.dtype)
        sigma = self._cov.scale[..., 0]
        d = self._n - self._A.num_rows
        quad = x.square().sum(-1) / sigma.square()
        return -0.5 * quad - d * sigma.log() - 0.5 * d * math.log(2 * math.pi)


@functools.lru_cache(maxsize=64)
def _axis_sums(event_shape, axes, dtype, device) -> AxisSums:
    """One operator per shape (a model rebuilds its ZeroSumNormal at every step of NUTS or
    SVI; the operator's row maps and ``log det(A A^T)`` are then computed once)."""
    return AxisSums(event_shape, axes, dtype=dtype, device=device)


def _float_dtype(scale, loc) -> torch.dtype:
    for t in (scale, loc):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
