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
    assert list(base.pipeline.stages) == list(STAGES)
    changed_eval = load_config(None, ["eval.beams=5"])
    changed_data = load_config(None, ["data.synthetic.n_items=10"])
    assert all(_config_hash(base, s) == _config_hash(changed_eval, s) for s in STAGES if s != "eval")
    assert _config_hash(base, "eval") != _config_hash(changed_eval, "eval")
    assert all(_config_hash(base, s) != _config_hash(changed_data, s) for s in STAGES)
