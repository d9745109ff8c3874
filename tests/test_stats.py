"""Intervals and the paired test (core.stats) against known answers, and where they show: report.json, the side-by-side
table, the verdicts, the speed-up Markdown and the terminal summary."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest, chi2
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from core import stats
from core.metrics import verdict
from core.report import write_run
from core.runtime.intervals import paired_difference_interval
from core.summary import ARM_TITLES, results_table, speedup_text, summary_text, verdicts_md
from tests.test_train import tiny_result  # noqa: F401 - the module's small two-arm run, reused as a fixture

HEADLINE_KEYS = ("val_accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")


# ---------------------------------------------------------------- Wilson

@pytest.mark.parametrize(("correct", "n", "expected"), [
    # by hand: z = 1.959964; centre = (p + z²/2n) / (1 + z²/n); half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    (45, 50, (0.7864, 0.9565)),  # centre 0.938415/1.076829 = 0.871461, half 0.091599/1.076829 = 0.085063
    (0, 10, (0.0, 0.2775)),  # centre = half = 0.192073/1.384146 = 0.138767
    (10, 10, (0.7225, 1.0)),
    (1, 2, (0.0945, 0.9055)),  # centre 0.5; half 1.959964·sqrt(0.125 + 0.240091)/2.920729 = 0.405469
])
def test_wilson_matches_values_computed_by_hand(correct, n, expected):
    assert stats.wilson_interval(correct, n) == pytest.approx(expected, abs=1e-4)


def _score_test_bound(k: int, n: int, z: float, upper: bool) -> float:
    """The p where the score statistic |k/n - p| / sqrt(p(1-p)/n) equals z, by bisection: the Wilson bound's
    definition, solved without its closed form."""
    lo, hi = (k / n, 1.0) if upper else (0.0, k / n)
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(k / n - mid) < z * math.sqrt(mid * (1 - mid) / n)
        if inside == upper:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize(("correct", "n", "confidence"), [(45, 50, 0.95), (145, 153, 0.95), (3, 17, 0.9),
                                                          (760, 800, 0.99), (1, 1, 0.95)])
def test_wilson_bounds_are_where_the_score_test_is_at_its_critical_value(correct, n, confidence):
    z = {0.9: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}[confidence]
    expected = (_score_test_bound(correct, n, z, upper=False), _score_test_bound(correct, n, z, upper=True))
    assert stats.wilson_interval(correct, n, confidence) == pytest.approx(expected, abs=1e-9)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct=11, n=10"):
        stats.wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(5, 10, confidence=95)


# ---------------------------------------------------------------- McNemar

def _paired(b: int, c: int, both_right: int = 7, both_wrong: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of arms A and B with b images only A gets right and c only B does (shuffled)."""
    a = np.array([1] * b + [0] * c + [1] * both_right + [0] * both_wrong, bool)
    b_ = np.array([0] * b + [1] * c + [1] * both_right + [0] * both_wrong, bool)
    order = np.random.default_rng(b * 100 + c).permutation(len(a))
    return a[order], b_[order]


@pytest.mark.parametrize(("b", "c"), [(0, 1), (1, 0), (3, 0), (5, 5), (10, 3), (2, 9), (12, 12), (20, 4), (0, 24)])
def test_mcnemar_exact_branch_matches_scipy_binomtest(b, c):
    result = stats.mcnemar(*_paired(b, c))
    assert (result.b, result.c, result.n) == (b, c, b + c + 9)
    assert result.method == "exact binomial" and result.statistic is None
    assert result.p_value == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize(("b", "c", "statistic"), [
    (44, 3, 1600 / 47),  # (|44 - 3| - 1)² / 47 = 34.04
    (20, 10, 81 / 30),  # (10 - 1)² / 30 = 2.7
    (13, 12, 0.0),  # |b - c| - 1 = 0
    (15, 10, 16 / 25),  # b + c = 25: the first count that leaves the exact test
])
def test_mcnemar_chi_square_branch_matches_a_hand_computation(b, c, statistic):
    result = stats.mcnemar(*_paired(b, c))
    assert result.method == "chi-square with continuity correction"
    assert result.statistic == pytest.approx(statistic, rel=1e-12)
    assert result.p_value == pytest.approx(chi2.sf(statistic, df=1), rel=1e-9)


def test_mcnemar_switches_to_chi_square_at_25_discordant_images():
    assert stats.mcnemar(*_paired(14, 10)).method == "exact binomial"
    assert stats.mcnemar(*_paired(15, 10)).method == "chi-square with continuity correction"


def test_mcnemar_sentence_says_real_or_chance():
    names = ("pretrained", "scratch")
    real = stats.mcnemar(*_paired(44, 3), names=names)
    assert real.sentence == ("pretrained is right on 44 images where scratch is wrong, scratch on 3: p < 0.001, "
                             "the difference is real.")
    chance = stats.mcnemar(*_paired(9, 6), names=names)
    assert chance.p_value == pytest.approx(binomtest(9, 15).pvalue)
    assert chance.sentence == ("pretrained is right on 9 images where scratch is wrong, scratch on 6: "
                               f"p = {chance.p_value:.2f}, this could be chance.")
    assert "p = 0.61" in chance.sentence
    same = stats.mcnemar([True, False, True], [True, False, True], names=names)
    assert same.p_value == 1.0 and "exactly the same images" in same.sentence


def test_mcnemar_p_value_is_not_rounded_across_alpha():
    # 0.0498 would print as "0.05" with two digits, beside "the difference is real": three digits then
    result = stats.McNemarResult(30, 12, 60, 0.0498, "chi-square with continuity correction", 3.9)
    assert "p = 0.0498, the difference is real" in result.sentence


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError, match="same images: 3 vs 2"):
        stats.mcnemar([True, True, False], [True, False])


# ---------------------------------------------------------------- bootstrap

def _sklearn_metrics(y_true, y_pred, labels) -> dict[str, float]:
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    with warnings.catch_warnings():  # a predicted class without images: scikit-learn warns, then ignores it
        warnings.simplefilter("ignore")
        ba = balanced_accuracy_score(y_true, y_pred)
    return {"val_accuracy": float(np.mean(y_true == y_pred)), "balanced_accuracy": ba, "precision_macro": pm,
            "recall_macro": rm, "f1_macro": fm}


def test_metrics_from_confusion_counts_match_scikit_learn():
    """The vectorised metrics equal scikit-learn's, including classes never predicted or without images."""
    rng = np.random.default_rng(0)
    cases = [(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), 3),  # class 2 never predicted
             (np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), 4)]  # class 2 predicted but has no image, 3 neither
    cases += [(rng.integers(0, k, n), rng.integers(0, k, n), k) for k, n in ((2, 7), (5, 40), (10, 300), (4, 3))]
    for y_true, y_pred, k in cases:
        cm = stats.confusion_counts(y_true, y_pred, k)
        ours = {m: float(v) for m, v in stats.metrics_from_confusion(cm).items()}
        assert ours == pytest.approx(_sklearn_metrics(y_true, y_pred, list(range(k))), abs=1e-12), (y_true, y_pred)


def _predictions(recalls, per_class: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A classifier that gets class k right with probability recalls[k], else names another class at random."""
    k = len(recalls)
    y_true = np.repeat(np.arange(k), per_class)
    right = rng.random(len(y_true)) < np.asarray(recalls)[y_true]
    other = (y_true + rng.integers(1, k, len(y_true))) % k
    return y_true, np.where(right, y_true, other)


def test_bootstrap_resamples_keep_every_class_count():
    y_true, y_pred = _predictions([0.9, 0.6, 0.75], 20, np.random.default_rng(1))
    y_true, y_pred = y_true[5:], y_pred[5:]  # 15, 20, 20 images
    boots = stats.resampled_confusions(y_true, y_pred, n_boot=200, seed=3, labels=range(4))
    assert boots.shape == (200, 4, 4)
    assert (boots.sum(-1) == [15, 20, 20, 0]).all()
    assert len({b.tobytes() for b in boots}) > 150  # and they do differ from one another


def test_bootstrap_matches_resampling_images_one_by_one_with_scikit_learn():
    """The multinomial shortcut gives the interval of the textbook procedure: resample each class's images with
    replacement, score with scikit-learn."""
    rng = np.random.default_rng(2)
    y_true, y_pred = _predictions([0.95, 0.8, 0.7, 0.85, 0.6], 24, rng)
    labels = list(range(5))
    by_class = [np.nonzero(y_true == k)[0] for k in labels]
    reference = {m: [] for m in stats.BOOTSTRAP_METRICS}
    for _ in range(400):
        idx = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        for m, v in _sklearn_metrics(y_true[idx], y_pred[idx], labels).items():
            reference[m].append(v)
    ours = stats.bootstrap_intervals(y_true, y_pred, n_boot=4000, seed=0, labels=labels)
    spread = stats.metrics_from_confusion(stats.resampled_confusions(y_true, y_pred, n_boot=4000, labels=labels))
    for m in stats.BOOTSTRAP_METRICS:
        # The resampled values spread alike (sd about 0.036; 400 draws estimate it within about 4%) ...
        assert np.std(spread[m]) == pytest.approx(np.std(reference[m]), rel=0.12), m
        # ... and the 2.5% and 97.5% points agree (values move in steps of 1/120 here)
        assert ours[m] == pytest.approx(np.quantile(reference[m], [0.025, 0.975]), abs=0.02), m
        assert stats.bootstrap_interval(y_true, y_pred, m, n_boot=4000, seed=0, labels=labels) == ours[m]


def test_bootstrap_is_seeded():
    y_true, y_pred = _predictions([0.9, 0.7], 30, np.random.default_rng(4))
    first = stats.bootstrap_interval(y_true, y_pred, "f1_macro", seed=7)
    assert stats.bootstrap_interval(y_true, y_pred, "f1_macro", seed=7) == first
    assert stats.bootstrap_interval(y_true, y_pred, "f1_macro", seed=8) != first


def test_bootstrap_names_a_misspelt_metric():
    with pytest.raises(ValueError, match="Did you mean 'balanced_accuracy'"):
        stats.bootstrap_interval([0, 1], [0, 1], "balanced_acuracy")


def test_bootstrap_interval_covers_the_true_balanced_accuracy_at_about_95_percent():
    """200 validation sets drawn from a classifier whose true balanced accuracy is known: the 95% interval holds
    the truth in roughly 95% of them (a too-narrow interval, e.g. one that ignores a class's own noise, fails)."""
    recalls = [0.95, 0.9, 0.8, 0.7, 0.85, 0.97]
    truth = float(np.mean(recalls))
    rng = np.random.default_rng(11)
    covered = 0
    for s in range(200):
        y_true, y_pred = _predictions(recalls, 25, rng)
        lo, hi = stats.bootstrap_interval(y_true, y_pred, "balanced_accuracy", seed=s)
        covered += lo <= truth <= hi
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_headline_intervals_hold_their_point_estimate():
    y_true, y_pred = _predictions([0.9, 0.8, 0.7, 0.95], 40, np.random.default_rng(5))
    intervals = stats.headline_intervals(y_true, y_pred, 5, seed=0)  # class 4 has no image: it counts as 0
    point = _sklearn_metrics(y_true, y_pred, list(range(5)))
    assert set(intervals) == {f"{m}_ci" for m in HEADLINE_KEYS}
    for m in HEADLINE_KEYS:
        lo, hi = intervals[f"{m}_ci"]
        assert lo < point[m] < hi, m
    assert intervals["val_accuracy_ci"] == list(stats.wilson_interval(int((y_true == y_pred).sum()), 160))


# ---------------------------------------------------------------- verdicts

GOOD = {"val_accuracy": 0.90, "precision_macro": 0.88, "recall_macro": 0.87}


def test_verdict_names_an_interval_that_reaches_below_the_bar():
    v = verdict({**GOOD, "val_accuracy_ci": [0.80, 0.95], "precision_macro_ci": [0.82, 0.93],
                 "recall_macro_ci": [0.79, 0.93]})
    assert v["label"] == "good" and v["straddles"] == ["val_accuracy", "recall_macro"]
    assert v["reasons"][-1] == ("good, but the accuracy interval (80.0%–95.0%) reaches below 85%; the macro recall "
                                "interval (79.0%–93.0%) reaches below 80%: collect more validation images to be sure")


def test_verdict_names_an_interval_that_reaches_above_the_bar():
    v = verdict({**GOOD, "val_accuracy": 0.82, "val_accuracy_ci": [0.74, 0.88], "recall_macro_ci": [0.79, 0.93]})
    assert v["label"] == "fair" and v["straddles"] == ["val_accuracy"]  # recall: fair either way, not named
    assert v["reasons"][-1] == ("fair, but the accuracy interval (74.0%–88.0%) reaches above 85%: collect more "
                                "validation images to be sure")


def test_verdict_is_quiet_about_an_interval_that_cannot_make_the_run_good():
    """Precision could reach 80%, but accuracy and recall are below their bars with room to spare."""
    v = verdict({"val_accuracy": 0.76, "precision_macro": 0.77, "recall_macro": 0.76, "val_accuracy_ci": [0.71, 0.80],
                 "precision_macro_ci": [0.73, 0.81], "recall_macro_ci": [0.72, 0.79]})
    assert v["label"] == "fair" and v["straddles"] == [] and not any("interval" in r for r in v["reasons"])


def test_verdict_is_quiet_when_intervals_clear_the_bars():
    v = verdict({**GOOD, "val_accuracy_ci": [0.86, 0.93], "precision_macro_ci": [0.81, 0.93],
                 "recall_macro_ci": [0.805, 0.92]})
    assert v["label"] == "good" and v["straddles"] == [] and not any("interval" in r for r in v["reasons"])


def test_verdicts_markdown_shows_the_straddle():
    runs = {"pretrained": {"verdict": verdict({**GOOD, "val_accuracy_ci": [0.80, 0.95]})}}
    text = verdicts_md({"runs": runs})
    assert "reaches below 85%: collect more validation images" in text


# ---------------------------------------------------------------- the report, the table, the sentences

def test_report_json_carries_intervals_and_the_paired_test(tiny_result, tmp_path):  # noqa: F811
    write_run(tiny_result, tmp_path, export=False)
    report = json.loads((tmp_path / "report.json").read_text())
    labels = tiny_result.val.labels
    correct = {}
    for arm, result in tiny_result.runs.items():
        run = report["runs"][arm]
        pred = result.val_probabilities.argmax(1)
        correct[arm] = pred == labels
        for m in HEADLINE_KEYS:
            lo, hi = run[f"{m}_ci"]
            assert 0 <= lo <= run[m] <= hi <= 1, (arm, m)
        assert run["val_accuracy_ci"] == pytest.approx(stats.wilson_interval(int(correct[arm].sum()), len(labels)))
        assert run["balanced_accuracy_ci"] == pytest.approx(stats.bootstrap_interval(
            labels, pred, "balanced_accuracy", seed=report["seed"], labels=range(3)))
        assert "straddles" in run["verdict"]
    assert report["intervals"]["confidence"] == 0.95
    comp = report["comparison"]
    expected = stats.mcnemar(correct["pretrained"], correct["scratch"])
    assert comp["test"] == "McNemar" and comp["split"] == "val" and comp["n"] == len(labels)
    assert (comp["pretrained_right_scratch_wrong"], comp["scratch_right_pretrained_wrong"]) == (expected.b, expected.c)
    assert comp["p_value"] == pytest.approx(expected.p_value) and comp["method"] == "exact binomial"


def test_results_table_shows_each_value_with_its_interval(tiny_result):  # noqa: F811
    report = tiny_result.report
    table = results_table(report).set_index("metric")
    for arm in ("pretrained", "scratch"):
        run = report["runs"][arm]
        for label, key in (("validation accuracy", "val_accuracy"), ("balanced accuracy", "balanced_accuracy"),
                           ("precision (macro)", "precision_macro"), ("F1 (macro)", "f1_macro")):
            lo, hi = run[f"{key}_ci"]
            assert table.loc[label, ARM_TITLES[arm]] == f"{run[key]:.1%} ({lo * 100:.1f}–{hi * 100:.1f})"


def test_table_of_a_report_without_intervals_shows_plain_percentages():
    run = {"val_accuracy": 0.948, "balanced_accuracy": 0.9, "precision_macro": 0.9, "recall_macro": 0.9,
           "f1_macro": 0.9, "train_seconds": 1.0, "time_to_target_seconds": 1.0, "best_epoch": 1, "epochs_run": 1,
           "verdict": {"label": "good", "reasons": []}}
    table = results_table({"target_accuracy": 0.85, "runs": {"pretrained": run}}).set_index("metric")
    assert table.loc["validation accuracy", ARM_TITLES["pretrained"]] == "94.8%"


def test_paired_test_sentence_under_the_table_and_in_the_terminal(tiny_result):  # noqa: F811
    report = tiny_result.report
    comp = report["comparison"]
    n = len(tiny_result.val.labels)
    correct = [r.val_probabilities.argmax(1) == tiny_result.val.labels for r in tiny_result.runs.values()]
    plain = stats.mcnemar(*correct, names=tuple(tiny_result.runs)).sentence.removesuffix(".")
    sentence = (f"Is the difference luck? On the same {n} validation images, {plain} "
                "(paired McNemar test, exact binomial).")
    assert speedup_text(report).split("\n\n")[2] == sentence  # the app's Markdown: headline, speed-up, this
    assert sentence in summary_text(report).splitlines()  # the terminal's summary
    one_arm = {**report, "runs": {"pretrained": report["runs"]["pretrained"]}, "comparison": None}
    assert "McNemar" not in speedup_text(one_arm) and "McNemar" not in summary_text(one_arm)
    assert re.search(r"\d+ images? where scratch is wrong|exactly the same images", comp["sentence"])


# ---------------------------------------------------------------- paired difference (core.runtime.intervals)

def _answers(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.r_[np.ones(both + only_a), np.zeros(only_b + neither)].astype(bool)
    b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)].astype(bool)
    return a, b


def test_paired_difference_interval_holds_the_difference_and_mirrors():
    a, b = _answers(150, 9, 3, 38)
    low, high = paired_difference_interval(a, b)
    assert low < (9 - 3) / 200 < high
    assert paired_difference_interval(b, a) == pytest.approx((-high, -low))
    with pytest.raises(ValueError, match="same images"):
        paired_difference_interval(a, b[:-1])


def test_paired_difference_interval_is_narrower_when_the_answers_agree():
    """The same two accuracies (80% vs 75%) are far more certainly apart when the models differ on 10 images than
    when they differ on 90: pairing is the point of the paired interval."""
    close = paired_difference_interval(*_answers(150, 10, 0, 40))
    loose = paired_difference_interval(*_answers(110, 50, 40, 0))
    assert close[1] - close[0] < (loose[1] - loose[0]) / 2
    # 10 images one way and none back is a real difference (McNemar p = 0.002); 50 against 40 is not (p = 0.34)
    assert close[0] > 0 > loose[0]


def test_paired_difference_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    # per image: both right 0.80, only A 0.04, only B 0.02, neither 0.14 -> true difference 0.02
    probabilities, truth, n, hits = [0.80, 0.04, 0.02, 0.14], 0.02, 150, 0
    trials = 400
    for _ in range(trials):
        counts = rng.multinomial(n, probabilities)
        low, high = paired_difference_interval(*_answers(*counts))
        hits += low <= truth <= high
    assert 0.92 <= hits / trials <= 0.99
