"""Minibatches of an in-memory :class:`~sparsestart.train.data.Split`: a seeded iterator and CIFAR augmentation.

The permutation and the augmentation draws come from the iterator's generator
(the trainer's is a CPU generator), so the batches are the same on every device
and a saved ``generator.get_state()`` resumes the data order anywhere. Batches
are gathered, converted to float [0, 1] and augmented on the split's device.
Reading datasets lives in :mod:`sparsestart.train.data`.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["augment_batch", "BatchIterator"]


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels and random horizontal flip, per image, seeded.

    The offsets and flips are drawn on the generator's device (the trainer's is a
    CPU generator: the same draws for a batch on any device); the crop runs on ``x``'s device.
    """
    n, c, h, w = x.shape
    dev, gdev = x.device, generator.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # [n, h]
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out.contiguous()


class BatchIterator:
    """Shuffled minibatches of a :class:`~sparsestart.train.data.Split` as float [0, 1] pixels, all randomness
    from ``generator``.

    Each pass draws a fresh permutation (and augmentation) from the generator;
    saving ``generator.get_state()`` between passes is enough to resume exactly.
    The last, smaller batch is kept. Batches are gathered on the split's device
    (the permutation moves there once per pass); a CPU generator gives the same
    batches on every device.
    """

    # ``split`` is not annotated: naming Split would import data.py, which re-exports this module's names.
    def __init__(self, split, batch_size: int, generator: torch.Generator, augment: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.generator, self.augment = split, int(batch_size), generator, augment

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.split), generator=self.generator, device=self.generator.device)
        perm = perm.to(self.split.images.device)
        for idx in perm.split(self.batch_size):
            x = self.split.pixels(idx)
            if self.augment:
                x = augment_batch(x, self.generator)
            yield x, self.split.labels[idx]
