"""The trainer and the CLI end to end on tiny generated datasets: outputs, bit-identical resume, errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import sparsestart
from sparsestart.cli import main
from sparsestart.train import checkpoint as C
from sparsestart.train.config import TrainConfig
from sparsestart.train.trainer import Trainer
from tests.train.conftest import rows, untimed, write_cifar10



def tiny_cfg(data_dir, **kw):
    base = dict(dataset="fashion-mnist", data_dir=str(data_dir), model="lenet5", density=0.3,
                distribution="uniform", method="static", epochs=2, batch_size=32, lr=0.05, progress=False,
                final_eval=False, threads=2, device="cpu")  # CUDA runs: tests/train/test_device.py
    base.update(kw)
    return TrainConfig(**base)


def test_cli_end_to_end(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "lenet5",
                 "--density", "0.1", "--distribution", "uniform", "--method", "static", "--epochs", "1",
                 "--batch-size", "32", "--out", str(out), "--no-progress", "--test-limit", "40"])
    assert code == 0, capsys.readouterr().err
    for f in ("checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (out / f).is_file(), f
    (r,) = rows(out)
    assert r["epoch"] == 1 and 0 <= r["val_accuracy"] <= 1 and r["samples_seen"] == 135
    with open(out / "metrics.csv") as f:
        (c,) = list(csv.DictReader(f))
    assert float(c["test_accuracy"]) == r["test_accuracy"]
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["density"] == 0.1 and s["dataset"]["test"] == 40
    t = s["final"]["test"]
    assert set(t["ood_auroc"]) == {"gaussian", "uniform", "shifted"} and t["ood_shifted_set"].startswith("digits")
    assert 0 <= t["fgsm_accuracy"] <= 1 and t["fgsm_eps"] == pytest.approx(8 / 255)
    assert s["best_val"]["epoch"] == 1 and s["best_val"]["test"]["accuracy"] == r["test_accuracy"]
    assert [l["name"] for l in s["layers"]][:2] == ["features.conv1", "features.conv2"]
    assert all(l["type"].startswith("Sparse") for l in s["layers"])
    assert s["density"] == pytest.approx(0.1, abs=1e-3)
    fl = s["flops"]
    assert fl["training_total"] == 3 * fl["forward_per_sample"] * 135 and fl["forward_per_sample"] < fl["dense_forward_per_sample"]
    assert s["memory"]["layers_bytes"] == sum(l["sparse_bytes"] for l in s["layers"]) < s["memory"]["layers_dense_bytes"]
    assert s["wall_time_seconds"] > s["train_seconds"] > 0
    from sparsestart import runtime
    if runtime._libc() is not None:  # the trainer keeps freed memory by default (--retain-memory)
        assert s["malloc"]["policy"] == "retain_freed_memory"
    # `sparsestart evaluate` reproduces the final test metrics from the checkpoint
    assert main(["evaluate", str(out)]) == 0
    ev = json.loads((out / "evaluation-final.json").read_text())
    assert ev["test"]["accuracy"] == t["accuracy"] and ev["test"]["nll"] == pytest.approx(t["nll"], abs=1e-9)
    assert ev["test"]["ood_auroc"] == pytest.approx(t["ood_auroc"])
    assert main(["evaluate", str(out), "--which", "best", "--output", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["epoch"] == 1


def test_dense_baseline_has_no_sparse_layers(fmnist_dir, tmp_path):
    cfg = tiny_cfg(fmnist_dir, density=1.0, epochs=1, model="mlp", model_options={"hidden": [32]})
    t = Trainer(cfg, tmp_path / "dense", explicit=frozenset({"density"}))
    assert not any(isinstance(m, sparsestart.nn.SparseLayer) for m in t.run.model.modules())
    s = t.fit()
    assert s["density"] == 1.0 and [l["type"] for l in s["layers"]] == ["Linear", "Linear"]
    assert s["flops"]["forward_per_sample"] == 784 * 32 + 32 * 10


@pytest.mark.parametrize("kind", ["fashion-mnist", "cifar10-augmented"])
def test_resume_is_bit_identical(kind, fmnist_dir, tmp_path):
    if kind == "fashion-mnist":
        cfg = tiny_cfg(fmnist_dir)
    else:
        write_cifar10(tmp_path / "c", per_batch=8, n_test=8)
        cfg = tiny_cfg(tmp_path / "c", dataset="cifar10", model="mlp", model_options={"hidden": [64]}, density=0.2)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    first = Trainer(cfg, tmp_path / "resumed")
    assert first.fit(stop_after=1) is None
    assert len(rows(tmp_path / "resumed")) == 1
    second = Trainer(None, tmp_path / "resumed", resume=True, overrides={"threads": 2})
    assert second.epoch == 1
    second.fit()
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert len(a) == 2 and untimed(a) == untimed(b)
    sa, sb = straight.run.model.state_dict(), second.run.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_with_autotuning_restores_the_choices(fmnist_dir, tmp_path, monkeypatch):
    """With conv/linear_algorithm="auto" measuring, the resumed run must compute with the algorithms the
    run it continues chose (stored in the checkpoint), not measure afresh: the algorithms round
    differently. The fake timer makes the winners depend on ``prefer``, which changes before the resume,
    so a resume that measured again would choose other algorithms and differ."""
    from sparsestart.nn import autotune

    prefer = {}

    def timer(name, run, device, limit=None):
        return 1.0 if name in prefer["winners"] else 2.0

    monkeypatch.setattr(autotune, "_time_candidate", timer)
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    autotune.set_enabled(True)
    try:
        cfg = tiny_cfg(fmnist_dir)
        first_choice = {"winners": ("unfold", "dense")}
        prefer.update(first_choice)
        autotune.clear()
        straight = Trainer(cfg, tmp_path / "straight")
        straight.fit()
        chosen = {e["choice"] for e in autotune.entries()}
        assert chosen == {"unfold", "dense"}  # both layer kinds measured, the fake winners taken
        autotune.clear()
        assert Trainer(cfg, tmp_path / "resumed").fit(stop_after=1) is None
        saved = C.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["autotune"]
        assert {e["choice"] for e in saved["entries"]} == chosen
        autotune.clear()
        prefer["winners"] = ("direct", "sparse")  # a new measurement would choose these
        second = Trainer(None, tmp_path / "resumed", resume=True, overrides={"threads": 2})
        second.fit()
        assert {e["choice"] for e in autotune.entries()} == chosen
        a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
        assert len(a) == 2 and untimed(a) == untimed(b)
        sa, sb = straight.run.model.state_dict(), second.run.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    finally:
        autotune.clear()
        autotune.set_enabled(None)


def test_crash_while_checkpointing_then_resume(fmnist_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(fmnist_dir)
    Trainer(cfg, tmp_path / "straight").fit()
    real_save = torch.save

    def crash_on_epoch_2(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        if obj.get("kind") == "checkpoint" and obj["epoch"] == 2:
            f.truncate(1000)
            raise OSError("power cut")

    monkeypatch.setattr(torch, "save", crash_on_epoch_2)
    with pytest.raises(OSError, match="power cut"):
        Trainer(cfg, tmp_path / "crashed").fit()
    monkeypatch.undo()
    assert C.load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["epoch"] == 1
    assert len(rows(tmp_path / "crashed")) == 2  # the row of epoch 2 was written before the crash ...
    Trainer(None, tmp_path / "crashed", resume=True).fit()
    # ... and is replaced by the resumed epoch 2, equal to the uninterrupted one
    assert untimed(rows(tmp_path / "crashed")) == untimed(rows(tmp_path / "straight"))


def test_resume_errors_leave_checkpoint_untouched(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(fmnist_dir, epochs=2), out).fit(stop_after=1)
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    assert main(["train", "--resume", str(out), "--density", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "differ from the run being resumed" in err and "density" in err
    assert ckpt.read_bytes() == data
    # a checkpoint whose model does not fit the configuration
    bad = C.load_checkpoint(ckpt)
    bad["config"]["model"] = "mlp"
    C.atomic_save(bad, ckpt)
    mismatched = ckpt.read_bytes()
    assert main(["train", "--resume", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err and ckpt.read_bytes() == mismatched
    # a truncated checkpoint
    ckpt.write_bytes(data[:5000])
    assert main(["train", "--resume", str(out)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err and ckpt.read_bytes() == data[:5000]
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_on_a_full_disk_says_which_epoch_is_saved(fmnist_dir, tmp_path, capsys, monkeypatch):
    """A resume rewrites metrics.jsonl before its first epoch: a full disk there says what is saved, as one
    during an epoch does (was a bare "no space left on device while saving .../metrics.jsonl")."""
    import errno

    out = tmp_path / "run"
    Trainer(tiny_cfg(fmnist_dir, epochs=2), out, log=lambda m: None).fit(stop_after=1)
    ckpt = (out / "checkpoint.pt").read_bytes()

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(C, "_atomic_write", full)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left on device while saving" in err and "metrics.jsonl" in err, err
    assert f"the last completed epoch (1) is saved at {out / 'checkpoint.pt'}" in err, err
    assert f"sparsestart train --resume {out}" in err, err
    assert (out / "checkpoint.pt").read_bytes() == ckpt


@pytest.mark.parametrize("density", [0.6, 0.1])
def test_checkpoint_whose_config_density_disagrees_with_its_model_is_refused(density, fmnist_dir, tmp_path, capsys):
    """Issue 17: a checkpoint whose configuration says another density than its stored structure resumed
    silently (the layers adopted the saved capacity) and reported the configuration's density."""
    out = tmp_path / "run"
    Trainer(tiny_cfg(fmnist_dir, epochs=2), out, log=lambda m: None).fit(stop_after=1)  # density 0.3
    ckpt = out / "checkpoint.pt"
    edited = C.load_checkpoint(ckpt)
    edited["config"]["density"] = density
    C.atomic_save(edited, ckpt)  # with a fresh checksum: the file is intact, its content disagrees
    data = ckpt.read_bytes()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not match its configuration" in err and f"(density {density:.4g})" in err, err
    assert ckpt.read_bytes() == data
    assert main(["evaluate", str(out)]) == 2  # evaluate loads the model the same way
    assert "does not match its configuration" in capsys.readouterr().err
    # the same checkpoint with its own density resumes
    edited["config"]["density"] = 0.3
    C.atomic_save(edited, ckpt)
    assert Trainer(None, out, resume=True, log=lambda m: None).epoch == 1

def test_new_run_refuses_existing_run_dir(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(fmnist_dir, epochs=1), out).fit(stop_after=1)
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp", "--out", str(out)]
    assert main(args) == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--model", "resnet9000"], ["unknown model", "convnet_small", "resnet20", "vgg16"]),
    (["--dataset", "mnist-ish"], ["unknown dataset", "fashion-mnist, cifar10, cifar100, digits"]),
    (["--method", "magic"], ["unknown method", "static, imp, str, rigl, set, gradual, edgepopup"]),
    (["--distribution", "zipf"], ["unknown distribution", "uniform"]),
    (["--optimizer", "lion"], ["unknown optimizer", "sgd, adamw"]),
    (["--schedule", "linear"], ["unknown schedule", "cosine, step, constant"]),
    (["--density", "1.0", "--method", "rigl"], ["dense baseline", "static"]),
    (["--density", "1.0", "--flow", "rejection"], ["dense baseline", "--flow"]),
    (["--density", "0"], ["--density", "outside"]),
    (["--format", "bsr"], ["--block-size"]),
    (["--format", "csr", "--block-size", "16"], ["bsr only"]),
    (["--optimizer", "adamw", "--momentum", "0.5"], ["sgd only"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--dataset", "cifar10"], ["CIFAR10 not found", "Looked for", "cifar-10-batches-py", "--data-dir"]),
    (["--model", "mlp", "--model-option", "bogus=1"], ["--model mlp", "bogus"]),
])
def test_bad_input_gives_clear_errors_before_training(args, expected, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["train", "--data-dir", str(fmnist_dir), "--out", str(out), "--no-progress"]
    if "--dataset" not in args:
        base += ["--dataset", "fashion-mnist"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsestart train: error:")
    for e in expected:
        assert e in err, (e, err)
    assert not (out / "checkpoint.pt").exists()


def test_missing_fashion_mnist_cli_message(tmp_path, no_system_data, capsys):
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "apt-get install dataset-fashion-mnist" in err


def test_config_files_yaml_and_toml(fmnist_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"dataset: fashion-mnist\ndata-dir: {fmnist_dir}\nmodel: mlp\n"
                                     f"model_options: {{hidden: [16]}}\ndensity: 0.5\ndistribution: uniform\n"
                                     f"method: static\nepochs: 3\nbatch_size: 64\nfinal_eval: false\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "1", "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 0
    s = json.loads((tmp_path / "y" / "summary.json").read_text())
    assert s["config"]["epochs"] == 1 and s["config"]["batch_size"] == 64 and s["config"]["model_options"] == {"hidden": [16]}
    (tmp_path / "c.toml").write_text(f'dataset = "fashion-mnist"\ndata_dir = "{fmnist_dir}"\nmodel = "mlp"\n'
                                     f'density = 1.0\nepochs = 1\nfinal_eval = false\n[model_options]\nhidden = [8]\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["density"] == 1.0 and s["config"]["model_options"] == {"hidden": [8]}
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "b")]) == 2
    assert "unknown key 'epochz'" in capsys.readouterr().err


def test_no_arguments_runs_the_quick_demonstration(monkeypatch, no_system_data, capsys):
    from sparsestart.train import trainer as T
    from sparsestart.train.config import QUICK_FALLBACK

    seen = {}

    class Stop(ValueError):
        pass

    def fake(cfg, out, **kw):
        seen["cfg"], seen["out"] = cfg, out
        raise Stop("stopped by the test")

    monkeypatch.setattr(T, "Trainer", fake)
    assert main(["train"]) == 2
    cfg = seen["cfg"]
    assert cfg.dataset == "digits"  # Fashion-MNIST hidden by no_system_data
    assert cfg.model == "convnet_small" and cfg.density == 0.1 and cfg.epochs == QUICK_FALLBACK["epochs"]
    assert cfg.distribution == ("erk" if "erk" in sparsestart.init.DISTRIBUTIONS else "uniform")
    assert "short demonstration" in capsys.readouterr().out


def test_convnet_small_with_erk_if_available(fmnist_dir, tmp_path):
    dist = "erk" if "erk" in getattr(sparsestart.init, "DISTRIBUTIONS", ()) else "uniform"
    cfg = tiny_cfg(fmnist_dir, model="convnet_small", distribution=dist, density=0.1, epochs=1, train_limit=64)
    s = Trainer(cfg, tmp_path / "cs").fit()
    assert s["density"] == pytest.approx(0.1, abs=1e-3) and s["config"]["distribution"] == dist


def _algorithms():
    from sparsestart.train.methods import available_methods
    return available_methods()


@pytest.mark.skipif("imp" not in _algorithms(), reason="sparsestart.algorithms has no imp yet")
def test_imp_levels_and_resume_across_prune(fmnist_dir, tmp_path):
    # --epochs is per level: density 0.3 -> 0.15 with prune_fraction 0.5 is one prune, two levels of one epoch
    cfg = tiny_cfg(fmnist_dir, model="mlp", model_options={"hidden": [64]}, epochs=1, method="imp",
                   method_options={"final_density": 0.15, "prune_fraction": 0.5})
    Trainer(cfg, tmp_path / "a").fit()
    Trainer(cfg, tmp_path / "b").fit(stop_after=1)
    Trainer(None, tmp_path / "b", resume=True).fit()
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(a) == 2 and untimed(a) == untimed(b)
    assert a[0]["density"] == pytest.approx(0.3, abs=1e-3) and a[1]["density"] == pytest.approx(0.15, abs=1e-3)
    assert a[1]["lr"] == a[0]["lr"]  # the schedule restarts at every level


@pytest.mark.skipif("rigl" not in _algorithms(), reason="sparsestart.algorithms has no rigl yet")
def test_rigl_counts_dense_gradient_flops(fmnist_dir, tmp_path):
    cfg = tiny_cfg(fmnist_dir, model="mlp", model_options={"hidden": [64]}, epochs=1, method="rigl",
                   method_options={"update_every": 2})
    s = Trainer(cfg, tmp_path / "r").fit()
    fl = s["flops"]
    updates = 1  # 5 steps, t_end 0.75 -> end_step 3: an update at step 2 only
    assert fl["training_total"] == 3 * fl["forward_per_sample"] * 135 + updates * 32 * fl["dense_forward_per_sample"]
    assert s["method"]["history"] and s["density"] == pytest.approx(0.3, abs=1e-3)


def test_cosine_schedule_ends_at_lr_min():
    from sparsestart.train.trainer import LRFactor

    f = LRFactor("cosine", 100, 0, min_factor=0.1)
    assert f(0) == pytest.approx(1.0) and f(50) == pytest.approx(0.55) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert LRFactor("cosine", 100)(99) < 1e-3  # default: anneal to 0, as before


def test_lr_min_is_validated_and_reaches_the_schedule(tmp_path):
    from sparsestart.train.config import validate

    with pytest.raises(ValueError, match="--lr-min 0.5 must not exceed --lr 0.1"):
        validate(TrainConfig(dataset="digits", lr=0.1, lr_min=0.5))
    with pytest.raises(ValueError, match="lr.min"):
        validate(TrainConfig(dataset="digits", lr_min=-0.01))


def test_str_gets_the_runs_learning_rate_schedule(tmp_path, monkeypatch):
    """STR derives its default s_init from the learning rate weight decay acts at (the run's schedule)."""
    import functools

    from sparsestart.algorithms import soft_threshold
    from sparsestart.train import trainer as trainer_mod

    seen = {}
    original = soft_threshold.STR.__init__

    @functools.wraps(original)  # keeps STR's signature, which make_algorithm inspects
    def spy(self, *args, **kwargs):
        seen["lr_factor"] = kwargs.get("lr_factor")
        original(self, *args, **kwargs)

    monkeypatch.setattr(soft_threshold.STR, "__init__", spy)
    cfg = TrainConfig(dataset="digits", model="mlp", model_options={"hidden": [16]}, density=0.5, method="str",
                      epochs=1, lr=0.1, lr_min=0.01, progress=False, final_eval=False, device="cpu", threads=1)
    Trainer(cfg, tmp_path / "str")
    assert isinstance(seen["lr_factor"], trainer_mod.LRFactor)
    assert seen["lr_factor"].min_factor == pytest.approx(0.1)


def test_best_model_is_chosen_among_the_sparsest_epochs():
    from sparsestart.train.trainer import is_new_best

    first = {"epoch": None, "val_accuracy": -1.0}
    assert is_new_best(first, 1000, 0.5)
    best = {"epoch": 1, "val_accuracy": 0.9, "nnz": 1000}
    assert not is_new_best(best, 1000, 0.8) and is_new_best(best, 1000, 0.91)
    # a pruned epoch replaces a denser one even when its accuracy is lower (IMP's next level, STR's cut) ...
    assert is_new_best(best, 500, 0.3)
    # ... and a denser epoch never replaces a sparser one
    assert not is_new_best({"epoch": 3, "val_accuracy": 0.3, "nnz": 500}, 1000, 0.99)
    # a checkpoint from before the rule (no nnz in best) compares accuracy only
    assert not is_new_best({"epoch": 1, "val_accuracy": 0.9}, 10, 0.5)


def test_best_model_of_a_pruning_run_has_the_final_size(fmnist_dir, tmp_path):
    """IMP 0.3 -> 0.15 (2 phases of 1 epoch): best.pt and summary's best_val are from the final level."""
    cfg = tiny_cfg(fmnist_dir, method="imp", epochs=1, method_options={"final_density": 0.15, "prune_fraction": 0.5})
    s = Trainer(cfg, tmp_path / "imp", explicit=frozenset({"density", "method"})).fit()
    hist = rows(tmp_path / "imp")
    assert len(hist) == 2 and hist[1]["nnz"] < hist[0]["nnz"]
    assert s["best_val"]["epoch"] == 2
    best = torch.load(tmp_path / "imp" / "best.pt", weights_only=False)
    assert best["epoch"] == 2
