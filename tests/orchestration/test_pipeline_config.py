"""`tsrec run` rejects bad stage lists before starting anything, and hashes config per stage."""

import pytest

from tsrec.config import ConfigError, load_config
from tsrec.orchestration.pipeline import STAGES, _config_hash, run_pipeline


@pytest.mark.parametrize(
    "stages, message",
    [("[data, train]", "unknown stage"), ("[sid, data]", "must follow the pipeline order")],
)
def test_bad_stage_lists(tmp_path, stages, message):
    cfg = load_config(None, [f"pipeline.stages={stages}", f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg)


def test_stage_hash_covers_own_and_upstream_sections():
    base = load_config(None)
    # Every stage runs by default except the optional RL stage (between sft and eval when listed).
    assert list(base.pipeline.stages) == [s for s in STAGES if s != "rl"]
    changed_eval = load_config(None, ["eval.beams=5"])
    changed_data = load_config(None, ["data.synthetic.n_items=10"])
    assert all(_config_hash(base, s) == _config_hash(changed_eval, s) for s in STAGES if s != "eval")
    assert _config_hash(base, "eval") != _config_hash(changed_eval, "eval")
    assert all(_config_hash(base, s) != _config_hash(changed_data, s) for s in STAGES)


def test_stage_rewritten_by_hand_is_not_skipped(tmp_path):
    """`tsrec sft --lr ...` run by hand into the pipeline's sft/ replaces its outputs: the next `tsrec run`
    must not skip the stage on the old marker (it would keep the hand-run model)."""
    import json

    from tsrec.artifacts import write_manifest
    from tsrec.orchestration.pipeline import MARKER, _manifest_sha, _up_to_date

    cfg = load_config(None)
    write_manifest(tmp_path, "sft", cfg)
    (tmp_path / MARKER).write_text(json.dumps({"stage": "sft", "config_sha256": _config_hash(cfg, "sft"),
                                               "manifest_sha256": _manifest_sha(tmp_path)}))
    assert _up_to_date(cfg, "sft", tmp_path)
    write_manifest(tmp_path, "sft", load_config(None, ["sft.lr=3e-2"]))  # the hand-run's outputs
    assert not _up_to_date(cfg, "sft", tmp_path)
