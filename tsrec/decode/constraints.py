"""Catalogue constraint tensors for constrained SID decoding (METHOD.md 1.8, requirement R4).

Stage: evaluation and RL rollouts (``tsrec eval``; the RL rollout generator).
Input: a :class:`tsrec.sid.index.SidIndex` (the ``index.json`` of a sids folder) and the tokenizer
of the model, which must map every SID token string to exactly one token id.
Output: :class:`SidConstraints`, a per-level prefix table on the decoding device.

Layout. The distinct catalogue SIDs (all of length L = 3, or 4 with the collision level ``<d_r>``)
form a prefix tree. Level ``l`` has ``N_l`` nodes (``N_0 = 1``: the root; a node of level ``l`` is a
distinct SID prefix of length ``l``) and ``C_l`` candidate codes (the distinct tokens used at level
``l``). ``children[l]`` is a dense ``(N_l, C_l)`` integer table: the node id at level ``l + 1``
reached by appending code ``c`` to node ``n``, or -1 where the catalogue has no such prefix. At the
last level the "node id" is the index of the complete SID in :attr:`SidConstraints.sids`.

A beam carries its node id explicitly, so one ``index_select`` per step gives, for every beam of
every prompt at once, the allowed codes (``child >= 0``) and the next node ids: no Python per beam,
no re-hashing of prefixes, no dependence on how the prompt ends. ``level_token_ids[l]`` maps the
codes of level ``l`` to vocabulary ids, so scoring gathers ``C_l`` columns of the full-vocabulary
log-softmax; disallowed ids are never candidates, which equals masking them to minus infinity.

Collisions (METHOD.md R9): in ``upstream`` handling several items may share one SID. The tree holds
distinct SIDs; :attr:`SidConstraints.items_by_sid` keeps every item of each SID for item-level
reporting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from tsrec.artifacts import InputError
from tsrec.sid.index import TOKEN_RE, SidIndex, sid_string


def _code_key(tok: str) -> tuple[str, int]:
    m = TOKEN_RE.fullmatch(tok)
    return (m.group(1), int(m.group(2))) if m else (tok, -1)


@dataclass
class SidConstraints:
    """The catalogue as per-level child tables (see the module docstring).

    Attributes:
        num_levels: SID length L.
        level_tokens: per level, the code token strings (``C_l`` of them, by code number).
        level_token_ids: per level, ``(C_l,)`` int64 vocabulary ids of those tokens.
        children: per level, ``(N_l, C_l)`` int64 child node ids (-1 = not in the catalogue).
        sids: the distinct catalogue SID strings; leaf ids index this list.
        sid_token_ids: ``(S, L)`` int64 token ids of every SID, row = leaf id.
        items_by_sid: SID string -> every item id carrying it (collisions included).
    """

    num_levels: int
    level_tokens: list[list[str]]
    level_token_ids: list[torch.Tensor]
    children: list[torch.Tensor]
    sids: list[str]
    sid_token_ids: torch.Tensor
    items_by_sid: dict[str, list[int]] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def from_sid_tokens(cls, sid_tokens: Mapping[int, Sequence[str]], token_to_id: Mapping[str, int]) -> SidConstraints:
        """Build from ``item_id -> [level tokens]`` and a ``token string -> vocabulary id`` map.

        Raises:
            ValueError: SIDs of different lengths, a token without an id, or an empty catalogue.
        """
        if not sid_tokens:
            raise ValueError("empty catalogue: no SIDs to constrain decoding to")
        lengths = {len(t) for t in sid_tokens.values()}
        if len(lengths) != 1:
            raise ValueError(f"catalogue SIDs have different lengths {sorted(lengths)}; decoding needs one fixed length")
        L = lengths.pop()
        items_by_sid: dict[str, list[int]] = {}
        tuples: dict[str, tuple[str, ...]] = {}
        for item_id, toks in sorted(sid_tokens.items()):
            s = sid_string(toks)
            items_by_sid.setdefault(s, []).append(int(item_id))
            tuples[s] = tuple(toks)
        level_tokens = [sorted({t[lvl] for t in tuples.values()}, key=_code_key) for lvl in range(L)]
        for toks in level_tokens:
            for t in toks:
                if t not in token_to_id:
                    raise ValueError(f"SID token {t} has no vocabulary id")
        code_of = [{t: c for c, t in enumerate(toks)} for toks in level_tokens]
        # Deterministic node numbering: distinct SIDs sorted by their code tuples.
        ordered = sorted(tuples.values(), key=lambda t: tuple(code_of[lvl][x] for lvl, x in enumerate(t)))
        node_of: list[dict[tuple[str, ...], int]] = [{(): 0}] + [{} for _ in range(L)]
        for toks in ordered:
            for lvl in range(1, L + 1):
                node_of[lvl].setdefault(toks[:lvl], len(node_of[lvl]))
        children = []
        for lvl in range(L):
            table = torch.full((len(node_of[lvl]), len(level_tokens[lvl])), -1, dtype=torch.long)
            for prefix, child in node_of[lvl + 1].items():
                table[node_of[lvl][prefix[:-1]], code_of[lvl][prefix[-1]]] = child
            children.append(table)
        sids = [""] * len(node_of[L])
        sid_ids = torch.empty((len(node_of[L]), L), dtype=torch.long)
        for toks, leaf in node_of[L].items():
            sids[leaf] = sid_string(toks)
            sid_ids[leaf] = torch.tensor([token_to_id[t] for t in toks])
        return cls(
            num_levels=L,
            level_tokens=level_tokens,
            level_token_ids=[torch.tensor([token_to_id[t] for t in toks], dtype=torch.long) for toks in level_tokens],
            children=children,
            sids=sids,
            sid_token_ids=sid_ids,
            items_by_sid={s: items_by_sid[s] for s in sids},
        )

    @classmethod
    def from_index(cls, index: SidIndex, tokenizer, source: str = "index.json") -> SidConstraints:
        """Build from a SID index and the model's tokenizer.

        Every SID token must be exactly one tokenizer id (added as its own token, METHOD.md 1.3),
        otherwise a SID could be decoded that the model never sees as one unit.

        Raises:
            InputError: a SID token is unknown to the tokenizer or splits into several ids.
        """
        token_to_id = {}
        for tok in index.all_tokens():
            ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
            direct = tokenizer.convert_tokens_to_ids(tok)
            if len(ids) != 1 or ids[0] != direct or direct == tokenizer.unk_token_id:
                raise InputError(
                    source,
                    f"SID token {tok} is not a single tokenizer id (got {list(ids)}); add the SID tokens to the "
                    f"tokenizer ({getattr(tokenizer, 'name_or_path', '')}) with `tsrec model init` first",
                    field="sid",
                )
            token_to_id[tok] = int(direct)
        return cls.from_sid_tokens(index.items, token_to_id)

    # ----------------------------------------------------------------------------------------------
    # Use
    # ----------------------------------------------------------------------------------------------

    @property
    def num_sids(self) -> int:
        return len(self.sids)

    @property
    def device(self) -> torch.device:
        return self.sid_token_ids.device

    def to(self, device: torch.device | str) -> SidConstraints:
        """A copy with every table on ``device`` (no copy if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return replace(
            self,
            level_token_ids=[t.to(device) for t in self.level_token_ids],
            children=[t.to(device) for t in self.children],
            sid_token_ids=self.sid_token_ids.to(device),
        )

    def lookup(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Child node ids for every beam: ``nodes`` of any shape ``S`` -> ``S + (C_level,)``.

        Dead beams (node -1) get an all -1 row, i.e. an empty allowed set.
        """
        table = self.children[level]
        rows = table.index_select(0, nodes.clamp(min=0).reshape(-1)).view(*nodes.shape, table.shape[1])
        return rows.masked_fill((nodes < 0).unsqueeze(-1), -1)

    def valid_token_tuples(self) -> set[tuple[int, ...]]:
        """Every catalogue SID as a tuple of token ids (for the invalid-SID count, METHOD.md R10)."""
        return {tuple(r) for r in self.sid_token_ids.tolist()}

    def leaf_matches(self, sid_token_ids: torch.Tensor, sid_index: torch.Tensor) -> torch.Tensor:
        """``(...)`` bool: the decoded ids ``(..., L)`` equal the token tuple of leaf ``sid_index`` (``(...)``).

        A check of the decode against the tables' own leaf numbering: a corrupt child table makes a
        beam's leaf id point at another SID than the tokens it decoded. Dead beams (-1) are False.
        """
        table = self.sid_token_ids.to(sid_token_ids.device)
        leaf = sid_index.clamp(min=0)
        same = (table[leaf] == sid_token_ids).all(-1)
        return same & (sid_index >= 0) & (sid_index < table.shape[0])

    def items_of(self, sid: str) -> list[int]:
        return self.items_by_sid.get(sid, [])

    def python_trie(self) -> dict[tuple[int, ...], list[int]]:
        """``generated prefix ids -> allowed next ids``, as a plain dict (the reference baseline only)."""
        trie: dict[tuple[int, ...], set[int]] = {}
        for row in self.sid_token_ids.tolist():
            for lvl in range(self.num_levels):
                trie.setdefault(tuple(row[:lvl]), set()).add(row[lvl])
        return {k: sorted(v) for k, v in trie.items()}
