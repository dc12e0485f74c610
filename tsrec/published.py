"""Published test results on the MiniOneRec datasets, for the report to show beside a run's own (``eval.published``).

Copied by hand from METHOD.md 4.1 (the MiniOneRec paper's main table: full ranking, temporal split, same data and
SIDs as tsrec's MiniOneRec format) and 4.3 (users' reproductions of the public code). They are not run here:
the report labels them "published" with their setting.
"""

from __future__ import annotations

from typing import Any

KEYS = ("hr@3", "ndcg@3", "hr@5", "ndcg@5", "hr@10", "ndcg@10")
MOR = "MiniOneRec paper, Table (METHOD.md 4.1)"


def _rows(source: str, setting: str, table: str) -> list[dict[str, Any]]:
    out = []
    for line in table.strip().splitlines():
        name, *values = line.split("|")
        out.append({"name": name.strip(), "setting": setting, "source": source,
                    **{k: float(v) for k, v in zip(KEYS, values) if v.strip()}})
    return out


PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "Industrial_and_Scientific": _rows(MOR, "as published (backbone not stated)", """
        SASRec | 0.0790 | 0.0700 | 0.0909 | 0.0748 | 0.1088 | 0.0806
        HSTU | 0.0927 | 0.0885 | 0.1037 | 0.0918 | 0.1163 | 0.0958
        TIGER | 0.0852 | 0.0742 | 0.1010 | 0.0807 | 0.1321 | 0.0908
        LC-Rec | 0.0915 | 0.0805 | 0.1057 | 0.0862 | 0.1332 | 0.0952
        BIGRec | 0.0931 | 0.0841 | 0.1092 | 0.0907 | 0.1370 | 0.0997
        S-DPO | 0.1032 | 0.0906 | 0.1238 | 0.0991 | 0.1524 | 0.1082
        MiniOneRec (SFT+RL) | 0.1143 | 0.1011 | 0.1321 | 0.1084 | 0.1586 | 0.1167
    """) + _rows("MiniOneRec issue #35 (METHOD.md 4.3)", "users' reproduction: Qwen2.5-1.5B, 8 x H100", """
        MiniOneRec SFT, reproduced | 0.0902 | 0.0804 | 0.1050 | 0.0865 | 0.1370 | 0.0969
        MiniOneRec SFT+RL, reproduced | 0.0984 | 0.0883 | 0.1107 | 0.0935 | 0.1313 | 0.1001
    """),
    "Office_Products": _rows(MOR, "as published (backbone not stated)", """
        SASRec | 0.0861 | 0.0769 | 0.0949 | 0.0805 | 0.1120 | 0.0858
        HSTU | 0.1134 | 0.1031 | 0.1252 | 0.1079 | 0.1400 | 0.1126
        TIGER | 0.0986 | 0.0852 | 0.1163 | 0.0960 | 0.1408 | 0.1002
        MiniOneRec (SFT+RL) | 0.1217 | 0.1088 | 0.1420 | 0.1172 | 0.1634 | 0.1242
    """),
}


def published_rows(dataset: str) -> list[dict[str, Any]]:
    """The published rows of ``dataset`` (a key of :data:`PUBLISHED`); KeyError names the known ones."""
    if dataset not in PUBLISHED:
        raise KeyError(f"no published results for {dataset!r}; known: {sorted(PUBLISHED)}")
    return PUBLISHED[dataset]
