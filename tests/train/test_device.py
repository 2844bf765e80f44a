"""--device and --precision: validation, TF32 switches, bf16 autocast, device-independent checkpoints, DDP ranks.

The CPU tests run everywhere. The CUDA tests (``cuda`` in their names) need a GPU
and are skipped without one; they run unchanged on a CUDA machine:
``pytest -q tests/train/test_device.py``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from sparsestart.cli import main
from sparsestart.train import checkpoint as C
from sparsestart.train import device as DV
from sparsestart.train import distributed as D
from sparsestart.train import trainer as T
from sparsestart.train.config import TrainConfig, resolve
from sparsestart.train.data import BatchIterator, load_dataset
from sparsestart.train.evaluate import evaluate_run
from sparsestart.train.trainer import Trainer
from tests.train.conftest import digits_cfg, rows, untimed

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def tiny_cfg(data_dir, **kw):
    base = dict(dataset="fashion-mnist", data_dir=str(data_dir), model="mlp", model_options={"hidden": [32]},
                density=0.3, distribution="uniform", method="static", epochs=2, batch_size=32, lr=0.05,
                progress=False, final_eval=False, threads=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tf32_flags():
    """The TF32 switches as they were before the test, restored afterwards whatever the test did."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    yield saved
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


# ---------------------------------------------------------------------------------------------- device names
def test_device_names_resolve(monkeypatch):
    assert DV.resolve_device("cpu") == "cpu" and DV.resolve_device(" CPU ") == "cpu"
    assert DV.resolve_device(torch.device("cpu")) == "cpu"
    no_cuda(monkeypatch)
    assert DV.resolve_device("auto") == DV.resolve_device(None) == "cpu"
    fake_gpus(monkeypatch, 2)
    assert DV.resolve_device("auto") == "cuda" and DV.resolve_device("cuda") == "cuda"
    assert DV.resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("value, gpus, expected", [
    ("gpu", 0, ["--device 'gpu'", "unknown device", "allowed: auto, cpu"]),
    ("cuda:x", 2, ["--device 'cuda:x'", "unknown device", "allowed: auto, cpu, cuda, cuda:0..cuda:1"]),
    ("", 0, ["--device ''", "unknown device"]),
    (3, 0, ["--device 3", "expected a device name"]),
    ("cuda", 0, ["--device cuda", "CUDA is not available", "allowed: auto, cpu"]),
    ("cuda:0", 0, ["--device cuda:0", "CUDA is not available", "allowed: auto, cpu"]),
    ("cuda:1", 1, ["--device cuda:1", "1 CUDA device(s)", "allowed: auto, cpu, cuda, cuda:0..cuda:0"]),
])
def test_invalid_devices_name_option_value_and_choices(monkeypatch, value, gpus, expected):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(ValueError) as info:
        DV.resolve_device(value)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


@pytest.mark.parametrize("cmd", ["train", "sweep", "evaluate"])
def test_cli_refuses_a_bad_device(cmd, monkeypatch, fmnist_dir, tmp_path, capsys):
    no_cuda(monkeypatch)
    if cmd == "evaluate":
        Trainer(tiny_cfg(fmnist_dir, epochs=1), tmp_path / "run").fit()
        argv = ["evaluate", str(tmp_path / "run"), "--device", "cuda"]
    else:
        argv = [cmd, "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "new"),
                "--no-progress", "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sparsestart {cmd}: error: --device cuda: CUDA is not available" in err and "auto, cpu" in err
    assert not (tmp_path / "new").exists()


def test_cli_refuses_a_bad_precision(fmnist_dir, tmp_path, capsys):
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "new"),
            "--no-progress", "--device", "cpu", "--precision", "fp16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--precision 'fp16': unknown precision; allowed: fp32, tf32, bf16" in err
    with pytest.raises(ValueError, match="--precision 'half'"):
        DV.check_precision("half")


def test_auto_resolves_into_the_saved_config(monkeypatch, fmnist_dir):
    no_cuda(monkeypatch)
    cfg = resolve(TrainConfig(dataset="fashion-mnist", data_dir=str(fmnist_dir), device="auto", precision="BF16"))
    assert cfg.device == "cpu" and cfg.precision == "bf16"


# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision, expected", [("fp32", (False, False, "highest")),
                                                 ("bf16", (False, False, "highest")),
                                                 ("tf32", (True, True, "high"))])
def test_precision_switches_are_set_and_restored(precision, expected, tf32_flags):
    for before in ((True, True, "medium"), (False, True, "highest")):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])
        with DV.precision_flags(precision):
            assert flags() == expected
        assert flags() == before
        with pytest.raises(RuntimeError, match="inside"):
            with DV.precision_flags(precision):
                raise RuntimeError("inside")
        assert flags() == before  # restored after an error too


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_precision_switches_survive_the_new_torch_api(tf32_flags):
    """After torch's newer fp32_precision API the legacy getters raise; the switches still set and restore."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with DV.precision_flags("fp32"):
            assert flags() == (False, False, "highest")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(tf32_flags[2])  # back to a consistent legacy state


def test_trainer_sets_precision_while_training_and_restores_it(fmnist_dir, tmp_path, monkeypatch, tf32_flags):
    seen = []
    epoch = Trainer._train_epoch

    def spy(self):
        seen.append(flags())
        return epoch(self)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    torch.set_float32_matmul_precision("medium")
    Trainer(tiny_cfg(fmnist_dir, epochs=1, precision="fp32"), tmp_path / "a").fit()
    Trainer(tiny_cfg(fmnist_dir, epochs=1, precision="tf32"), tmp_path / "b").fit()
    assert seen == [(False, False, "highest"), (True, True, "high")]
    assert flags() == (True, True, "medium")


def test_autocast_context():
    assert isinstance(DV.autocast("fp32", "cpu"), type(DV.autocast("tf32", "cpu")))
    with DV.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with DV.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("model, method", [("mlp", "static"), ("lenet5", "static"), ("convnet_small", "static"),
                                           ("mlp", "rigl")])
def test_bf16_training_on_cpu(model, method, tmp_path, monkeypatch):
    """A few bf16 steps on digits: autocast reaches the forward pass, the loss is finite, weights stay fp32."""
    dtypes = []
    epoch = Trainer._train_epoch

    def spy(self):
        h = self.run.net.register_forward_hook(lambda m, i, o: dtypes.append((o.dtype, torch.is_autocast_enabled("cpu"))))
        try:
            return epoch(self)
        finally:
            h.remove()

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    opts = {"method_options": {"update_every": 2}} if method == "rigl" else {}
    if model != "mlp":
        opts["model_options"] = {}
    t = Trainer(digits_cfg(model=model, method=method, precision="bf16", final_eval=True, **opts), tmp_path / "bf16")
    s = t.fit()
    assert dtypes and all(enabled for _, enabled in dtypes)  # every training forward ran under autocast
    (row,) = rows(tmp_path / "bf16")
    assert math.isfinite(row["train_loss"]) and 0 <= row["test_accuracy"] <= 1
    assert all(p.dtype == torch.float32 for p in t.run.model.parameters())
    assert all(v.dtype == torch.float32 for st in t.run.optimizer.state.values() for k, v in st.items()
               if torch.is_tensor(v) and k != "step")
    assert s["precision"] == "bf16" and s["config"]["precision"] == "bf16"
    assert math.isfinite(s["final"]["test"]["nll"]) and 0 <= s["final"]["test"]["fgsm_accuracy"] <= 1
    assert not torch.is_autocast_enabled("cpu")
    if method == "rigl":
        assert t.run.algorithm.history, "no structure update happened"


# ---------------------------------------------------------------------------------------------- summary, checkpoints
def test_explicit_cpu_run_records_device_and_precision(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp",
                 "--model-option", "hidden=[32]", "--density", "0.3", "--distribution", "uniform", "--method",
                 "static", "--epochs", "1", "--no-progress", "--no-final-eval", "--device", "cpu", "--precision",
                 "tf32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "on cpu, tf32 ->" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cpu" and s["gpu_name"] is None and s["precision"] == "tf32"
    assert s["config"]["device"] == "cpu" and s["config"]["precision"] == "tf32"
    ckpt = C.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["device"] == "cpu" and ckpt["config"]["precision"] == "tf32"
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    ev = json.loads((out / "evaluation-final.json").read_text())
    assert ev["device"] == "cpu" and ev["gpu_name"] is None and ev["precision"] == "tf32"
    assert ev["test"]["accuracy"] == s["final"]["test"]["accuracy"]


def test_load_checkpoint_maps_tensors(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    C.atomic_save({"format": C.FORMAT, "version": C.VERSION, "w": torch.ones(3)}, path)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("map_location"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert C.load_checkpoint(path)["w"].device.type == "cpu"
    C.load_checkpoint(path, map_location="meta")
    assert calls == ["cpu", "meta"]


def test_to_cpu_keeps_structure_and_state_dict_metadata():
    bn = torch.nn.BatchNorm1d(3)
    state = {"model": bn.state_dict(), "list": [torch.zeros(2), (1, torch.ones(1))], "n": 3}
    out = C.to_cpu(state)
    assert out["model"]._metadata == bn.state_dict()._metadata
    assert out["model"]["weight"] is state["model"]["weight"]  # CPU tensors are not copied
    assert out["n"] == 3 and isinstance(out["list"][1], tuple)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_state_moves_to_the_parameters_device(opt):
    """Simulated on the meta device: state loaded from the (CPU) checkpoint follows its parameter."""
    p = torch.nn.Parameter(torch.randn(5))
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if opt == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=0.1))
    o = make([p])
    p.grad = torch.ones(5)
    o.step()
    q = torch.nn.Parameter(torch.empty(5, device="meta"))
    o2 = make([q])
    o2.state[q] = {k: v.clone() if torch.is_tensor(v) else v for k, v in o.state[p].items()}  # CPU state, as loaded
    assert all(v.device.type == "cpu" for v in o2.state[q].values() if torch.is_tensor(v))
    C.move_optimizer_state_(o2)
    st = o2.state[q]
    moved = [k for k, v in st.items() if torch.is_tensor(v) and k != "step"]
    assert moved and all(st[k].device.type == "meta" for k in moved)
    if "step" in st:
        assert st["step"].device.type == "cpu"  # plain (not capturable) optimizers keep the step counter on the CPU


def test_resume_loads_onto_the_run_device_and_moves_optimizer_state(fmnist_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(fmnist_dir, optimizer="adamw")
    Trainer(cfg, tmp_path / "r").fit(stop_after=1)
    moved, loaded = [], []
    from sparsestart.train import run as R  # where the run is built and its checkpoint loaded

    real_move, real_load = R.move_optimizer_state_, T.load_checkpoint
    monkeypatch.setattr(R, "move_optimizer_state_", lambda o: (moved.append(o), real_move(o)))
    monkeypatch.setattr(T, "load_checkpoint", lambda path, **kw: (loaded.append(kw), real_load(path, **kw))[1])
    t = Trainer(None, tmp_path / "r", resume=True)
    assert loaded == [{}] and moved == [t.run.optimizer]  # CPU tensors in; state next to its parameters
    for p, st in t.run.optimizer.state.items():
        assert all(v.device == p.device for k, v in st.items() if torch.is_tensor(v) and k != "step")


def _retag_device(path, device):
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["device"] = device
    C.atomic_save(ckpt, path)


@pytest.mark.skipif(CUDA, reason="simulates a CUDA checkpoint on a machine without CUDA")
def test_a_gpu_run_resumes_on_the_cpu(fmnist_dir, tmp_path, capsys):
    """A checkpoint whose run trained on cuda: resuming here needs --device cpu, then matches a straight run."""
    cfg = tiny_cfg(fmnist_dir, method="static")
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    Trainer(cfg, tmp_path / "gpu").fit(stop_after=1)
    _retag_device(tmp_path / "gpu" / "checkpoint.pt", "cuda")
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available.*--device cpu"):
        Trainer(None, tmp_path / "gpu", resume=True)
    assert main(["train", "--resume", str(tmp_path / "gpu")]) == 2
    assert "--device cpu" in capsys.readouterr().err
    resumed = Trainer(None, tmp_path / "gpu", resume=True, overrides={"device": "cpu"})
    assert resumed.cfg.device == "cpu" and resumed.run.device == torch.device("cpu")
    resumed.fit()
    assert untimed(rows(tmp_path / "gpu")) == untimed(rows(tmp_path / "straight"))
    assert C.load_checkpoint(tmp_path / "gpu" / "checkpoint.pt")["config"]["device"] == "cpu"


def test_resume_keeps_the_precision(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "r"
    Trainer(tiny_cfg(fmnist_dir, precision="tf32"), out).fit(stop_after=1)
    assert main(["train", "--resume", str(out), "--precision", "fp32"]) == 2
    assert "precision: saved 'tf32', given 'fp32'" in capsys.readouterr().err
    t = Trainer(None, out, resume=True, overrides={"device": "cpu"})
    assert t.cfg.precision == "tf32"


def test_cpu_data_pipeline_is_unchanged(fmnist_dir):
    """Dataset.to(cpu) is the same data; the iterator's batches are what a plain randperm gives."""
    d = load_dataset("fashion-mnist", str(fmnist_dir), augment=True)
    assert d.to("cpu").train is d.train and d.device == torch.device("cpu")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = list(BatchIterator(d.train, 32, g1, augment=False))
    perm = torch.randperm(len(d.train), generator=g2)
    want = [(d.train.pixels(i), d.train.labels[i]) for i in perm.split(32)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------- DDP rank devices
@pytest.fixture
def torchrun_env(monkeypatch):
    """A fake torchrun rank (LOCAL_RANK 1 of 2) whose process-group start and set_device are recorded."""
    calls = {"init": [], "set_device": []}
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: calls["init"].append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    return calls


def test_one_gpu_two_ranks_auto_falls_back_to_cpu_and_gloo(torchrun_env, monkeypatch):
    """Review finding F6: rank 1 on a 1-GPU machine must never call set_device(1)."""
    fake_gpus(monkeypatch, 1)
    assert D.run_device("auto") == D.run_device(None) == "cpu"
    assert D.init() is True
    assert torchrun_env == {"init": ["gloo"], "set_device": []}


def test_one_gpu_two_ranks_explicit_cuda_is_an_error(torchrun_env, monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"--device cuda: torchrun started 2 processes .* LOCAL_RANK 1\) but it has "
                                         r"1 CUDA device\(s\)"):
        D.init(device="cuda")
    monkeypatch.setenv(D.BACKEND_ENV, "nccl")  # forcing nccl does not reach set_device(1) either
    with pytest.raises(ValueError, match="needs CUDA device 1, but this machine has 1"):
        D.init()
    assert torchrun_env == {"init": [], "set_device": []}


def test_one_rank_per_gpu_uses_nccl_and_the_local_gpu(torchrun_env, monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert D.run_device("auto") == "cuda" and D.default_backend() == "cpu:gloo,cuda:nccl"
    assert D.init(device="cuda") is True
    assert torchrun_env == {"init": ["cpu:gloo,cuda:nccl"], "set_device": [1]}
    with pytest.raises(ValueError, match="--device cuda:0: torchrun started 2 processes .* every one would use"):
        D.run_device("cuda:0")


def test_cpu_ranks_use_gloo_even_with_gpus(torchrun_env, monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert D.default_backend("cpu") == "gloo"
    D.init(device="cpu")
    assert torchrun_env == {"init": ["gloo"], "set_device": []}


def test_module_entry_point_refuses_cuda_ranks_without_gpus(torchrun_env, monkeypatch, fmnist_dir, tmp_path, capsys):
    from sparsestart.train import __main__ as entry

    fake_gpus(monkeypatch, 1)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--device", "cuda", "--out",
            str(tmp_path / "never")]
    assert entry.main(argv) == 2
    assert "--device cuda: torchrun started 2 processes" in capsys.readouterr().err
    assert torchrun_env == {"init": [], "set_device": []} and not (tmp_path / "never").exists()


def test_module_entry_point_passes_the_device_to_the_process_group(monkeypatch, fmnist_dir, tmp_path):
    from types import SimpleNamespace

    from sparsestart.train import __main__ as entry

    assert entry.requested_device(SimpleNamespace(device="cpu", resume=None, config=None)) == "cpu"
    assert entry.requested_device(SimpleNamespace(resume=None, config=None)) is None
    Trainer(tiny_cfg(fmnist_dir, epochs=2), tmp_path / "r").fit(stop_after=1)
    assert entry.requested_device(SimpleNamespace(resume=str(tmp_path / "r"), config=None)) == "cpu"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\n")
    assert entry.requested_device(SimpleNamespace(resume=None, config=str(cfg))) == "cpu"


# ---------------------------------------------------------------------------------------------- CUDA
@needs_cuda
def test_cuda_train_one_epoch(fmnist_dir, tmp_path):
    t = Trainer(tiny_cfg(fmnist_dir, device="cuda", epochs=1, final_eval=True, method="rigl",
                         method_options={"update_every": 2}), tmp_path / "cuda")
    assert t.run.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in t.run.model.parameters())
    assert all(b.device.type == "cuda" for b in t.run.model.buffers())
    s = t.fit()
    assert s["device"].startswith("cuda:") and isinstance(s["gpu_name"], str) and s["gpu_name"]
    assert s["precision"] == "fp32" and s["backend"] != "cpu (C++)"
    assert 0 <= s["final"]["test"]["accuracy"] <= 1 and math.isfinite(s["final"]["test"]["nll"])
    assert set(s["final"]["test"]["ood_auroc"]) == {"gaussian", "uniform", "shifted"}
    assert t.run.algorithm.history, "RigL did not update the structure on the GPU"
    raw = torch.load(tmp_path / "cuda" / "checkpoint.pt", weights_only=True)  # no map_location: saved on the CPU
    assert all(v.device.type == "cpu" for v in raw["model"].values())
    assert "cuda" in raw["rng"]


@needs_cuda
def test_cuda_data_is_held_on_the_gpu_and_batched_like_the_cpu(fmnist_dir, tmp_path):
    t = Trainer(tiny_cfg(fmnist_dir, device="cuda", augment=True), tmp_path / "d")
    d = t.run.data
    assert {s.images.device.type for s in (d.train, d.val, d.test)} == {"cuda"}
    assert d.train.images.dtype == torch.uint8
    cpu = d.to("cpu")
    g_gpu, g_cpu = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for (xg, yg), (xc, yc) in zip(BatchIterator(d.train, 32, g_gpu, augment=True),
                                  BatchIterator(cpu.train, 32, g_cpu, augment=True)):
        assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)  # the same images in the same order ...
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)  # ... (CUDA divides by 255 as x * (1/255))


@needs_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_resume_across_devices(first, then, fmnist_dir, tmp_path):
    cfg = tiny_cfg(fmnist_dir, device=first, optimizer="adamw", method="rigl", method_options={"update_every": 2})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    Trainer(cfg, tmp_path / "r").fit(stop_after=1)
    t = Trainer(None, tmp_path / "r", resume=True, overrides={"device": then})
    assert t.run.device.type == then and t.cfg.device == then
    assert all(p.device.type == then for p in t.run.model.parameters())
    for p, st in t.run.optimizer.state.items():
        assert all(v.device == p.device for k, v in st.items() if torch.is_tensor(v) and k != "step")
    t.fit()
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "r")
    assert [r["epoch"] for r in b] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in b)
    # the same data order on both devices; they round differently, so the runs stay close, not equal
    assert [(r["step"], r["samples_seen"]) for r in a] == [(r["step"], r["samples_seen"]) for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 0.1 * abs(ra["train_loss"]) + 1e-3
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["device"].startswith(then)


@needs_cuda
def test_cuda_resume_on_the_gpu_is_bit_identical(fmnist_dir, tmp_path):
    """Holds where the GPU kernels are deterministic (MLP: SpMM, SpMM^T, SDDMM, RigL's top-k)."""
    cfg = tiny_cfg(fmnist_dir, device="cuda", method="rigl", method_options={"update_every": 2})
    Trainer(cfg, tmp_path / "straight").fit()
    Trainer(cfg, tmp_path / "r").fit(stop_after=1)
    Trainer(None, tmp_path / "r", resume=True).fit()
    assert untimed(rows(tmp_path / "straight")) == untimed(rows(tmp_path / "r"))


@needs_cuda
@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_cuda_bf16_training(model, fmnist_dir, tmp_path):
    t = Trainer(tiny_cfg(fmnist_dir, device="cuda", precision="bf16", model=model, epochs=1, final_eval=True,
                         model_options={"hidden": [32]} if model == "mlp" else {}), tmp_path / "bf16")
    s = t.fit()
    (row,) = rows(tmp_path / "bf16")
    assert math.isfinite(row["train_loss"]) and s["precision"] == "bf16"
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in t.run.model.parameters())
    assert not torch.is_autocast_enabled("cuda")


@needs_cuda
def test_cuda_evaluate_a_cpu_run(fmnist_dir, tmp_path):
    Trainer(tiny_cfg(fmnist_dir, epochs=1, final_eval=True), tmp_path / "cpu").fit()
    cpu = json.loads((tmp_path / "cpu" / "summary.json").read_text())["final"]["test"]
    ev = evaluate_run(tmp_path / "cpu", device="cuda", log=lambda m: None)
    assert ev["device"].startswith("cuda") and ev["gpu_name"]
    assert abs(ev["test"]["accuracy"] - cpu["accuracy"]) <= 2 / cpu["n"]
    assert ev["test"]["nll"] == pytest.approx(cpu["nll"], rel=1e-3)
