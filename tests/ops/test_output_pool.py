"""The native CPU ops' output-buffer pool (csrc/cpu/pool.h, sparsestart.runtime.output_pool_stats).

Outputs and per-call scratch of 256 KiB and more come from blocks freed by earlier calls. What
can go wrong is stale data: a reused block still holds the last call's numbers, so every kernel
must overwrite all of an uninitialized block and the zeroed ones (sddmm, conv weight gradient,
their partial sums) must really be zeroed. The tests poison the pool with NaN results of the
same shapes, run the ops again and compare with the reference; they also check the counters
and the limit, and reject bad limits.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsestart import ops, runtime
from sparsestart.ops import reference
from tests.util import assert_close_to_reference, random_matrix

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")

NATIVE = torch.ops.sparsestart
POOLED = 256 * 1024  # csrc/cpu/pool.h kMinPooledBytes


@pytest.fixture
def pool_on():
    """A pool with room, whatever SPARSESTART_POOL_LIMIT_MB the tests run under; restored after."""
    before = runtime.output_pool_stats()["limit_bytes"]
    runtime.set_output_pool_limit(1 << 30)
    yield
    runtime.set_output_pool_limit(before)


def _matrix_ops(m, x, dy):
    r, c, s, cp, rr, st = m.index_tensors()
    M, K = m.shape
    return (NATIVE._native_spmm(m.values, r, c, s, x, M, False),
            NATIVE._native_spmm(m.values, cp, rr, st, dy, K, True),
            NATIVE._native_sddmm(r, c, s, dy, x, m.capacity, m.block_size))


def _conv_ops(m, x, dy, geo):
    idx = m.index_tensors()
    with ops.use_backend("cpu"):
        return (NATIVE.conv2d(m.values, *idx, x, *geo),
                NATIVE.conv2d_input_grad(m.values, *idx, dy, *geo),
                NATIVE.conv2d_weight_grad(*idx, dy, x, m.capacity, *geo))


def _poisoned_then_real(run, m, *operands):
    """Runs with NaN operands (their NaN outputs and scratch go back to the pool), then for real."""
    nan = [torch.full_like(t, float("nan")) for t in operands]
    poison = run(m, *nan)
    assert all(bool(t.isnan().any()) for t in poison[:2])
    del poison
    return run(m, *operands)


@pytest.mark.parametrize("block_size", [1, 4])
def test_matrix_ops_reuse_blocks_without_stale_data(pool_on, block_size):
    # out [512, 256] floats = 512 KiB; sddmm's value gradient has capacity * b^2 floats >= 256 KiB.
    m = random_matrix(512, 512, 0.3, block_size=block_size, dtype=torch.float32, capacity_extra=3,
                      empty_rows=(0,), seed=block_size)
    assert m.capacity * block_size**2 * 4 >= POOLED
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(512, 256, generator=g), torch.randn(512, 256, generator=g)
    first = [t.clone() for t in _matrix_ops(m, x, dy)]
    hits = runtime.output_pool_stats()["hits"]
    again = _poisoned_then_real(_matrix_ops, m, x, dy)
    assert runtime.output_pool_stats()["hits"] >= hits + 6  # poison and real run each reuse three blocks
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # deterministic kernels: the same bits from a reused block
    r, c, s, cp, rr, st = m.index_tensors()
    v, xd, dyd = m.values.double(), x.double(), dy.double()
    refs = (reference.native_spmm(v, r, c, s, xd, 512, False), reference.native_spmm(v, cp, rr, st, dyd, 512, True),
            reference.native_sddmm(r, c, s, dyd, xd, m.capacity, m.block_size))
    bounds = (reference.native_spmm(v.abs(), r, c, s, xd.abs(), 512, False),
              reference.native_spmm(v.abs(), cp, rr, st, dyd.abs(), 512, True),
              reference.native_sddmm(r, c, s, dyd.abs(), xd.abs(), m.capacity, m.block_size))
    for got, ref, bound in zip(again, refs, bounds):
        assert_close_to_reference(got, ref, bound, torch.float32)
    assert not bool(again[2][m.slot[m.nnz:].long()].any())  # free slots zeroed in a reused block


def test_conv_ops_reuse_blocks_without_stale_data(pool_on):
    # y and dx: 8 x 16 x 32 x 32 floats = 512 KiB each, plus the kernels' padded-input scratch.
    n, cin, cout, h, k = 8, 16, 16, 32, (3, 3)
    m = random_matrix(cout, cin * 9, 0.3, dtype=torch.float32, capacity_extra=2, empty_rows=(0,), seed=3)
    geo = ([3, 3], [1, 1], [1, 1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cin, h, h, generator=g)
    dy = torch.randn(n, cout, h, h, generator=g)
    first = [t.clone() for t in _conv_ops(m, x, dy, geo)]
    hits = runtime.output_pool_stats()["hits"]
    again = _poisoned_then_real(lambda mm, a, b: _conv_ops(mm, a, b, geo), m, x, dy)
    assert runtime.output_pool_stats()["hits"] >= hits + 4  # y and dx, poisoned and real
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    wd = m.to_dense().double().reshape(cout, cin, *k)
    xd, dyd = x.double(), dy.double()
    assert_close_to_reference(again[0], F.conv2d(xd, wd, padding=1), F.conv2d(xd.abs(), wd.abs(), padding=1),
                              torch.float32)
    assert_close_to_reference(again[1], torch.nn.grad.conv2d_input(x.shape, wd, dyd, padding=1),
                              torch.nn.grad.conv2d_input(x.shape, wd.abs(), dyd.abs(), padding=1), torch.float32)
    dw = torch.nn.grad.conv2d_weight(xd, wd.shape, dyd, padding=1).reshape(m.shape) * m.mask()
    dw_bound = torch.nn.grad.conv2d_weight(xd.abs(), wd.shape, dyd.abs(), padding=1).reshape(m.shape) * m.mask()
    got = type(m)(again[2], *m.index_tensors(), m.shape).to_dense()
    assert_close_to_reference(got, dw, dw_bound, torch.float32)


def test_limit_bounds_the_kept_blocks(pool_on):
    m = random_matrix(256, 64, 0.5, dtype=torch.float32, seed=2)
    r, c, s = m.index_tensors()[:3]
    x = torch.randn(64, 512)  # out [256, 512] floats = 512 KiB

    def spmm():
        return NATIVE._native_spmm(m.values, r, c, s, x, 256, False)

    block = 256 * 512 * 4
    try:
        runtime.set_output_pool_limit(0)
        assert runtime.output_pool_stats()["held_bytes"] == 0
        misses = runtime.output_pool_stats()["misses"]
        del_me = spmm()
        del del_me
        stats = runtime.output_pool_stats()
        assert stats["held_bytes"] == 0 and stats["limit_bytes"] == 0  # off: freed at once, never counted
        assert stats["misses"] == misses
        runtime.set_output_pool_limit(block)  # room for exactly one block
        a, b = spmm(), spmm()
        del a, b
        assert runtime.output_pool_stats()["held_bytes"] == block
        hits = runtime.output_pool_stats()["hits"]
        y = spmm()
        assert runtime.output_pool_stats()["hits"] == hits + 1 and runtime.output_pool_stats()["held_bytes"] == 0
        del y
    finally:
        runtime.set_output_pool_limit(1 << 30)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="nbytes"):
        runtime.set_output_pool_limit(bad)


def test_bad_environment_limit_is_refused():
    env = dict(os.environ, SPARSESTART_POOL_LIMIT_MB="lots")
    code = "from sparsestart import runtime; runtime.output_pool_stats()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SPARSESTART_POOL_LIMIT_MB=lots" in proc.stderr and "MiB" in proc.stderr
