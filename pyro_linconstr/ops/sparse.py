r"""Sparse constraint matrices: :class:`SparseOperator`.

A ``torch.sparse_coo`` or ``torch.sparse_csr`` tensor ``A`` (a conservation law
over a network: the node-edge incidence matrix, whose rows say that the flows
balance at every node) is wrapped in a :class:`SparseOperator` by
:func:`~pyro_linconstr.ops.as_operator`, so it is accepted wherever a dense
``A`` is and gives the same results, without ever forming the ``m x n``
matrix on the Gaussian path.

**Costs** (``nnz`` non-zeros, ``c_j`` the non-zeros of column ``j``):

* ``A X``, ``A^T Y``, ``|A| |x|``: ``O(nnz)`` per column of ``X``, through a CSR
  copy of ``A`` and one of ``A^T`` (built once per dtype and device, so that
  neither product nor its backward transposes a sparse matrix);
* ``A diag(s) A^T`` (:meth:`~SparseOperator.weighted_gram`) and its adjoint
  ``diag(A^T M A)`` (:meth:`~SparseOperator.quad_diag`): ``O(sum_j c_j^2)``,
  the number of products of two non-zeros that share a column (``4 n`` for an
  incidence matrix), plus the dense ``m x m`` result. The list of those pairs is
  built once and kept while it holds at most :data:`PAIR_BUDGET` pairs (larger
  lists are rebuilt chunk by chunk on each call, so memory stays bounded);
* ``log det(A A^T)``: one ``m x m`` Cholesky in float64, cached.

The Gaussian conditioning then factors the dense ``m x m`` matrix
``A Sigma A^T``, ``O(m^3)``: a sparse ``A`` pays off when ``n`` is large next to
``m`` or when the same law is used at many sizes of batch, and it removes the
``O(m^2 n)`` products of a dense ``A`` (see :doc:`/conditioning`).

**What densifies.** :meth:`~SparseOperator.to_dense` forms ``m x n``; the
library calls it only where no sparse algorithm is offered: the float64 SVD
fallback of an ill-conditioned (not merely redundant) system,
:func:`~pyro_linconstr.project`, the chart
:class:`~pyro_linconstr.transforms.AffineSubspaceTransform` (an SVD with the
full ``n x n`` basis), the variance of a ``LowRankMultivariateNormal`` base,
and the discrete families.

**Set-up is cached.** Wrapping a tensor coalesces it, checks it and copies it
to CSR (``O(nnz log nnz)``); the operator keeps its CSR copies, pair list,
``log det(A A^T)`` and the analysis of redundant rows of the conditioning
(:attr:`~SparseOperator.analysis_cache`) across calls.
:func:`~pyro_linconstr.ops.as_operator` returns the same operator for the same
tensor object as long as the tensor is not modified in place (its version
counter is unchanged), so calling :func:`~pyro_linconstr.constrain` with the
same sparse tensor at every step of SVI pays the set-up once.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from pyro_linconstr.ops.operators import LinearOperator, _power_of_two_scales

__all__ = ["PAIR_BUDGET", "SparseOperator"]

#: Largest number of non-zero pairs ``(A_ri, A_ci)`` kept in memory for
#: :meth:`SparseOperator.weighted_gram` (about 100 MB of indices); beyond it the
#: pairs are generated chunk by chunk on each call.
PAIR_BUDGET = 1 << 22

_SUPPORTED_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def _quiet_csr(fn, *args):
    """Run a CSR conversion without torch's "CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support.*")
        return fn(*args)


class _SpMM(torch.autograd.Function):
    """``A X`` (or ``A^T X``) with a cached CSR matrix; backward is the other product.

    The backward is this same function on the transposed matrix, so every order
    of derivative is available; gradients never reach the values of ``A`` (a
    sparse law is data: :class:`SparseOperator` refuses an ``A`` that requires grad).
    """

    @staticmethod
    def forward(ctx, X, op, transpose):
        ctx.op, ctx.transpose = op, transpose
        return op._csr(X.dtype, X.device, transpose) @ X

    @staticmethod
    def backward(ctx, grad):
        return _SpMM.apply(grad, ctx.op, not ctx.transpose), None, None


def _check_sparse(A: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the problem and the fix for an unsupported sparse ``A``."""
    if A.layout not in _SUPPORTED_LAYOUTS:
        raise ValueError(
            f"A is a sparse tensor with layout {A.layout}; supported sparse layouts are "
            "torch.sparse_coo and torch.sparse_csr. Convert it with A.to_sparse_csr() (or "
            "A.to_sparse_coo()), or pass A.to_dense()."
        )
    if A.dim() != 2 or A.dense_dim() != 0:
        what = "a hybrid sparse tensor" if A.dense_dim() else "a batched sparse tensor"
        raise ValueError(
            f"A is {what} of shape {tuple(A.shape)} (sparse dims {A.sparse_dim()}, dense dims "
            f"{A.dense_dim()}); a sparse A must be one m x n matrix, shared by the batch (b "
            "may still be batched). For per-item laws, use a dense A of shape (..., m, n), or "
            "one block-diagonal sparse matrix over the concatenated events."
        )
    if A.dtype.is_complex or not A.dtype.is_floating_point:
        raise ValueError(
            f"A must have floating-point values, got a sparse tensor with dtype {A.dtype}; "
            "convert it with A.to(torch.get_default_dtype())."
        )
    if A.requires_grad:
        raise ValueError(
            "A is a sparse tensor that requires grad; gradients with respect to the values of "
            "a sparse A are not supported. Pass A.detach() (a law is usually data), or a "
            "dense A."
        )


class SparseOperator(LinearOperator):
    r"""A sparse ``m x n`` constraint matrix (``torch.sparse_coo`` or ``torch.sparse_csr``).

    Built by :func:`~pyro_linconstr.ops.as_operator` (and so by
    :func:`~pyro_linconstr.constrain`, :func:`~pyro_linconstr.project`, the
    support and the chart) for a sparse tensor; results equal those of
    ``A.to_dense()``. Products cost ``O(nnz)`` per column, ``A diag(s) A^T``
    ``O(sum_j c_j^2)`` with ``c_j`` the non-zeros of column ``j`` (see
    :mod:`pyro_linconstr.ops.sparse`), and no method but :meth:`to_dense`
    forms the ``m x n`` matrix. A COO tensor is coalesced once (duplicate
    entries are summed, as ``to_dense`` would).

    :param torch.Tensor A: a 2-d sparse COO or CSR tensor with finite
        floating-point values (explicit zeros are allowed). Its values are
        copied: later in-place changes to ``A`` do not reach the operator.
    :raises ValueError: for another layout (``sparse_csc``, ``sparse_bsr``,
        ``sparse_bsc``), a batched or hybrid sparse tensor, integer or complex
        values, non-finite values, or values that require grad.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> # a triangle network: flows on edges 0->1, 1->2, 0->2 balance at every node
        >>> A = torch.sparse_coo_tensor(
        ...     torch.tensor([[0, 1, 1, 2, 0, 2], [0, 0, 1, 1, 2, 2]]),
        ...     torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]), (3, 3))
        >>> base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> d = plc.constrain(base, A, torch.tensor([-1.0, 0.0, 1.0]))  # node 0 injects 1
        >>> x = d.sample()
        >>> bool(((A @ x) - torch.tensor([-1.0, 0.0, 1.0])).abs().max() < 1e-5)
        True
        >>> d.mean
        tensor([0.3333, 0.3333, 0.6667])
    """

    #: :meth:`quad_diag` costs ``O(sum_j c_j^2)``, without an ``m x n`` matrix.
    structured_quad_diag = True

    def __init__(self, A: torch.Tensor) -> None:
        if not isinstance(A, torch.Tensor) or A.layout == torch.strided:
            raise TypeError("SparseOperator: A must be a sparse torch.Tensor (COO or CSR).")
        _check_sparse(A)
        coo = A.coalesce() if A.layout == torch.sparse_coo else A.to_sparse_coo().coalesce()
        values = coo.values().detach().clone()
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError("A has non-finite entries (nan or inf).")
        m, n = A.shape
        self._init(coo.indices().clone(), values, m, n, {})

    def _init(self, indices, values, m: int, n: int, shared: dict) -> None:
        self._indices, self._values = indices, values
        self.num_rows, self.num_cols = int(m), int(n)
        #: caches shared by every dtype version of this operator (see :meth:`to`)
        self._shared = shared
        self._shared.setdefault("ops", {})[values.dtype] = self

    @classmethod
    def _from_coo(cls, indices, values, m: int, n: int, shared: dict | None = None):
        new = cls.__new__(cls)
        new._init(indices, values, m, n, {} if shared is None else shared)
        return new

    # ------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def nnz(self) -> int:
        """The number of stored non-zeros (after coalescing)."""
        return self._values.numel()

    @property
    def analysis_cache(self) -> dict:
        """A dict shared by the dtype versions of this operator, where the conditioning
        keeps what depends on ``A`` alone (its analysis of redundant rows)."""
        return self._shared.setdefault("analysis", {})

    def __repr__(self) -> str:
        return f"SparseOperator(m={self.num_rows}, n={self.num_cols}, nnz={self.nnz})"

    def __getstate__(self):
        # caches are rebuilt on use; the dtype versions are not pickled
        return {
            "indices": self._indices,
            "values": self._values,
            "shape": (self.num_rows, self.num_cols),
        }

    def __setstate__(self, state) -> None:
        self._init(state["indices"], state["values"], *state["shape"], {})

    # ------------------------------------------------------------- internals
    def _cached(self, key, build):
        cache = self._shared.setdefault("tensors", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _csr(
        self, dtype: torch.dtype, device: torch.device, transpose: bool = False, absolute=False
    ):
        """``A`` (or ``A^T``, or ``|A|``) as a CSR tensor in ``dtype`` on ``device`` (cached)."""

        def build():
            idx = self._indices.to(device)
            vals = self._values.to(device=device, dtype=dtype)
            if absolute:
                vals = vals.abs()
            shape = (self.num_rows, self.num_cols)
            if transpose:
                idx, shape = idx.flip(0), shape[::-1]
            coo = torch.sparse_coo_tensor(idx, vals, shape, device=device, check_invariants=False)
            return _quiet_csr(lambda t: t.coalesce().to_sparse_csr(), coo)

        return self._cached(("csr", dtype, device, transpose, absolute), build)

    def _product(self, X: torch.Tensor, transpose: bool, absolute: bool = False) -> torch.Tensor:
        """``A X`` / ``A^T X`` for a 2-d dense ``X`` (rows: ``n`` or ``m``)."""
        if absolute:
            return self._csr(X.dtype, X.device, transpose, absolute=True) @ X
        return _SpMM.apply(X, self, transpose)

    def _pairs(self, device: torch.device):
        """Chunks ``(flat, elem, coef)`` of the pairs of non-zeros ``(r, i), (c, i)`` sharing a
        column ``i``: ``flat = r m + c``, ``elem = i``, ``coef = A_ri A_ci`` (float64).

        ``A diag(s) A^T`` scatters ``s_i coef`` to ``flat``; ``diag(A^T M A)`` gathers
        ``M[flat] coef`` into ``elem``. A list is cached when the pairs fit in
        :data:`PAIR_BUDGET`, else a generator rebuilds the chunks on each call.
        """
        key = ("pairs", device)
        cache = self._shared.setdefault("tensors", {})
        if key in cache:
            return cache[key]
        plan = self._pair_plan(device)
        chunks = (self._pair_chunk(plan, lo, hi) for lo, hi in plan["bounds"])
        if plan["total"] <= PAIR_BUDGET:
            chunks = list(chunks)
            cache[key] = chunks
        return chunks

    def _pair_plan(self, device: torch.device) -> dict:
        def build():
            m = self.num_rows
            rows, cols = self._indices.to(device)
            vals = self._values.to(device=device, dtype=torch.float64)
            order = torch.argsort(cols * m + rows)  # column-major order of the non-zeros
            rows, cols, vals = rows[order], cols[order], vals[order]
            counts = torch.bincount(cols, minlength=self.num_cols)
            starts = torch.cumsum(counts, 0) - counts
            reps = counts[cols]  # each non-zero pairs with every non-zero of its column
            cum = torch.cumsum(reps, 0)
            total = int(cum[-1]) if cum.numel() else 0
            # chunk boundaries over the non-zeros so that each chunk holds <= PAIR_BUDGET pairs
            bounds, lo = [], 0
            nnz = reps.numel()
            while lo < nnz:
                base = int(cum[lo - 1]) if lo else 0
                hi = int(torch.searchsorted(cum, base + PAIR_BUDGET, right=True))
                hi = max(hi, lo + 1)
                bounds.append((lo, hi))
                lo = hi
            return {
                "rows": rows,
                "cols": cols,
                "vals": vals,
                "starts": starts,
                "reps": reps,
                "total": total,
                "bounds": bounds,
            }

        return self._cached(("pair_plan", device), build)

    def _pair_chunk(self, plan: dict, lo: int, hi: int):
        rows, cols, vals, reps = plan["rows"], plan["cols"], plan["vals"], plan["reps"]
        r = reps[lo:hi]
        a = torch.repeat_interleave(torch.arange(lo, hi, device=r.device), r)
        first = torch.cumsum(r, 0) - r  # position of each block inside the chunk
        offset = torch.arange(a.numel(), device=r.device) - torch.repeat_interleave(first, r)
        b = plan["starts"][cols[a]] + offset
        flat = rows[a] * self.num_rows + rows[b]
        return flat, cols[a], vals[a] * vals[b]

    # -------------------------------------------------------------- products
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        X = x.reshape(-1, self.num_cols).transpose(0, 1)
        return self._product(X, False).transpose(0, 1).reshape(lead + (self.num_rows,))

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        lead = y.shape[:-1]
        Y = y.reshape(-1, self.num_rows).transpose(0, 1)
        return self._product(Y, True).transpose(0, 1).reshape(lead + (self.num_cols,))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-2], x.shape[-1]
        X = x.movedim(-2, 0).reshape(self.num_cols, -1)
        return self._product(X, False).reshape((self.num_rows,) + lead + (k,)).movedim(0, -2)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        lead, k = y.shape[:-2], y.shape[-1]
        Y = y.movedim(-2, 0).reshape(self.num_rows, -1)
        return self._product(Y, True).reshape((self.num_cols,) + lead + (k,)).movedim(0, -2)

    def abs_matvec(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        X = x.abs().reshape(-1, self.num_cols).transpose(0, 1)
        out = self._product(X, False, absolute=True)
        return out.transpose(0, 1).reshape(lead + (self.num_rows,))

    def weighted_gram(self, s: torch.Tensor) -> torch.Tensor:
        """``A diag(s) A^T``, ``(..., m, m)``, from the pairs of non-zeros sharing a column.

        ``O(sum_j c_j^2)`` plus the ``m x m`` result; differentiable in ``s``
        (its backward is :meth:`quad_diag`'s gather, also ``O(sum_j c_j^2)``).
        """
        m, lead = self.num_rows, s.shape[:-1]
        G = s.new_zeros(lead + (m * m,))
        for flat, elem, coef in self._pairs(s.device):
            G = G.index_add(-1, flat, s.index_select(-1, elem) * coef.to(s.dtype))
        return G.reshape(lead + (m, m))

    def quad_diag(self, M: torch.Tensor) -> torch.Tensor:
        """``diag(A^T M A)_i = sum_{r, c} A_ri M_rc A_ci`` over the non-zeros of column ``i``.

        ``O(sum_j c_j^2)``, without an ``m x n`` matrix.
        """
        m, lead = self.num_rows, M.shape[:-2]
        Mf = M.reshape(lead + (m * m,))
        out = M.new_zeros(lead + (self.num_cols,))
        for flat, elem, coef in self._pairs(M.device):
            out = out.index_add(-1, elem, Mf.index_select(-1, flat) * coef.to(M.dtype))
        return out

    def gram_logdet(self) -> torch.Tensor:
        """``log det(A A^T)`` from one float64 Cholesky of the ``m x m`` gram (cached, no
        host synchronisation); meaningful for ``A`` of full row rank."""

        def build():
            ones = torch.ones(self.num_cols, dtype=torch.float64, device=self.device)
            chol, _ = torch.linalg.cholesky_ex(self.weighted_gram(ones))
            return 2 * chol.diagonal().log().sum()

        return self._cached(("gram_logdet", self.device), build).to(self.dtype)

    def row_norms1(self) -> torch.Tensor:
        """The 1-norm of each row, ``(m,)`` (float64)."""
        ones = torch.ones(self.num_cols, dtype=torch.float64, device=self.device)
        return self.abs_matvec(ones)

    def select_rows(self, rows: torch.Tensor) -> SparseOperator:
        """The operator of the rows ``rows`` (in that order), sharing nothing with this one."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        new_id = torch.full((self.num_rows,), -1, dtype=torch.long, device=self.device)
        new_id[rows] = torch.arange(rows.numel(), device=self.device)
        r, c = self._indices
        keep = new_id[r] >= 0
        idx = torch.stack([new_id[r[keep]], c[keep]])
        coo = torch.sparse_coo_tensor(
            idx, self._values[keep], (rows.numel(), self.num_cols), check_invariants=False
        )
        coo = coo.coalesce()
        return SparseOperator._from_coo(coo.indices(), coo.values(), rows.numel(), self.num_cols)

    def to_dense(self) -> torch.Tensor:
        """The ``m x n`` dense matrix (for tests and the dense fallbacks only)."""
        return self.to_sparse().to_dense()

    def to_sparse(self) -> torch.Tensor:
        """``A`` as a coalesced sparse COO tensor."""
        shape = (self.num_rows, self.num_cols)
        coo = torch.sparse_coo_tensor(self._indices, self._values, shape, check_invariants=False)
        return coo.coalesce()

    def equilibrated(self) -> tuple[SparseOperator, torch.Tensor | None]:
        """See :meth:`LinearOperator.equilibrated`; ``None`` for rows already in ``[1, 2)``
        (sums), computed once per dtype version."""

        def build():
            rows = self._indices[0]
            row_max = torch.zeros(self.num_rows, dtype=self.dtype, device=self.device)
            row_max = row_max.scatter_reduce(0, rows, self._values.abs(), "amax")
            d = _power_of_two_scales(row_max)
            if bool((d == 1).all()):
                return self, None
            values = self._values * d[rows]
            return SparseOperator._from_coo(self._indices, values, self.num_rows, self.num_cols), d

        return self._cached(("equilibrated", self.dtype), build)

    def to(self, dtype: torch.dtype) -> SparseOperator:
        """The same operator with values in ``dtype`` (products follow their input's dtype).

        The dtype versions of one operator share their caches, and asking twice
        for one dtype returns the same object.
        """
        ops = self._shared.setdefault("ops", {})
        if dtype not in ops:
            SparseOperator._from_coo(
                self._indices, self._values.to(dtype), self.num_rows, self.num_cols, self._shared
            )
        return ops[dtype]


# ---------------------------------------------------------------------------
# as_operator(A) for a sparse tensor: the same operator while the tensor lives unchanged
_FROM_TENSOR: dict[int, tuple] = {}


def from_tensor(A: torch.Tensor) -> SparseOperator:
    """The :class:`SparseOperator` of ``A``, cached by identity while ``A`` lives and is not
    modified in place (its version counter)."""
    key = id(A)
    entry = _FROM_TENSOR.get(key)
    if entry is not None and entry[0]() is A and entry[1] == A._version:
        return entry[2]
    op = SparseOperator(A)  # holds copies, never A itself: the cache cannot keep A alive

    def forget(ref, key=key):
        if _FROM_TENSOR.get(key, (None,))[0] is ref:
            del _FROM_TENSOR[key]

    ref = weakref.ref(A, forget)
    _FROM_TENSOR[key] = (ref, A._version, op)
    return op
