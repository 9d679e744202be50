"""Linear operators ``A`` for constraints ``A x = b``.

A constraint matrix is either a dense tensor ``(..., m, n)`` (wrapped in the
private :class:`DenseOperator`) or a structured operator such as
:class:`GroupSum`. Every operator offers the same small set of products, so the
constrained families never need to know which one they hold, and a structured
operator never materialises its ``m x n`` matrix.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch


class LinearOperator:
    """Interface of a (possibly batched) ``m x n`` constraint matrix.

    Subclasses implement :meth:`matmul`, :meth:`rmatmul`,
    :meth:`weighted_gram`, :meth:`gram_logdet` and :meth:`to_dense`, and
    may override :meth:`quad_diag`.
    """

    num_rows: int
    num_cols: int
    #: True when ``A diag(s) A^T`` is diagonal for every ``s``.
    diagonal_gram: bool = False
    #: True when :meth:`quad_diag` never forms the ``m x n`` matrix (``O(n)`` for a
    #: GroupSum, ``O(n k^2)`` for an AxisSums; the dense default costs ``O(m^2 n)``).
    structured_quad_diag: bool = False

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(..., n)``; returns ``(..., m)``."""
        return self.matmul(x.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for ``y`` of shape ``(..., m)``; returns ``(..., n)``."""
        return self.rmatmul(y.unsqueeze(-1)).squeeze(-1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A X`` for ``X`` of shape ``(..., n, k)``; returns ``(..., m, k)``."""
        raise NotImplementedError

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T Y`` for ``Y`` of shape ``(..., m, k)``; returns ``(..., n, k)``."""
        raise NotImplementedError

    def abs_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``|A| |x|``, the scale of rounding errors in ``A x``."""
        raise NotImplementedError

    def weighted_gram(self, s: torch.Tensor) -> torch.Tensor:
        """``A diag(s) A^T`` for ``s`` of shape ``(..., n)``.

        Returns ``(..., m)`` (its diagonal) when :attr:`diagonal_gram`,
        else ``(..., m, m)``.
        """
        raise NotImplementedError

    def quad_diag(self, M: torch.Tensor) -> torch.Tensor:
        """``diag(A^T M A)`` for ``M`` of shape ``(..., m, m)``; returns ``(..., n)``.

        The conditional variances of a diagonal Gaussian are
        ``s - s^2 diag(A^T S^{-1} A)``. Generic version: through :meth:`to_dense`
        (``O(m^2 n)``); structured operators override it (see
        :attr:`structured_quad_diag`).
        """
        A = self.to_dense().to(M.dtype)
        return ((M @ A) * A).sum(-2)

    def gram_logdet(self) -> torch.Tensor:
        """``log det(A A^T)``, shape :attr:`batch_shape`."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The matrix ``A`` as a dense tensor ``(..., m, n)``."""
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> LinearOperator:
        raise NotImplementedError

    def equilibrated(self) -> tuple[LinearOperator, torch.Tensor | None]:
        """``(D A, d)``: the rows rescaled by powers of two ``d`` (``D = diag(d)``,
        shape ``batch_shape + (m,)``) so that each row's largest ``|entry|`` lies in
        ``[1, 2)``; ``d`` is ``None`` when no row needs it (operators of 0/1 entries).

        ``{x : D A x = D b}`` is the same subspace and every quantity of the
        constrained families is unchanged by it, while ``A Sigma A^T`` of rows
        with entries of ``1e19`` (float32) no longer overflows; powers of two
        scale without rounding, so the rescaling itself adds no error (a row
        whose largest entry is already in ``[1, 2)`` is left as it is).
        """
        return self, None


def _power_of_two_scales(row_max: torch.Tensor) -> torch.Tensor:
    """``d = 2^k`` with ``d * row_max`` in ``[1, 2)`` (zero rows: ``d = 1``), ``k`` kept
    within the dtype's normal range so that ``d`` is finite."""
    _, exp = torch.frexp(row_max)  # row_max = mantissa * 2^exp, mantissa in [0.5, 1)
    k = torch.where(row_max > 0, 1 - exp, torch.zeros_like(exp))
    limit = math.floor(math.log2(torch.finfo(row_max.dtype).max)) - 1  # 126 in float32
    return torch.ldexp(torch.ones_like(row_max), k.clamp(-limit, limit))


_DERIVED: dict[int, tuple] = {}


def _derived(A: torch.Tensor) -> dict:
    """A store for quantities derived from the dense matrix ``A`` (its float64 copy,
    ``log det(A A^T)``), kept while ``A`` lives and is not modified in place (its version
    counter), so that a fixed ``A`` reused at every step pays for them once. The store never
    holds ``A`` itself; a matrix that requires grad gets a fresh store (no stale graphs)."""
    if A.requires_grad:
        return {}
    key = id(A)
    entry = _DERIVED.get(key)
    if entry is not None and entry[0]() is A and entry[1] == A._version:
        return entry[2]

    def forget(ref, key=key, registry=_DERIVED):  # the registry bound: safe at shutdown
        if registry.get(key, (None,))[0] is ref:
            del registry[key]

    store: dict = {}
    _DERIVED[key] = (weakref.ref(A, forget), A._version, store)
    return store


class DenseOperator(LinearOperator):
    """A dense, possibly batched, matrix ``A`` of shape ``(..., m, n)``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() < 2:
            raise ValueError(
                f"A must have shape (..., m, n) with at least 2 dims, got shape "
                f"{tuple(matrix.shape)}; for a single constraint use A.unsqueeze(0)."
            )
        if not matrix.is_floating_point():
            raise ValueError(
                f"A must be a floating-point tensor, got dtype {matrix.dtype}; "
                "convert it with A.to(torch.get_default_dtype())."
            )
        self.matrix = matrix
        self.num_rows, self.num_cols = matrix.shape[-2:]

    @property
    def batch_shape(self) -> torch.Size:
        return self.matrix.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix.dim() == 2:  # shared A: one GEMM over the whole batch
            return x @ self.matrix.T
        return (self.matrix @ x.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        if self.matrix.dim() == 2:
            return y @ self.matrix
        return (y.unsqueeze(-2) @ self.matrix).squeeze(-2)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix @ x

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.matrix.transpose(-1, -2) @ y

    def abs_matvec(self, x: torch.Tensor) -> torch.Tensor:
        return DenseOperator(self.matrix.abs()).matvec(x.abs())

    def weighted_gram(self, s: torch.Tensor) -> torch.Tensor:
        scaled = self.matrix * s.unsqueeze(-2)
        return scaled @ self.matrix.transpose(-1, -2)

    def quad_diag(self, M: torch.Tensor) -> torch.Tensor:
        return ((M @ self.matrix) * self.matrix).sum(-2)

    def gram_logdet(self) -> torch.Tensor:
        # in float64, without a host synchronisation: within the documented range
        # (cond(A) <= 1e5) the float64 Cholesky of A A^T cannot fail; computed once per
        # unmodified matrix (a fixed A reused across the steps of a training loop)
        store = _derived(self.matrix)
        if "gram_logdet" not in store:
            M = self.matrix.to(torch.float64)
            chol, _ = torch.linalg.cholesky_ex(M @ M.transpose(-1, -2))
            store["gram_logdet"] = (2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)).to(
                self.matrix.dtype
            )
        return store["gram_logdet"]

    def to_dense(self) -> torch.Tensor:
        return self.matrix

    def equilibrated(self) -> tuple[DenseOperator, torch.Tensor]:
        # once per unmodified matrix, like the other derived quantities; the scales are
        # constants (powers of two), gradients reach A through the product
        store = _derived(self.matrix)
        if "equilibrated" not in store:
            d = _power_of_two_scales(self.matrix.detach().abs().amax(-1))
            store["equilibrated"] = (DenseOperator(self.matrix * d.unsqueeze(-1)), d)
        return store["equilibrated"]

    def to(self, dtype: torch.dtype) -> DenseOperator:
        if dtype == self.matrix.dtype:
            return self
        store = _derived(self.matrix)  # the float64 copy of the refinement, made once
        if dtype not in store:
            store[dtype] = DenseOperator(self.matrix.to(dtype))
        return store[dtype]


class _SegmentSum(torch.autograd.Function):
    """Sums over contiguous segments along the last dim (sorted group ids).

    ``torch.segment_reduce`` is several times faster than ``index_add`` but has
    no double backward; pairing it with :class:`_Expand` as each other's
    backward keeps every order of derivative available.
    """

    @staticmethod
    def forward(ctx, x, lengths, groups):
        ctx.save_for_backward(lengths, groups)
        out = torch.segment_reduce(x.movedim(-1, 0), "sum", lengths=lengths, axis=0)
        return out.movedim(0, -1)

    @staticmethod
    def backward(ctx, grad):
        lengths, groups = ctx.saved_tensors
        return _Expand.apply(grad, lengths, groups), None, None


class _Expand(torch.autograd.Function):
    """``y[..., groups]``, the adjoint of :class:`_SegmentSum`."""

    @staticmethod
    def forward(ctx, y, lengths, groups):
        ctx.save_for_backward(lengths, groups)
        return y.index_select(-1, groups)

    @staticmethod
    def backward(ctx, grad):
        lengths, groups = ctx.saved_tensors
        return _SegmentSum.apply(grad, lengths, groups), None, None


class _SumOperator(LinearOperator):
    """An operator with 0/1 entries that implements :meth:`matvec` and :meth:`rmatvec` natively
    (sums and their adjoint broadcasts): matrix products go column by column through them, and
    ``|A| |x| = A |x|``."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x.transpose(-1, -2)).transpose(-1, -2)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.rmatvec(y.transpose(-1, -2)).transpose(-1, -2)

    def abs_matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x.abs())


class GroupSum(_SumOperator):
    """Sum of the entries of each group: row ``g`` of ``A`` is the indicator
    of ``groups == g``.

    This is the constraint of a batch of graphs whose per-graph totals are
    known (partial charges of a crystal sum to its net charge), of per-block
    sums of an image, or of a single sum (``groups = zeros(n)``). Products cost
    ``O(n)`` and ``A diag(s) A^T`` is diagonal, so conditioning a diagonal
    Gaussian on a :class:`GroupSum` never forms an ``m x n`` matrix.

    :param torch.Tensor groups: integer tensor of shape ``(n,)``, the group
        index ``0 <= groups[i] < num_groups`` of entry ``i``.
    :param int num_groups: the number of groups ``m`` (an ``int``; groups may be empty).
    :param dtype: the dtype of :meth:`to_dense` (default: torch's default dtype
        when the operator is built). :func:`~pyro_linconstr.constrain` converts
        the operator to the base's dtype with :meth:`to`.

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> A = plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), num_groups=2)
        >>> A.to_dense()
        tensor([[1., 1., 0., 0., 0.],
                [0., 0., 1., 1., 1.]])
    """

    diagonal_gram = True
    structured_quad_diag = True

    def __init__(
        self, groups: torch.Tensor, num_groups: int, dtype: torch.dtype | None = None
    ) -> None:
        groups = torch.as_tensor(groups)
        if groups.dim() != 1:
            raise ValueError(
                f"GroupSum: groups must be a 1-d tensor of shape (n,), got shape "
                f"{tuple(groups.shape)}; flatten it with groups.reshape(-1)."
            )
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(
                f"GroupSum: groups must be an integer tensor, got dtype {groups.dtype}; "
                "convert it with groups.long()."
            )
        if isinstance(num_groups, torch.Tensor) and num_groups.numel() == 1:
            num_groups = num_groups.item()
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise ValueError(
                f"GroupSum: num_groups must be an integer, got {num_groups!r}; pass the number "
                "of groups, e.g. int(groups.max()) + 1."
            )
        num_groups = int(num_groups)
        if num_groups < 1:
            raise ValueError(f"GroupSum: num_groups must be >= 1, got {num_groups}.")
        if groups.numel() == 0:
            raise ValueError("GroupSum: groups is empty (n = 0).")
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(
                f"GroupSum: group ids must lie in [0, num_groups) = [0, {num_groups}), "
                f"got ids in [{lo}, {hi}]; pass num_groups={hi + 1} or fix the ids."
            )
        self.groups = groups.long()
        self.num_rows = num_groups
        self.num_cols = groups.numel()
        self._dtype = torch.get_default_dtype() if dtype is None else dtype
        self._sizes = torch.bincount(self.groups, minlength=num_groups)
        sizes64 = self._sizes.to(torch.float64)
        # log det(A A^T) = sum of log group sizes over the non-empty groups
        self._gram_logdet = torch.where(sizes64 > 0, sizes64.log(), 0.0).sum()
        # contiguous groups (atoms of one molecule stored together) use segment sums
        self._sorted = bool((self.groups[1:] >= self.groups[:-1]).all())

    @classmethod
    def blocks(
        cls,
        image_shape: tuple[int, ...] | torch.Size,
        block_shape: int | tuple[int, int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> GroupSum:
        r"""Sums over the non-overlapping blocks of an image (downscaling consistency).

        Pixel ``(..., i, j)`` of an event of shape ``image_shape = (..., H, W)``,
        flattened row-major, belongs to block ``(..., i // bh, j // bw)``, and
        blocks are numbered row-major over ``(..., H // bh, W // bw)``: the
        order of :func:`torch.nn.functional.avg_pool2d` flattened, with every
        leading dim (channels) kept apart. So a low-resolution image ``y`` of
        shape ``(..., H // bh, W // bw)`` is the block *average* of ``x`` when
        ``A x = (bh * bw) * y.flatten()``: averages and sums define the same
        law, and the sum form keeps ``A`` a 0/1 :class:`GroupSum` (``O(n)``
        products, diagonal ``A A^T``, accepted by every family).

        :param image_shape: the event shape ``(..., H, W)`` (at least 2 dims,
            e.g. ``(28, 28)`` or ``(3, 32, 32)``).
        :param block_shape: ``(bh, bw)``, or an ``int`` for square blocks.
            ``H`` must be divisible by ``bh`` and ``W`` by ``bw``.
        :param dtype: the dtype of :meth:`to_dense` (as in :class:`GroupSum`).
        :param device: the device of the group index.
        :raises ValueError: for a shape with fewer than 2 dims, a non-positive
            block, or ``H`` / ``W`` not divisible by the block (naming the argument).

        Example::

            >>> import torch, torch.nn.functional as F, pyro_linconstr as plc
            >>> A = plc.GroupSum.blocks((4, 6), (2, 3))
            >>> A
            GroupSum(n=24, num_groups=4)
            >>> x = torch.arange(24.0).reshape(4, 6)
            >>> A.matvec(x.reshape(-1)) / 6  # block averages, row-major
            tensor([ 4.,  7., 16., 19.])
            >>> F.avg_pool2d(x[None], (2, 3)).reshape(-1)
            tensor([ 4.,  7., 16., 19.])
        """
        image_shape = _whole_numbers("image_shape", image_shape)
        if len(image_shape) < 2 or min(image_shape) < 1:
            raise ValueError(
                f"GroupSum.blocks: image_shape must be (..., H, W) with positive sizes, got "
                f"{image_shape}; for a single-channel image pass (H, W)."
            )
        if isinstance(block_shape, numbers.Integral):
            block_shape = (int(block_shape), int(block_shape))
        block_shape = _whole_numbers("block_shape", block_shape)
        if len(block_shape) != 2 or min(block_shape) < 1:
            raise ValueError(
                f"GroupSum.blocks: block_shape must be a positive int or a pair (bh, bw), "
                f"got {block_shape}."
            )
        *lead, H, W = image_shape
        bh, bw = block_shape
        for name, size, block in (("H", H, bh), ("W", W, bw)):
            if size % block:
                raise ValueError(
                    f"GroupSum.blocks: image_shape {image_shape} has {name} = {size}, not "
                    f"divisible by the block size {block} of block_shape {block_shape}; crop or "
                    f"pad the image to a multiple of {block}."
                )
        h, w = H // bh, W // bw
        rows = torch.arange(H, device=device) // bh
        cols = torch.arange(W, device=device) // bw
        within = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (H * W,)
        channels = math.prod(lead)
        offsets = torch.arange(channels, device=device)[:, None] * (h * w)
        groups = (offsets + within[None, :]).reshape(-1)
        return cls(groups, channels * h * w, dtype=dtype)

    @property
    def num_groups(self) -> int:
        return self.num_rows

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.groups.device

    def __repr__(self) -> str:
        return f"GroupSum(n={self.num_cols}, num_groups={self.num_rows})"

    def group_sizes(self) -> torch.Tensor:
        """Number of entries in each group, shape ``(m,)``."""
        return self._sizes

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        if self._sorted:
            return _SegmentSum.apply(x, self._sizes, self.groups)
        out = x.new_zeros(x.shape[:-1] + (self.num_rows,))
        return out.index_add(-1, self.groups, x)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        if self._sorted:
            return _Expand.apply(y, self._sizes, self.groups)
        return y.index_select(-1, self.groups)

    def weighted_gram(self, s: torch.Tensor) -> torch.Tensor:
        return self.matvec(s)

    def quad_diag(self, M: torch.Tensor) -> torch.Tensor:
        """``diag(A^T M A)_i = M[g(i), g(i)]``, ``O(n)``."""
        return self.rmatvec(M.diagonal(dim1=-2, dim2=-1))

    def gram_logdet(self) -> torch.Tensor:
        return self._gram_logdet

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.num_rows, self.num_cols, dtype=self._dtype, device=self.device)
        dense[self.groups, torch.arange(self.num_cols, device=self.device)] = 1.0
        return dense

    def to(self, dtype: torch.dtype) -> GroupSum:
        """The same operator with :meth:`to_dense` in ``dtype`` (products follow their input)."""
        if dtype == self._dtype:
            return self
        new = GroupSum.__new__(GroupSum)
        new.__dict__.update(self.__dict__)
        new._dtype = dtype
        return new


def as_operator(A) -> LinearOperator:
    """Wrap a dense tensor as a :class:`DenseOperator` and a sparse COO / CSR tensor as a
    :class:`~pyro_linconstr.ops.sparse.SparseOperator` (the same operator for the same,
    unmodified tensor); pass operators through."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.layout != torch.strided:  # sparse: checked (layout, shape, values) there
            from pyro_linconstr.ops.sparse import from_tensor

            return from_tensor(A)
        return DenseOperator(A)
    raise TypeError(
        f"A must be a torch.Tensor of shape (..., m, n) (dense, or a sparse COO / CSR m x n "
        f"matrix) or a pyro_linconstr operator "
        f"such as plc.GroupSum, got {type(A).__name__}."
    )


def _whole_numbers(name: str, sizes) -> tuple[int, ...]:
    """``sizes`` as a tuple of ints; a float such as 2.5 is an error, never truncated."""
    try:
        items = tuple(sizes)
    except TypeError:
        items = None
    if items is None or not all(
        isinstance(s, numbers.Integral)
        or (isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_floating_point())
        for s in items
    ):
        raise ValueError(
            f"GroupSum.blocks: {name} must be whole numbers (an int or a tuple of ints), "
            f"got {sizes!r}."
        )
    return tuple(int(s) for s in items)
