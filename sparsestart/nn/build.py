"""Arguments and sampling shared by the sparse layers' constructors and ``from_dense``."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..formats import BSR, CSR, SparseMatrix
from ..init.sampling import check_density, er_indices

_FORMATS = ("csr", "bsr")


def _real_number(v, name: str):
    """``v`` as a Python float when it is a real number of another kind (a numpy scalar, a 0-d real
    tensor), else ``v`` itself for check_density to judge; TypeError for what is not a real number."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a real number in (0, 1], got {v!r}")
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be a real number in (0, 1], got a tensor of shape {tuple(v.shape)} "
                            f"and dtype {v.dtype}")
        if v.is_meta:
            raise TypeError(f"{name} must be a real number in (0, 1], got a meta tensor (it has no value)")
        return float(v.item())
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, numbers.Real):  # numpy scalars, fractions, decimals
        return float(v)
    raise TypeError(f"{name} must be a real number in (0, 1], got {v!r}")


def _refuse_meta(device) -> None:
    """Construction samples the sparse structure, which needs real tensors: refuse the meta device
    (given, or the default device, e.g. inside ``with torch.device("meta")``) before any sampling."""
    dev = torch.get_default_device() if device is None else torch.device(device)
    if dev.type == "meta":
        raise NotImplementedError(
            "sparse layers cannot be built on the meta device: construction samples the sparse structure "
            "(which entries exist), and a meta tensor holds no index. Build the layer on 'cpu' (sampling "
            "costs O(nnz) memory, never the dense size) and move it with .to(device)")


def _generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _check_format(format: str, block_size) -> tuple[str, int]:
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if format == "csr":
        if block_size not in (None, 1):
            raise ValueError(f"block_size applies to format='bsr' only, got block_size={block_size!r} with 'csr'")
        return "csr", 1
    if block_size is None:
        raise ValueError("format='bsr' needs a block_size (e.g. 16, 32 or 64)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 for format='bsr', got {block_size!r}")
    return "bsr", block_size


def _weight_to_matrix(matrix_shape: tuple[int, int], weight: torch.Tensor, mask: Optional[torch.Tensor], density,
                      format: str, block_size, capacity, exact: bool, seed) -> SparseMatrix:
    """The compressed [M, K] matrix (a layer's ``matrix_shape``) holding ``weight`` at the positions of
    ``mask`` (or of an ER sample)."""
    _refuse_meta(weight.device)
    fmt, b = _check_format(format, block_size)
    M, K = matrix_shape
    cls = CSR if fmt == "csr" else BSR
    w2 = weight.detach().reshape(M, K)
    if mask is not None:
        if density is not None:
            raise ValueError("give either mask or density, not both")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has {tuple(weight.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        return cls.from_dense(w2, mask.reshape(M, K).to(w2.device), block_size=b, capacity=capacity)
    if density is None:
        return cls.from_dense(w2, None if b == 1 else _nonzero_blocks(w2, b), block_size=b, capacity=capacity)
    density = check_density(_real_number(density, "density"))
    cls._check_shape((M, K), b)
    rows, cols = er_indices((M // b, K // b), density, exact=exact, generator=_generator(seed, w2.device))
    bm = torch.zeros(M // b, K // b, dtype=torch.bool, device=w2.device)
    bm[rows.to(w2.device), cols.to(w2.device)] = True
    return cls.from_dense(w2, bm, block_size=b, capacity=capacity)


def _nonzero_blocks(w2: torch.Tensor, b: int) -> torch.Tensor:
    M, K = w2.shape
    return (w2 != 0).reshape(M // b, b, K // b, b).any(dim=(1, 3))
