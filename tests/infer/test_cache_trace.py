"""The cache's decisions: trace replay equals the live counts; Belady's MIN against brute force and by hand."""
from __future__ import annotations

import pytest
import torch

from moekit.infer.cache import LFU, LRU, Belady, CacheCore, Trace, replay
from moekit.infer.generate import generate
from moekit.infer.offload import load_offloaded

from .conftest import EXPERT_BYTES, prompts


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_replay_equals_live(checkpoints, tmp_path, policy, prefetch):
    ids, mask = prompts()
    om = load_offloaded(checkpoints["moekit"], 4 * EXPERT_BYTES, policy=policy, prefetch=prefetch)
    with torch.no_grad():
        generate(om.model, ids, 12, temperature=0, attention_mask=mask)
    st = om.stats()
    path = om.save_trace(tmp_path / "trace.json")
    om.close()
    trace = Trace.load(path)
    r = replay(trace, policy)
    assert (r["hits"], r["accesses"]) == (st["hits"], st["accesses"])
    assert r["per_layer"] == {l: {"hits": s["hits"], "accesses": s["accesses"]} for l, s in st["per_layer"].items()}
    assert trace.live == {"hits": st["hits"], "accesses": st["accesses"]}
    if not prefetch:  # a demand-only run is also its own demand-only replay
        assert replay(trace, policy, prefetch=False)["hits"] == st["hits"]
    opt = replay(trace, "min")
    demand_only = replay(trace, policy, prefetch=False)
    assert opt["accesses"] == st["accesses"] and opt["hits"] >= demand_only["hits"]
    # a larger cache never loses under MIN
    assert replay(trace, "min", trace.capacity + 4)["hits"] >= opt["hits"]


def _events(seq: list[int]) -> list[tuple[str, int, int]]:
    """One access per group (a decode of top-1 experts of one layer), keys (0, e)."""
    return [ev for e in seq for ev in (("a", 0, e), ("e", 0, -1))]


def _brute_force_hits(seq: list[int], capacity: int) -> int:
    """Max hits over every eviction choice (exhaustive search)."""
    best = 0

    def go(i: int, cache: frozenset, hits: int) -> None:
        nonlocal best
        if hits + (len(seq) - i) <= best:
            return
        if i == len(seq):
            best = max(best, hits)
            return
        x = seq[i]
        if x in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < capacity:
            go(i + 1, cache | {x}, hits)
        else:
            for v in cache:
                go(i + 1, (cache - {v}) | {x}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_hand_worked():
    """Capacity 3, sequence 1 2 3 4 1 2 5 1 2 3 4 5 (positions 1..12). MIN: 1 2 3 cold misses; 4 evicts 3
    (next use 10, later than 1 at 5 and 2 at 6); 1, 2 hit; 5 evicts 4 (next use 11; 1 at 8, 2 at 9); 1, 2
    hit; 3 evicts 1 (never used again); 4 evicts 2; 5 hits: 5 hits, 7 misses. LRU hits only 1 and 2 at 8, 9."""
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    r = replay(Trace(3, "lru", events=_events(seq)), "min")
    assert (r["hits"], r["accesses"]) == (5, 12)
    assert replay(Trace(3, "lru", events=_events(seq)), "lru")["hits"] == 2  # hits: 1 at 8, 2 at 9


@pytest.mark.parametrize("seed", range(6))
def test_belady_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 5, (11,), generator=g).tolist()
    for capacity in (1, 2, 3):
        r = replay(Trace(capacity, "lru", events=_events(seq)), "min")
        assert r["hits"] == _brute_force_hits(seq, capacity), (seq, capacity)
        for pol in ("lru", "lfu"):
            assert replay(Trace(capacity, pol, events=_events(seq)), pol)["hits"] <= r["hits"]


def test_pins_and_prefetch_rules():
    core = CacheCore(2, LRU())
    assert core.access((0, 1)) == (False, None)
    assert core.access((0, 2)) == (False, None)
    with pytest.raises(RuntimeError, match="pinned"):
        core.access((0, 3))  # both slots pinned by the current call
    core = CacheCore(2, LRU())
    core.access((0, 1))
    core.access((0, 2))
    core.end_group(0)
    assert core.prefetch((1, 5)) == (True, (0, 1))  # the least recently used goes
    assert core.prefetch((1, 6)) == (True, (0, 2))
    assert core.prefetch((1, 7)) == (False, None)  # never over another prefetch
    assert core.access((1, 5)) == (True, None)
    lfu = CacheCore(2, LFU())
    for e in (1, 1, 2, 3):
        lfu.access((0, e))
        lfu.end_group(0)
    assert lfu.resident == {(0, 1), (0, 3)}  # 2 (one use, older than 3) was evicted, not 1 (two uses)


def test_belady_policy_alone():
    """1 2 1 3 1 2, two slots: at 3, MIN evicts 2 (next used at 6) and keeps 1 (used at 5)."""
    seq = [(0, e) for e in (1, 2, 1, 3, 1, 2)]
    core = CacheCore(2, Belady(seq))
    hits = []
    for k in seq:
        hits.append(core.access(k)[0])
        core.end_group(0)
    assert hits == [False, False, True, False, True, False]


def test_lru_evicts_an_unused_prefetch_first():
    """3 slots: experts 1, 2 used; a prefetch of 5 for layer 1 guesses wrong (layer 1 uses 6). Once layer 1's
    call is over, the next miss evicts the wrong guess, not 2 (older, but really used); a right guess
    counts as recently used from its use on."""
    core = CacheCore(3, LRU())
    for e in (1, 2):
        core.access((0, e))
        core.end_group(0)
    assert core.prefetch((1, 5)) == (True, None)
    assert core.access((1, 6)) == (False, (0, 1))  # the guess is held through its layer's call
    core.end_group(1)
    assert core.access((0, 9)) == (False, (1, 5))  # plain LRU would have evicted (0, 2)
    core.end_group(0)
    assert core.prefetch((1, 7)) == (True, (0, 2))
    assert core.access((1, 7)) == (True, None)
    core.end_group(1)
    assert core.access((0, 3)) == (False, (1, 6))  # 7, used after 6, stays
