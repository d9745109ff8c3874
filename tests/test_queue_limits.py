"""Per-session queue limits: counted from the queue and from the moment a request is let in."""

from __future__ import annotations

import threading

from core.queue_limits import QueueLimits


def test_a_session_at_its_limit_is_refused_and_others_are_not():
    queued = [("a", "train")]
    limits = QueueLimits({"train": 1, "predict": 2}, lambda: queued, window_s=0.0)
    assert not limits.admit("a", "train")  # its one training is waiting
    assert limits.admit("b", "train")  # another session is not affected
    assert limits.admit("a", "predict") and limits.admit("a", "other-group")
    queued.clear()
    assert limits.admit("a", "train")  # its training finished


def test_requests_arriving_together_pass_only_up_to_the_limit():
    limits = QueueLimits({"train": 1, "predict": 3}, lambda: [], window_s=5.0)  # none shows in the queue yet
    start, results = threading.Barrier(12), []

    def join(group: str) -> None:
        start.wait()
        results.append((group, limits.admit("a", group)))

    threads = [threading.Thread(target=join, args=(g,)) for g in ["train"] * 6 + ["predict"] * 6]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(ok for g, ok in results if g == "train") == 1
    assert sum(ok for g, ok in results if g == "predict") == 3


def test_the_refusal_names_the_count():
    limits = QueueLimits({"train": 1, "predict": 8})
    assert limits.refusal("train", "training").startswith("You already have a training waiting")
    assert "8 predictions" in limits.refusal("predict", "prediction")
