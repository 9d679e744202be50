r"""Sums of a multi-dimensional event over chosen axes: :class:`AxisSums`.

The rows of ``A`` are the *margins* of the event ``x`` (shape ``event_shape``,
flattened row-major to ``n`` entries): for each summed axis ``a``, the sums of
``x`` over ``a``, one per position of the other axes. With ``b = 0`` the
event is zero-sum along every chosen axis (PyMC's and NumPyro's
``ZeroSumNormal``, Stan's ``sum_to_zero_matrix``); with any other ``b`` its
margins are fixed (a contingency table with known row and column totals).

**Redundant rows.** With several axes the full set of margins is linearly
dependent: for a ``r x c`` table, the row sums and the column sums have the
same total. ``A`` keeps only independent rows, so that ``A Sigma A^T`` is
positive definite and the Gaussian conditioning takes its fast Cholesky path.
For summed axes ``a_1 < ... < a_k``, all margins of ``a_1`` are kept; for
``a_j``, the margins whose index along an earlier summed axis
``a_1, ..., a_{j-1}`` is the *last* one are dropped (each is the total of the
others, known from the margins of that earlier axis). A ``r x c`` table summed
over both axes keeps its ``c`` column sums and the first ``r - 1`` row sums,
``m = r + c - 1`` rows. In general the subspace ``{x : A x = b}`` has
dimension ``prod_a (s_a - 1) * prod_other s_b`` and
``m = n - prod_a (s_a - 1) * prod_other s_b``. :meth:`AxisSums.rhs` maps a
full set of margins (checked for consistency) to the kept rows' ``b``.

**Cost.** Products cost ``O(n k)`` (sums over axes, then a selection).
``A diag(s) A^T`` is an ``m x m`` matrix built by scattering each ``s_i`` into
the entries of the pairs of rows it belongs to, ``O(n k^2)`` time and
``O(m^2)`` memory; an ``m x n`` matrix is never formed. The Gaussian
conditioning then factors this ``m x m`` matrix (``O(m^3)``, with
``m ~ r + c`` for a table, small next to ``n = r c`` until the table is
several hundred wide). With a single axis the rows are disjoint sums, like a
:class:`~pyro_linconstr.GroupSum`: the gram is diagonal and everything is
``O(n)``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from pyro_linconstr.ops.numerics import CONSISTENCY_RTOL
from pyro_linconstr.ops.operators import _SumOperator

__all__ = ["AxisSums"]


def _check_event_shape(event_shape) -> torch.Size:
    if isinstance(event_shape, numbers.Integral) and not isinstance(event_shape, bool):
        event_shape = (int(event_shape),)
    try:
        sizes = tuple(event_shape)
    except TypeError:
        raise ValueError(
            f"AxisSums: event_shape must be a tuple of positive ints, got {event_shape!r}."
        ) from None
    if len(sizes) == 0 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1 for s in sizes
    ):
        raise ValueError(
            "AxisSums: event_shape must be a non-empty tuple of positive ints, "
            f"got {event_shape!r}."
        )
    return torch.Size(int(s) for s in sizes)


def _check_axes(axes, event_shape: torch.Size) -> tuple[int, ...]:
    D = len(event_shape)
    raw = (axes,) if isinstance(axes, numbers.Integral) else axes
    try:
        raw = tuple(raw)
    except TypeError:
        raise ValueError(
            f"AxisSums: axes must be an int or a tuple of ints (axes of the event), got {axes!r}."
        ) from None
    if len(raw) == 0:
        raise ValueError(
            "AxisSums: axes is empty; name at least one axis of the event to sum over."
        )
    normalized = []
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise ValueError(f"AxisSums: axes must be ints, got {a!r} in {axes!r}.")
        if not -D <= int(a) < D:
            raise ValueError(
                f"AxisSums: axis {a} is outside the event: event_shape "
                f"{tuple(event_shape)} has {D} axes, so axes must lie in [{-D}, {D - 1}] "
                "(the axes count within the event, not the batch)."
            )
        normalized.append(int(a) % D)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"AxisSums: duplicate axes {tuple(raw)} (as non-negative axes "
            f"{tuple(normalized)}); name each axis once."
        )
    axes = tuple(sorted(normalized))
    for a in axes:
        if event_shape[a] < 2:
            raise ValueError(
                f"AxisSums: axis {a} has size {event_shape[a]}: a sum over one entry fixes "
                "every entry, and the subspace is a point. Sum over axes of size >= 2."
            )
    return axes


class AxisSums(_SumOperator):
    r"""The sums of a multi-dimensional event over one or several of its axes.

    ``A x`` are the margins of ``x`` (shape ``event_shape``, flattened
    row-major to ``n = prod(event_shape)`` entries) over each axis in ``axes``,
    without the redundant rows: for axes ``a_1 < ... < a_k``, the margins of
    ``a_j`` whose index along an earlier axis ``a_i`` (``i < j``) is the last
    one are dropped (see :mod:`pyro_linconstr.ops.axis_sums`). A ``r x c``
    table with ``axes=(0, 1)`` has ``m = c + (r - 1)`` rows: the ``c`` column
    sums (``x.sum(0)``), then the row sums of the first ``r - 1`` rows
    (``x.sum(1)[:-1]``). With ``b = 0`` the event sums to zero along every
    axis in ``axes``; use :meth:`rhs` to turn a full set of margins into ``b``.

    Why drop rows instead of keeping them all: the conditioning needs ``A
    Sigma A^T`` invertible, and dropping them here costs nothing, whereas a
    dense ``A`` with redundant rows is re-expressed through an SVD of the
    ``m x n`` matrix. With one axis the rows are disjoint (like a
    :class:`~pyro_linconstr.GroupSum`, a diagonal gram: :attr:`diagonal_gram`
    is true and everything is ``O(n)``); with several, ``A diag(s) A^T`` is an
    ``m x m`` matrix built in ``O(n k^2)``, never an ``m x n`` one.

    :param event_shape: the shape of the event (a tuple of positive ints).
    :param axes: an axis or a tuple of axes of the event to sum over (negative
        axes count from the end of the event; each at most once; each of size
        at least 2).
    :param dtype: the dtype of :meth:`to_dense` (default: torch's default
        dtype). :func:`~pyro_linconstr.constrain` converts the operator to the
        base's dtype; products follow their input's dtype.
    :param device: the device of :meth:`to_dense` and :meth:`gram_logdet`
        (default: CPU); products, and the chart of
        :class:`~pyro_linconstr.transforms.AffineSubspaceTransform`, run on
        their input's device.

    The base's event must have shape ``event_shape``, or be a flat vector of
    its ``n`` entries in row-major order; :func:`~pyro_linconstr.constrain`
    rejects any other shape (a transposed event would be summed along the
    wrong axes).

    :raises ValueError: for an empty or non-positive ``event_shape``, an axis
        outside the event, a duplicate axis, or an axis of size 1.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> A = plc.AxisSums((2, 3), axes=(0, 1))
        >>> A.num_rows  # 3 column sums + the first row sum
        4
        >>> A.to_dense()
        tensor([[1., 0., 0., 1., 0., 0.],
                [0., 1., 0., 0., 1., 0.],
                [0., 0., 1., 0., 0., 1.],
                [1., 1., 1., 0., 0., 0.]])
        >>> base = dist.Normal(torch.zeros(2, 3), 1.0).to_event(2)
        >>> x = plc.constrain(base, A, torch.zeros(4)).sample()
        >>> bool(x.sum(0).abs().max() < 1e-5 and x.sum(1).abs().max() < 1e-5)
        True
    """

    #: ``quad_diag`` costs ``O(n k^2)``, without an ``m x n`` matrix.
    structured_quad_diag = True

    def __init__(self, event_shape, axes, dtype: torch.dtype | None = None, device=None) -> None:
        self.event_shape = _check_event_shape(event_shape)
        self.axes = _check_axes(axes, self.event_shape)
        D = len(self.event_shape)
        self.num_cols = math.prod(self.event_shape)
        self._dtype = torch.get_default_dtype() if dtype is None else dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        # per summed axis a_j: the margin's shape (the event without a_j), the shape of its
        # kept rows (one less along each earlier summed axis), their count and first row
        self._margin_shapes, self._kept_shapes, self._counts, self._offsets = [], [], [], []
        offset = 0
        for j, a in enumerate(self.axes):
            margin = list(self.event_shape[:a] + self.event_shape[a + 1 :])
            kept = list(margin)
            for ai in self.axes[:j]:
                kept[ai] -= 1  # ai < a: same position in the margin
            self._margin_shapes.append(torch.Size(margin))
            self._kept_shapes.append(torch.Size(kept))
            self._counts.append(math.prod(kept))
            self._offsets.append(offset)
            offset += self._counts[-1]
        self.num_rows = offset
        self._D = D
        #: with one axis the rows are disjoint sums: ``A diag(s) A^T`` is diagonal.
        self.diagonal_gram = len(self.axes) == 1
        self._index_cache: dict = {}

    # ------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (
            f"AxisSums(event_shape={tuple(self.event_shape)}, axes={self.axes}, "
            f"m={self.num_rows}, n={self.num_cols})"
        )

    def null_dim(self) -> int:
        """The dimension ``n - m`` of the subspace ``{x : A x = b}``."""
        return self.num_cols - self.num_rows

    def group_sizes(self) -> torch.Tensor:
        """With one axis (disjoint rows): the entries per row, ``(m,)``, all the axis' size."""
        if not self.diagonal_gram:
            raise AttributeError("AxisSums.group_sizes: the rows overlap (several axes).")
        size = self.event_shape[self.axes[0]]
        return torch.full((self.num_rows,), size, dtype=torch.long, device=self._device)

    # --------------------------------------------------------------- margins
    def margins(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All margins of ``x`` (``(..., n)`` or ``(..., *event_shape)``), redundant ones included.

        :returns: one tensor per axis in :attr:`axes`, ``x.sum(a)`` of shape
            ``(..., *event_shape without a)``.
        """
        X = self._unflat(x)
        return tuple(X.sum(a - self._D) for a in self.axes)

    def rhs(self, margins) -> torch.Tensor:
        r"""The right-hand side ``b`` (kept rows, ``(..., m)``) of a full set of margins.

        :param margins: a tuple or list with one tensor per axis in
            :attr:`axes` (in increasing axis order), the sums over that axis:
            shape ``(..., *event_shape without a)`` (leading dims broadcast);
            or a tensor ``(..., m)`` of the kept rows, returned unchanged.
        :raises ValueError: when the margins do not fit together: the totals of
            two margins over their shared axes differ (``x.sum(a_i)`` summed
            over ``a_j`` must equal ``x.sum(a_j)`` summed over ``a_i``), beyond
            ``CONSISTENCY_RTOL * sqrt(s) * eps`` of their scale (``s`` the
            larger axis size, ``eps`` of the margins' dtype). Agreeing totals
            are also sufficient: such margins are the margins of some ``x``.

        Example::

            >>> import torch, pyro_linconstr as plc
            >>> A = plc.AxisSums((2, 3), axes=(0, 1))
            >>> A.rhs((torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 2.0])))
            tensor([1., 2., 3., 4.])
            >>> A.rhs((torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 1.0])))
            Traceback (most recent call last):
                ...
            ValueError: AxisSums.rhs: inconsistent margins: ...
        """
        if isinstance(margins, torch.Tensor):
            if margins.dim() < 1 or margins.shape[-1] != self.num_rows:
                raise ValueError(
                    f"AxisSums.rhs: a tensor of kept rows must have shape (..., {self.num_rows}), "
                    f"got {tuple(margins.shape)}; pass the margins as a tuple, one per axis "
                    f"{self.axes}."
                )
            return margins
        if not isinstance(margins, (tuple, list)) or len(margins) != len(self.axes):
            raise ValueError(
                f"AxisSums.rhs: margins must be a tuple of {len(self.axes)} tensors, one per "
                f"axis {self.axes} (or a tensor of the {self.num_rows} kept rows), got "
                f"{type(margins).__name__}"
                + (f" of length {len(margins)}." if isinstance(margins, (tuple, list)) else ".")
            )
        ms = []
        for j, (a, t) in enumerate(zip(self.axes, margins)):
            t = torch.as_tensor(t)
            if not t.is_floating_point():
                t = t.to(torch.get_default_dtype())
            shape = self._margin_shapes[j]
            k = len(shape)
            if t.dim() < k or t.shape[t.dim() - k :] != shape:
                raise ValueError(
                    f"AxisSums.rhs: the margin over axis {a} must have shape (..., "
                    f"{', '.join(map(str, shape))}) (the event {tuple(self.event_shape)} without "
                    f"axis {a}), got {tuple(t.shape)}."
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"AxisSums.rhs: the margin over axis {a} has non-finite entries.")
            ms.append(t)
        dtype = ms[0].dtype
        for t in ms[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        ms = [t.to(dtype) for t in ms]
        self._check_margins(ms)
        leads = [t.shape[: t.dim() - len(self._margin_shapes[j])] for j, t in enumerate(ms)]
        lead = torch.broadcast_shapes(*leads)
        return torch.cat(
            [self._kept(t.expand(lead + t.shape[len(leads[j]) :]), j) for j, t in enumerate(ms)],
            -1,
        )

    def _check_margins(self, ms: list[torch.Tensor]) -> None:
        eps = torch.finfo(ms[0].dtype).eps
        D1 = self._D - 1
        for i, ai in enumerate(self.axes):
            for j in range(i + 1, len(self.axes)):
                aj = self.axes[j]
                # in margin i (no axis ai), aj sits at aj - 1; in margin j, ai sits at ai
                ti = ms[i].sum(aj - 1 - D1)
                tj = ms[j].sum(ai - D1)
                scale = ms[i].abs().sum(aj - 1 - D1) + ms[j].abs().sum(ai - D1)
                size = max(self.event_shape[ai], self.event_shape[aj])
                tol = CONSISTENCY_RTOL * math.sqrt(size) * eps * scale
                diff = (ti - tj).abs()
                if bool((diff > tol).any()):
                    worst = float((diff / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
                    raise ValueError(
                        f"AxisSums.rhs: inconsistent margins: the sums over axis {ai} and the "
                        f"sums over axis {aj} have different totals over the two axes "
                        f"(largest difference {float(diff.max()):.3g}, relative {worst:.3g}); "
                        "no event has these margins. Make the totals agree, e.g. every row "
                        "total and every column total must add up to the same grand total."
                    )

    # --------------------------------------------------------------- helpers
    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[x.dim() - self._D :] == self.event_shape:
            return x
        if x.dim() < 1 or x.shape[-1] != self.num_cols:
            raise ValueError(
                f"AxisSums: expected a tensor of shape (..., {self.num_cols}) or (..., "
                f"{', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}."
            )
        return x.reshape(x.shape[:-1] + self.event_shape)

    def _kept(self, margin: torch.Tensor, j: int) -> torch.Tensor:
        """Kept rows of the margin over axis ``a_j``, flattened: ``(..., count_j)``."""
        D1 = self._D - 1
        for ai in self.axes[:j]:
            margin = margin.narrow(ai - D1, 0, self.event_shape[ai] - 1)
        return margin.reshape(margin.shape[: margin.dim() - D1] + (self._counts[j],))

    def _index(self, device: torch.device):
        """Row maps on ``device``: per axis, the kept row of each entry's margin (or -1);
        per pair of axes ``j < j'``, the entries in two kept rows with the flat index
        ``row_j * m + row_j'`` of their gram entry (unique: two rows share one entry);
        and the scatter of the whole gram (entries, flat indices)."""
        cached = self._index_cache.get(device)
        if cached is not None:
            return cached
        m = self.num_rows
        rows = []
        for j, a in enumerate(self.axes):
            idx = torch.full(self._margin_shapes[j], -1, dtype=torch.long, device=device)
            view = idx
            for ai in self.axes[:j]:
                view = view.narrow(ai, 0, self.event_shape[ai] - 1)
            ids = torch.arange(self._counts[j], device=device) + self._offsets[j]
            view.copy_(ids.reshape(self._kept_shapes[j]))
            rows.append(idx.unsqueeze(a).expand(self.event_shape).reshape(-1))
        pairs = []
        for j in range(len(self.axes)):
            for jj in range(j + 1, len(self.axes)):
                valid = (rows[j] >= 0) & (rows[jj] >= 0)
                elems = valid.nonzero().squeeze(-1)
                pairs.append((elems, rows[j][elems] * m + rows[jj][elems]))
        # the whole gram in one scatter: both triangles of every pair, then the diagonal
        elems = torch.cat([e for e, _ in pairs] * 2) if pairs else rows[0][:0]
        lower = [(f % m) * m + f // m for _, f in pairs]
        diag = torch.arange(m, device=device) * (m + 1)
        flat = torch.cat([f for _, f in pairs] + lower + [diag])
        cached = (rows, pairs, (elems, flat))
        self._index_cache[device] = cached
        return cached

    # -------------------------------------------------------------- products
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        X = x.reshape(x.shape[:-1] + self.event_shape)
        out = [self._kept(X.sum(a - self._D), j) for j, a in enumerate(self.axes)]
        return out[0] if len(out) == 1 else torch.cat(out, -1)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        lead, D1 = y.shape[:-1], self._D - 1
        out = None
        for j, a in enumerate(self.axes):
            block = y.narrow(-1, self._offsets[j], self._counts[j])
            block = block.reshape(lead + self._kept_shapes[j])
            if j > 0:  # dropped rows are 0: pad the last index of each earlier axis
                pad = [0] * (2 * D1)
                for ai in self.axes[:j]:
                    pad[2 * (D1 - 1 - ai) + 1] = 1
                block = F.pad(block, pad)
            block = block.unsqueeze(a - self._D)
            out = block if out is None else out + block
        return out.expand(lead + self.event_shape).reshape(lead + (self.num_cols,))

    def weighted_gram(self, s: torch.Tensor) -> torch.Tensor:
        """``A diag(s) A^T``: ``(..., m)`` (the diagonal) with one axis, else ``(..., m, m)``.

        The diagonal is ``A s`` (each row's own sum); an off-diagonal entry
        pairs a row over ``a_j`` with a row over ``a_j'``, which share exactly
        one entry ``i``, so it is ``s_i`` (or 0): one scatter of ``O(n k^2)``
        values to distinct positions, differentiable in ``s``.
        """
        diag = self.matvec(s)
        if self.diagonal_gram:
            return diag
        m, lead = self.num_rows, s.shape[:-1]
        elems, flat = self._index(s.device)[2]
        values = torch.cat([s.index_select(-1, elems), diag], -1)
        G = s.new_zeros(lead + (m * m,)).index_add_(-1, flat, values)
        return G.reshape(lead + (m, m))

    def quad_diag(self, M: torch.Tensor) -> torch.Tensor:
        """``diag(A^T M A)`` for ``M`` ``(..., m, m)``, in ``O(n k^2)``.

        Entry ``i`` lies in one kept row per axis (or none, where dropped):
        ``sum_{j, j'} M[row_j(i), row_j'(i)]``, the diagonal terms by
        :meth:`rmatvec` of ``diag(M)`` and the others gathered pair by pair.
        """
        out = self.rmatvec(M.diagonal(dim1=-2, dim2=-1))
        if self.diagonal_gram:
            return out
        m, lead = self.num_rows, M.shape[:-2]
        pairs = self._index(M.device)[1]
        sym = (M + M.transpose(-1, -2)).reshape(lead + (m * m,))
        extra = out.new_zeros(lead + (self.num_cols,))
        for elems, flat in pairs:
            extra = extra.index_add(-1, elems, sym.index_select(-1, flat))
        return out + extra

    def gram_logdet(self) -> torch.Tensor:
        """``log det(A A^T)`` in float64 (one ``m x m`` Cholesky, cached)."""
        if not hasattr(self, "_gram_logdet"):
            if self.diagonal_gram:
                size = self.event_shape[self.axes[0]]
                value = torch.tensor(self.num_rows * math.log(size), dtype=torch.float64)
            else:
                ones = torch.ones(self.num_cols, dtype=torch.float64, device=self._device)
                chol = torch.linalg.cholesky(self.weighted_gram(ones))
                value = 2 * chol.diagonal().log().sum()
            self._gram_logdet = value.to(self._device)
        return self._gram_logdet

    def to_dense(self) -> torch.Tensor:
        rows = self._index(self._device)[0]
        dense = torch.zeros(self.num_rows, self.num_cols, dtype=self._dtype, device=self._device)
        cols = torch.arange(self.num_cols, device=self._device)
        for r in rows:
            keep = r >= 0
            dense[r[keep], cols[keep]] = 1.0
        return dense

    def to(self, dtype: torch.dtype) -> AxisSums:
        """The same operator with :meth:`to_dense` in ``dtype`` (products follow their input)."""
        if dtype == self._dtype:
            return self
        new = AxisSums.__new__(AxisSums)
        new.__dict__.update(self.__dict__)
        new._dtype = dtype
        return new
