"""GroupSum.blocks: block sums / averages of images, against dense oracles."""

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import pyro_linconstr as plc


def _loop_oracle(image_shape, block_shape):
    """The block-sum matrix written out entry by entry (independent of the constructor)."""
    *lead, H, W = image_shape
    bh, bw = block_shape
    C = 1
    for s in lead:
        C *= s
    h, w = H // bh, W // bw
    M = torch.zeros(C * h * w, C * H * W, dtype=torch.float64)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                M[c * h * w + (i // bh) * w + j // bw, c * H * W + i * W + j] = 1.0
    return M


@pytest.mark.parametrize(
    "image_shape, block_shape",
    [((4, 6), (2, 3)), ((14, 14), 2), ((28, 28), 4), ((3, 8, 4), (4, 2)), ((2, 2, 6, 6), 3)],
)
def test_blocks_match_dense_oracles(image_shape, block_shape):
    A = plc.GroupSum.blocks(image_shape, block_shape, dtype=torch.float64)
    bs = (block_shape, block_shape) if isinstance(block_shape, int) else block_shape
    M = _loop_oracle(image_shape, bs)
    assert torch.equal(A.to_dense(), M)
    assert A.num_rows == M.shape[0] and A.num_cols == M.shape[1]
    # block averages equal avg_pool2d over the last two dims, channels kept apart
    torch.manual_seed(0)
    x = torch.randn((5,) + tuple(image_shape), dtype=torch.float64)
    k = bs[0] * bs[1]
    flat = x.reshape(5, -1)
    lead = tuple(image_shape[:-2])
    pooled = F.avg_pool2d(x.reshape((-1, 1) + tuple(image_shape[-2:])), bs)
    torch.testing.assert_close(A.matvec(flat) / k, pooled.reshape(5, -1))
    torch.testing.assert_close(A.matvec(flat), flat @ M.T)
    # the adjoint (upsampling by repetition) and the Gram matrix diag(k)
    y = torch.randn(5, A.num_rows, dtype=torch.float64)
    torch.testing.assert_close(A.rmatvec(y), y @ M)
    torch.testing.assert_close(
        A.weighted_gram(torch.ones(A.num_cols, dtype=torch.float64)),
        torch.full((A.num_rows,), float(k), dtype=torch.float64),
    )
    assert len(lead) == len(image_shape) - 2


def test_conditioned_gaussian_honours_the_low_resolution_image():
    """A diagonal Gaussian over a 14x14 image conditioned on its 7x7 block averages:
    samples average exactly to the low-resolution image, and the conditional mean equals
    the dense float64 formula mu + S A^T (A S A^T)^{-1} (b - A mu)."""
    torch.manual_seed(1)
    A = plc.GroupSum.blocks((14, 14), 2, dtype=torch.float64)
    low = torch.rand(3, 7, 7, dtype=torch.float64)
    b = 4 * low.reshape(3, -1)
    loc = torch.randn(3, 196, dtype=torch.float64)
    var = torch.rand(3, 196, dtype=torch.float64) + 0.1
    d = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b)
    x = d.sample((50,))
    pooled = F.avg_pool2d(x.reshape(-1, 1, 14, 14), 2).reshape(50, 3, 49)
    assert (pooled - low.reshape(3, 49)).abs().max() < 1e-12
    M = A.to_dense()
    S = torch.diag_embed(var)
    K = S @ M.T
    mean = loc + (K @ torch.linalg.solve(M @ K, (b - loc @ M.T).unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(d.mean, mean)


@pytest.mark.parametrize(
    "image_shape, block_shape, words",
    [
        ((14, 15), 2, ["W = 15", "block_shape"]),
        ((16, 14), (3, 2), ["H = 16", "not divisible"]),
        ((14,), 2, ["image_shape", "(..., H, W)"]),
        ((14, 14), (0, 2), ["block_shape"]),
        ((14, 14), (2, 2, 2), ["block_shape"]),
        ((14, 14), 1.5, ["block_shape", "whole numbers"]),  # never truncated to 1
        ((14.5, 14), 2, ["image_shape", "whole numbers"]),
        ((14, 14), (2, 2.0), ["block_shape", "whole numbers"]),
    ],
)
def test_blocks_bad_shapes_name_the_argument(image_shape, block_shape, words):
    with pytest.raises(ValueError) as err:
        plc.GroupSum.blocks(image_shape, block_shape)
    for word in words:
        assert word in str(err.value)
