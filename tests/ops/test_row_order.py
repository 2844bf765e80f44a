"""The CUDA SpMM's row order, computed once per structure change (review F13), checked on CPU.

The kernel itself runs in tests/gpu/test_gpu_ops.py; here: the order is the row swizzle
(rows by decreasing length, ties by row), and the per-tensor cache follows in-place
structure updates through the version counter.
"""
import torch

from sparsestart.ops import gpu


def test_row_order_is_rows_by_decreasing_length_ties_by_row():
    ptr = torch.tensor([0, 2, 2, 5, 7, 8], dtype=torch.int32)  # lengths 2, 0, 3, 2, 1
    assert gpu.row_order(ptr).tolist() == [2, 0, 3, 4, 1]
    assert gpu.row_order(ptr).dtype == torch.int32
    assert gpu.row_order(torch.zeros(1, dtype=torch.int64)).numel() == 0


def test_cached_order_is_reused_until_the_index_changes():
    ptr = torch.tensor([0, 1, 4, 4], dtype=torch.int64)
    first = gpu.cached_row_order(ptr)
    assert first.tolist() == [1, 0, 2]
    assert gpu.cached_row_order(ptr) is first  # same version: no new sort
    ptr.copy_(torch.tensor([0, 3, 3, 4]))  # a structure update rewrites the index in place
    second = gpu.cached_row_order(ptr)
    assert second is not first and second.tolist() == [0, 2, 1]


def test_cache_is_per_tensor():
    a = torch.tensor([0, 1, 3], dtype=torch.int32)
    b = torch.tensor([0, 2, 3], dtype=torch.int32)
    assert gpu.cached_row_order(a).tolist() == [1, 0]
    assert gpu.cached_row_order(b).tolist() == [0, 1]


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        ptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    assert gpu.cached_row_order(ptr).tolist() == [0, 1]
