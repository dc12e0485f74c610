"""The valid ranking probe of every training recipe: the evaluation's constrained beam search on a fixed,
seeded sample of valid rows, HR/NDCG@K (METHOD.md 1.8) with every rank's sums all-reduced.

SFT calls it with ``sft.valid_ranking_sample`` (sweeps rank trials by it: TS-Align changes what the valid
loss measures), RL at every evaluation and for its start (``rl.valid_sample_size``). The prompts, the
suffix scoring and the batch size are those of ``tsrec eval`` with ``eval.split=valid``, so a number
logged here is the number ``tsrec eval`` gives the exported model on the same rows. No Ray here.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

KS = (1, 3, 5, 10)  # cut-offs reported (those within the beam width)


def valid_sample(n_rows: int, size: int, seed: int) -> list[int]:
    """Row numbers of the fixed valid sample: ``size`` seeded rows in valid order (all rows when ``size`` is 0
    or at least ``n_rows``), so every evaluation of a run, every trial of a sweep and the RL loop's guard
    score the same rows."""
    if 0 < size < n_rows:
        return sorted(random.Random(seed).sample(range(n_rows), size))
    return list(range(n_rows))


def valid_ranking_rows(cfg, data_dir: Path, index, tok, size: int) -> list[dict[str, Any]]:
    """The fixed valid sample (:func:`valid_sample`, seeded by ``run.data_seed``, else ``run.seed``) with the
    evaluation prompts of ``tsrec eval`` (stage ``eval`` wording), tokenised (``ids``), with the target's SID token
    ids (``target``)."""
    from tsrec import prompts
    from tsrec.data.schema import read_split
    from tsrec.decode.evaluate import build_prompt_texts
    from tsrec.sid.index import split_sid

    table = read_split(data_dir, "valid")
    rows = [{"row": i, "user_id": str(u), "history_item_ids": list(h or []), "item_id": int(t)}
            for i, (u, h, t) in enumerate(zip(table.column("user_id").to_pylist(),
                                              table.column("history_item_ids").to_pylist(),
                                              table.column("item_id").to_pylist()))]
    rows = [rows[i] for i in valid_sample(len(rows), size, cfg.run.upstream_seed)]  # every seed of a sweep: same rows
    out = []
    for r in build_prompt_texts(rows, index, cfg.prompts.mode, source=str(Path(data_dir) / "valid.parquet")):
        target = [int(i) for i in tok.convert_tokens_to_ids(split_sid(r["target_sid"]))]
        out.append({"ids": prompts.encode_prompt(tok, r["_sample"]), "target": target})
    return out


def ranking_metric_names(ks) -> list[str]:
    """``hr@K`` and ``ndcg@K`` for each cut-off, in the probe's order: the names ``sft.best_metric`` and the sweeps'
    ``tune.metric`` (prefixed ``valid_``) refer to."""
    return [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]


def best_metric_choices(sft) -> list[str]:
    """The metrics ``sft.best_metric`` may name: "loss", and the probe's HR/NDCG at its cut-offs within
    ``sft.valid_ranking_beams`` when ``sft.valid_ranking_sample`` > 0 (a catalogue smaller than the beam width
    drops more cut-offs; the worker checks that case again)."""
    if sft.valid_ranking_sample <= 0:
        return ["loss"]
    return ["loss"] + ranking_metric_names(k for k in KS if k <= sft.valid_ranking_beams)


def check_best_metric(sft) -> None:
    """ConfigError naming the choices unless ``sft.best_metric`` is one of :func:`best_metric_choices`: called
    before Ray Train starts (``tsrec sft`` and ``tsrec run``), so a metric the probe never reports (``ndcg@10`` at
    ``valid_ranking_beams`` 5) is refused up front, not in the workers."""
    from tsrec.config import ConfigError

    if sft.best_metric not in best_metric_choices(sft):
        raise ConfigError(f"sft.best_metric={sft.best_metric!r}: expected one of {best_metric_choices(sft)} "
                          f"(sft.valid_ranking_sample={sft.valid_ranking_sample}, "
                          f"sft.valid_ranking_beams={sft.valid_ranking_beams})")


class ValidRanking:
    """Built once per run (prompts, constraint tables); called with the engine at each evaluation.

    ``rows`` from :func:`valid_ranking_rows` are sharded over ranks; every rank must call the probe at
    the same evaluations (the sums are all-reduced), with or without rows of its own.
    """

    def __init__(self, cfg, rows: list[dict[str, Any]], tok, constraints, beams: int, ks=KS,
                 zero_stage: int = 0, rank: int = 0, world: int = 1):
        from tsrec.decode.evaluate import score_suffix_enabled, upstream_suffix_ids

        self.tok, self.constraints, self.zero_stage = tok, constraints, zero_stage
        self.suffix = upstream_suffix_ids(tok, constraints) if score_suffix_enabled(cfg) else []
        self.batch_size = cfg.eval.batch_size
        self.share = [rows[i] for i in np.array_split(np.arange(len(rows)), world)[rank]]
        self.beams = min(beams, constraints.num_sids)
        self.ks = [k for k in ks if k <= self.beams]

    def __call__(self, engine) -> dict[str, float]:
        from tsrec.decode.beam import constrained_beam_search, left_pad
        from tsrec.train.distributed import all_sum

        acc = torch.zeros(2 * len(self.ks) + 1, dtype=torch.float64)
        was_training = engine.training
        engine.eval()
        with torch.no_grad(), gathered_policy(engine, self.zero_stage) as lm:
            for i in range(0, len(self.share), self.batch_size):
                chunk = self.share[i : i + self.batch_size]
                ids, mask = left_pad([r["ids"] for r in chunk], self.tok.eos_token_id, self.constraints.device)
                out = constrained_beam_search(lm, ids, mask, self.constraints, self.beams, score_suffix_ids=self.suffix)
                target = torch.tensor([r["target"] for r in chunk], device=ids.device)
                hit = (out.sid_token_ids == target.unsqueeze(1)).all(-1)  # (rows, beams)
                first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], -1, dtype=torch.long))
                for j, k in enumerate(self.ks):
                    inside = (first >= 0) & (first < k)
                    acc[2 * j] += inside.double().sum().cpu()
                    acc[2 * j + 1] += torch.where(inside, 1.0 / torch.log2(first.double() + 2),
                                                  torch.zeros_like(first, dtype=torch.float64)).sum().cpu()
                acc[-1] += len(chunk)
        if was_training:
            engine.train()
        acc = all_sum(acc)  # every rank calls this once per evaluation, with or without rows
        n = max(acc[-1].item(), 1.0)
        out: dict[str, float] = {}
        for j, k in enumerate(self.ks):
            out[f"hr@{k}"] = acc[2 * j].item() / n
            out[f"ndcg@{k}"] = acc[2 * j + 1].item() / n
        return out


@contextlib.contextmanager
def gathered_policy(engine, zero_stage: int):
    """The engine's HF module (``engine.module.lm``) with full parameters for local forwards (rollouts,
    evaluation).

    ZeRO 0/2: every rank holds every weight; the module is used as is. ZeRO-3: the partitions are
    gathered (``GatheredParameters``, read-only) and the engine's per-module fetch/release hooks are
    removed meanwhile, then registered again (the coordinator re-records its trace on the next forward).
    """
    lm = engine.module.lm
    if zero_stage != 3:
        yield lm
        return
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for p in engine.module.parameters():
            p.ds_active_sub_modules.clear()
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield lm
        finally:
            offload._register_deepspeed_module(offload.module)
