"""The one prompt builder for SFT, RL and evaluation (METHOD.md 1.6, 1.7, 1.8; requirement R3).

Every prompt is three segments (METHOD.md 1.6):

    A (instruction) = PREAMBLE + INSTRUCTION + SUFFIX        SUFFIX = "\\n\\n", TS-Align: "\\n"
    B (user input)  = "### User Input: \\n" + INPUT + "\\n\\n### Response:\\n"
    C (target)      = TARGET + "\\n"  (+ EOS id, added at tokenisation)

Two modes:
- ``canonical`` (default): one next-SID prompt (the SFT wording, with preamble) in SFT, RL and
  evaluation, so the model is evaluated on exactly the prompt it was trained on.
- ``upstream``: byte-for-byte the public TS-Rec/MiniOneRec strings, including their differences: RL
  prompts have no preamble, evaluation uses another next-SID wording.

Every result records its mode (``PromptSample.mode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["canonical", "upstream"]
Stage = Literal["sft", "rl", "eval"]

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n"
)
INPUT_HEADER = "### User Input: \n"
RESPONSE_HEADER = "\n\n### Response:\n"

# name -> (INSTRUCTION, INPUT template). Templates use str.format fields.
TEMPLATES: dict[str, tuple[str, str]] = {
    "next_sid": (
        "Can you predict the next possible item that the user may expect?",
        "The user has interacted with items {history} in chronological order. "
        "Can you predict the next possible item that the user may expect?",
    ),
    "next_sid_eval_upstream": (
        "Can you predict the next possible item that the user may expect?",
        "Can you predict the next possible item the user may expect, given the following chronological "
        "interaction history: {history}",
    ),
    "title_to_sid": ("Answer the question about item identification.", "Which item has the title: {title}?"),
    "sid_to_title": ("Answer the question about item identification.", 'What is the title of item "{sid}"?'),
    "history_to_title": (
        "Can you recommend the next item for the user based on their interaction history?",
        "The user has sequentially interacted with items {history}. Can you recommend the next item for him? "
        "Tell me the title of the item",
    ),
    "token_to_description": (
        "Answer the question about item Semantic ID token identification.",
        "What is the typical scope and shared features of items that contain the token: {token}?",
    ),
    "description_to_token": (
        "Answer the question about item Semantic ID token identification.",
        'What token do the items that have the following scope and shared characteristics contain: "{description}"?',
    ),
    # RL-only tasks (METHOD.md 1.7).
    "description_to_sid": (
        "Answer the question about item identification.",
        'An item can be described as follows: "{description}". Which item is it describing?',
    ),
    "title_history_to_sid": (
        "Can you predict the next possible item that the user may expect?",
        "Given the title sequence of user historical interactive items: {titles}, can you recommend a suitable "
        "next item for the user?",
    ),
}

# TS-Align's instruction ends with one newline where every other task uses two (METHOD.md 1.6).
_SINGLE_NEWLINE_SUFFIX = {"token_to_description", "description_to_token"}


@dataclass(frozen=True)
class PromptSample:
    """One prompt/target pair. ``instruction`` + ``user_input`` is the prompt; ``target`` excludes "\\n"."""

    task: str
    instruction: str  # segment A ("" for upstream RL prompts, which have no preamble)
    user_input: str  # segment B
    target: str  # TARGET without the trailing newline
    mode: Mode = "canonical"

    @property
    def prompt(self) -> str:
        return self.instruction + self.user_input

    @property
    def completion(self) -> str:
        """Segment C without EOS."""
        return self.target + "\n"


def join_history(sids: Sequence[str]) -> str:
    """H = ", ".join(history SIDs), oldest first."""
    return ", ".join(sids)


def quote_titles(titles: Sequence[str]) -> str:
    """T for the RL title-history task: each title in double quotes, joined by ", "."""
    return ", ".join(f'"{t}"' for t in titles)


def build(task: str, target: str = "", *, mode: Mode = "canonical", stage: Stage = "sft", **fields: str) -> PromptSample:
    """Build any task's prompt from its named template.

    Args:
        task: a key of :data:`TEMPLATES` (``next_sid``, ``title_to_sid``, ...).
        target: the response text without the trailing newline ("" for pure prompts).
        mode: ``canonical`` or ``upstream``.
        stage: ``sft``, ``rl`` or ``eval``; only changes the string in upstream mode.
        **fields: template fields (``history``, ``title``, ``sid``, ``token``, ``description``, ``titles``).
    """
    if mode not in ("canonical", "upstream"):
        raise ValueError(f"prompt mode {mode!r} is not canonical or upstream")
    name = task
    if task == "next_sid" and mode == "upstream" and stage == "eval":
        name = "next_sid_eval_upstream"
    try:
        instruction, template = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt task {task!r}; known: {sorted(TEMPLATES)}") from None
    suffix = "\n" if task in _SINGLE_NEWLINE_SUFFIX else "\n\n"
    segment_a = PREAMBLE + instruction + suffix
    if mode == "upstream" and stage == "rl":
        segment_a = ""  # upstream RL prompts have no preamble (METHOD.md 1.7)
    segment_b = INPUT_HEADER + template.format(**fields) + RESPONSE_HEADER
    return PromptSample(task=task, instruction=segment_a, user_input=segment_b, target=target, mode=mode)


# Convenience builders: names say what the task is; all go through `build`.


def next_sid(history: Sequence[str], target_sid: str = "", *, mode: Mode = "canonical", stage: Stage = "sft") -> PromptSample:
    return build("next_sid", target_sid, mode=mode, stage=stage, history=join_history(history))


def title_to_sid(title: str, sid: str, *, mode: Mode = "canonical", stage: Stage = "sft") -> PromptSample:
    return build("title_to_sid", sid, mode=mode, stage=stage, title=title)


def sid_to_title(sid: str, title: str, *, mode: Mode = "canonical") -> PromptSample:
    return build("sid_to_title", title, mode=mode, sid=sid)


def history_to_title(history: Sequence[str], title: str, *, mode: Mode = "canonical") -> PromptSample:
    return build("history_to_title", title, mode=mode, history=join_history(history))


def token_to_description(token: str, description: str, *, mode: Mode = "canonical") -> PromptSample:
    return build("token_to_description", description, mode=mode, token=token)


def description_to_token(description: str, token: str, *, mode: Mode = "canonical") -> PromptSample:
    return build("description_to_token", token, mode=mode, description=description)


def description_to_sid(description: str, sid: str, *, mode: Mode = "canonical", stage: Stage = "rl") -> PromptSample:
    return build("description_to_sid", sid, mode=mode, stage=stage, description=description)


def title_history_to_sid(titles: Sequence[str], sid: str, *, mode: Mode = "canonical", stage: Stage = "rl") -> PromptSample:
    return build("title_history_to_sid", sid, mode=mode, stage=stage, titles=quote_titles(titles))


# --------------------------------------------------------------------------------------------------
# Tokenisation (METHOD.md 1.6): segments are tokenised separately and concatenated.
# --------------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, sample: PromptSample) -> list[int]:
    """Token ids of segments A and B, tokenised separately; BOS first if the tokenizer defines one.

    The same ids are used as the SFT prompt part and as the evaluation/RL prompt, so what the model is
    evaluated on is exactly what it was trained on.
    """
    ids: list[int] = []
    if sample.instruction and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    return ids + _ids(tokenizer, sample.instruction) + _ids(tokenizer, sample.user_input)


def encode_sft(tokenizer, sample: PromptSample, cutoff_len: int = 512) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one SFT sample: labels are -100 on A+B, C (+ "\\n" + EOS) is supervised.

    Sequences over ``cutoff_len`` keep their last ``cutoff_len`` tokens (the preamble is cut first).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; SFT targets end with EOS")
    prompt = encode_prompt(tokenizer, sample)
    response = _ids(tokenizer, sample.completion) + [tokenizer.eos_token_id]
    input_ids = prompt + response
    labels = [-100] * len(prompt) + response
    if len(input_ids) > cutoff_len:
        input_ids, labels = input_ids[-cutoff_len:], labels[-cutoff_len:]
    return input_ids, labels
