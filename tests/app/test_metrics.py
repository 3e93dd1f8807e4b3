"""Metrics against values worked out by hand on tiny constructed inputs."""

import math

import numpy as np
import pytest

from mixc.metrics import accuracy, brier, disagreement, diversity, ece, evaluate, nll


def test_ece_hand_worked():
    # confidences 0.7 (right), 0.7 (wrong) share bin (10/15, 11/15]; 0.78 is in
    # (11/15, 12/15]; 0.95 in (14/15, 1]. Every other bin is empty and skipped.
    p = np.array([[0.7, 0.3], [0.7, 0.3], [0.05, 0.95], [0.22, 0.78]])
    y = np.array([0, 1, 1, 1])
    want = 2 / 4 * abs(0.5 - 0.7) + 1 / 4 * abs(1 - 0.95) + 1 / 4 * abs(1 - 0.78)
    assert ece(p, y) == pytest.approx(want, abs=1e-12)


def test_ece_bin_edges_are_upper_inclusive():
    edge = np.linspace(0, 1, 16)[10]  # 10/15 as the binning computes it
    p = np.array([[edge, 1 - edge], [0.65, 0.35]])
    y = np.array([0, 1])  # the edge sample is right, the 0.65 one wrong
    # Both fall in (9/15, 10/15]: one bin with accuracy 0.5.
    assert ece(p, y) == pytest.approx(abs(0.5 - (edge + 0.65) / 2), abs=1e-12)
    # Just above the edge the samples part into two bins.
    q = p.copy()
    q[0] = [edge + 1e-9, 1 - edge - 1e-9]
    assert ece(q, y) == pytest.approx(0.5 * abs(1 - q[0, 0]) + 0.5 * 0.65, abs=1e-9)


def test_ece_perfect_and_confidence_one():
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ece(p, np.array([0, 1])) == 0.0
    assert ece(p, np.array([1, 1])) == pytest.approx(0.5)


def test_nll_of_averaged_probabilities_not_averaged_log_probs():
    # Member 0 is sure and right, member 1 sure and wrong: the ensemble says 0.5.
    mp = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # [N=1, M=2, C=2]
    y = np.array([0])
    r = evaluate(mp, y)
    assert r["nll"] == pytest.approx(math.log(2))
    assert r["member_nll"][0] == pytest.approx(0.0)
    assert r["member_nll"][1] == pytest.approx(-math.log(1e-12))  # clipped, not infinite
    assert np.mean(r["member_nll"]) > 13  # what averaging log-probs would have given


def test_accuracy_brier():
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    y = np.array([0, 0, 1])
    assert accuracy(p, y) == pytest.approx(1 / 3)  # a tie picks the first class
    assert brier(p, y) == pytest.approx((0.18 + 0.72 + 0.5) / 3)
    assert nll(p, y) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.5)) / 3)


def _onehot(preds, c=3):
    return np.eye(c)[np.asarray(preds)]


def test_diversity_hand_worked():
    y = np.array([0, 1, 2, 0])
    # member predictions per sample: m0 = y (no errors), m1 wrong on sample 0, m2 wrong on 0 and 1
    mp = np.stack([_onehot([0, 1, 2, 0]), _onehot([1, 1, 2, 0]), _onehot([2, 0, 2, 0])], axis=1)
    # pairs: (0,1) differ on 1/4, (0,2) on 2/4, (1,2) on 2/4 -> mean 5/12
    assert disagreement(mp) == pytest.approx(5 / 12)
    # mean member error: (0 + 1/4 + 2/4) / 3 = 1/4
    assert diversity(mp, y) == pytest.approx((5 / 12) / (1 / 4))
    r = evaluate(mp, y)
    assert r["member_accuracy"] == pytest.approx([1.0, 0.75, 0.5])
    assert r["diversity"] == pytest.approx(5 / 3)


def test_diversity_edge_cases():
    y = np.array([0, 1])
    same = np.stack([_onehot(y), _onehot(y)], axis=1)
    assert diversity(same, y) == 0.0
    assert evaluate(_onehot(y)[:, None], y)["diversity"] is None


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError):
        evaluate(np.zeros((3, 2)), np.zeros(3))
