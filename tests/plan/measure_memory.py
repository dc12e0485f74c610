"""Measure one rank's memory for one SFT step of a tiny Qwen2 under DeepSpeed on CPU (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/plan/measure_memory.py OUT_DIR 0 2 3

The model and engine are the SFT loop's own (``SftLM``, ``deepspeed_config``); the batch is a packed
random batch (two samples per row: position ids restart, so attention runs with the block mask and
GQA's k/v are expanded, as in the SFT loop). Writes ``OUT_DIR/rank{R}_zero{S}.json`` with bytes of:
- ``states``: every live torch tensor storage inside the second optimiser step, just before the torch
  optimizer runs (params, gradient partitions in 16 and 32 bit, fp32 master copy, Adam moments), found through the garbage collector, minus those alive before the model
  was built; views of one flat buffer count once (deduplicated by storage pointer);
- ``activations``: storages autograd saved during the forward (``saved_tensors_hooks``), deduplicated,
  parameters excluded; the logits part is the saved log-softmax of the supervised rows;
Process RSS is not used: its peak holds the allocator's caches and gloo's buffers and never goes down
between the stages measured in one process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

TINY = dict(hidden_size=256, layers=4, vocab_size=4096)
SEQ, MICRO, SUPERVISED = 64, 8, 0.25


def live_storages() -> dict[int, int]:
    out = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                s = o.untyped_storage()
                if s.nbytes():
                    out[s.data_ptr()] = s.nbytes()
        except Exception:  # noqa: BLE001 - meta/fake tensors and odd subclasses: not memory here
            continue
    return out


def main(out_dir: str, stages: list[int]) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:  # one process for all stages: the imports dominate the run time
        measure(out_dir, stage)


def measure(out_dir: str, stage: int) -> None:
    import deepspeed

    from tsrec.config import load_config
    from tsrec.sft.loop import SftLM, engine_spec
    from tsrec.train.engine import deepspeed_config
    from tsrec.sft.packing import IGNORE, Batch
    from tsrec.tiny import build_tiny_model

    rank = int(os.environ["RANK"])
    cfg = load_config(None, [f"sft.zero_stage={stage}", "sft.precision=bf16", f"sft.micro_batch_size={MICRO}",
                             f"sft.global_batch_size={MICRO * 2}"])
    ds = deepspeed_config(engine_spec(cfg.sft, world_size=2), world_size=2)
    gc.collect()
    before = live_storages()
    # ZeRO-3 partitions the (tiny) model in deepspeed.initialize; zero.Init is not needed at this size.
    lm = build_tiny_model(TINY["vocab_size"], TINY["hidden_size"], TINY["layers"], seed=0)
    lm = lm.to(torch.bfloat16)
    lm.config.save_pretrained(out_dir)  # the planner reads this config.json
    engine, *_ = deepspeed.initialize(model=SftLM(lm), config=ds, model_parameters=list(lm.parameters()))

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, TINY["vocab_size"], (MICRO, SEQ), generator=g)
    targets = torch.full((MICRO, SEQ), IGNORE)
    sup = torch.rand(MICRO, SEQ, generator=g) < SUPERVISED
    targets[sup] = ids[sup]
    batch = Batch(input_ids=ids, position_ids=torch.arange(SEQ).remainder(SEQ // 2).repeat(MICRO, 1), targets=targets,
                  weights=sup.float(), task_ids=torch.where(sup, 0, -1), real_tokens=MICRO * SEQ, num_samples=MICRO)
    # Weights saved for backward are parameters, not activations (under ZeRO-3 a gathered copy).
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    param_ids = {id(p) for p in engine.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if id(t) not in param_ids and s.data_ptr() not in params and s.nbytes():
            saved[s.data_ptr()] = s.nbytes()
        return t

    # Step 1 creates Adam's moments (lazily, in the first step); step 2 is measured after its backward,
    # when the gradient partitions and all optimizer states are alive together (the peak of model states).
    total, _, _ = engine(batch)
    engine.backward(total)
    engine.step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _, _ = engine(batch)
    engine.backward(total)
    del total
    # The peak of model states is inside step(): DeepSpeed has just cast the gradient partition to the
    # fp32 master copy's .grad and the torch optimizer is about to run. A step pre-hook sees exactly that.
    peak = {}

    def at_step(opt, args, kwargs):
        gc.collect()
        peak["states"] = sum(n for p, n in live_storages().items() if p not in before)

    hook = engine.optimizer.optimizer.register_step_pre_hook(at_step)
    engine.step()
    hook.remove()
    states = peak["states"]
    result = {"states": states, "activations": sum(saved.values()), "supervised": int(sup.sum())}
    engine.destroy()
    Path(out_dir, f"rank{rank}_zero{stage}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]])
