"""Building layers from the sampler's compressed rows: the chunked CSC counting sort, the
chunked initial values, and the layer constructors on the chunked sampling path."""
from __future__ import annotations

import math

import pytest
import torch

import sparsestart.formats.compressed as C
import sparsestart.formats.csc as CSC
import sparsestart.init.sampling as S
from sparsestart.formats import BSR, CSR
from sparsestart.nn import SparseConv2d, SparseLinear


def _random_csr(R, Q, p, seed, empty_rows=(), empty_cols=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(R, Q, generator=g) < p
    mask[list(empty_rows)] = False
    mask[:, list(empty_cols)] = False
    rows, cols = mask.nonzero(as_tuple=True)
    rowptr = torch.zeros(R + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(mask.sum(1), 0)
    return rowptr, cols, rows


@pytest.mark.parametrize("chunk", [1, 7, 1 << 17])
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
def test_csc_counting_sort_matches_a_stable_argsort(monkeypatch, chunk, idt):
    monkeypatch.setattr(CSC, "_CSC_CHUNK", chunk)
    R, Q, cap = 37, 23, 400
    rowptr, cols, rows = _random_csr(R, Q, 0.3, 0, empty_rows=(0, 5, 36), empty_cols=(3, 22))
    nnz = cols.numel()
    colptr, row, slot_t = CSC.csc_of_csr(rowptr, cols.to(idt), Q, cap, idt)
    order = torch.argsort(cols, stable=True)  # the reference: CSR positions by column, rows ascending
    assert colptr.dtype == row.dtype == slot_t.dtype == idt
    assert torch.equal(colptr.long(), torch.cat([torch.zeros(1, dtype=torch.long),
                                                 torch.cumsum(torch.bincount(cols, minlength=Q), 0)]))
    assert torch.equal(slot_t[:nnz].long(), order) and torch.equal(row[:nnz].long(), rows[order])
    assert torch.equal(slot_t[nnz:].long(), torch.arange(nnz, cap)) and not row[nnz:].any()


@pytest.mark.parametrize("cls,b", [(CSR, 1), (BSR, 4)])
def test_from_csr_builds_a_valid_matrix(monkeypatch, cls, b):
    monkeypatch.setattr(CSC, "_CSC_CHUNK", 5)
    R, Q = 9, 11
    rowptr, cols, rows = _random_csr(R, Q, 0.4, 1, empty_rows=(2,))
    for capacity in (None, cols.numel() + 13):
        m = cls._from_csr(rowptr, cols.to(torch.int32), (R * b, Q * b), b, capacity, torch.float64, None)
        m.validate()
        ref = cls.from_indices(rows, cols, (R * b, Q * b), block_size=b, capacity=capacity, dtype=torch.float64)
        for got, want in zip(m.index_tensors(), ref.index_tensors()):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert m.values.dtype == torch.float64 and not m.values.any() and m.capacity == ref.capacity


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(S, "_CHUNKED_ABOVE", 0)
    monkeypatch.setattr(S, "_CHUNK", 1000)
    monkeypatch.setattr(CSC, "_CSC_CHUNK", 777)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("init_fan_in", ["dense", "kept"])
def test_linear_on_the_chunked_path(chunked, exact, init_fan_in):
    """Structure = er_csr's for the seed; values = one uniform draw of nnz values from the
    generator after the structure (in CSR order, as the unchunked construction draws them),
    though the layer draws them in chunks (nnz > 2**18 here)."""
    out_f, in_f, p, seed = 1024, 640, 0.5, 4
    layer = SparseLinear(in_f, out_f, density=p, exact=exact, seed=seed, init_fan_in=init_fan_in)
    layer.validate()
    g = torch.Generator().manual_seed(seed)
    rowptr, col = S.er_csr((out_f, in_f), p, exact=exact, generator=g)
    m = layer.sparse_weight
    nnz = col.numel()
    assert nnz > 1 << 18
    assert torch.equal(m.rowptr.long(), rowptr) and torch.equal(m.col[:nnz].long(), col.long())
    live = torch.empty(nnz).uniform_(-1, 1, generator=g)
    if init_fan_in == "dense":
        bound = torch.full((nnz,), 1 / math.sqrt(in_f), dtype=torch.float64)
    else:
        bound = (1 / rowptr.diff().double().clamp(min=1).sqrt()).repeat_interleave(rowptr.diff())
    assert torch.equal(layer.values.detach()[m.slot[:nnz].long()], live * bound.float())


def test_bsr_conv_and_capacity_on_the_chunked_path(chunked):
    layer = SparseLinear(256, 128, density=0.3, format="bsr", block_size=8, capacity=300, seed=2)
    layer.validate()
    m = layer.sparse_weight
    assert m.capacity == 300 and m.nnz == round(0.3 * 16 * 32)
    assert torch.equal(m.slot[m.nnz:].long(), torch.arange(m.nnz, 300)) and not layer.values[m.nnz:].any()
    conv = SparseConv2d(16, 24, 3, density=0.2, seed=3)
    conv.validate()
    assert conv.sparse_weight.nnz == round(0.2 * 24 * 16 * 9)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(conv(x), conv.to_dense()(x))


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with C.one_thread():
            assert torch.get_num_threads() == 1
            with C.one_thread():
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with C.one_thread():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
