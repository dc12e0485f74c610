"""Valid ranking metric inside the SFT loop (``sft.valid_ranking_sample``): the evaluation's constrained
beam search on a fixed, seeded sample of valid rows, HR/NDCG@K for K in (1, 3, 5, 10) up to the beams.

Valid loss alone cannot rank sweep trials: TS-Align changes what the loss measures. Rows are sharded
over ranks and the sums all-reduced, so every rank gets the same numbers. No Ray here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

KS = (1, 3, 5, 10)


class ValidRanking:
    """Built once per SFT run (prompts, constraint tables); called with the engine at each evaluation."""

    def __init__(self, cfg, data_dir: Path, sids_dir: Path, tok, device: str, rank: int, world: int):
        import numpy as np

        from tsrec import prompts
        from tsrec.data.schema import read_split
        from tsrec.decode.constraints import SidConstraints
        from tsrec.decode.evaluate import build_prompt_texts, score_suffix_enabled, upstream_suffix_ids
        from tsrec.sid.index import read_index, split_sid

        self.cfg, self.tok, self.rank, self.world = cfg, tok, rank, world
        index = read_index(sids_dir)
        self.constraints = SidConstraints.from_index(index, tok, source=str(sids_dir)).to(device)
        self.suffix = upstream_suffix_ids(tok, self.constraints) if score_suffix_enabled(cfg) else []
        table = read_split(data_dir, "valid")
        rows = [{"row": i, "user_id": str(u), "history_item_ids": list(h or []), "item_id": int(t)}
                for i, (u, h, t) in enumerate(zip(table.column("user_id").to_pylist(),
                                                  table.column("history_item_ids").to_pylist(),
                                                  table.column("item_id").to_pylist()))]
        n = cfg.sft.valid_ranking_sample
        if 0 < n < len(rows):  # the same rows at every evaluation and in every trial of a sweep (run.seed)
            rows = [rows[i] for i in sorted(random.Random(cfg.run.seed).sample(range(len(rows)), n))]
        prepared = build_prompt_texts(rows, index, cfg.prompts.mode, source=str(Path(data_dir) / "valid.parquet"))
        sample = [{"ids": prompts.encode_prompt(tok, r["_sample"]),
                   "target": [int(i) for i in tok.convert_tokens_to_ids(split_sid(r["target_sid"]))]} for r in prepared]
        self.share = [sample[i] for i in np.array_split(np.arange(len(sample)), world)[rank]]
        self.beams = min(cfg.sft.valid_ranking_beams, self.constraints.num_sids)
        self.ks = [k for k in KS if k <= self.beams]

    def __call__(self, engine) -> dict[str, float]:
        import torch

        from tsrec.decode.beam import constrained_beam_search, left_pad
        from tsrec.rl.loop import gathered_policy
        from tsrec.sft.loop import all_sum

        acc = torch.zeros(2 * len(self.ks) + 1, dtype=torch.float64)
        was_training = engine.training
        engine.eval()
        with torch.no_grad(), gathered_policy(engine, self.cfg.sft.zero_stage) as lm:
            bs = self.cfg.eval.batch_size
            for i in range(0, len(self.share), bs):
                chunk = self.share[i : i + bs]
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
        out: dict[str, Any] = {}
        for j, k in enumerate(self.ks):
            out[f"hr@{k}"] = acc[2 * j].item() / n
            out[f"ndcg@{k}"] = acc[2 * j + 1].item() / n
        return out
