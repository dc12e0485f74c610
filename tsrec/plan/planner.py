"""Per-GPU memory plan for SFT/RL of a decoder backbone under ZeRO 2/3, offload, checkpointing and LoRA.

Pure arithmetic on the backbone's HF ``config.json`` (no weights are loaded, no Ray). Model states
(weights, gradients, optimizer) come from DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the
number-returning functions behind the ``*_all_cold`` printers); the split into the three parts uses
the multipliers those functions document (16-bit params 2, gradients 2 + 4 fp32, optimizer 4 fp32
master + 8 Adam moments, per parameter) and is checked to add up to DeepSpeed's total.

Activations (bytes per token per decoder layer, bf16, sdpa/flash attention so no seq^2 scores kept),
counted from the tensors autograd saves in a HF Qwen2 layer:
  2 RMSNorms x (fp32 input copy 4h + bf16 cast 2h + scaled output 2h)        = 16h
  q, k, v after RoPE and repeat_kv (GQA expanded to h each) + attention out   =  8h
  o_proj input (contiguous copy of the transposed output)                      =  2h
  MLP: gate, SiLU(gate), up, SiLU(gate)*up (intermediate size I)              =  8I
  => 26h + 8I bytes/token/layer (fp32 training: 4-byte tensors, 8h + 4(9h + 4I)).
This is Korthikanti et al.'s per-layer count (34 sbh + 5as^2 b) redone for SwiGLU, GQA, RMSNorm,
no dropout and a fused attention kernel. With gradient checkpointing only each layer's input (b h per
token) is kept, plus one layer's full activations while it is recomputed.

Logits (R6, METHOD.md section 5): only supervised positions reach the LM head; per such position the
fp32 logits row, the saved log-softmax and its gradient = 12 bytes x vocab.

Buffers: ZeRO-3's gradient reduce bucket (allocated at initialisation; measured on CPU with DeepSpeed's
default 5e8 elements). On GPUs the loops run ZeRO-2/3 with ``overlap_comm`` and buckets of ``GPU_BUCKET``
elements (``tsrec/train/engine.py``): the reduce bucket is that size, and overlapping needs about 4.5x the
reduce + all-gather buckets (DeepSpeed's ZeRO documentation) on top. ``Setup.overlap_comm`` False plans the
CPU measurement's setting.

Overhead: a fixed ``overhead_gib`` (default 2 GiB) for the CUDA context, NCCL and DeepSpeed's
communication buckets; it is a round guess, not fitted to any measurement.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tsrec.config import ConfigError

GIB = 1024**3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
GPU_BUCKET = 100_000_000  # the loops' reduce/all-gather bucket on GPUs (tsrec.train.engine.GPU_BUCKET)
OVERLAP_FACTOR = 4.5  # overlap_comm's buffers, in (reduce + all-gather) bucket sizes
PRESETS = Path(__file__).resolve().parent / "presets"


class PlanError(ConfigError):
    """(A ConfigError, so the CLI reports it as one.) A backbone spec that is neither a preset, a folder with config.json nor a config file, or bad sizes."""


@dataclass(frozen=True)
class Backbone:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # rows after adding the SID tokens
    tie: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q/k/v carry a bias in Qwen2, o_proj none
        return attn + 3 * h * self.intermediate + 2 * h  # SwiGLU MLP + two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        head = 0 if self.tie else self.embedding_params()
        return self.embedding_params() + head + self.layers * self.layer_params() + self.hidden

    def largest_layer_params(self) -> int:
        # DeepSpeed's stage-3 model_to_params: the largest single module's own params (the embedding).
        return max(self.embedding_params(), 3 * self.hidden * self.intermediate)

    def lora_params(self, r: int, targets: list[str]) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise PlanError(f"LoRA target modules {unknown} are not Qwen2 projections ({sorted(dims)})")
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def load_backbone(spec: str, sid_tokens: int = 768) -> Backbone:
    """A preset name (``qwen2.5-7b``), a model folder with ``config.json``, or a ``config.json`` path."""
    if sid_tokens < 0:
        raise PlanError(f"--sid-tokens must be >= 0, got {sid_tokens}")
    preset = PRESETS / f"{spec.lower()}.json"
    path = Path(spec)
    if preset.is_file():
        path, name = preset, spec.lower()
    elif path.is_dir():
        path, name = path / "config.json", path.name
    else:
        name = path.parent.name or path.stem
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.json")))
        raise PlanError(f"backbone {spec!r}: not a preset ({known}), a folder with config.json or a config file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON: {e}") from None
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's shape there
    try:
        return Backbone(
            name=name, hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate=int(cfg["intermediate_size"]),
            # Conservative: every SID token is a new row (Qwen's padded vocab could absorb a few).
            vocab=int(cfg["vocab_size"]) + sid_tokens, tie=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise PlanError(f"{path}: config has no {e.args[0]!r} (a decoder-only HF config is expected)") from None


@dataclass(frozen=True)
class Setup:
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float
    stage: str = "sft"  # sft | rl
    seq_len: int = 512
    micro_batch: int = 16  # sequences per GPU per micro-step (RL: prompts_per_micro x group_size)
    precision: str = "bf16"
    supervised_fraction: float = 0.15  # share of positions with a target (R6: only these get logits)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    sid_rows: int = 768  # trainable embedding (and untied head) rows under LoRA
    host_mem_gib: float = 0.0  # per node; 0 = do not check host RAM
    overhead_gib: float = 2.0
    # A candidate fits when its total is at most (1 - headroom) x gpu_mem: the estimate is off by a few
    # percent (tests/plan) and the caching allocator fragments.
    headroom: float = 0.10
    # RL only: rollout (the KV cache of G beams of prompt + completion) and the frozen reference model.
    rl_completion_len: int = 5
    # GPU training: ZeRO-2/3 with overlap_comm and GPU_BUCKET buckets (the loops' setting on GPUs).
    overlap_comm: bool = True

    def __post_init__(self):
        for k in ("gpus_per_node", "nodes", "seq_len", "micro_batch"):
            if getattr(self, k) < 1:
                raise PlanError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.gpu_mem_gib <= 0:
            raise PlanError(f"--gpu-mem must be > 0 GiB, got {self.gpu_mem_gib}")
        if not 0 <= self.headroom < 1:
            raise PlanError(f"--headroom must be in [0, 1), got {self.headroom}")
        if self.stage not in ("sft", "rl"):
            raise PlanError(f"--stage must be sft or rl, got {self.stage!r}")
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"precision must be bf16 or fp32, got {self.precision!r}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Candidate:
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    lora: bool
    gradient_checkpointing: bool
    gib: dict[str, float] = field(default_factory=dict)
    host_gib_per_node: float = 0.0
    fits: bool = False
    relative_step_time: float = 1.0
    bytes: dict[str, int] = field(default_factory=dict)  # the same parts unrounded, for small models

    def overrides(self, stage: str, precision: str) -> dict:
        """The candidate as config keys of ``sft``/``rl`` (tsrec/config.py)."""
        return {stage: {"zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                        "offload_params": self.offload_params, "gradient_checkpointing": self.gradient_checkpointing,
                        "precision": precision, "lora": {"enabled": self.lora}}}

    def to_json(self) -> dict:
        return asdict(self)


def model_states(params: int, setup: Setup, zero_stage: int, offload_optimizer: bool, offload_params: bool,
                 largest_layer: int) -> tuple[dict[str, float], float]:
    """Per-GPU bytes of weights/gradients/optimizer and host bytes per node, from DeepSpeed's estimators.

    ZeRO-0 (plain data parallel; only LoRA uses it) is DeepSpeed's ZeRO-2 count with one GPU: nothing
    is partitioned. fp32 training has no DeepSpeed estimator (they assume 16-bit params): params 4,
    gradients 4, optimizer 4 (ZeRO's fp32 partition copy) + 8, same partitioning.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = 1 if zero_stage == 0 else setup.world
    g, nodes = (1, 1) if zero_stage == 0 else (setup.gpus_per_node, setup.nodes)
    if zero_stage in (0, 1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, g, nodes, cpu_offload=offload_optimizer)
        weights = 2 * params
    elif zero_stage == 3:
        cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
            params, largest_layer, g, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
        weights = largest + (0 if offload_params else 2 * params // n)
    else:
        raise PlanError(f"zero_stage must be 0-3, got {zero_stage}")
    grads = 0 if offload_optimizer else 6 * params / n
    optim = 0 if offload_optimizer else 12 * params / n
    # The split must reproduce DeepSpeed's total; if a DeepSpeed upgrade changes its count, say so.
    # DeepSpeed's stage-3 count without offload leaves out the 16-bit parameter partition (2P/N) that
    # its offload branch does count; it is added here.
    expected = gpu + (2 * params // n if zero_stage == 3 and not offload_optimizer else 0)
    if abs(weights + grads + optim - expected) > 1e-6 * expected + 16:
        raise AssertionError(f"split {weights + grads + optim} != DeepSpeed estimate {gpu}: update tsrec/plan")
    if setup.precision == "fp32":
        weights = (4 * params // n if zero_stage == 3 else 4 * params) + (largest_layer * 4 if zero_stage == 3 else 0)
        if offload_params:
            weights = 4 * largest_layer
        grads = 0 if offload_optimizer else 4 * params / n
        optim = 0 if offload_optimizer else (8 if zero_stage == 0 else 12) * params / n
    return {"weights": weights, "gradients": grads, "optimizer": optim}, float(cpu if (offload_optimizer or offload_params) else 0)


def activation_bytes(b: Backbone, setup: Setup, checkpointing: bool, tokens: int) -> float:
    """Saved activations for ``tokens`` tokens per GPU (formula in the module docstring)."""
    e = 2 if setup.precision == "bf16" else 4
    per_layer = 8 * b.hidden + e * (9 * b.hidden + 4 * b.intermediate)
    if checkpointing:
        return tokens * (b.layers * e * b.hidden + per_layer)
    return tokens * (b.layers * per_layer + 8 * b.hidden)  # + the final norm


def evaluate(b: Backbone, setup: Setup, zero_stage: int, offload_optimizer: bool, offload_params: bool,
             lora: bool, checkpointing: bool) -> Candidate:
    params = b.params()
    if lora:
        # Frozen 16-bit base + the trainable part (adapters and SID rows) with its own ZeRO states.
        trainable = b.lora_params(setup.lora_r, list(setup.lora_targets)) + setup.sid_rows * b.hidden * (1 if b.tie else 2)
        states, host = model_states(trainable, setup, zero_stage, offload_optimizer, offload_params, 0)
        states["weights"] += (2 if setup.precision == "bf16" else 4) * params
    else:
        states, host = model_states(params, setup, zero_stage, offload_optimizer, offload_params, b.largest_layer_params())
    tokens = setup.seq_len * setup.micro_batch
    gib = dict(states)
    # ZeRO-3 with contiguous gradients (the SFT loop's setting) allocates one gradient reduce bucket of
    # reduce_bucket_size elements on the device at initialisation; overlap_comm (GPU, ZeRO-2/3) adds its
    # double buffers (module doc).
    elem = 2 if setup.precision == "bf16" else 4
    bucket = GPU_BUCKET if setup.overlap_comm else REDUCE_BUCKET
    gib["buffers"] = (bucket * elem if zero_stage == 3 else 0) + (
        OVERLAP_FACTOR * 2 * bucket * elem if setup.overlap_comm and zero_stage in (2, 3) else 0)
    gib["activations"] = activation_bytes(b, setup, checkpointing, tokens)
    if setup.stage == "sft":
        gib["logits"] = tokens * setup.supervised_fraction * b.vocab * 12
    else:
        # RL: logits only for the completion (logits_to_keep); a frozen reference model in 16-bit
        # (partitioned like the policy under ZeRO-3); the rollout's KV cache for every beam.
        seqs = setup.micro_batch
        gib["logits"] = seqs * setup.rl_completion_len * b.vocab * 12
        gib["reference"] = 2 * params / (setup.world if zero_stage == 3 else 1)
        gib["kv_cache"] = 2 * b.layers * b.kv_dim * 2 * seqs * setup.seq_len
    gib["overhead"] = setup.overhead_gib * GIB
    raw = {k: int(v) for k, v in gib.items()}
    gib = {k: v / GIB for k, v in gib.items()}
    gib["total"] = sum(gib.values())
    gib = {k: round(v, 2) for k, v in gib.items()}
    host_gib = host / GIB
    fits = gib["total"] <= (1 - setup.headroom) * setup.gpu_mem_gib and (setup.host_mem_gib <= 0 or host_gib <= setup.host_mem_gib)
    # Relative step time, a heuristic for ranking only: recomputation is one extra forward (~+1/3),
    # ZeRO-3 all-gathers the weights in forward and backward, offload moves states over PCIe and steps
    # Adam on the CPU; LoRA skips the frozen weights' gradients (~2/3 of a full step).
    t = 1.0 * (1.33 if checkpointing else 1.0) * (1.15 if zero_stage == 3 and setup.world > 1 else 1.0)
    t *= (1.6 if offload_optimizer else 1.0) * (2.0 if offload_params else 1.0) * (0.7 if lora else 1.0)
    return Candidate(zero_stage, offload_optimizer, offload_params, lora, checkpointing, gib,
                     round(host_gib, 2), fits, round(t, 3), raw)


def candidates(b: Backbone, setup: Setup, lora: bool | None = None) -> list[Candidate]:
    """Full fine-tune candidates (ZeRO 2/3 x offload x checkpointing) and LoRA ones (ZeRO-2, as the SFT
    loop allows). ``lora=True``: LoRA only; ``False``: full fine-tune only; ``None``: both."""
    out = []
    if lora is not True:
        for stage, off_opt, off_par in ((2, False, False), (2, True, False), (3, False, False),
                                        (3, True, False), (3, True, True)):
            for ckpt in (False, True):
                out.append(evaluate(b, setup, stage, off_opt, off_par, False, ckpt))
    if lora is not False:
        for ckpt in (False, True):
            out.append(evaluate(b, setup, 2, False, False, True, ckpt))
    return out


def best(cands: list[Candidate], prefer_full: bool = True) -> Candidate | None:
    """The fastest fitting candidate; full fine-tune first unless only LoRA fits (LoRA trains less)."""
    fitting = [c for c in cands if c.fits]
    if prefer_full and any(not c.lora for c in fitting):
        fitting = [c for c in fitting if not c.lora]
    return min(fitting, key=lambda c: (c.relative_step_time, c.gib["total"]), default=None)
