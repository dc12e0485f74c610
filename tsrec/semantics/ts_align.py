"""TS-Align samples (METHOD.md 1.6, task 4): two SFT samples per teacher record.

- 4a token -> description: "What is the typical scope and shared features of items that contain the
  token: {token}?" -> description;
- 4b description -> token: 'What token do the items that have the following scope and shared
  characteristics contain: "{description}"?' -> token (a single token at a single level, never a SID).

Both come from :mod:`tsrec.prompts` (the one prompt builder; TS-Align's instruction ends with one
newline). Only the description is aligned; keywords are used by SA-Init alone. The SFT task mixture
imports :func:`ts_align_samples`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tsrec import prompts
from tsrec.prompts import Mode, PromptSample


def ts_align_samples(records: Iterable[dict[str, Any]], mode: Mode = "canonical") -> list[PromptSample]:
    """Token->description then description->token for each record, in record (file) order.

    Args:
        records: teacher records ``{"token", "description", ...}`` (``read_teacher_file``).
        mode: prompt mode; TS-Align strings are the same in both modes.

    Returns:
        ``2 * len(records)`` samples.
    """
    out: list[PromptSample] = []
    for rec in records:
        out.append(prompts.token_to_description(rec["token"], rec["description"], mode=mode))
        out.append(prompts.description_to_token(rec["description"], rec["token"], mode=mode))
    return out
