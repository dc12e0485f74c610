"""Stage 1.1 from raw Amazon Reviews 2018 files (METHOD.md 1.1), streamed and columnar.

Inputs (in ``data.input``): ``{Category}_5.json[.gz]`` (JSON lines with ``reviewerID``, ``asin``,
``unixReviewTime``) and ``meta_{Category}.json[.gz]`` (JSON lines with ``asin``, ``title``,
``description`` list, ``brand``). Outputs (via ``tsrec.data.prepare``): items.parquet, train/valid/
test.parquet. Command: ``tsrec data prepare --source amazon2018 --input DIR --category Industrial_and_Scientific --out DIR``.

Both files are read block-wise with pyarrow (only the needed fields are parsed); the filtering loop,
id assignment and sample building are NumPy array operations, so files far larger than memory work
as long as the projected (user, item, time) columns fit. The meta file is read twice: titles first
(the item filter), then descriptions and brands of the surviving items only.

Definitions where METHOD.md leaves room (all deterministic):
- Title filter: drop a meta row with no title, a title containing ``<span id``; otherwise replace
  ``&quot;``/``&amp;``, strip spaces, then double quotes, and drop it if the result has <= 1 character
  or more than ``max_title_words`` space-separated words. An asin listed on several valid rows takes
  the last one (the upstream dict overwrite).
- Window: ``[window_start, window_end]`` at UTC midnight, both ends inclusive as upstream. While fewer
  than ``min_items`` items survive, the start moves back one year, until it precedes every review.
- k-core: every review is one interaction; users and items with fewer than ``k_core`` interactions in
  the current set are dropped together in one pass, repeated to a fixpoint (the unique maximal core).
- Ids: users by their first surviving review in file order; each user's reviews sorted by
  (time, file order); items by first appearance walking users in id order. Samples and the split
  come from :mod:`tsrec.data.samples`.

Differs from MiniOneRec: UTC instead of the machine's local time for the window bounds; description
is the cleaned list elements joined by spaces, with the upstream stringified form in ``description_raw``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import html
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tsrec.artifacts import InputError
from tsrec.config import ConfigError, DataConfig
from tsrec.data.jsonl import iter_json_batches
from tsrec.data.samples import SourceData, make_samples, split_samples

REVIEW_FIELDS = {"reviewerID": pa.string(), "asin": pa.string(), "unixReviewTime": pa.int64()}
META_TITLE_FIELDS = {"asin": pa.string(), "title": pa.string()}
META_TEXT_FIELDS = {"asin": pa.string(), "description": pa.list_(pa.string()), "brand": pa.string()}


def load_amazon2018(cfg: DataConfig, seed: int) -> SourceData:
    """Read raw Amazon 2018 reviews + meta and build the catalogue and splits (METHOD.md 1.1).

    Args:
        cfg: the ``data`` section (input, category, k_core, window_start/end, min_items, max_history,
            split, max_title_words).
        seed: unused (the procedure has no randomness); kept for the common source signature.

    Returns:
        SourceData with items (item_id, title, description, description_raw, brand, asin) and splits.

    Raises:
        InputError: missing/empty/malformed files, or nothing survives the filters.
    """
    reviews_path, meta_path = find_inputs(Path(cfg.input), cfg.category)
    start_date, end_ts = _parse_date(cfg.window_start, "data.window_start"), _day_ts(_parse_date(cfg.window_end, "data.window_end"))
    skipped: dict[str, int] = {}

    # --- 2. item filter on titles (meta pass 1) ---
    titles = read_titles(meta_path, cfg.max_title_words, skipped)  # asin, title, meta_row; one row per asin

    # --- 1. interactions with a titled item, up to the window end ---
    users, items, times = read_interactions(reviews_path, titles.column("asin"), end_ts, skipped)
    if len(users) == 0:
        raise InputError(reviews_path, "no review has an item with a valid title inside the time window")

    # --- 3-4. k-core inside the window; move the start back a year while too few items survive ---
    start = start_date
    while True:
        in_window = times >= _day_ts(start)
        keep, passes = kcore_mask(users, items, in_window, cfg.k_core)
        n_items = len(np.unique(items[keep]))
        if cfg.min_items <= 0 or n_items >= cfg.min_items or _day_ts(start) <= int(times.min()):
            break
        start = _year_back(start)
    if not keep.any():
        raise InputError(reviews_path, f"no interaction survives the {cfg.k_core}-core filter inside [{start}, {cfg.window_end}]")
    skipped["reviews_before_window"] = int((~in_window).sum())
    skipped["reviews_kcore"] = int((in_window & ~keep).sum())

    # --- 5. ids: users by first appearance, items by first appearance in users' time-sorted reviews ---
    user_idx, item_rows, ts = assign_ids(users[keep], items[keep], times[keep])
    seen, first = np.unique(item_rows, return_index=True)
    item_order = seen[np.argsort(first, kind="stable")]  # title-table rows in item-id order
    remap = np.empty(titles.num_rows, dtype=np.int64)
    remap[item_order] = np.arange(len(item_order))
    item_ids = remap[item_rows]

    # --- 6-7. sliding-window samples, global chronological split ---
    samples = make_samples(user_idx, item_ids, ts, cfg.max_history)
    splits = split_samples(samples, cfg.split)

    # --- item text of the survivors (meta pass 2) ---
    kept_titles = titles.take(pa.array(item_order))
    text = read_item_text(meta_path, kept_titles.column("meta_row").to_numpy())
    items_table = pa.table(
        {
            "item_id": pa.array(np.arange(len(item_order)), pa.int64()),
            "title": kept_titles.column("title"),
            "description": pa.array(text["description"], pa.string()),
            "description_raw": pa.array(text["description_raw"], pa.string()),
            "brand": pa.array(text["brand"], pa.string()),
            "asin": kept_titles.column("asin"),
        }
    )
    stats = {
        "interactions": int(keep.sum()),
        "window_start_used": start.isoformat(),
        "window_end": cfg.window_end,
        "kcore_passes": passes,
        "min_items_reached": cfg.min_items <= 0 or n_items >= cfg.min_items,
        "skipped": skipped,
    }
    return SourceData(items_table, splits, {"reviews": reviews_path, "meta": meta_path}, stats)


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


def find_inputs(folder: Path, category: str) -> tuple[Path, Path]:
    """Locate ``{category}_5.json[.gz]`` and ``meta_{category}.json[.gz]``; infer a unique category."""
    if not folder.is_dir():
        raise InputError(folder, "input folder not found (set data.input / --input)")
    if not category:
        found = sorted({f.name.split("_5.json")[0] for f in folder.iterdir() if re.fullmatch(r".+_5\.json(\.gz)?", f.name)})
        if len(found) != 1:
            raise InputError(folder, f"cannot infer the category from {found or 'no *_5.json[.gz] files'}; set data.category / --category")
        category = found[0]
    paths = []
    for stem in (f"{category}_5", f"meta_{category}"):
        options = [folder / f"{stem}.json", folder / f"{stem}.json.gz"]
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            raise InputError(options[0], "missing file (also tried .json.gz)")
        paths.append(hit)
    return paths[0], paths[1]


def read_titles(meta_path: Path, max_words: int, skipped: dict[str, int]) -> pa.Table:
    """Apply the title filter to every meta row; return ``asin, title, meta_row`` (unique asins, file order)."""
    parts, offset = [], 0
    reasons = {"meta_no_title": 0, "meta_title_span_id": 0, "meta_title_too_short": 0, "meta_title_too_long": 0}
    for batch in iter_json_batches(meta_path, META_TITLE_FIELDS, required=("asin",)):
        title = batch.column("title")
        no_title = pc.is_null(title)
        span = pc.fill_null(pc.match_substring(title, "<span id"), False)
        clean = pc.replace_substring(pc.replace_substring(title, "&quot;", '"'), "&amp;", "&")
        clean = pc.utf8_trim(pc.utf8_trim(clean, " "), '"')  # strip(" ") then strip('"'), as upstream
        short = pc.fill_null(pc.less_equal(pc.utf8_length(clean), 1), False)
        long = pc.fill_null(pc.greater(pc.list_value_length(pc.split_pattern(clean, " ")), max_words), False)
        # count each dropped row once, under its first failing rule
        bad = np.zeros(batch.num_rows, dtype=bool)
        for name, rule in zip(reasons, (no_title, span, short, long)):
            hit = rule.to_numpy(zero_copy_only=False) & ~bad
            reasons[name] += int(hit.sum())
            bad |= hit
        good = pa.array(~bad)
        rows = pa.array(np.arange(offset, offset + batch.num_rows, dtype=np.int64))
        parts.append(pa.table({"asin": batch.column("asin"), "title": clean, "meta_row": rows}).filter(good))
        offset += batch.num_rows
    table = pa.concat_tables(parts)
    # the last valid row of an asin wins (upstream builds a dict asin -> title in file order)
    codes = pc.dictionary_encode(table.column("asin")).combine_chunks().indices.to_numpy()
    _, last_rev = np.unique(codes[::-1], return_index=True)
    last = np.sort(len(codes) - 1 - last_rev)
    skipped.update(reasons)
    skipped["meta_duplicate_asin"] = table.num_rows - len(last)
    return table.take(pa.array(last)).combine_chunks()


def read_interactions(reviews_path: Path, asins: pa.ChunkedArray, end_ts: int, skipped: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream reviews; keep those whose item has a valid title and whose time is <= ``end_ts``.

    Returns:
        (users, items, times): (N,) int64 arrays in file order; users are dictionary codes, items are
        row indices into the title table.
    """
    value_set = asins.combine_chunks()
    user_parts, item_parts, time_parts = [], [], []
    untitled = late = 0
    for batch in iter_json_batches(reviews_path, REVIEW_FIELDS, required=tuple(REVIEW_FIELDS)):
        item = pc.index_in(batch.column("asin"), value_set=value_set)
        titled = pc.is_valid(item)
        in_time = pc.less_equal(batch.column("unixReviewTime"), end_ts)
        mask = pc.and_(titled, in_time)
        untitled += batch.num_rows - titled.true_count
        late += titled.true_count - mask.true_count
        user_parts.append(batch.column("reviewerID").filter(mask))
        item_parts.append(item.filter(mask))
        time_parts.append(batch.column("unixReviewTime").filter(mask))
    skipped["reviews_untitled_item"] = int(untitled)
    skipped["reviews_after_window"] = int(late)
    users = pc.dictionary_encode(pa.chunked_array(user_parts, pa.string()).combine_chunks()).indices
    items = pa.chunked_array(item_parts, pa.int32()).combine_chunks()
    times = pa.chunked_array(time_parts, pa.int64()).combine_chunks()
    return (users.to_numpy().astype(np.int64), items.to_numpy().astype(np.int64), times.to_numpy().astype(np.int64))


def kcore_mask(users: np.ndarray, items: np.ndarray, in_window: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core on the interactions inside the window; returns (keep mask, passes).

    Every pass starts from the window mask intersected with the survivors (the window is re-applied
    inside every pass, METHOD.md 1.1 step 3) and drops users and items below ``k`` together.
    """
    keep = in_window.copy()
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    passes = 0
    while True:
        passes += 1
        user_counts = np.bincount(users[keep], minlength=n_users)
        item_counts = np.bincount(items[keep], minlength=n_items)
        drop = keep & ((user_counts[users] < k) | (item_counts[items] < k))
        if not drop.any():
            return keep, passes
        keep &= ~drop


def assign_ids(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense user ids by first appearance (file order); sort by (user id, time, file order).

    Args: (N,) arrays of the surviving interactions in file order.
    Returns: (user ids, items, times) sorted by user id, then time, then file order.
    """
    codes, first = np.unique(users, return_index=True)
    rank = np.empty(int(codes.max()) + 1, dtype=np.int64)
    rank[codes[np.argsort(first, kind="stable")]] = np.arange(len(codes))
    user_idx = rank[users]
    order = np.lexsort((np.arange(len(users)), times, user_idx))  # last key is the primary one
    return user_idx[order], items[order], times[order]


def read_item_text(meta_path: Path, meta_rows: np.ndarray) -> dict[str, list[str]]:
    """Description, upstream-style raw description and brand of the given meta rows (meta pass 2)."""
    wanted = np.sort(meta_rows)
    found: dict[int, tuple[list | None, str | None]] = {}
    offset = 0
    for batch in iter_json_batches(meta_path, META_TEXT_FIELDS, required=("asin",)):
        rows = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
        hit = np.nonzero(np.isin(rows, wanted))[0]
        if len(hit):
            sub = batch.take(pa.array(hit))
            for row, desc, brand in zip(rows[hit], sub.column("description").to_pylist(), sub.column("brand").to_pylist()):
                found[int(row)] = (desc, brand)
        offset += batch.num_rows
    out: dict[str, list[str]] = {"description": [], "description_raw": [], "brand": []}
    for row in meta_rows:
        desc, brand = found[int(row)]
        parts = [clean_text(d) for d in desc or [] if d]
        out["description"].append(" ".join(p for p in parts if p))
        out["description_raw"].append(clean_text(str(desc)) if desc else "")
        out["brand"].append((brand or "").replace("by\n", "").strip())
    return out


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Drop HTML tags, decode entities, collapse whitespace (the upstream description cleaning)."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub("", text))).strip()


def _parse_date(text: str, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{key}: expected an ISO date like 2016-10-01, got {text!r}") from None


def _day_ts(day: dt.date) -> int:
    """Unix seconds of UTC midnight starting ``day``."""
    return calendar.timegm(day.timetuple())


def _year_back(day: dt.date) -> dt.date:
    return day.replace(year=day.year - 1, day=min(day.day, 28) if day.month == 2 else day.day)
