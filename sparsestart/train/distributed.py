"""Data-parallel training: one process per rank (torchrun), the same sparse structure on every rank.

``torchrun --nproc_per_node=N -m sparsestart.train [train options]`` runs
:mod:`sparsestart.train.__main__`, which initialises the process group from
torchrun's environment (:func:`process_group`); the trainer then leaves every
difference from a single process to :class:`DistributedRun`. What is
synchronised (docs/training.md, "Distributed"):

batches     ``--batch-size`` is the global batch. Every rank draws the same
            permutation and augmentation from the same seeded generator and
            trains on its contiguous shard (:func:`shard`) of every global batch.
loss        a rank's loss is its share of the global mean, the sum of its
            per-sample losses times world size / global batch size. DDP
            averages gradients over the ranks, so every rank gets the gradient
            of the global mean loss, as one process would, also when the shards
            differ in size.
gradients   DistributedDataParallel averages those of the model's parameters
            (``values`` and ``bias`` of the sparse layers, the dense layers);
            parameters an algorithm trains outside the model (STR's thresholds,
            edge-popup's scores) are averaged by :meth:`DistributedRun.after_backward`.
structure   every structure decision sees the same inputs on every rank:
            magnitudes of identical values, generators with the same seed, and
            the dense gradients of RigL-style growth, which are averaged over
            the ranks chunk by chunk before the top-k (``algorithm.sync``). The
            ranks rewrite their index in lock-step; nothing is broadcast.
buffers     DDP does not broadcast buffers before every forward
            (``forward_sync_buffers=False``): the index buffers are identical by
            construction, broadcasting them would move more bytes than the
            gradients, and it would hide a rank that decided differently.
            BatchNorm running statistics are averaged over the ranks at the end
            of every epoch (batch statistics are per rank, as in plain DDP).
checks      what a checkpoint holds (model, optimizer, method, LR schedule,
            generators, step) is digested on every rank and compared when the
            run is built and at the end of every epoch; a difference is an error
            naming the tensors that differ.
devices     one rank per GPU: under torchrun, rank LOCAL_RANK uses cuda:LOCAL_RANK
            (``--device cuda``, or ``auto`` when CUDA is available) and the group
            is ``cpu:gloo,cuda:nccl``; CPU ranks (``--device cpu``) use gloo alone.
            A machine with fewer GPUs than local ranks never calls
            ``set_device`` with an index it does not have: ``--device cuda``
            is refused with an error, ``--device auto`` trains every rank on
            the CPU over gloo (:func:`run_device`).
rank 0      alone logs, shows progress, evaluates, writes metrics, checkpoints
            and the summary. The others wait for it at the end of every epoch
            (so a checkpoint is on disk when any rank leaves its epoch), but not
            for the final evaluation: ``Trainer.fit`` returns None on them.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import inspect
import os
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["is_distributed", "rank", "world_size", "is_main", "launched_world_size", "local_rank", "local_world_size",
           "cuda_ranks_fit", "run_device", "default_backend", "init",
           "cleanup", "process_group", "check_launch", "main_only", "quiet_unless_main", "all_reduce_mean_",
           "all_reduce_sum", "shard", "check_shards", "state_digests", "verify_identical",
           "average_batchnorm_stats_", "DistributedRun", "BACKEND_ENV", "TIMEOUT_ENV", "VERIFIED_KEYS"]

#: Overrides the backend chosen by :func:`default_backend` (e.g. "gloo").
BACKEND_ENV = "SPARSESTART_DIST_BACKEND"
#: Seconds a collective may wait for the other ranks (torch's default, 30 minutes, when unset).
TIMEOUT_ENV = "SPARSESTART_DIST_TIMEOUT"
#: Entries of the trainer's checkpoint state that must be bit-identical on every rank.
VERIFIED_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "algorithm", "data_rng", "rng", "samples_seen",
                 "train_flops")


# ---------------------------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """A process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _env_number(name: str, kind: type, valid: Callable[[Any], bool], expected: str):
    """The environment variable ``name`` converted by ``kind`` (None when unset); ValueError if not ``valid``."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not valid(number):
        raise ValueError(f"environment variable {name}={value!r}: expected {expected}")
    return number


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it for the processes it starts; 1 outside torchrun."""
    return _env_number("WORLD_SIZE", int, lambda n: n >= 1, "an integer >= 1 (torchrun sets it)") or 1


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (the rank on this machine); 0 outside torchrun."""
    return _env_number("LOCAL_RANK", int, lambda n: n >= 0, "an integer >= 0 (torchrun sets it)") or 0


def local_world_size() -> int:
    """Processes torchrun started on this machine: LOCAL_WORLD_SIZE, else LOCAL_RANK + 1 (at least this many)."""
    n = _env_number("LOCAL_WORLD_SIZE", int, lambda n: n >= 1, "an integer >= 1 (torchrun sets it)")
    return max(n or 1, local_rank() + 1)


def cuda_ranks_fit() -> bool:
    """CUDA is available and this machine has a GPU for every local rank (one rank per GPU)."""
    return torch.cuda.is_available() and local_world_size() <= torch.cuda.device_count()


def run_device(spec=None, option: str = "--device") -> str:
    """The device string of this process for ``--device spec`` ("cpu", "cuda" or "cuda:N"; "auto" resolved).

    Outside torchrun (or with WORLD_SIZE 1) this is
    :func:`sparsestart.train.device.resolve_device`. Under torchrun with several
    ranks, "cuda" is the rank's GPU (cuda:LOCAL_RANK, made current by :func:`init`)
    and needs a GPU for every local rank; "cuda:N" needs a single local rank.
    ``auto`` on a machine with fewer GPUs than local ranks falls back to the CPU
    for every rank (gloo), instead of failing: the choice is the same on every
    rank of the machine, so the ranks never mix CUDA and CPU tensors in one
    collective. An explicit ``cuda`` there is an error.
    """
    from .device import resolve_device

    if launched_world_size() <= 1:
        return resolve_device(spec, option)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return "cuda" if cuda_ranks_fit() else "cpu"
    device = resolve_device(spec, option)  # unknown names, no CUDA at all
    if device == "cpu":
        return device
    n, gpus = local_world_size(), torch.cuda.device_count()
    if device != "cuda" and n > 1:
        raise ValueError(f"{option} {spec}: torchrun started {n} processes on this machine and every one would use "
                         f"{device}; one rank per GPU: use --device cuda (rank LOCAL_RANK takes cuda:LOCAL_RANK), "
                         f"or cpu, or auto")
    if device == "cuda" and not cuda_ranks_fit():
        raise ValueError(f"{option} {spec}: torchrun started {n} processes on this machine (this one has "
                         f"LOCAL_RANK {local_rank()}) but it has {gpus} CUDA device(s); one rank per GPU: use "
                         f"--nproc_per_node={gpus} or fewer, or --device cpu (or auto, which falls back to the CPU "
                         f"when there are fewer GPUs than ranks)")
    return device


def default_backend(device=None) -> str:
    """The backend for ranks on ``device`` (default auto, see :func:`run_device`): ``cpu:gloo,cuda:nccl`` for
    CUDA ranks (gloo carries the CPU collectives: metrics, object gathers), ``gloo`` for CPU ranks."""
    return "cpu:gloo,cuda:nccl" if run_device(device).startswith("cuda") else "gloo"


def init(backend: Optional[str] = None, device=None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Does nothing outside torchrun, with WORLD_SIZE 1, or when a group exists.
    ``backend`` (else $SPARSESTART_DIST_BACKEND, else :func:`default_backend` of
    ``device``, the run's ``--device``, default auto). With nccl, the rank's GPU
    (LOCAL_RANK, or N of ``cuda:N``) becomes the current CUDA device; a rank
    without a GPU of its own is an error, never ``set_device`` of a missing index.
    Returns True when this call created the group (the caller then owns it).
    """
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={launched_world_size()} asks for distributed training, but this torch build "
                           f"has no torch.distributed")
    seconds = _env_number(TIMEOUT_ENV, float, lambda t: 0 < t < float("inf"), "a positive number of seconds")
    backend = backend or os.environ.get(BACKEND_ENV) or default_backend(device)
    if "nccl" in backend:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = run_device(device) if device is not None else "cuda"
        index = int(wanted.split(":")[1]) if wanted.startswith("cuda:") else local_rank()
        if index >= gpus:
            raise ValueError(f"process group backend {backend!r}: rank with LOCAL_RANK {local_rank()} needs CUDA "
                             f"device {index}, but this machine has {gpus}; use ${BACKEND_ENV}=gloo, --device cpu, "
                             f"or at most {gpus} processes per machine")
        torch.cuda.set_device(index)
    timeout = None if seconds is None else timedelta(seconds=seconds)
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return True


def cleanup(synchronize: bool = False) -> None:
    """Destroy the default process group, if there is one; with ``synchronize``, after a barrier.

    The barrier keeps one rank from tearing down its gloo connections while another is still
    working (rank 0 writing the last checkpoint): a peer closing its side under a busy rank
    aborted that rank ("terminate called without an active exception") in about 1 of 5 runs
    that stopped early with --stop-after. Only on a normal exit: after an error on one rank the
    others may never arrive.

    Before either, a garbage collection frees the DistributedDataParallel wrappers of finished
    Trainers that only reference cycles keep alive: their reducers hold the group, and one freed
    after the group's shutdown (at interpreter exit) is the other way a rank ended in that abort.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: Optional[str] = None, device=None) -> Iterator[None]:
    """:func:`init` on entry; on exit, :func:`cleanup` of the group this created (none outside torchrun),
    synchronised when the body finished without an error."""
    started = init(backend, device)
    finished = False
    try:
        yield
        finished = True
    finally:
        if started:
            cleanup(synchronize=finished)


def check_launch() -> None:
    """Refuse to train alone in a process that torchrun started as one of several (all would write one run)."""
    n = launched_world_size()
    if n > 1 and world_size() != n:
        raise ValueError(f"WORLD_SIZE={n}: torchrun started this process as one of {n}, but no process group of "
                         f"{n} ranks is initialised; launch `torchrun --nproc_per_node={n} -m sparsestart.train "
                         f"[options]` (not `-m sparsestart train`), or call sparsestart.train.distributed.init() "
                         f"before building the Trainer")


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` on rank 0; a function doing nothing on the other ranks."""
    return fn if is_main() else (lambda *args, **kwargs: None)


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Standard output of ranks other than 0 goes to /dev/null (errors on stderr stay visible)."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks in place (every rank gets the same bits); returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor.div_(world_size())
    return tensor


def all_reduce_sum(values: Iterable[float]) -> list[float]:
    """Sums over the ranks of a few numbers (float64)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def _average_grads_(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks in one collective; a missing gradient counts as 0
    and stays missing only if it is missing on every rank."""
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(dtype)
                      for p in params] + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype)])
    dist.all_reduce(flat)
    flat.div_(world_size())
    grads = flat[:-len(params)].split([p.numel() for p in params])
    for p, g, present in zip(params, grads, flat[-len(params):].tolist()):
        p.grad = g.view_as(p).to(p.dtype) if present > 0 else None


@torch.no_grad()
def average_batchnorm_stats_(model: nn.Module) -> None:
    """Average the running mean and variance of every BatchNorm layer over the ranks (one collective)."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    if not buffers or not is_distributed():
        return
    flat = all_reduce_mean_(torch.cat([b.reshape(-1).double() for b in buffers]))
    for b, chunk in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(chunk.view_as(b))


# ---------------------------------------------------------------------------------------------- batches
def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous part of a batch of ``n`` that ``rank`` of ``world`` trains on (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def check_shards(n_train: int, batch_size: int, world: int) -> None:
    """Every global batch must give every rank at least one sample (all ranks run every step)."""
    smallest = min(n_train % batch_size or batch_size, n_train)
    if smallest < world:
        raise ValueError(f"--batch-size {batch_size}: with {world} processes every global batch must hold at least "
                         f"{world} samples (one per process), but the {n_train} training samples leave a last batch "
                         f"of {smallest}; choose a --batch-size (or --train-limit) whose last batch holds at least "
                         f"{world} samples, or none")


# ---------------------------------------------------------------------------------------------- verification
def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def state_digests(state: Any) -> dict[str, str]:
    """{path: digest} of every tensor and plain value in nested dicts/lists (path like ``model.fc1.col``)."""
    return {path: _digest(v) for path, v in _leaves(state)}


def verify_identical(state: Any, where: str) -> None:
    """RuntimeError on every rank unless ``state`` is bit-identical on all ranks; the message names what differs.

    One small collective when the ranks agree (a digest of the digests); a
    second one gathers the per-tensor digests to name the differences.
    """
    if not is_distributed():
        return
    digests = state_digests(state)
    total = hashlib.blake2b("".join(f"{k}={v};" for k, v in digests.items()).encode(), digest_size=16).hexdigest()
    totals: list = [None] * world_size()
    dist.all_gather_object(totals, total)
    if len(set(totals)) == 1:
        return
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, digests)
    names = sorted({k for d in everyone[1:] for k in set(d) | set(everyone[0]) if d.get(k) != everyone[0].get(k)},
                   key=lambda k: (not k.startswith("model."), k))  # the model's tensors first
    ranks = [r for r, t in enumerate(totals) if t != totals[0]]
    raise RuntimeError(f"distributed training: after {where}, rank(s) {ranks} differ from rank 0 in {len(names)} "
                       f"entr{'y' if len(names) == 1 else 'ies'}: {', '.join(names[:8])}"
                       f"{' ...' if len(names) > 8 else ''}. Every rank must hold the same model and take the same "
                       f"structure decisions (same seed, same data, averaged scores)")


# ---------------------------------------------------------------------------------------------- the trainer's side
# No buffer broadcast before every forward (the name of the option changed in torch 2.13).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class DistributedRun:
    """Everything a training run does differently on several ranks.

    ``run`` is the trainer's RunState, ``state`` returns the trainer's
    checkpoint state (verified identical on every rank, keys
    :data:`VERIFIED_KEYS`). With one process every method is the plain
    single-process behaviour: no wrapper, no collective, the same loss.
    """

    def __init__(self, run, state: Callable[[], dict]):
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        self.module: nn.Module = run.model
        #: What the training step calls: the DDP wrapper, or the model itself.
        self.model: nn.Module = run.model
        self.extra_params: list[torch.Tensor] = []
        self._state = state
        if self.world == 1:
            return
        check_shards(len(run.data.train), int(run.cfg.batch_size), self.world)
        self.verify("building the run (same seed, same ER structure and initial values)")
        if hasattr(run.algorithm, "sync"):
            run.algorithm.sync = all_reduce_mean_
        own = {id(p) for p in run.model.parameters()}
        self.extra_params = [p for group in run.optimizer.param_groups for p in group["params"]
                             if p.requires_grad and id(p) not in own]
        device = next(iter(run.model.parameters()), torch.empty(0)).device
        backend = str(dist.get_backend()).lower()
        if device.type == "cuda" and "nccl" not in backend:
            raise ValueError(f"--device {device}: the process group was initialised with backend {backend!r}, which "
                             f"does not carry CUDA tensors; launch with --device cuda on the command line (the group "
                             f"then gets nccl), or train with --device cpu")
        if any(p.requires_grad for p in run.model.parameters()):
            device_ids = None if device.type == "cpu" else [device]
            self.model = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids, **_NO_BUFFER_SYNC)

    def verify(self, where: str) -> None:
        state = self._state()
        verify_identical({k: state[k] for k in VERIFIED_KEYS if k in state}, where)

    def batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(x, y, size of the global batch) of this rank's shard of every global batch."""
        for x, y in batches:
            n = int(y.shape[0])
            if self.world == 1:
                yield x, y, n
            else:
                part = shard(n, self.rank, self.world)
                yield x[part], y[part], n

    def loss(self, logits: torch.Tensor, y: torch.Tensor, n_global: int) -> torch.Tensor:
        """Cross-entropy; on several ranks this rank's share of the mean over the global batch."""
        if self.world == 1:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits, y, reduction="sum") * (self.world / n_global)

    def after_backward(self) -> None:
        """Average the gradients DDP does not see (optimizer parameters outside the model)."""
        if self.extra_params:
            _average_grads_(self.extra_params)

    def wait_for_main(self) -> None:
        """Barrier: no rank goes on before rank 0 has written what it writes (e.g. a checkpoint to resume)."""
        if self.world > 1:
            dist.barrier()

    def end_epoch(self, loss_sum: float, correct: int, seen: int) -> tuple[float, int, int]:
        """Sums of the epoch over the ranks; BatchNorm statistics averaged; every rank's state verified."""
        if self.world == 1:
            return loss_sum, correct, seen
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen])
        average_batchnorm_stats_(self.module)
        self.verify("an epoch")
        return loss_sum, int(correct), int(seen)
