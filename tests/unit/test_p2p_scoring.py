import random

import pytest

from p2p.scoring import BAN_THRESHOLD, MAX_SCORE, SCORE_DELTAS, PeerEvent, PeerScores, next_score, peers_to_drop
from p2p.throttle import TokenBucket


def test_one_corrupt_blob_bans_a_peer_at_once():
    scores = PeerScores()
    for _ in range(10):
        scores.record("good", PeerEvent.BLOB_SERVED)
    assert scores.record("good", PeerEvent.BLOB_CORRUPT) is True
    assert scores.is_banned("good")


def test_two_junk_messages_ban_a_fresh_peer_and_one_does_not():
    scores = PeerScores()
    assert scores.record("p", PeerEvent.JUNK_MESSAGE) is False
    assert not scores.is_banned("p")
    assert scores.record("p", PeerEvent.JUNK_MESSAGE) is True
    assert scores.record("p", PeerEvent.JUNK_MESSAGE) is False  # reported once, stays banned
    assert scores.is_banned("p")


def test_scores_match_a_naive_running_sum_with_a_ceiling():
    rng = random.Random(0)
    events = [rng.choice([PeerEvent.BLOB_SERVED, PeerEvent.TRANSFER_FAILED, PeerEvent.FALSE_HAVE]) for _ in range(300)]
    scores = PeerScores()
    expected = 0.0
    for event in events:
        scores.record("p", event)
        expected = min(MAX_SCORE, expected + SCORE_DELTAS[event])
        assert scores.score("p") == expected
    assert scores.is_banned("p") == (min(_running(events)) < BAN_THRESHOLD)


def _running(events):
    score = 0.0
    for event in events:
        score = next_score(score, event)
        yield score


def test_transient_failures_alone_take_many_rounds_to_ban():
    scores = PeerScores()
    num_failures = 0
    while not scores.is_banned("slow"):
        scores.record("slow", PeerEvent.TRANSFER_FAILED)
        num_failures += 1
    assert num_failures > 20


def test_peers_to_drop_removes_the_lowest_scored_beyond_the_bound_but_never_a_seed():
    scores = PeerScores()
    scores.scores.update({"a": 5.0, "b": -3.0, "c": 1.0, "seed": -40.0})
    connected = ["a", "b", "c", "d", "seed"]
    assert peers_to_drop(connected, scores, max_peers=2, keep={"seed"}) == ["b", "d"]  # d is unscored: 0
    assert peers_to_drop(connected, scores, max_peers=4, keep={"seed"}) == []


@pytest.mark.parametrize("rate,burst", [(100.0, 10.0), (1e6, 65536.0)])
def test_token_bucket_matches_a_naive_reference(rate, burst):
    rng = random.Random(1)
    bucket = TokenBucket(rate=rate, burst=burst, level=burst, updated_at=0.0)
    level, updated_at, now = burst, 0.0, 0.0
    for _ in range(200):
        now += rng.random() * burst / rate
        amount = rng.random() * burst * 1.5
        delay = bucket.take(amount, now)
        level = min(burst, level + (now - updated_at) * rate) - amount
        updated_at = now
        assert bucket.level == level
        assert delay == (0.0 if level >= 0 else -level / rate)


def test_token_bucket_paces_a_long_upload_to_its_rate():
    bucket = TokenBucket(rate=1000.0, burst=100.0, level=100.0, updated_at=0.0)
    now = 0.0
    for _ in range(50):
        now += bucket.take(100.0, now)
    assert now == pytest.approx(4.9)  # 5000 bytes at 1000 B/s, the first 100 from the burst
