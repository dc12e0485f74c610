"""RL prompts (METHOD.md 1.7): the four RL tasks, every sample carrying its own target SID (R8).

Stage: RL. Inputs: a prepared data folder (``items.parquet`` with ``title``, ``description`` and, for
MiniOneRec sources, ``description_raw``; ``train.parquet``) and a SID folder
(``index.json``). Every prompt comes from :mod:`tsrec.prompts` with ``stage="rl"`` (in ``upstream``
mode: no preamble, METHOD.md 1.7; in ``canonical`` mode: the SFT wording with preamble).

Tasks (``rl.tasks``):

| task | INPUT | samples |
|---|---|---|
| ``sid_history`` | SID history -> SID (``next_sid`` template) | one per train row |
| ``title`` | ``Which item has the title: {title}?`` | one per distinct (title, SID) |
| ``description`` | ``An item can be described as follows: "{desc}". ...`` | one per distinct non-empty (description, SID) |
| ``title_history`` | ``Given the title sequence ...: {T}, ...`` | ``rl.title_history_rows`` train rows |

Differences from the public code, all from R8: the public code keys targets by prompt text, so one
prompt has one target (the last item wins) and all items without a description share one ``""``
prompt. Here a sample is (prompt, target): identical prompts with different targets stay separate
samples, an identical (prompt, target) pair is kept once for the per-item tasks (title, description),
and items whose description is empty are dropped (counted in ``dropped``). The ``sid_history`` and
``title_history`` tasks keep every (sampled) train row, like the public code, even when two rows give
the same prompt and target.

"Processed description" (METHOD.md 1.7; :func:`processed_description`), computed from
``description_raw`` when the data has it (MiniOneRec sources), else the ``description`` column. In
``upstream`` mode: the first element of the stringified list when the raw string starts with ``['``
and ends with ``']``, otherwise the raw string (2,870 distinct on Industrial, as METHOD.md says; note
that 608 Industrial items, not only the 229 with no description, get an empty one, because 379 lists
start with an empty element). In ``canonical`` mode: the first non-blank element, so those 379 items
keep a description. Blank descriptions are dropped in both modes (R8).
The title-history rows are ``numpy.random.RandomState(seed).choice(n, k, replace=False)``, which is what
pandas ``sample(k, random_state=seed)`` draws (public: k = 10,000, seed 0).

Usage::

    rl = build_rl_data(cfg, data_dir, sids_dir)
    rl.counts      # {"sid_history": 36259, "title": ..., "description": ..., "title_history": 10000}
    batch = tokenize_rl(tokenizer, rl.train[:4])
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrec import prompts
from tsrec.artifacts import InputError
from tsrec.data.schema import item_sid, read_items, read_split, split_rows  # the split readers SFT uses too
from tsrec.sid.index import SidIndex, read_index, split_sid

RL_TASKS = ("sid_history", "title", "description", "title_history")
# RL task -> prompt template name in tsrec.prompts.
TEMPLATE_OF_TASK = {
    "sid_history": "next_sid",
    "title": "title_to_sid",
    "description": "description_to_sid",
    "title_history": "title_history_to_sid",
}

_ELEMENT_SEP = re.compile(r"""['"]\s*,\s*['"]""")


@dataclass(frozen=True)
class RlSample:
    """One RL prompt with its own target (R8). ``prompt.target`` is the target SID string."""

    task: str  # one of RL_TASKS
    prompt: prompts.PromptSample
    target_item: int  # an item carrying the target SID (the first in item-id order for per-item tasks)

    @property
    def target_sid(self) -> str:
        return self.prompt.target


@dataclass
class RlData:
    """RL train prompts (shuffled once with ``run.seed``) and counts for the manifest."""

    train: list[RlSample]
    counts: dict[str, int] = field(default_factory=dict)  # per task, in RL_TASKS order
    dropped: dict[str, int] = field(default_factory=dict)  # why samples were not made, e.g. empty descriptions


@dataclass
class TokenizedRlSample:
    """Prompt ids (tokenised as :func:`tsrec.prompts.encode_prompt`) and the target SID's token ids."""

    prompt_ids: list[int]
    target_ids: list[int]
    task: str


def build_rl_data(cfg, data_dir: str | Path, sids_dir: str | Path) -> RlData:
    """Read a data folder and SID index and build the RL prompts (see the module docstring).

    Args:
        cfg: the full config (reads ``rl.tasks``, ``rl.title_history_rows``, ``rl.title_history_seed``,
            ``prompts.mode``, ``run.seed``).
        data_dir: prepared data folder.
        sids_dir: folder with ``index.json`` (or the index file).

    Raises:
        ValueError: an unknown task name in ``rl.tasks``.
        InputError: an item of a split has no SID.
    """
    rl, mode, seed = cfg.rl, cfg.prompts.mode, cfg.run.seed
    unknown = [t for t in rl.tasks if t not in RL_TASKS]
    if unknown:
        raise ValueError(f"rl.tasks: unknown task(s) {unknown}; known: {list(RL_TASKS)}")
    items = read_items(data_dir)
    item_ids = items.column("item_id").to_pylist()
    titles = dict(zip(item_ids, items.column("title").to_pylist()))
    desc_col = "description_raw" if "description_raw" in items.column_names else "description"
    descriptions = dict(zip(item_ids, (processed_description(d or "", mode) for d in items.column(desc_col).to_pylist())))
    index = read_index(sids_dir)
    train_path = Path(data_dir) / "train.parquet"
    train_rows = split_rows(read_split(data_dir, "train"))

    by_task: dict[str, list[RlSample]] = {}
    dropped: dict[str, int] = {}
    if "sid_history" in rl.tasks:
        by_task["sid_history"] = sid_history_samples(train_rows, index, mode, train_path)
    if "title" in rl.tasks:
        by_task["title"] = title_samples(titles, index, mode)
    if "description" in rl.tasks:
        by_task["description"], dropped["empty_description_items"] = description_samples(descriptions, index, mode)
    if "title_history" in rl.tasks:
        by_task["title_history"] = title_history_samples(train_rows, titles, index, mode, train_path,
                                                         rl.title_history_rows, rl.title_history_seed)
    train = [s for t in RL_TASKS for s in by_task.get(t, [])]
    random.Random(seed).shuffle(train)

    # The valid rows the loop scores are the evaluation's (tsrec.train.ranking.valid_ranking_rows), not RL prompts.
    return RlData(train=train, counts={t: len(by_task.get(t, [])) for t in RL_TASKS}, dropped=dropped)


def processed_description(raw: str, mode: str = "upstream") -> str:
    """The RL description of an item from its raw description string (see the module docstring).

    ``upstream``: the public code's processing, exactly: the first element of a ``['...']`` list literal
    (not stripped), the raw string when it is not such a literal or does not parse (16 Industrial
    strings with unbalanced quotes). On Industrial this gives the 2,870 distinct descriptions of
    METHOD.md 1.7, of which one is empty.
    ``canonical``: the first non-blank element, stripped; unparsable literals are split on the
    quote-comma-quote separator. Lists that start with an empty element (``['', 'text']``, 379 items
    on Industrial) keep their text instead of becoming empty.
    """
    if not (raw.startswith("['") and raw.endswith("']")):
        return raw if mode == "upstream" else raw.strip()
    try:
        value = ast.literal_eval(raw)  # literals only: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if mode == "upstream":
        return str(value[0]) if isinstance(value, list) and value else raw
    parts = [str(v) for v in value] if isinstance(value, list) else _ELEMENT_SEP.split(raw[2:-2])
    return next((x.strip() for x in parts if x.strip()), "")


def sid_history_samples(rows: Sequence[tuple[list[int], int]], index: SidIndex, mode: str, source: Path) -> list[RlSample]:
    """SID history -> SID: one sample per row, each with that row's own target (R8)."""
    out = []
    for i, (hist, target) in enumerate(rows):
        p = prompts.next_sid([item_sid(index, h, source, i) for h in hist], item_sid(index, target, source, i), mode=mode, stage="rl")
        out.append(RlSample("sid_history", p, int(target)))
    return out


def title_samples(titles: dict[int, str], index: SidIndex, mode: str) -> list[RlSample]:
    """title -> SID: one sample per distinct (title, SID), items in id order (the first item names it)."""
    out, seen = [], set()
    for item_id, title in titles.items():
        if item_id not in index.items or not title.strip():
            continue
        key = (title, index.sid(item_id))
        if key not in seen:
            seen.add(key)
            out.append(RlSample("title", prompts.title_to_sid(title, key[1], mode=mode, stage="rl"), int(item_id)))
    return out


def description_samples(descriptions: dict[int, str], index: SidIndex, mode: str) -> tuple[list[RlSample], int]:
    """description -> SID: one per distinct non-empty (description, SID); returns (samples, items dropped as empty)."""
    out, seen, empty = [], set(), 0
    for item_id, desc in descriptions.items():
        if item_id not in index.items:
            continue
        if not desc.strip():
            empty += 1  # R8: no shared "" prompt scored against one arbitrary item
            continue
        key = (desc, index.sid(item_id))
        if key not in seen:
            seen.add(key)
            out.append(RlSample("description", prompts.description_to_sid(desc, key[1], mode=mode, stage="rl"), int(item_id)))
    return out, empty


def title_history_samples(rows: Sequence[tuple[list[int], int]], titles: dict[int, str], index: SidIndex, mode: str,
                          source: Path, n_rows: int, seed: int) -> list[RlSample]:
    """title history -> SID for ``n_rows`` train rows drawn as pandas ``sample(n_rows, random_state=seed)``.

    ``n_rows`` <= 0 or >= the number of rows takes every row in order.
    """
    picked = range(len(rows))
    if 0 < n_rows < len(rows):
        picked = np.random.RandomState(seed).choice(len(rows), size=n_rows, replace=False).tolist()
    out = []
    for i in picked:
        hist, target = rows[i]
        try:
            hist_titles = [titles[h] for h in hist]
        except KeyError as e:
            raise InputError(source, f"history item {e.args[0]} is not in items.parquet", row=i, field="history_item_ids") from None
        p = prompts.title_history_to_sid(hist_titles, item_sid(index, target, source, i), mode=mode, stage="rl")
        out.append(RlSample("title_history", p, int(target)))
    return out


def tokenize_rl(tokenizer, samples: Sequence[RlSample]) -> list[TokenizedRlSample]:
    """Prompt ids (:func:`tsrec.prompts.encode_prompt`, the ids SFT trains on) and target SID token ids.

    In ``upstream`` mode the prompt is one segment, so this equals tokenising the whole prompt string
    with ``add_special_tokens=False`` (METHOD.md 1.7).

    Raises:
        ValueError: a target SID token is not a single vocabulary id (SID tokens not added).
    """
    out = []
    for s in samples:
        toks = split_sid(s.target_sid)
        ids = tokenizer.convert_tokens_to_ids(toks)
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"target SID {s.target_sid} has tokens unknown to the tokenizer; add the SID tokens first")
        out.append(TokenizedRlSample(prompts.encode_prompt(tokenizer, s.prompt), [int(i) for i in ids], s.task))
    return out
