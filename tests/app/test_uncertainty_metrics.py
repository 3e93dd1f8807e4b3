"""OOD detection, selective prediction, adaptive/classwise ECE and temperature scaling: against
scikit-learn (the independent reference) and against cases worked out by hand, ties included."""

import math

import numpy as np
import pytest

from mixc.metrics import adaptive_ece, classwise_ece, nll
from mixc.ood import (
    auroc,
    average_precision,
    detection_metrics,
    evaluate_ood,
    fpr_at_tpr,
    ood_scores,
)
from mixc.selective import risk_coverage, selective_metrics
from mixc.temperature import apply_temperature, fit_temperature, tempered_nll

sk = pytest.importorskip("sklearn.metrics")


def _cases():
    rng = np.random.default_rng(0)
    yield rng.normal(1, 1, 300), rng.normal(0, 1, 200)  # continuous scores
    yield rng.integers(0, 5, 257).astype(float), rng.integers(0, 4, 101).astype(float)  # many ties
    yield np.full(10, 0.5), np.full(7, 0.5)  # all tied
    yield rng.random(3), rng.random(1000)  # unbalanced


@pytest.mark.parametrize("k", range(4))
def test_auroc_and_aupr_agree_with_scikit_learn(k):
    pos, neg = list(_cases())[k]
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    assert abs(auroc(pos, neg) - sk.roc_auc_score(y, s)) < 1e-9
    assert abs(average_precision(pos, neg) - sk.average_precision_score(y, s)) < 1e-9
    m = detection_metrics(pos, neg)
    assert abs(m["aupr_out"] - sk.average_precision_score(1 - y, -s)) < 1e-9
    # FPR at 95% TPR: the first point of scikit-learn's full ROC curve whose TPR reaches 0.95
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    assert abs(m["fpr95"] - fpr[np.searchsorted(tpr, 0.95 - 1e-12)]) < 1e-9


def test_detection_by_hand_with_ties():
    # pairs (2,1) (2,0) (1,0) won, (1,1) tied: 3.5 of 4
    assert auroc([2, 1], [1, 0]) == 0.875
    # 19 of 20 in-distribution scores accepted at threshold 2; OOD 2, 3, 25 pass it
    assert fpr_at_tpr(np.arange(1, 21), [0.5, 1, 2, 3, 25]) == pytest.approx(3 / 5)
    # ties at the threshold go together: all 4 ID inputs needed, threshold 4, OOD 4 accepted
    assert fpr_at_tpr([5, 5, 5, 4], [4, 3]) == 0.5
    assert fpr_at_tpr([5, 5, 5, 5], [5, 1]) == 0.5
    # AP: ranked 3(+) 2(-) 1(+): precision 1 at recall 1/2, 2/3 at recall 1 -> 1/2 + 1/3
    assert average_precision([3, 1], [2]) == pytest.approx(0.5 + 1 / 3)


def test_scores_and_their_directions():
    # 2 inputs, 2 members, 2 classes: input 0 confident and agreed, input 1 split between members
    p = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.8, 0.2], [0.2, 0.8]]])
    z = np.log(p) + 3.0  # logits up to a constant per member
    s = ood_scores(p, z)
    assert s["msp"].tolist() == pytest.approx([0.9, 0.5])
    h = lambda q: -sum(v * math.log(v) for v in q)  # noqa: E731
    assert s["entropy"] == pytest.approx([h([0.9, 0.1]), math.log(2)])
    assert s["mutual_information"] == pytest.approx([0.0, math.log(2) - h([0.8, 0.2])])
    assert s["disagreement"].tolist() == [0.0, 1.0]
    assert s["max_logit"] == pytest.approx(
        [math.log(0.9) + 3, (math.log(0.8) + math.log(0.2)) / 2 + 3]
    )
    assert s["energy"][0] == pytest.approx(
        -math.log(math.exp(math.log(0.9) + 3) + math.exp(math.log(0.1) + 3))
    )
    assert "max_logit" not in ood_scores(p)  # probabilities alone cannot give logits
    # input 0 is the in-distribution one: every score must rank it so, whatever its raw direction
    r = evaluate_ood({k: v[:1] for k, v in s.items()}, {k: v[1:] for k, v in s.items()})
    assert all(r[k]["auroc"] == 1.0 for k in r) and set(r) == set(s)
    assert (
        r["energy"]["direction"] == "lower = in-distribution"
        and r["entropy"]["direction"] == "higher = OOD"
    )


def test_disagreement_counts_member_pairs():
    # 3 members predicting classes 0, 0, 1: pairs (0,1) same, (0,2) and (1,2) differ -> 2/3
    p = np.eye(3)[[[0, 0, 1]]] * 0.9 + 0.1 / 3
    assert ood_scores(p)["disagreement"][0] == pytest.approx(2 / 3)


def test_selective_by_hand_with_ties():
    # sorted: 0.9 right | 0.8, 0.8 (one wrong) | 0.6 wrong. Errors among the top k (tie spread): 0,
    # .5, 1, 2
    conf, wrong = np.array([0.8, 0.9, 0.6, 0.8]), np.array([1, 0, 1, 0])
    m = selective_metrics(conf, wrong)
    assert m["aurc"] == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4)
    assert m["augrc"] == pytest.approx((0 + 0.5 + 1 + 2) / 4 / 4)
    assert m["risk_at_80"] == pytest.approx(0.5)  # ceil(0.8 * 4) = all 4
    assert m["coverage_at_5"] == 0.25  # only the first group is below 5% risk
    # the wrong one of the tied pair swapped
    swapped = selective_metrics(conf, np.array([0, 0, 1, 1]))
    assert swapped == m
    cov, risk = risk_coverage(conf, wrong)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0] and risk == pytest.approx([0, 0.25, 1 / 3, 0.5])
    perfect = selective_metrics(np.array([0.9, 0.5]), np.array([0, 0]))
    assert perfect["aurc"] == 0 and perfect["coverage_at_5"] == 1.0
    assert selective_metrics(np.array([0.9, 0.5]), np.array([1, 0]))["coverage_at_5"] == 0.0


def test_adaptive_and_classwise_ece_by_hand():
    conf = np.array([0.6, 0.7, 0.8, 0.9])
    p = np.stack([conf, 1 - conf], axis=1)
    y = np.array([0, 1, 0, 0])  # right, wrong, right, right
    # 2 equal-mass bins {0.6, 0.7} (acc .5, conf .65) and {0.8, 0.9} (acc 1, conf .85): 2/4*.15 +
    # 2/4*.15
    assert adaptive_ece(p, y, bins=2) == pytest.approx(0.15)
    # class 0: p 0.65 (hit) and 0.62 (miss) share a bin: |1 - 1.27| / 2; class 1 likewise: |1 -
    # 0.73| / 2
    q = np.array([[0.65, 0.35], [0.62, 0.38]])
    assert classwise_ece(q, np.array([0, 1])) == pytest.approx(0.135)


def test_temperature_recovers_a_known_temperature_and_lowers_nll():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (4000, 3, 5))  # members' logits
    # labels drawn from member 0
    y = np.array([rng.choice(5, p=np.exp(r) / np.exp(r).sum()) for r in z[:, 0]])
    # logits 3x too large: over-confident
    over = np.exp(3 * z) / np.exp(3 * z).sum(-1, keepdims=True)
    t = fit_temperature(over[:, :1], y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert tempered_nll(over[:, :1], y, t) < nll(over[:, 0], y)
    np.testing.assert_allclose(
        apply_temperature(over, 3.0)[:, 0],
        np.exp(z[:, 0]) / np.exp(z[:, 0]).sum(-1, keepdims=True),
        atol=1e-9,
    )
    assert fit_temperature(over, y) > 1.0


def test_a_temperature_fitted_without_errors_is_flagged():
    from mixc.calibration import _warning

    p = np.array([[[0.9, 0.1]], [[0.2, 0.8]]])
    assert "no error" in _warning(p, np.array([0, 1]), [0.05])
    assert "bound" in _warning(p, np.array([1, 1]), [0.05])
    assert _warning(p, np.array([1, 1]), [1.3]) is None
