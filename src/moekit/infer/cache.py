"""Which experts stay in memory: the replacement policies (LRU, LFU, Belady's MIN), the cache decisions
shared by the live cache and by trace replay, and the expert trace.

Keys are (layer, expert). The cache holds ``capacity`` experts (all experts of a model have one size, so
a byte budget is a slot count). Decisions are a pure function of the event sequence:
- ``access(key)``: a layer call needs ``key`` now (hit if resident, else a miss that may evict). Keys
  accessed in the current group (one layer call, or one chunk of it) are pinned until ``end_group``;
- ``prefetch(key)``: insert ``key`` ahead of its layer, only into a free slot or over an unpinned,
  unheld entry; a prefetched entry is held (not evictable by other prefetches) until its layer's group ends;
- ``end_group(layer)``: release the pins and the holds for ``layer``; with ``retain=False`` (budget 0) the
  unpinned entries are dropped, so nothing is reused across calls (the no-cache baseline).
The live cache (moekit.infer.offload) calls exactly these, in the main thread, and records them as a
trace; :func:`replay` feeds a trace through any policy, so a replay through the live policy gives the
live hit counts exactly, and Belady's MIN (evict the entry whose next access is farthest) the optimum.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LFU", "LRU", "POLICIES", "Belady", "CacheCore", "Policy", "Trace", "make_policy", "replay"]

Key = tuple[int, int]


class Policy(abc.ABC):
    """Chooses the victim among evictable resident keys; sees every access and insertion in order."""

    name = "base"

    def __init__(self) -> None:
        self.t = 0
        self.last: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        self.t += 1
        self.last[key] = self.t

    def on_insert(self, key: Key, prefetch: bool) -> None:
        self.t += 1
        self.last[key] = self.t

    @abc.abstractmethod
    def victim(self, candidates: list[Key]) -> Key:
        """The key to evict among ``candidates``."""


class LRU(Policy):
    """Least recently used. A prefetched entry goes in at the cold end: it is a guess, so until its layer
    uses it (which moves it to the front) it is the first to go, and a wrong guess never displaces an
    expert that was really used."""

    name = "lru"

    def on_insert(self, key: Key, prefetch: bool) -> None:
        self.t += 1
        self.last[key] = -self.t if prefetch else self.t

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: self.last[k])


class LFU(Policy):
    """Least frequently used: demand accesses counted over the whole run (evicted keys keep their count);
    ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.freq: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.freq[key] = self.freq.get(key, 0) + 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.freq.get(k, 0), self.last[k]))


class Belady(Policy):
    """Belady's MIN: evict the key whose next demand access is farthest in the future (never = infinity).
    Optimal for a demand-only sequence of equal-size entries; needs the whole sequence up front."""

    name = "min"

    def __init__(self, accesses: list[Key]) -> None:
        super().__init__()
        self.pos = 0  # index of the next demand access
        self.next_use: list[int] = [0] * len(accesses)
        seen: dict[Key, int] = {}
        for i in range(len(accesses) - 1, -1, -1):
            self.next_use[i] = seen.get(accesses[i], 1 << 62)
            seen[accesses[i]] = i
        self.upcoming: dict[Key, int] = {}  # key -> position of its next access after the current one
        self.first = dict(sorted(((k, i) for k, i in seen.items()), key=lambda kv: kv[1]))

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.upcoming[key] = self.next_use[self.pos]
        self.pos += 1

    def victim(self, candidates: list[Key]) -> Key:
        return max(candidates, key=lambda k: self.upcoming.get(k, self.first.get(k, 1 << 62)))


POLICIES = ("lru", "lfu")


def make_policy(name: str) -> Policy:
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    raise ValueError(f"expert cache policy {name!r} must be one of {', '.join(POLICIES)}")


class CacheCore:
    """The decisions of an expert cache of ``capacity`` entries (see the module docstring)."""

    def __init__(self, capacity: int, policy: Policy, retain: bool = True):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 expert")
        self.capacity, self.policy, self.retain = capacity, policy, retain
        self.resident: set[Key] = set()
        self.pinned: set[Key] = set()
        self.held: set[Key] = set()  # prefetched, not yet used by their layer's call
        self.hits = self.accesses = self.prefetches = 0

    def _evictable(self, allow_held: bool) -> list[Key]:
        return [k for k in self.resident if k not in self.pinned and (allow_held or k not in self.held)]

    def access(self, key: Key) -> tuple[bool, Key | None]:
        """(hit, evicted key or None). Raises if every slot is pinned by the current group."""
        self.accesses += 1
        self.policy.on_access(key)
        self.held.discard(key)
        if key in self.resident:
            self.hits += 1
            self.pinned.add(key)
            return True, None
        victim = None
        if len(self.resident) >= self.capacity:
            cands = self._evictable(False) or self._evictable(True)  # demand beats a prefetch
            if not cands:
                raise RuntimeError(f"expert cache: all {self.capacity} slots are pinned by the current call")
            victim = self.policy.victim(cands)
            self.resident.discard(victim)
            self.held.discard(victim)
        self.resident.add(key)
        self.pinned.add(key)
        return False, victim

    def prefetch(self, key: Key) -> tuple[bool, Key | None]:
        """(inserted, evicted key or None); never evicts a pinned or held entry."""
        if key in self.resident:
            if key not in self.pinned:
                self.held.add(key)
            return False, None
        victim = None
        if len(self.resident) >= self.capacity:
            cands = self._evictable(False)
            if not cands:
                return False, None
            victim = self.policy.victim(cands)
            self.resident.discard(victim)
        self.prefetches += 1
        self.policy.on_insert(key, True)
        self.resident.add(key)
        self.held.add(key)
        return True, victim

    def end_group(self, layer: int) -> list[Key]:
        """Release the group's pins and ``layer``'s holds; returns the keys dropped (retain=False)."""
        self.pinned.clear()
        self.held = {k for k in self.held if k[0] != layer}
        if self.retain:
            return []
        dropped = [k for k in self.resident if k not in self.held]
        self.resident.difference_update(dropped)
        return dropped


@dataclass
class Trace:
    """The cache events of a run: ``("a", layer, expert)`` access, ``("p", layer, expert)`` prefetch,
    ``("e", layer, -1)`` end of a group; plus the live cache's settings and counts."""

    capacity: int
    policy: str
    retain: bool = True
    expert_bytes: int = 0
    events: list[tuple[str, int, int]] = field(default_factory=list)
    live: dict[str, Any] = field(default_factory=dict)
    record: bool = True  # False: events are not kept (a server runs for days; its trace would only grow)

    def add(self, kind: str, layer: int, expert: int) -> None:
        if self.record:
            self.events.append((kind, layer, expert))

    def accesses(self) -> list[Key]:
        return [(l, e) for k, l, e in self.events if k == "a"]

    def save(self, path: str | os.PathLike[str]) -> Path:
        from moekit.rundir import atomic_write

        d = {"capacity": self.capacity, "policy": self.policy, "retain": self.retain,
             "expert_bytes": self.expert_bytes, "live": self.live, "events": [list(ev) for ev in self.events]}
        return atomic_write(path, json.dumps(d) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trace:
        d = json.loads(Path(path).read_text())
        return cls(d["capacity"], d["policy"], d.get("retain", True), d.get("expert_bytes", 0),
                   [tuple(ev) for ev in d["events"]], d.get("live", {}))


def replay(trace: Trace, policy: str | Policy = "min", capacity: int | None = None, *,
           prefetch: bool | None = None) -> dict[str, Any]:
    """Hit counts of ``trace`` replayed through ``policy`` ("lru", "lfu", "min" or a Policy) at ``capacity``
    (default: the live one). ``prefetch``: replay the prefetch events too (default: yes, except for
    MIN, which is the optimum of the demand sequence alone)."""
    if isinstance(policy, str):
        pol = Belady(trace.accesses()) if policy == "min" else make_policy(policy)
    else:
        pol = policy
    use_prefetch = (pol.name != "min") if prefetch is None else prefetch
    core = CacheCore(capacity or trace.capacity, pol, trace.retain)
    per_layer: dict[int, list[int]] = {}
    for kind, layer, expert in trace.events:
        if kind == "a":
            hit, _ = core.access((layer, expert))
            c = per_layer.setdefault(layer, [0, 0])
            c[0] += hit
            c[1] += 1
        elif kind == "p" and use_prefetch:
            core.prefetch((layer, expert))
        elif kind == "e":
            core.end_group(layer)
    return {"policy": pol.name, "capacity": core.capacity, "hits": core.hits, "accesses": core.accesses,
            "hit_rate": core.hits / max(core.accesses, 1),
            "per_layer": {l: {"hits": h, "accesses": a} for l, (h, a) in sorted(per_layer.items())}}
