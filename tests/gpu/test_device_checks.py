"""The GPU checks of scripts/gpu_checks.sh, each with a CPU half that CPU CI runs (issue 19).

Every test picks its device: CUDA when the process sees a GPU, else CPU. On CPU the GPU-only
assertions (bf16, MFU, the Qwen2.5-1.5B shape) are replaced by their CPU analogue on a tiny model, so
the code path, the engine's device and the comparisons stay checked; nothing here is ``gpu``-marked,
so plain ``pytest`` runs the CPU halves. scripts/gpu_checks.sh runs this file on the GPU machine.

Each test writes what it measured (device, tokens/s, MFU, losses, attention backend, what a zero-GPU
actor saw) as one JSON line to ``$TSREC_GPU_CHECKS_RECORDS`` when set; scripts/gpu_checks.sh folds the
lines into its one results file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Qwen2.5-1.5B's shape (config.json of the release): what the SFT check measures tokens/s and MFU on.
QWEN15_SHAPE = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                "num_key_value_heads": 2, "vocab_size": 151_936, "tie_word_embeddings": True}


def record(check: str, **values) -> None:
    """One JSON line for the results file of scripts/gpu_checks.sh (no-op without $TSREC_GPU_CHECKS_RECORDS)."""
    path = os.environ.get("TSREC_GPU_CHECKS_RECORDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"check": check, "device": DEVICE, **values}) + "\n")


def _sft_synth():
    spec = importlib.util.spec_from_file_location("sft_synth", REPO / "tests" / "sft" / "sft_synth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _spy_engines(monkeypatch) -> list:
    """Every DeepSpeed engine the training loops build (deepspeed.initialize wrapped, nothing else changed)."""
    import deepspeed

    engines, real = [], deepspeed.initialize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        engines.append(out[0])
        return out

    monkeypatch.setattr(deepspeed, "initialize", spy)
    return engines


def _metrics_io():
    """``(read_metrics_csv, write_metrics_csv)`` wherever the training package keeps them."""
    try:
        from tsrec.train.metrics import read_metrics_csv, write_metrics_csv
    except ImportError:  # before the training refactor
        from tsrec.sft.checkpoint import read_metrics_csv, write_metrics_csv
    return read_metrics_csv, write_metrics_csv


def _without_tb_plots(monkeypatch) -> None:
    """The lent GPU image has neither tensorboard nor matplotlib: the run logs keep only metrics.csv there."""
    if importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("matplotlib") is not None:
        return
    from tsrec.train import metrics

    _, write_csv = _metrics_io()

    def csv_only(rows, out_dir, *args, **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_csv(Path(out_dir) / "metrics.csv", rows)

    monkeypatch.setattr(metrics, "write_run_logs", csv_only)


# --------------------------------------------------------------------------------------------------
# 0. The test process's DeepSpeed accelerator (tests/conftest.py)
# --------------------------------------------------------------------------------------------------


def test_deepspeed_accelerator_follows_the_device():
    """conftest forces DS_ACCELERATOR=cpu only without CUDA: on a GPU DeepSpeed must pick CUDA (an engine on the
    CPU accelerator beside an NCCL process group was the first crash of the SFT check)."""
    import device_env
    from deepspeed.accelerator import get_accelerator

    assert device_env.default_ds_accelerator({}, lambda: True) is None
    assert device_env.default_ds_accelerator({}, lambda: False) == "cpu"
    assert device_env.default_ds_accelerator({"DS_ACCELERATOR": "cuda"}, lambda: False) == "cuda"
    if "DS_ACCELERATOR" not in os.environ or os.environ["DS_ACCELERATOR"] == DEVICE:
        assert get_accelerator().device_name() == DEVICE
    record("deepspeed_accelerator", accelerator=get_accelerator().device_name(),
           DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR"))


# --------------------------------------------------------------------------------------------------
# 1. Decode parity: exhaustive scoring on the model's device
# --------------------------------------------------------------------------------------------------


def _constraints(n_sids: int = 24, codebooks=(4, 4, 4), first_id: int = 10):
    from tsrec.decode.constraints import SidConstraints
    from tsrec.sid.index import SidIndex

    rng, seen = random.Random(0), set()
    while len(seen) < n_sids:
        seen.add(tuple(rng.randrange(k) for k in codebooks))
    index = SidIndex.from_codes(range(n_sids), sorted(seen))
    token_to_id = {t: first_id + i for i, t in enumerate(index.all_tokens())}
    return SidConstraints.from_sid_tokens(index.items, token_to_id), first_id + len(token_to_id)


class _DeviceCheckingLM(torch.nn.Module):
    """A causal-LM stand-in on ``device`` ("meta" on CPU: no memory, no maths) that refuses inputs elsewhere."""

    def __init__(self, vocab: int, device: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(vocab, 2, device=device))

    def forward(self, input_ids, attention_mask):
        assert input_ids.device == self.w.device, f"input_ids on {input_ids.device}, model on {self.w.device}"
        assert attention_mask.device == self.w.device
        logits = torch.zeros(*input_ids.shape, self.w.shape[0], device=self.w.device)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("suffix", [(), (3, 4)], ids=["sid", "sid+suffix"])
def test_exhaustive_scoring_runs_on_the_model_device(suffix):
    """tsrec.decode.reference.exhaustive_scores builds the sequences where the model is (meta on CPU, cuda on a
    GPU): the CUDA decode-parity test fed a CUDA model CPU tensors."""
    from tsrec.decode.reference import exhaustive_scores

    cons, vocab = _constraints()
    device = "cuda" if CUDA else "meta"
    scores = exhaustive_scores(_DeviceCheckingLM(vocab, device), [1, 2, 5], cons, suffix_ids=suffix)
    assert scores.shape == (cons.num_sids,) and scores.device.type == device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_equals_exhaustive_scoring_on_the_device(tmp_path, dtype):
    """Beam search as wide as the catalogue = exhaustive scoring, on this device (fp32 exact, bf16 near-ties);
    the CPU half runs fp32 and bf16 on a tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec import prompts
    from tsrec.decode.beam import constrained_beam_search, left_pad
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.reference import compare_topk, exhaustive_scores
    from tsrec.sid.index import SidIndex
    from tsrec.tiny import save_tiny_sid_model

    rng, seen = random.Random(0), set()
    while len(seen) < 60:
        seen.add(tuple(rng.randrange(k) for k in (4, 4, 8)))
    index = SidIndex.from_codes(range(60), sorted(seen))
    path = save_tiny_sid_model(tmp_path / "m", index.all_tokens(), texts=["heavy duty staples glue tape"], seed=3,
                               hidden_size=256 if CUDA else 64, layers=4 if CUDA else 2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
    cons = SidConstraints.from_index(index, tok).to(DEVICE)
    s = index.sids()
    raw = [prompts.encode_prompt(tok, prompts.next_sid(h, stage="eval")) for h in ([s[0]], [s[5], s[0], s[42]], [])]
    ids, mask = left_pad(raw, tok.eos_token_id, device=DEVICE)
    out = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    assert out.scores.device.type == DEVICE
    tol = 1e-3 if dtype == torch.float32 else 0.1
    verdicts = []
    for b, prompt in enumerate(raw):
        truth = exhaustive_scores(model, prompt, cons)
        assert truth.device.type == DEVICE
        truth = truth.float().cpu()
        order = torch.argsort(truth, descending=True, stable=True)
        ours = [cons.sids[i] for i in out.sid_index[b].tolist()]
        verdict = compare_topk(ours, out.scores[b].tolist(), [cons.sids[i] for i in order.tolist()],
                               truth[order].tolist(), tol)
        verdicts.append(verdict)
        assert verdict == "identical" if dtype == torch.float32 else verdict in ("identical", "near-tie"), (b, verdict)
        torch.testing.assert_close(out.scores[b].float().cpu(), truth[out.sid_index[b].cpu()], atol=tol, rtol=0)
    record("decode_parity", dtype=str(dtype).removeprefix("torch."), verdicts=verdicts)


# --------------------------------------------------------------------------------------------------
# 2. SFT on the device: the engine's device, tokens/s, MFU
# --------------------------------------------------------------------------------------------------


def _qwen15_shape_model(src: Path, out: Path) -> Path:
    """``src``'s tokenizer with a random bf16 model of Qwen2.5-1.5B's shape (its 151,936-row vocabulary holds
    the tiny tokenizer's ids), built on the GPU (a CPU init of 1.5B parameters takes minutes)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    cfg = Qwen2Config(**QWEN15_SHAPE, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    assert len(tok) <= cfg.vocab_size
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def test_sft_runs_on_the_device_with_tokens_per_s_and_mfu(tmp_path, monkeypatch):
    """SFT through tsrec.sft.loop.train_sft: the DeepSpeed engine lives on this device (cuda on a GPU, the crash of
    issue 19 was an engine on the CPU accelerator), every row has tokens/s, and on a GPU an MFU in (0, 1) for bf16
    ZeRO-2 on the Qwen2.5-1.5B shape. CPU half: fp32, the tiny model, no MFU column."""
    pytest.importorskip("deepspeed")
    from tsrec.config import load_config
    from tsrec.runtime import LocalContext
    from tsrec.sft import loop

    read_metrics_csv, _ = _metrics_io()
    _without_tb_plots(monkeypatch)
    engines = _spy_engines(monkeypatch)
    tiny = _sft_synth().make_tiny_run(tmp_path / "tiny", n_train=512 if CUDA else 48)
    model = _qwen15_shape_model(tiny["model"], tmp_path / "qwen15") if CUDA else tiny["model"]
    steps = 4 if CUDA else 2
    overrides = [f"sft.max_steps={steps}", f"sft.eval_every_steps={steps}", f"sft.save_every_steps={steps}",
                 "sft.lr=1e-4", "sft.warmup_steps=1", "sft.zero_stage=2", "sft.max_eval_samples=16"]
    overrides += (["sft.precision=bf16", "sft.global_batch_size=256", "sft.micro_batch_size=16", "sft.packing=true",
                   "sft.pack_len=512"] if CUDA else
                  ["sft.precision=fp32", "sft.global_batch_size=8", "sft.micro_batch_size=4"])
    cfg = load_config(None, overrides)
    result = loop.train_sft(cfg, model, tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(tmp_path / "run"))
    assert result["steps"] == steps
    assert engines and {e.device.type for e in engines} == {DEVICE}, [str(e.device) for e in engines]
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == DEVICE
    rows = read_metrics_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(r["train/tokens_per_s"] > 0 for r in rows)
    if CUDA:
        for r in rows:
            assert 0 < r["train/mfu"] < 1, r
    else:
        assert all("train/mfu" not in r or r["train/mfu"] in (None, "") for r in rows)
    timed = rows[1:] or rows  # step 0 includes the kernels' first-call cost
    record("sft", shape="qwen2.5-1.5b" if CUDA else "tiny", precision=cfg.sft.precision, zero_stage=2,
           engine_device=str(engines[0].device), gpu=torch.cuda.get_device_name() if CUDA else "",
           tokens_per_s=sum(r["train/tokens_per_s"] for r in timed) / len(timed),
           mfu=(sum(r["train/mfu"] for r in timed) / len(timed)) if CUDA else None,
           peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if CUDA else None)


# --------------------------------------------------------------------------------------------------
# 3. Packed vs unpacked loss on the device, attention backend named
# --------------------------------------------------------------------------------------------------


def _attention_backend() -> str:
    if CUDA and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def test_packed_loss_equals_unpacked_on_the_device():
    """One packed batch (several samples per row, block-diagonal attention) has the per-sample loss of the same
    samples unpacked, on this device with the attention backend SFT would use here (flash_attention_2 where
    flash-attn is installed on a GPU, else sdpa with the dense block mask)."""
    import dataclasses

    from tsrec import prompts
    from tsrec.sft.packing import batch_loss, collate, pack_samples
    from tsrec.sft.tasks import tokenize_samples
    from tsrec.tiny import build_tiny_model, build_tiny_tokenizer

    backend = _attention_backend()
    dtype = torch.bfloat16 if backend == "flash_attention_2" else torch.float32
    tok = build_tiny_tokenizer(["heavy duty staples glue tape"])
    tok.add_tokens(["<a_1>", "<a_3>", "<a_5>", "<b_2>", "<b_4>", "<b_6>"])
    model = build_tiny_model(len(tok), hidden_size=128 if CUDA else 64, seed=3)
    model.config._attn_implementation = backend
    model = model.to(device=DEVICE, dtype=dtype).eval()
    sids = ["<a_1><b_2>", "<a_3><b_4>", "<a_5><b_6>"]
    samples = tokenize_samples(tok, [prompts.next_sid(sids[:1], sids[1]), prompts.next_sid(sids[:2], sids[2]),
                                     prompts.sid_to_title(sids[0], "heavy duty staples"),
                                     prompts.title_to_sid("glue tape", sids[2]),
                                     prompts.history_to_title(sids, "tape"),
                                     prompts.token_to_description("<a_1>", "a family of staples")], cutoff_len=512)
    rows = pack_samples(samples, 2 * max(len(s.input_ids) for s in samples))
    assert len(rows) < len(samples)  # something was packed

    def on_device(batch):
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(DEVICE) for f in dataclasses.fields(batch)
                                             if isinstance(getattr(batch, f.name), torch.Tensor)})

    with torch.no_grad():
        packed = batch_loss(model, on_device(collate(rows, tok.pad_token_id))).item()
        unpacked = batch_loss(model, on_device(collate([[s] for s in samples], tok.pad_token_id))).item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(packed - unpacked) < tol, (backend, packed, unpacked)
    record("packing", attn_implementation=backend, dtype=str(dtype).removeprefix("torch."), packed_loss=packed,
           unpacked_loss=unpacked, rows=len(rows), samples=len(samples))


# --------------------------------------------------------------------------------------------------
# 4. RL under ZeRO-2 and ZeRO-3: equal step-0 losses
# --------------------------------------------------------------------------------------------------

RL_BASE = ["rl.group_size=4", "rl.prompts_per_step=8", "rl.prompts_per_micro=4", "rl.max_steps=3", "rl.lr=1e-3",
           "rl.warmup_ratio=0", "rl.eval_every_steps=3", "rl.save_every_steps=3", "rl.valid_sample_size=8",
           "rl.eval_beams=8", "rl.title_history_rows=16", "rl.beta=0.01", "rl.sync_ref=false",
           "eval.batch_size=8", "run.name=t"]


def test_rl_three_steps_under_zero2_and_zero3(tmp_path, monkeypatch):
    """GRPO (tsrec.rl.loop.train_rl) 3 steps under ZeRO-2 and under ZeRO-3 from the same model: the engines live on
    this device, step 0 (same weights, same rollouts) has the same loss and rewards under both partitionings, and so
    do steps 1 and 2 (the same updates). GPU: bf16; CPU: fp32."""
    pytest.importorskip("deepspeed")
    from tsrec.config import load_config
    from tsrec.rl import loop
    from tsrec.runtime import LocalContext

    read_metrics_csv, _ = _metrics_io()
    _without_tb_plots(monkeypatch)
    engines = _spy_engines(monkeypatch)
    tiny = _sft_synth().make_tiny_run(tmp_path / "tiny", hidden_size=128 if CUDA else 64)
    precision = "bf16" if CUDA else "fp32"
    rows = {}
    for zero in (2, 3):
        cfg = load_config(None, [*RL_BASE, f"rl.zero_stage={zero}", f"rl.precision={precision}"])
        out = tmp_path / f"zero{zero}"
        loop.train_rl(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(out))
        rows[zero] = [r for r in read_metrics_csv(out / "logs" / "metrics.csv") if r["step"] >= 0]
        assert [r["step"] for r in rows[zero]] == [0, 1, 2]
    assert engines and {e.device.type for e in engines} == {DEVICE}
    a, b = rows[2][0], rows[3][0]
    tol = 5e-3 if precision == "bf16" else 1e-6
    assert a["rollout/reward_mean"] == pytest.approx(b["rollout/reward_mean"], abs=1e-6)
    assert abs(a["train/loss"] - b["train/loss"]) < tol, (a["train/loss"], b["train/loss"])
    # Step 0's GRPO loss is ~0 by construction (ratio 1, mean-zero advantages): the updated steps after it show
    # that both partitionings took the same optimiser step.
    for r2, r3 in zip(rows[2][1:], rows[3][1:]):
        assert abs(r2["train/loss"] - r3["train/loss"]) < tol, (r2["step"], r2["train/loss"], r3["train/loss"])
        assert r2["rollout/reward_mean"] == pytest.approx(r3["rollout/reward_mean"], abs=tol)
    record("rl_zero", precision=precision, loss_zero2=[r["train/loss"] for r in rows[2]],
           loss_zero3=[r["train/loss"] for r in rows[3]], reward_mean_step0=a["rollout/reward_mean"])


# --------------------------------------------------------------------------------------------------
# 5. Placement: a zero-GPU actor sees no GPU; evaluation in GPU actors on a cluster
# --------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_zero_gpu_actors_see_no_gpu(ray_cluster):
    """Ray 2.60 shows a zero-GPU actor every GPU of its node; with tsrec's runtime_env (cluster.cpu_only_runtime_env,
    used by the embedding pool, the hf teacher and CPU eval actors) it sees none, as a Ray actor and as a Ray Data
    pool actor. On a GPU node a one-GPU actor sees exactly one."""
    import ray

    from tsrec.orchestration.cluster import cpu_only_runtime_env

    @ray.remote
    def seen() -> dict:
        import torch as t

        return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "devices": t.cuda.device_count()}

    hidden = ray.get(seen.options(num_gpus=0, runtime_env=cpu_only_runtime_env()).remote())
    assert hidden == {"CUDA_VISIBLE_DEVICES": "", "devices": 0}, hidden
    plain = ray.get(seen.options(num_gpus=0).remote())  # what Ray 2.60 does without it (recorded)

    class Probe:
        def __call__(self, batch):
            import torch as t

            n = len(batch["x"])
            return {"cvd": [os.environ.get("CUDA_VISIBLE_DEVICES")] * n, "devices": [t.cuda.device_count()] * n}

    ds = ray.data.from_items([{"x": i} for i in range(4)]).map_batches(
        Probe, batch_size=2, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, num_gpus=0,
        runtime_env=cpu_only_runtime_env())
    pool = ds.take_all()
    assert {r["cvd"] for r in pool} == {""} and {r["devices"] for r in pool} == {0}, pool
    one = None
    if ray.cluster_resources().get("GPU", 0) >= 1:
        one = ray.get(seen.options(num_gpus=1).remote())
        assert one["devices"] == 1, one
    record("placement_probe", zero_gpu_hidden=hidden, zero_gpu_plain=plain, one_gpu=one,
           cluster_gpus=ray.cluster_resources().get("GPU", 0))


@pytest.mark.ray
def test_eval_on_a_cluster_runs_in_actors_on_the_gpu(ray_cluster, tmp_path):
    """Joined to a cluster (resources.ray_address set, as RAY_ADDRESS is under `ray job submit`), one eval worker is
    a Ray actor, never the driver (the head pod has no GPU); on a GPU cluster it holds a GPU and decodes on cuda,
    on CPU it decodes on cpu with the GPUs hidden. The manifest says where it ran."""
    from tsrec.config import load_config
    from tsrec.orchestration.evaluate import run_eval

    tiny = _sft_synth().make_tiny_run(tmp_path / "tiny")
    cfg = load_config(None, [f"resources.ray_address={ray_cluster['address']}", "resources.eval.workers=1",
                             "eval.beams=4", "eval.batch_size=8", "eval.max_rows=8", "eval.ks=[1,4]"])
    result = run_eval(cfg, tiny["model"], tiny["data"], tiny["sids"], tmp_path / "eval")
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    placement = manifest["stats"]["placement"]
    assert result["placement"] == placement
    assert placement["where"] == "actors" and placement["actors"] == 1
    assert placement["device"] == DEVICE and placement["gpus_per_actor"] == (1.0 if CUDA else 0.0)
    record("eval_placement", **placement)
