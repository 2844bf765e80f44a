"""Fuzzing of everything that reads an index or a file a user hands over (issue 17): random corruptions
must give the right result or a clear exception, never a crash or a silent wrong answer.

Targets (each a hypothesis property):

    ops         every public op (torch.ops.sparsestart.*) on a corrupted index: the native CPU backend's
                result must equal the reference backend's on the same index, or the op raises a
                ValueError/TypeError naming itself
    layers      SparseLinear (CSR, BSR) and SparseConv2d (direct, unfolded) after a corrupted
                load_state_dict (full or partial, assign or not) or an in-place write into their index
                buffers after a forward: a refused load leaves the layer unchanged; otherwise forward and
                backward equal the reference backend's, or raise a clear error
    checkpoint  a small checkpoint file with bytes flipped, overwritten or cut off: load_checkpoint raises
                CheckpointError, or loads exactly what was saved
    idx, cifar  dataset files (IDX, plain and gzip; CIFAR pickle batches) corrupted the same way: the loader
                raises ValueError naming the file, or returns exactly what the bytes say (an independent
                parser of the format is the oracle)

A crash would kill the process, so the whole hypothesis loop runs in one child process (one
interpreter start for all targets) that reports each target on a JSON line; the example being
run is written to a file first, so a crash is reported with the example that caused it.
Deterministic by default (derandomize); SPARSESTART_FUZZ_SEED=<int> explores other examples and
SPARSESTART_FUZZ_SCALE=<float> multiplies the number of examples.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"ops": 250, "layers": 60, "checkpoint": 120, "idx": 150, "cifar": 100}  # examples per target
INDEX = ("rowptr", "col", "slot", "colptr", "row", "slot_t")
OPS = ("spmm", "spmm_t", "sddmm", "conv2d", "conv2d_input_grad", "conv2d_weight_grad")


# ------------------------------------------------------------------------------------- parent
@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    current = tmp / "current-example.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"from tests import test_fuzz; test_fuzz.child({str(tmp)!r})"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["target"]] = rec
    last = current.read_text() if current.exists() else "(none)"
    return results, f"child rc={r.returncode}; example being run: {last}\nstderr:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(fuzz_results, target):
    results, context = fuzz_results
    if target not in results:
        pytest.fail(f"the fuzz process died before finishing target {target!r}: {context}")
    rec = results[target]
    assert rec["ok"], f"{target}: {rec['error']}"
    assert rec["examples"] >= TARGETS[target] // 2, rec  # the loop ran (not filtered away)


# -------------------------------------------------------------------------------------- child
def child(tmp: str) -> None:
    from hypothesis import HealthCheck, seed, settings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tmp_dir = Path(tmp)
    scale = float(os.environ.get("SPARSESTART_FUZZ_SCALE", "1"))
    chosen_seed = os.environ.get("SPARSESTART_FUZZ_SEED")
    for target, n in TARGETS.items():
        counter = [0]
        prop = PROPERTIES[target](tmp_dir, counter)
        prop = settings(max_examples=max(1, int(n * scale)), deadline=None, database=None,
                        derandomize=chosen_seed is None, print_blob=False,
                        suppress_health_check=list(HealthCheck))(prop)
        if chosen_seed is not None:
            prop = seed(int(chosen_seed))(prop)
        try:
            prop()
            rec = {"target": target, "ok": True, "examples": counter[0]}
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
            rec = {"target": target, "ok": False, "examples": counter[0], "error": traceback.format_exc()[-4000:]}
        print(json.dumps(rec), flush=True)


def _note(tmp_dir: Path, counter: list, what: str) -> None:
    counter[0] += 1
    (tmp_dir / "current-example.txt").write_text(what)


# ---------------------------------------------------------------------------- index mutations
def _mutation():
    from hypothesis import strategies as st

    return st.tuples(
        st.sampled_from(INDEX),
        st.sampled_from(["set", "set", "set", "swap", "add", "flip", "truncate", "extend", "dtype", "strided"]),
        st.floats(0, 1), st.floats(0, 1),
        st.sampled_from(["-1", "0", "1", "nnz", "nnz+1", "C-1", "C", "R", "Q", "big", "min", "small"]),
        st.integers(-3, 40))


def _value(choice: str, small: int, nnz: int, C: int, R: int, Q: int, dtype: torch.dtype) -> int:
    big = 2**31 - 1 if dtype == torch.int32 else 2**40
    return {"-1": -1, "0": 0, "1": 1, "nnz": nnz, "nnz+1": nnz + 1, "C-1": C - 1, "C": C, "R": R, "Q": Q,
            "big": big, "min": -big - 1 if dtype == torch.int32 else -big, "small": small}[choice]


def _mutate(index: dict, mutation, nnz: int, C: int, R: int, Q: int, in_place: bool = False) -> None:
    """Apply one mutation to ``index`` (name -> tensor). ``in_place``: only writes that keep the tensor
    (a layer's buffer written through itself)."""
    name, kind, f1, f2, choice, small = mutation
    t = index[name]
    n = t.numel()
    if in_place and kind not in ("set", "swap", "add", "flip"):
        kind = "set"
    if n == 0 and kind in ("set", "swap", "add", "flip"):
        return
    p, q = min(int(f1 * n), n - 1), min(int(f2 * n), n - 1)
    target = t if in_place else t.clone()
    if kind == "set":
        target[p] = _value(choice, small, nnz, C, R, Q, t.dtype)
    elif kind == "swap":
        target[p], target[q] = t[q].clone(), t[p].clone()
    elif kind == "add":
        target[p:] += small % 5 - 2
    elif kind == "flip":
        lo, hi = min(p, q), max(p, q) + 1
        target[lo:hi] = t[lo:hi].flip(0).clone()
    elif kind == "truncate":
        target = t[:-1].clone()
    elif kind == "extend":
        target = torch.cat([t, t[-1:] if n else t.new_zeros(1)])
    elif kind == "dtype":
        target = t.to(torch.int64 if t.dtype == torch.int32 else torch.int32)
    else:  # strided: the same values in a non-contiguous tensor
        target = t.repeat_interleave(2)[::2]
    if not in_place:
        index[name] = target


def _clear(exc: BaseException, *pieces: str) -> bool:
    return isinstance(exc, (ValueError, TypeError)) and all(p in str(exc) for p in pieces)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12))
    return all(_same(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# ------------------------------------------------------------------------------------ target: ops
def _ops_property(tmp_dir: Path, counter: list):
    from hypothesis import given, strategies as st

    from sparsestart import ops
    from tests.ops.test_index_validation import GEOMETRY, run_op
    from tests.util import random_matrix

    backend = "cpu" if ops.NATIVE_AVAILABLE else "reference"

    @given(op=st.sampled_from(OPS), b=st.sampled_from([1, 1, 2, 3]), rows=st.integers(1, 5), cols=st.integers(1, 3),
           density=st.floats(0, 1), extra=st.integers(0, 3), seed=st.integers(0, 10**6),
           index_dtype=st.sampled_from([torch.int32, torch.int64]), mutations=st.lists(_mutation(), min_size=1,
                                                                                        max_size=3))
    def prop(op, b, rows, cols, density, extra, seed, index_dtype, mutations):
        conv = op.startswith("conv")
        if conv:
            b = 1
            M, K = rows, cols * 9  # cols input channels of a 3x3 kernel
        else:
            M, K = rows * b, cols * b * 2
        m = random_matrix(M, K, density, block_size=b, capacity_extra=extra, seed=seed, index_dtype=index_dtype)
        index = dict(zip(INDEX, (t.clone() for t in m.index_tensors())))
        R, Q = m.grid
        for mutation in mutations:
            _mutate(index, mutation, m.nnz, m.capacity, R, Q)
        _note(tmp_dir, counter, f"ops: op={op} b={b} M={M} K={K} density={density} extra={extra} seed={seed} "
                                f"index_dtype={index_dtype} mutations={mutations}")
        idx = [index[n] for n in INDEX]
        args = (m.values, idx, m.capacity, b, M, K)
        with ops.use_backend(backend):
            try:
                out = run_op(op, *args)
            except Exception as exc:  # noqa: BLE001
                assert _clear(exc, f"sparsestart.{op}"), f"unclear error {type(exc).__name__}: {exc}"
                return
        with ops.use_backend("reference"):
            ref = run_op(op, *args)
        assert _same(out, ref), f"{backend} and reference differ after mutations {mutations}"

    assert GEOMETRY == ([3, 3], [1, 1], [1, 1])
    return prop


# --------------------------------------------------------------------------------- target: layers
def _make_layer(kind: str, seed: int):
    from sparsestart.nn import SparseConv2d, SparseLinear

    if kind.startswith("linear"):
        kw = dict(format="bsr", block_size=2) if kind == "linear_bsr" else {}
        layer = SparseLinear(12, 8, density=0.4, seed=seed, capacity=40 if kind == "linear_csr" else None, **kw)
        return layer, torch.randn(3, 12, dtype=torch.float64)
    layer = SparseConv2d(2, 3, 3, padding=1, density=0.4, seed=seed)
    layer.conv_algorithm = kind.split("_")[1]
    return layer, torch.randn(2, 2, 5, 4, dtype=torch.float64)


def _pass(layer, x):
    """Output, input gradient and value gradient of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, layer.values.grad


def _layers_property(tmp_dir: Path, counter: list):
    from hypothesis import given, strategies as st

    from sparsestart import ops

    backend = "cpu" if ops.NATIVE_AVAILABLE else "reference"

    @given(kind=st.sampled_from(["linear_csr", "linear_bsr", "conv_direct", "conv_unfold"]),
           mode=st.sampled_from(["full", "partial", "write"]), assign=st.booleans(), seed=st.integers(0, 1000),
           mutations=st.lists(_mutation(), min_size=1, max_size=3))
    def prop(kind, mode, assign, seed, mutations):
        _note(tmp_dir, counter, f"layers: kind={kind} mode={mode} assign={assign} seed={seed} mutations={mutations}")
        layer, x = _make_layer(kind, seed)
        layer.double()
        donor = _make_layer(kind, seed + 1)[0].double()  # another structure, so a partial load mixes two
        m = layer.sparse_weight
        R, Q = m.grid
        if mode == "write":
            _pass(layer, x)  # a verdict is cached for the current version
            with torch.no_grad():
                for mutation in mutations:
                    _mutate(dict(zip(INDEX, layer._index())), mutation, m.nnz, m.capacity, R, Q, in_place=True)
        else:
            sd = {k: v.clone() for k, v in donor.state_dict().items()}
            index = {n: sd[n] for n in INDEX}
            for mutation in mutations:
                _mutate(index, mutation, m.nnz, m.capacity, R, Q)
            sd.update(index)
            if mode == "partial":
                sd = {n: index[n] for n in {mu[0] for mu in mutations}}
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            try:
                layer.load_state_dict(sd, strict=mode == "full", assign=assign)
            except (RuntimeError, ValueError, TypeError) as exc:
                assert str(exc), "an empty error message"
                after = layer.state_dict()
                assert after.keys() == before.keys() and all(
                    after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items()), \
                    f"a refused load changed the layer: {exc}"
                return
        with ops.use_backend(backend):
            try:
                out = _pass(layer, x)
            except Exception as exc:  # noqa: BLE001
                assert _clear(exc, "sparsestart."), f"unclear error {type(exc).__name__}: {exc}"
                return
        with ops.use_backend("reference"):
            ref = _pass(layer, x)
        assert _same(out, ref), f"{backend} and reference differ ({kind}, {mode})"

    return prop


# ----------------------------------------------------------------------------- byte mutations
def _byte_mutations():
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.sampled_from(["flip", "set", "truncate", "zero"]), st.floats(0, 1),
                              st.integers(0, 255), st.integers(1, 64)), min_size=1, max_size=3)


def _corrupt(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, f, byte, length in mutations:
        if not buf:
            break
        p = min(int(f * len(buf)), len(buf) - 1)
        if kind == "flip":
            buf[p] ^= 1 << (byte % 8)
        elif kind == "set":
            buf[p] = byte
        elif kind == "truncate":
            del buf[p:]
        else:
            buf[p:p + length] = bytes(len(buf[p:p + length]))
    return bytes(buf)


# ----------------------------------------------------------------------------- target: checkpoint
def _checkpoint_property(tmp_dir: Path, counter: list):
    from hypothesis import given

    from sparsestart.nn import SparseLinear
    from sparsestart.train import checkpoint as ck

    layer = SparseLinear(16, 8, density=0.3, seed=0)
    original = {"format": ck.FORMAT, "version": ck.VERSION, "model": layer.state_dict(), "epoch": 3,
                "history": [0.5, 0.25], "name": "fuzz"}
    saved = tmp_dir / "original.pt"
    ck.atomic_save(original, saved)
    data = saved.read_bytes()
    path = tmp_dir / "fuzzed.pt"
    checksum_key = getattr(ck, "CHECKSUM_KEY", None)

    @given(mutations=_byte_mutations())
    def prop(mutations):
        _note(tmp_dir, counter, f"checkpoint: mutations={mutations}")
        path.write_bytes(_corrupt(data, mutations))
        try:
            loaded = ck.load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001
            assert isinstance(exc, getattr(ck, "CheckpointError", RuntimeError)) and str(exc), \
                f"unclear error {type(exc).__name__}: {exc}"
            return
        for key, value in original.items():  # a load must give back exactly what was saved
            assert key in loaded, f"loaded without {key!r}"
            assert _equal_payload(loaded[key], value), f"{key!r} loaded with another value"
        extra = set(loaded) - set(original) - {checksum_key}
        assert not extra, f"loaded with unexpected keys {extra}"
        fresh = SparseLinear(16, 8, density=0.3, seed=5)
        fresh.load_state_dict(loaded["model"])
        x = torch.randn(2, 16)
        assert torch.equal(fresh(x), layer(x))

    return prop


def _equal_payload(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_equal_payload(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal_payload(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------ target: idx files
def _idx_oracle(data: bytes):
    """The IDX format (unsigned-byte type 0x08) parsed by hand: a uint8 tensor, or None if invalid."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        return None
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        return None
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) - header != math.prod(dims):
        return None
    return torch.tensor(list(data[header:]), dtype=torch.uint8).reshape(dims)


def _idx_property(tmp_dir: Path, counter: list):
    from hypothesis import given, strategies as st

    from sparsestart.train.data import read_idx, write_idx

    images = torch.randint(0, 256, (3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    files = {}
    for name in ("images.idx", "images.idx.gz"):
        write_idx(tmp_dir / name, images)
        files[name] = (tmp_dir / name).read_bytes()

    @given(name=st.sampled_from(sorted(files)), mutations=_byte_mutations())
    def prop(name, mutations):
        _note(tmp_dir, counter, f"idx: file={name} mutations={mutations}")
        path = tmp_dir / f"fuzzed-{name}"
        data = _corrupt(files[name], mutations)
        path.write_bytes(data)
        try:
            raw = gzip.decompress(data) if name.endswith(".gz") else data
            expected = _idx_oracle(raw)
        except Exception:  # noqa: BLE001  (a broken gzip stream: the loader must refuse it too)
            expected = None
        try:
            got = read_idx(path)
        except Exception as exc:  # noqa: BLE001
            assert isinstance(exc, ValueError) and str(path) in str(exc), f"unclear error {type(exc).__name__}: {exc}"
            assert expected is None or expected.numel() == 0, "a valid file was refused"
            return
        assert expected is not None, "an invalid file was loaded"
        assert got.dtype == torch.uint8 and torch.equal(got, expected)

    return prop


# ---------------------------------------------------------------------------- target: cifar files
def _cifar_oracle(data: bytes):
    """(pixels [N, 3, 32, 32], labels) by the standard unpickler, or None if the batch is not one."""
    import numpy as np

    try:
        d = pickle.Unpickler(io.BytesIO(data), encoding="latin1").load()
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        x, y = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"], dtype=np.int64)
    except Exception:  # noqa: BLE001
        return None
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        return None
    return torch.from_numpy(x.copy()).reshape(-1, 3, 32, 32), torch.from_numpy(y.copy())


def _cifar_property(tmp_dir: Path, counter: list):
    from hypothesis import given

    from sparsestart.train.data import read_cifar_batch, write_cifar_batch

    g = torch.Generator().manual_seed(0)
    path0 = tmp_dir / "data_batch_1"
    write_cifar_batch(path0, torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8), [3, 7])
    data0 = path0.read_bytes()

    @given(mutations=_byte_mutations())
    def prop(mutations):
        _note(tmp_dir, counter, f"cifar: mutations={mutations}")
        path = tmp_dir / "fuzzed_batch"
        data = _corrupt(data0, mutations)
        path.write_bytes(data)
        try:
            split = read_cifar_batch(path)
        except Exception as exc:  # noqa: BLE001
            assert isinstance(exc, ValueError) and str(path) in str(exc), f"unclear error {type(exc).__name__}: {exc}"
            return
        expected = _cifar_oracle(data)
        assert expected is not None, "an invalid batch was loaded"
        assert torch.equal(split.images, expected[0]) and torch.equal(split.labels, expected[1])

    return prop


PROPERTIES = {"ops": _ops_property, "layers": _layers_property, "checkpoint": _checkpoint_property,
              "idx": _idx_property, "cifar": _cifar_property}
