"""SFT task mixture (METHOD.md 1.6): next-SID, item alignment, SID history -> title, TS-Align.

Inputs: a prepared data folder (``items.parquet``, ``train.parquet``, ``valid.parquet``; see
``tsrec.data.schema``), a SID folder (``index.json``, ``tsrec.sid.index.read_index``) and, for
TS-Align, a teacher file (``description_keywords.json``: ``[{token, description, keywords}]``).
Every prompt comes from ``tsrec.prompts``, the builder RL and evaluation also use.

Counts follow the public code (METHOD.md 1.6): task 1 and task 3 give one sample per train row;
task 2 gives one sample per distinct title (2a, title -> SID) and one per distinct SID (2b, SID ->
title), where the last item (in item-id order) wins each key; task 3's target is the title of the last
catalogue item carrying the target SID; TS-Align gives two samples per teacher record.

Task weights (``sft.tasks.<name>``):
- ``share``: a multiplier on the task's natural size. ``1.0`` keeps every sample once (all shares 1.0 =
  the natural concatenation of the public code); ``0.5`` keeps a seeded random half; ``2.5`` keeps
  every sample twice plus a seeded random half. Deterministic for a given ``run.seed``.
- ``loss_weight``: multiplies the per-token loss of the task's response tokens (see ``packing.py``).

The mixture is shuffled once with ``run.seed`` (the public code: seed 42). Validation is task 1 on the
valid split, capped at ``sft.max_eval_samples`` rows (the first rows, so it is stable).

Usage::

    mix = build_mixture(cfg, data_dir, sids_dir, semantics_file)
    train = tokenize_samples(tokenizer, mix.train, cfg.sft.cutoff_len)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tsrec import prompts
from tsrec.artifacts import InputError
from tsrec.config import Config, ConfigError, SftConfig
from tsrec.data.schema import item_sid, read_items, read_split, split_rows
from tsrec.semantics.records import read_teacher_file
from tsrec.semantics.ts_align import ts_align_samples
from tsrec.sid.index import SidIndex, read_index

# Mixture task name -> config field of ``sft.tasks``. PromptSample.task holds the prompt-template name.
TASK_OF_TEMPLATE = {
    "next_sid": "next_sid",
    "title_to_sid": "item_sid",
    "sid_to_title": "item_sid",
    "history_to_title": "history_title",
    "token_to_description": "ts_align",
    "description_to_token": "ts_align",
}
TASK_NAMES = ("next_sid", "item_sid", "history_title", "ts_align")


@dataclass
class Mixture:
    """Prompt samples of the SFT mixture (train, shuffled) and the validation set (next-SID on valid)."""

    train: list[prompts.PromptSample]
    valid: list[prompts.PromptSample]
    natural_counts: dict[str, int] = field(default_factory=dict)  # per task, before share resampling
    counts: dict[str, int] = field(default_factory=dict)  # per task, after resampling


@dataclass
class TokenizedSample:
    """One tokenised SFT sample; ``labels`` are -100 on the prompt. ``task`` is a ``sft.tasks`` name."""

    input_ids: list[int]
    labels: list[int]
    task: str
    loss_weight: float = 1.0


def build_mixture(cfg: Config, data_dir: str | Path, sids_dir: str | Path, semantics_file: str | Path | None) -> Mixture:
    """Read inputs and build the shuffled SFT mixture plus validation samples (METHOD.md 1.6).

    Args:
        cfg: the full config (reads ``sft``, ``prompts.mode`` and ``run.seed``).
        data_dir: prepared data folder.
        sids_dir: folder with ``index.json`` (or the index file itself).
        semantics_file: teacher file for TS-Align; ignored when ``sft.use_ts_align`` is false. A missing
            file with ``use_ts_align`` on raises :class:`InputError`.
    """
    mode = cfg.prompts.mode
    # --- 1. read inputs ---
    items = read_items(data_dir)
    item_ids = items.column("item_id").to_pylist()
    titles = dict(zip(item_ids, items.column("title").to_pylist()))
    index = read_index(sids_dir)
    train_rows = split_rows(read_split(data_dir, "train"))
    valid_rows = split_rows(read_split(data_dir, "valid"))
    records = None
    if cfg.sft.use_ts_align:
        if semantics_file is None or not Path(semantics_file).exists():
            raise InputError(semantics_file or "<none>", "teacher file missing; set sft.use_ts_align=false to train without TS-Align")
        records = read_teacher_file(semantics_file)

    # --- 2. per-task samples ---
    by_task: dict[str, list[prompts.PromptSample]] = {
        "next_sid": next_sid_samples(train_rows, index, mode, Path(data_dir) / "train.parquet"),
        "item_sid": item_alignment_samples(titles, index, mode),
        "history_title": history_title_samples(train_rows, titles, index, mode, Path(data_dir) / "train.parquet"),
        "ts_align": ts_align_samples(records, mode) if records is not None else [],
    }
    natural = {k: len(v) for k, v in by_task.items()}

    # --- 3. share resampling, then one shuffle (seeded) ---
    seed = cfg.run.seed
    mixed: list[prompts.PromptSample] = []
    for offset, name in enumerate(TASK_NAMES):
        share = getattr(cfg.sft.tasks, name).share
        if share < 0:
            raise ConfigError(f"sft.tasks.{name}.share={share}: the share multiplies the task's natural size "
                              "(1.0 = every sample once, 0.5 = a seeded half, 2.5 = twice plus a seeded half); "
                              "it must be >= 0")
        mixed += resample(by_task[name], share, seed + offset)
    random.Random(seed).shuffle(mixed)
    counts = dict(Counter(TASK_OF_TEMPLATE[s.task] for s in mixed))

    valid = next_sid_samples(valid_rows, index, mode, Path(data_dir) / "valid.parquet")
    if cfg.sft.max_eval_samples > 0:
        valid = valid[: cfg.sft.max_eval_samples]
    return Mixture(train=mixed, valid=valid, natural_counts=natural, counts={k: counts.get(k, 0) for k in TASK_NAMES})


def next_sid_samples(rows: list[tuple[list[int], int]], index: SidIndex, mode: str, source: Path) -> list[prompts.PromptSample]:
    """Task 1: one sample per row, history SIDs -> target SID."""
    out = []
    for i, (hist, target) in enumerate(rows):
        out.append(prompts.next_sid([item_sid(index, h, source, i) for h in hist], item_sid(index, target, source, i), mode=mode))
    return out


def item_alignment_samples(titles: dict[int, str], index: SidIndex, mode: str) -> list[prompts.PromptSample]:
    """Task 2: one title->SID sample per distinct title (2a) and one SID->title per distinct SID (2b).

    Items are visited in item-id order and the last item wins each key, as in the public code.
    """
    sid_of_title: dict[str, str] = {}
    title_of_sid: dict[str, str] = {}
    for item_id, title in titles.items():
        if item_id not in index.items:
            continue
        sid = index.sid(item_id)
        sid_of_title[title] = sid
        title_of_sid[sid] = title
    out = [prompts.title_to_sid(t, s, mode=mode) for t, s in sid_of_title.items()]
    out += [prompts.sid_to_title(s, t, mode=mode) for s, t in title_of_sid.items()]
    return out


def history_title_samples(rows, titles: dict[int, str], index: SidIndex, mode: str, source: Path) -> list[prompts.PromptSample]:
    """Task 3: history SIDs -> title of the last catalogue item carrying the target SID."""
    title_of_sid = {index.sid(i): t for i, t in titles.items() if i in index.items}
    out = []
    for i, (hist, target) in enumerate(rows):
        sid = item_sid(index, target, source, i)
        out.append(prompts.history_to_title([item_sid(index, h, source, i) for h in hist], title_of_sid[sid], mode=mode))
    return out


def resample(samples: Sequence, share: float, seed: int) -> list:
    """Scale a task to ``round(share * len(samples))`` samples: whole copies plus a seeded random rest.

    ``share`` is a multiplier on the task's own size, not a fraction of the mixture."""
    if share < 0:
        raise ValueError(f"share multiplies a task's size and must be >= 0, got {share}")
    if share == 1.0 or not samples:
        return list(samples)
    target = int(round(share * len(samples)))
    whole, rest = divmod(target, len(samples))
    rng = random.Random(seed)
    return list(samples) * whole + rng.sample(list(samples), rest)


def tokenize_samples(tokenizer, samples: Sequence[prompts.PromptSample], cutoff_len: int,
                     sft: SftConfig | None = None) -> list[TokenizedSample]:
    """Tokenise with ``tsrec.prompts.encode_sft`` (labels -100 on the prompt) and attach loss weights."""
    out = []
    for s in samples:
        ids, labels = prompts.encode_sft(tokenizer, s, cutoff_len)
        task = TASK_OF_TEMPLATE.get(s.task, s.task)
        weight = getattr(sft.tasks, task).loss_weight if sft is not None and hasattr(sft.tasks, task) else 1.0
        out.append(TokenizedSample(ids, labels, task, float(weight)))
    return out
