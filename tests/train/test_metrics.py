"""Each metric against values computed by hand on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart.train import metrics as M
from sparsestart.train.data import NormalizedModel, Split


def test_accuracy():
    logits = torch.tensor([[2.0, 1, 0], [0, 3, 1], [1, 0, 0.5], [0, 0, 4]])
    assert M.accuracy(logits, torch.tensor([0, 1, 2, 2])) == 0.75


def test_nll():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)  # softmax: [1/2, 1/2], [3/4, 1/4]
    assert M.nll(logits, torch.tensor([0, 1])) == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-12)


def test_ece_hand_computed():
    # confidences 0.9 and 0.88 share bin (13/15, 14/15]; 0.82, 0.71, 0.56 are alone in theirs
    probs = torch.tensor([[0.9, 0.1], [0.18, 0.82], [0.29, 0.71], [0.44, 0.56], [0.88, 0.12]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0, 0])  # correct, wrong, correct, wrong, correct
    expected = (2 * abs(1 - 0.89) + 0.82 + abs(1 - 0.71) + 0.56) / 5
    assert M.ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    # with a single bin it is |accuracy - mean confidence|
    assert M.ece(probs, labels, n_bins=1) == pytest.approx(abs(3 / 5 - (0.9 + 0.82 + 0.71 + 0.56 + 0.88) / 5))
    # confidently right everywhere: perfectly calibrated
    assert M.ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_ood_auroc_hand_computed():
    # pairs (in, out) ranked correctly: (0.9, 0.85), (0.9, 0.1), (0.8, 0.1); wrong: (0.8, 0.85)
    assert M.ood_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.85, 0.1])) == pytest.approx(0.75)
    assert M.ood_auroc(torch.tensor([0.5]), torch.tensor([0.5])) == pytest.approx(0.5)
    assert M.ood_auroc(torch.tensor([0.9, 0.7]), torch.tensor([0.2])) == 1.0


def test_max_softmax():
    assert torch.allclose(M.max_softmax(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])),
                          torch.tensor([0.5, 0.75], dtype=torch.float64))


def _linear_model():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    return nn.Sequential(nn.Flatten(), lin)


def test_fgsm_hand_computed():
    # d CE / dx = -(W_y - sum_k p_k W_k): for label 0 its sign is (-1, +1) for both samples.
    # Sample 1 (logits 0, 0) flips to class 1; sample 2 (margin 2) survives eps = 8/255.
    model = _linear_model()
    x = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(2, 1, 1, 2)
    y = torch.tensor([0, 0])
    assert M.accuracy(model(x), y) == 1.0  # argmax of a tie picks class 0
    assert M.fgsm_accuracy(model, x, y, eps=8 / 255) == 0.5
    # eps 0.6 moves sample 2 to (0.4, 0.6), which is class 1
    assert M.fgsm_accuracy(model, x, y, eps=0.6) == 0.0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


class _Recorder(nn.Module):
    def forward(self, x):
        self.last = x.detach().clone()
        return x


def test_fgsm_is_in_pixel_space_before_normalisation_and_clipped():
    # Normalisation inside the model: the attack moves raw [0, 1] pixels by eps, then clips to [0, 1].
    rec = _Recorder()
    model = nn.Sequential(rec, NormalizedModel(_linear_model(), [0.5], [0.1]))
    x = torch.tensor([[0.5, 0.5]]).view(1, 1, 1, 2)
    assert M.fgsm_accuracy(model, x, torch.tensor([0]), eps=1e-3) == 0.0
    assert torch.allclose(rec.last.flatten(), torch.tensor([0.5 - 1e-3, 0.5 + 1e-3]))
    M.fgsm_accuracy(model, x, torch.tensor([0]), eps=0.7)
    assert torch.equal(rec.last.flatten(), torch.tensor([0.0, 1.0]))


def test_noise_sets():
    s = M.noise_sets((3, 4, 5), 7, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], seed=1)
    assert set(s) == {"gaussian", "uniform"}
    for x in s.values():
        assert x.shape == (7, 3, 4, 5) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(s["gaussian"], M.noise_sets((3, 4, 5), 7, [0.5, 0.4, 0.3], [0.2] * 3, seed=1)["gaussian"])


def test_forward_flops_counts_stored_nonzeros():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    fl = M.forward_flops(net, (1, 4, 4))
    assert fl["dense"] == fl["sparse"] == 2 * 9 * 16 + 32 * 3
    sparsestart.sparsify(net, 0.5, "uniform", seed=0)
    fl = M.forward_flops(net, (1, 4, 4))
    assert fl["sparse"] == net[0].nnz * 16 + net[2].nnz and fl["dense"] == 2 * 9 * 16 + 32 * 3
    assert fl["sparse"] < fl["dense"]


def test_evaluate_model_keys_and_ranges():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model = NormalizedModel(net, [0.5], [0.25])
    split = Split(torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 3, (20,)))
    shifted = ("other", torch.rand(9, 1, 4, 4))
    r = M.evaluate_model(model, split, mean=[0.5], std=[0.25], shifted=shifted, batch_size=7)
    assert r["n"] == 20 and 0 <= r["accuracy"] <= 1 and r["nll"] > 0 and 0 <= r["ece"] <= 1
    assert set(r["ood_auroc"]) == {"gaussian", "uniform", "shifted"} and r["ood_shifted_set"] == "other"
    assert all(0 <= v <= 1 for v in r["ood_auroc"].values()) and 0 <= r["fgsm_accuracy"] <= 1
    logits = model(split.pixels())
    assert r["accuracy"] == M.accuracy(logits, split.labels)
    r2 = M.evaluate_model(model, split, mean=[0.5], std=[0.25], shifted=(None, "none here"), fgsm=False)
    assert r2["ood_auroc"]["shifted"] is None and r2["ood_shifted_skipped"] == "none here"
    assert "fgsm_accuracy" not in r2
