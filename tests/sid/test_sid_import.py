"""``sid.method=import`` (tsrec/sid/imported.py): an existing index.json as the SID stage.

One test per bad-index case on small hand-written files, the SID folder an import writes, the pipeline
stage's identity following the file's content, and the released Industrial index when ../shared/data
is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared

from tsrec.artifacts import InputError, file_sha256, read_manifest, write_parquet
from tsrec.config import ConfigError, load_config
from tsrec.sid.build import build_sids
from tsrec.sid.imported import import_sids
from tsrec.sid.index import read_index

GOOD = {
    "0": ["<a_1>", "<b_2>", "<c_3>"],
    "1": ["<a_1>", "<b_2>", "<c_4>"],
    "2": ["<a_2>", "<b_0>", "<c_3>"],
    "3": ["<a_2>", "<b_1>", "<c_0>"],
}
TOKENS = sorted({t for toks in GOOD.values() for t in toks})  # 8 tokens: a 1,2; b 0,1,2; c 0,3,4


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A tiny catalogue: items 0..3."""
    out = tmp_path / "data"
    write_parquet(pa.table({"item_id": pa.array([0, 1, 2, 3], pa.int64()),
                            "title": ["drill", "drill bit", "glue", "tape"],
                            "description": ["", "", "", ""]}), out / "items.parquet")
    return out


def _index(tmp_path: Path, obj=GOOD, name: str = "my.index.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def _teacher(tmp_path: Path, tokens) -> Path:
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps([{"description": f"Items sharing {t}.", "keywords": ["tools", "glue"], "token": t}
                                for t in tokens]), encoding="utf-8")
    return path


def _cfg(index_file: Path, *extra: str):
    return load_config(None, ["sid.method=import", f"sid.index_file={index_file}", *extra])


def _bad(tmp_path, data_dir, obj, *extra: str) -> InputError:
    """Import ``obj`` and return the InputError; nothing may be written."""
    path = _index(tmp_path, obj)
    with pytest.raises(InputError) as err:
        import_sids(_cfg(path, *extra), data_dir, tmp_path / "sids")
    assert not (tmp_path / "sids").exists()
    return err.value


# --- the SID folder ------------------------------------------------------------------------------


def test_import_writes_the_sid_folder(tmp_path, data_dir):
    path = _index(tmp_path)
    # Through `tsrec sid build`'s entry point: the method dispatches to the import.
    stats = build_sids(_cfg(path), data_dir, tmp_path / "sids")
    out = tmp_path / "sids"
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "manifest.json", "sids.parquet", "stats.json"]
    assert read_index(out).items == {int(k): v for k, v in GOOD.items()}
    table = pq.read_table(out / "sids.parquet")
    assert table.column("sid").to_pylist()[2] == "<a_2><b_0><c_3>"
    assert table.column("code_2").to_pylist() == [3, 4, 3, 0]
    assert stats["items"] == 4 and stats["levels"] == 3 and stats["sid_length"] == 3
    assert stats["distinct_tokens_per_level"] == [2, 3, 3]
    assert stats["codebook_size_per_level"] == [3, 3, 5]  # largest code + 1
    assert stats["vocab_tokens"] == 8
    assert stats["collisions"] == {"unique_sids": 4, "collision_groups": 0, "collision_items": 0, "largest_group": 1}
    manifest = read_manifest(out)
    assert manifest["stage"] == "sid" and manifest["config"]["sid"]["method"] == "import"
    assert manifest["stats"]["index_file_sha256"] == file_sha256(path)
    assert manifest["inputs"]["index_file"]["path"] == str(path)
    assert manifest["inputs"]["items"]["path"] == str(data_dir / "items.parquet")
    assert json.loads((out / "stats.json").read_text()) == manifest["stats"]


def test_pipeline_stage_identity_follows_the_file_content(tmp_path, data_dir):
    """The `sid` stage of `tsrec run` imports without Ray; an edited file (same path) reruns it and
    changes the identity of every later stage."""
    from tsrec.orchestration import pipeline

    root = tmp_path / "run"
    root.mkdir()
    data_dir.rename(root / "data")
    path = _index(tmp_path)
    cfg = _cfg(path)
    _, seconds = pipeline.run_stage(cfg, "sid", root, log=lambda s: None)
    assert seconds is not None and (root / "sids" / "manifest.json").exists()
    _, seconds = pipeline.run_stage(cfg, "sid", root, log=lambda s: None)
    assert seconds is None  # unchanged file: up to date
    before = {s: pipeline._config_hash(cfg, s) for s in ("sid", "semantics", "eval")}

    _index(tmp_path, {**GOOD, "3": ["<a_2>", "<b_1>", "<c_1>"]})  # same path, new content
    after = {s: pipeline._config_hash(cfg, s) for s in ("sid", "semantics", "eval")}
    assert all(before[s] != after[s] for s in before), "an edited index file must change sid's and later identities"
    _, seconds = pipeline.run_stage(cfg, "sid", root, log=lambda s: None)
    assert seconds is not None
    assert read_index(root / "sids").items[3] == ["<a_2>", "<b_1>", "<c_1>"]
    assert pipeline._config_hash(cfg, "data") == pipeline._config_hash(load_config(), "data")


def test_config_keys_must_agree(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="sid.method=import needs sid.index_file"):
        import_sids(load_config(None, ["sid.method=import"]), data_dir, tmp_path / "sids")
    with pytest.raises(ConfigError, match="sid.index_file is set but sid.method='rqkmeans'"):
        build_sids(load_config(None, [f"sid.index_file={_index(tmp_path)}"]), data_dir, tmp_path / "sids")


# --- bad indices: one test per case ----------------------------------------------------------------


def test_catalogue_item_missing_from_index(tmp_path, data_dir):
    err = _bad(tmp_path, data_dir, {k: v for k, v in GOOD.items() if k != "2"})
    assert err.file == str(tmp_path / "my.index.json")
    assert "item 2 of the catalogue" in str(err) and "1 of 4 catalogue items missing" in str(err)


def test_index_item_outside_catalogue(tmp_path, data_dir):
    err = _bad(tmp_path, data_dir, {**GOOD, "9": ["<a_1>", "<b_0>", "<c_0>"]})
    assert err.file == str(tmp_path / "my.index.json") and "item 9 is not in the catalogue" in str(err)


def test_duplicate_sids_stop_with_error_mode(tmp_path, data_dir):
    dup = {**GOOD, "3": ["<a_1>", "<b_2>", "<c_4>"]}  # item 3 takes item 1's SID
    err = _bad(tmp_path, data_dir, dup, "sid.import_collisions=error")
    assert err.file == str(tmp_path / "my.index.json")
    assert "items [1, 3] share the SID <a_1><b_2><c_4>" in str(err) and "1 collision group(s), 2 items" in str(err)


def test_duplicate_sids_kept_and_counted_by_default(tmp_path, data_dir, capsys):
    dup = {**GOOD, "3": ["<a_1>", "<b_2>", "<c_4>"]}
    stats = import_sids(_cfg(_index(tmp_path, dup)), data_dir, tmp_path / "sids")
    assert stats["collisions"] == {"unique_sids": 3, "collision_groups": 1, "collision_items": 2, "largest_group": 2}
    assert stats["collision_groups_items"] == [[1, 3]]
    assert "1 collision group(s), 2 items share a SID" in capsys.readouterr().err


def test_duplicate_item_id_in_file(tmp_path, data_dir):
    text = json.dumps(GOOD)[:-1] + ', "1": ["<a_2>", "<b_2>", "<c_2>"]}'  # json.loads would keep the last silently
    err = _bad(tmp_path, data_dir, text)
    assert "item 1 appears more than once" in str(err)


@pytest.mark.parametrize("key", ["x1", "01", "-1", "1_0"])
def test_item_id_not_a_decimal_integer(tmp_path, data_dir, key):
    err = _bad(tmp_path, data_dir, {**GOOD, key: ["<a_1>", "<b_0>", "<c_0>"]})
    assert f"item id {key!r} is not a non-negative decimal integer" in str(err)


@pytest.mark.parametrize("tok", ["<a12>", "a_12", "<a_01>", "<A_12>", "<a_12> ", "<a_-1>"])
def test_malformed_token(tmp_path, data_dir, tok):
    err = _bad(tmp_path, data_dir, {**GOOD, "2": [tok, "<b_0>", "<c_3>"]})
    assert err.file == str(tmp_path / "my.index.json")
    assert f"item 2: token {tok!r} is not a SID token" in str(err)


@pytest.mark.parametrize("sid", [[], "<a_1><b_0><c_0>", ["<a_1>", 3, "<c_0>"]])
def test_sid_not_a_list_of_strings(tmp_path, data_dir, sid):
    err = _bad(tmp_path, data_dir, {**GOOD, "1": sid})
    assert "item 1: expected a non-empty list of SID tokens" in str(err)


def test_wrong_level_letter_order(tmp_path, data_dir):
    err = _bad(tmp_path, data_dir, {**GOOD, "1": ["<b_2>", "<a_1>", "<c_4>"]})
    assert "item 1: token <b_2> at position 1; position 1 takes '<a_*>'" in str(err)


def test_inconsistent_lengths(tmp_path, data_dir):
    err = _bad(tmp_path, data_dir, {**GOOD, "2": ["<a_2>", "<b_0>"]})
    assert "item 2: 2 tokens" in str(err) and "item 0 has 3" in str(err)


def test_too_many_levels(tmp_path, data_dir):
    six = ["<a_1>", "<b_2>", "<c_3>", "<d_0>", "<e_0>", "<f_0>"]
    err = _bad(tmp_path, data_dir, {k: six for k in GOOD})
    assert "item 0: 6 tokens; SIDs have at most 5 levels" in str(err)


def test_collision_level_d_is_accepted(tmp_path, data_dir):
    """tsrec's own extra_level indices (a fourth <d_r> token) import as they are."""
    four = {k: [*v, "<d_0>"] for k, v in GOOD.items()}
    stats = import_sids(_cfg(_index(tmp_path, four)), data_dir, tmp_path / "sids")
    assert stats["sid_length"] == 4 and stats["distinct_tokens_per_level"] == [2, 3, 3, 1]


# --- against the teacher file (teacher.engine=file) ------------------------------------------------


def test_teacher_token_used_by_no_sid_is_an_error(tmp_path, data_dir):
    teacher = _teacher(tmp_path, [*TOKENS, "<a_7>"])
    err = _bad(tmp_path, data_dir, GOOD, "teacher.engine=file", f"teacher.file={teacher}")
    assert err.file == str(teacher) and err.row == 9 and err.field == "token"
    assert "record 9: token <a_7> is used by no SID of the imported index (1 of 9 records)" in str(err)


def test_sid_token_without_record_is_a_counted_warning(tmp_path, data_dir, capsys):
    teacher = _teacher(tmp_path, [t for t in TOKENS if t not in ("<a_2>", "<c_4>")])
    path = _index(tmp_path)
    stats = import_sids(_cfg(path, "teacher.engine=file", f"teacher.file={teacher}"), data_dir, tmp_path / "sids")
    check = stats["teacher_check"]
    assert check["records"] == 6 and check["extra_tokens"] == 0 and check["missing_tokens"] == 2
    assert check["missing_tokens_per_level"] == [1, 0, 1] and check["missing_within_depth"] == 2
    assert "2 SID token(s) of the first sa_init.depth=3 levels have no record" in capsys.readouterr().err

    stats = import_sids(_cfg(path, "teacher.engine=file", f"teacher.file={teacher}", "sa_init.depth=1"), data_dir,
                        tmp_path / "sids")
    assert stats["teacher_check"]["missing_within_depth"] == 1
    err = capsys.readouterr().err
    assert "1 SID token(s) of the first sa_init.depth=1 levels" in err
    assert "1 SID token(s) beyond sa_init.depth=1" in err


def test_teacher_not_checked_for_other_engines(tmp_path, data_dir):
    teacher = _teacher(tmp_path, [*TOKENS, "<a_7>"])
    stats = import_sids(_cfg(_index(tmp_path), f"teacher.file={teacher}"), data_dir, tmp_path / "sids")  # engine hf
    assert stats["teacher_check"] is None


# --- the released Industrial index -----------------------------------------------------------------


def test_released_industrial_index(tmp_path):
    """The authors' index over the prepared Industrial catalogue, checked against the authors' teacher file."""
    from tsrec.data.prepare import prepare_data

    require_shared(INDUSTRIAL)
    require_shared(INDUSTRIAL_TEACHER)
    prepare_data(load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"]), tmp_path / "data")
    source = INDUSTRIAL / "index" / "Industrial_and_Scientific.index.json"
    cfg = _cfg(INDUSTRIAL / "index", "teacher.engine=file", f"teacher.file={INDUSTRIAL_TEACHER}")
    stats = import_sids(cfg, tmp_path / "data", tmp_path / "sids")

    assert stats["index_file"] == str(source) and stats["index_file_sha256"] == file_sha256(source)
    assert stats["items"] == 3686 and stats["levels"] == 3 and stats["codebook_size"] == 256
    assert stats["distinct_tokens_per_level"] == [48, 256, 256] and stats["vocab_tokens"] == 560
    # The released index keeps MiniOneRec's collisions (METHOD.md 1.3): 15 groups, 31 items, largest 3.
    assert stats["collisions"] == {"unique_sids": 3670, "collision_groups": 15, "collision_items": 31,
                                   "largest_group": 3}
    assert stats["collision_groups_items"][0] == [7, 8] and [2659, 3557, 3631] in stats["collision_groups_items"]
    assert stats["data_sid_disagreements"] == 0
    check = stats["teacher_check"]
    assert (check["records"], check["extra_tokens"], check["missing_tokens"]) == (560, 0, 0)
    # Same mapping, same serialisation (the release has no final newline).
    assert (tmp_path / "sids" / "index.json").read_bytes() == source.read_bytes() + b"\n"

    with pytest.raises(InputError, match=r"items \[7, 8\] share the SID <a_210><b_231><c_0> \(15 collision group"):
        import_sids(_cfg(source, "sid.import_collisions=error"), tmp_path / "data", tmp_path / "strict")
