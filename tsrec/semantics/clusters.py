"""Token clusters for teacher extraction (METHOD.md 1.4).

The cluster of SID token t at level l is *every catalogue item whose l-th SID token is t*, whatever
its prefix: ``<b_231>`` is one shared vocabulary token, so its cluster mixes items under different
``<a_*>`` prefixes. One teacher record is extracted per token, at every level.

Token order is the order of the authors' teacher files: level by level, and inside a level by first
appearance in item-id order (the Industrial file is exactly this order of its index). Every output
of ``tsrec semantics extract`` follows it.

Large clusters are shown to the teacher as a deterministic sample of ``max_items`` items: items are
ranked by ``sha256(seed:token:item_id)`` and the first ``max_items`` kept, then listed in item-id
order. The sample is recorded with the record (``sample_item_ids``), so a prompt can be rebuilt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tsrec.sid.index import SidIndex, token_level


@dataclass
class TokenCluster:
    """The items that carry ``token`` at its level, and the sample shown to the teacher."""

    token: str
    level: int  # 0-based
    item_ids: list[int]  # every item of the cluster, ascending
    sample_item_ids: list[int] = field(default_factory=list)  # items shown in the prompt, ascending

    @property
    def is_sampled(self) -> bool:
        return len(self.sample_item_ids) < len(self.item_ids)


def token_order(index: SidIndex) -> list[str]:
    """Every SID token of the index, level by level, each level in first-appearance (item-id) order."""
    order: list[str] = []
    for level in range(index.num_levels):
        seen: dict[str, None] = {}
        for toks in index.items.values():  # items are ordered by item id
            if level < len(toks):
                seen.setdefault(toks[level], None)
        order.extend(seen)
    return order


def token_clusters(index: SidIndex) -> dict[str, list[int]]:
    """``token -> ascending item ids`` for every token at every level, in :func:`token_order`."""
    members: dict[str, list[int]] = {t: [] for t in token_order(index)}
    for item_id, toks in index.items.items():
        for tok in toks:
            members[tok].append(item_id)
    return members


def sample_items(token: str, item_ids: list[int], max_items: int, seed: int) -> list[int]:
    """A deterministic sample of at most ``max_items`` items of one cluster (ascending item ids).

    Ranking by a seeded hash of (token, item id), not by position, so the sample does not favour low
    item ids and does not change when unrelated items are added to the catalogue.
    deterministic only with ``run.seed``.
    """
    if max_items <= 0 or len(item_ids) <= max_items:
        return sorted(item_ids)

    def rank(item_id: int) -> str:
        return hashlib.sha256(f"{seed}:{token}:{item_id}".encode()).hexdigest()

    return sorted(sorted(item_ids, key=rank)[:max_items])


def build_clusters(index: SidIndex, max_items: int, seed: int) -> list[TokenCluster]:
    """One :class:`TokenCluster` per SID token, in :func:`token_order`.

    Args:
        index: the SID index.
        max_items: most items shown per prompt (``teacher.max_items_per_prompt``; 0 = all).
        seed: sampling seed (``run.seed``).
    """
    return [
        TokenCluster(token=tok, level=token_level(tok), item_ids=ids, sample_item_ids=sample_items(tok, ids, max_items, seed))
        for tok, ids in token_clusters(index).items()
    ]


def first_per_level(clusters: list[TokenCluster], n: int) -> list[TokenCluster]:
    """``n`` clusters taken from the levels in turn (level 0's first, level 1's first, ..., then each level's second),
    each level in its own order; returned in the input order. A limit that took the first ``n`` in token order
    would give only level-0 tokens semantics, and every SA-Init depth above 1 the same model."""
    by_level: dict[int, list[TokenCluster]] = {}
    for c in clusters:
        by_level.setdefault(c.level, []).append(c)
    chosen: set[str] = set()
    queues = [list(reversed(q)) for _, q in sorted(by_level.items())]
    while len(chosen) < min(n, len(clusters)):
        for q in queues:
            if q and len(chosen) < n:
                chosen.add(q.pop().token)
    return [c for c in clusters if c.token in chosen]


def cluster_stats(clusters: list[TokenCluster]) -> dict[str, dict[str, float]]:
    """Tokens, mean / min / max items per token and sampled tokens, per level (``level_0`` ...)."""
    out: dict[str, dict[str, float]] = {}
    for level in sorted({c.level for c in clusters}):
        sizes = [len(c.item_ids) for c in clusters if c.level == level]
        out[f"level_{level}"] = {
            "tokens": len(sizes),
            "mean_items": sum(sizes) / len(sizes),
            "min_items": min(sizes),
            "max_items": max(sizes),
            "sampled_tokens": sum(1 for c in clusters if c.level == level and c.is_sampled),
        }
    return out
