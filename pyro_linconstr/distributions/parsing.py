"""Reading a base distribution and checking ``(base, A, b)``: one place for every family.

:func:`~pyro_linconstr.constrain` and every constrained family go through
:func:`parse_base` and :func:`check_constraint`, so that wrappers, shapes,
dtypes and bad input are handled the same way whatever the family:

* wrappers: ``Independent`` (``.to_event(k)``, also around a vector family
  such as ``MultivariateNormal``) and Pyro's masked distributions
  (``.mask(m)``) are unwrapped; a mask over the batch is re-applied to the
  constrained distribution by :func:`~pyro_linconstr.constrain` (a mask over
  the entries of the event cannot be: conditioning couples them);
* **dtypes**: one rule for every family, *the base decides*: ``A`` and ``b``
  are converted to the dtype of the base's parameters (a float64 base with a
  float32 ``A`` works in float64, a float16 ``A`` is promoted), and results
  are in that dtype. A half-precision base is an error (the factorizations
  need float32 or float64);
* shapes: ``A`` has ``n`` columns (``n`` = the number of entries of the
  base's event), ``b`` has ``m`` entries, and the leading dims of the base,
  ``A`` and ``b`` broadcast; an empty batch is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from torch.distributions import Distribution, Independent

from pyro_linconstr.ops.operators import DenseOperator, LinearOperator

__all__ = ["ParsedBase", "check_constraint", "parse_base", "should_validate"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass
class ParsedBase:
    """A base distribution read as ``inner`` (the innermost family) plus wrappers.

    :ivar inner: the innermost distribution (``Normal``, ``MultivariateNormal``, ...).
    :ivar int reinterpreted: batch dims of ``inner`` that ``Independent``
        wrappers moved into the event.
    :ivar mask: a bool tensor (or bool) over :attr:`batch_shape` gathered from
        masked wrappers, or ``None``.
    :ivar batch_shape: the base's batch shape.
    :ivar event_shape: the base's event shape (``x`` has ``n`` entries).
    :ivar int n: the number of entries of the event.
    :ivar dtype: the dtype of the base's parameters, which ``A``, ``b`` and
        the results follow.
    """

    inner: Distribution
    reinterpreted: int
    mask: torch.Tensor | bool | None
    batch_shape: torch.Size
    event_shape: torch.Size
    n: int
    dtype: torch.dtype

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter of a scalar ``inner`` family as ``batch_shape + (n,)``."""
        return t.expand(self.inner.batch_shape).reshape(self.batch_shape + (self.n,))

    @property
    def unmasked(self) -> Distribution:
        """The base without its mask wrappers."""
        if self.reinterpreted == 0:
            return self.inner
        return Independent(self.inner, self.reinterpreted, validate_args=False)


def parse_base(
    base: Distribution, *, allow_mask: bool = False, require_event: bool = True
) -> ParsedBase:
    """Unwrap ``Independent`` and masked wrappers of ``base`` (see the module docstring).

    :param bool allow_mask: when false, a mask is an error (a family constructed
        directly cannot re-apply it; :func:`~pyro_linconstr.constrain` can).
    :param bool require_event: when true, a base with an empty event is an
        error (every built-in family needs one; a registered family decides).
    :raises TypeError: ``base`` is not a distribution.
    :raises ValueError: a mask over event entries, a half-precision base, or a
        base with an empty event.
    """
    if not isinstance(base, Distribution):
        raise TypeError(f"constrain: base must be a Distribution, got {type(base).__name__}.")
    inner, k, mask = base, 0, None
    while True:
        if isinstance(inner, Independent):
            k += inner.reinterpreted_batch_ndims
            inner = inner.base_dist
        elif isinstance(inner, MaskedDistribution):
            mask = _merge_masks(mask, _batch_mask(inner._mask, k))
            inner = inner.base_dist
        else:
            break
    if mask is not None and not allow_mask:
        raise ValueError(
            "constrain: a masked base reached a constrained family directly; build it with "
            "plc.constrain(base, A, b), which re-applies the mask to the result."
        )
    full = inner.batch_shape
    if k > len(full):
        raise ValueError(
            f"constrain: the base reinterprets {k} batch dims but its family has only "
            f"{len(full)} ({type(inner).__name__} with batch shape {tuple(full)})."
        )
    batch_shape = full[: len(full) - k]
    event_shape = full[len(full) - k :] + inner.event_shape
    n = math.prod(event_shape)
    dtype = _param_dtype(inner)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"constrain: the base's parameters have dtype {dtype}; constrained families work "
            "in float32 or float64. Convert the parameters, e.g. loc.float()."
        )
    if require_event and (len(event_shape) == 0 or n == 0):
        raise ValueError(
            f"constrain: the base's event has no entries (event shape {tuple(event_shape)}); "
            f"a {type(inner).__name__} base needs an event dimension, e.g. "
            f"{type(inner).__name__}(...).to_event(1)."
        )
    return ParsedBase(inner, k, mask, batch_shape, event_shape, n, dtype)


def _param_dtype(inner: Distribution) -> torch.dtype:
    for name in ("loc", "rate", "logits", "probs"):
        t = inner.__dict__.get(name)
        if isinstance(t, torch.Tensor):
            return t.dtype
    return inner.mean.dtype


def _batch_mask(mask, k: int):
    """A wrapper's mask (over the inner batch) as a mask over the outer batch."""
    if not isinstance(mask, torch.Tensor) or k == 0 or mask.dim() == 0:
        return mask
    lead = mask.shape[: max(mask.dim() - k, 0)]
    flat = mask.reshape(lead + (-1,))
    if not bool((flat == flat[..., :1]).all()):
        raise ValueError(
            f"constrain: the base has a mask over entries of its event (mask shape "
            f"{tuple(mask.shape)}, last {k} dims are event dims); conditioning on A x = b "
            "couples the entries, so only whole events can be masked: make the mask "
            "constant over the event dims, or mask the site instead (poutine.mask)."
        )
    return flat[..., 0]


def _merge_masks(a, b):
    if a is None:
        return b
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    return torch.as_tensor(a) & torch.as_tensor(b)


def should_validate(validate_args: bool | None) -> bool:
    """Whether a family validates: ``validate_args`` if given, else the global setting."""
    if validate_args is None:
        return Distribution._validate_args
    return bool(validate_args)


def check_constraint(
    parsed: ParsedBase, A: LinearOperator, b: torch.Tensor, *, finite: bool = True
) -> torch.Size:
    """Check ``A`` and ``b`` against the parsed base and return the batch shape.

    ``A`` must have ``n`` columns and ``b`` its ``m`` rows, both finite (for
    ``finite=True``), and the leading dims of the base, ``A`` and ``b`` must
    broadcast.

    :raises TypeError: ``b`` is not a tensor.
    :raises ValueError: naming the argument and the fix.
    """
    if not isinstance(b, torch.Tensor):
        raise TypeError(
            f"constrain: b must be a torch.Tensor of shape (..., m), got {type(b).__name__}."
        )
    n = parsed.n
    if A.num_cols != n:
        raise ValueError(
            f"constrain: A has {A.num_cols} columns but the base's event "
            f"{tuple(parsed.event_shape)} has n = {n} entries; A must have shape (..., m, {n})."
        )
    op_event = getattr(A, "event_shape", None)  # an operator defined on a shaped event
    if op_event is not None and parsed.event_shape not in (torch.Size(op_event), (n,)):
        raise ValueError(
            f"constrain: A is defined on events of shape {tuple(op_event)} (e.g. plc.AxisSums) "
            f"but the base's event has shape {tuple(parsed.event_shape)}; its axes would be "
            f"read in the wrong places. Give the base the event shape {tuple(op_event)} "
            "(or a flat event of the same size in row-major order)."
        )
    if b.dim() < 1 or b.shape[-1] != A.num_rows:
        raise ValueError(
            f"constrain: b must have shape (..., m) with m = {A.num_rows} (the rows of A), "
            f"got shape {tuple(b.shape)}."
        )
    if b.is_complex() or b.dtype == torch.bool:
        raise ValueError(f"constrain: b must be a real tensor, got dtype {b.dtype}.")
    if finite:
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise ValueError("constrain: b has non-finite entries (nan or inf).")
        if isinstance(A, DenseOperator) and not bool(torch.isfinite(A.matrix).all()):
            raise ValueError("constrain: A has non-finite entries (nan or inf).")
    try:
        return torch.broadcast_shapes(parsed.batch_shape, A.batch_shape, b.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"constrain: batch shapes do not broadcast: base {tuple(parsed.batch_shape)}, "
            f"A {tuple(A.batch_shape)}, b {tuple(b.shape[:-1])}."
        ) from None
