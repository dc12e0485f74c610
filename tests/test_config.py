"""The config schema: YAML + overrides, named errors, every shipped config validates."""

from pathlib import Path

import pytest

from tsrec.cli import main
from tsrec.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["sid.levels=4", "sft.lr=1e-4", "eval.ks=[1,5]", "data.source=minionerec", "sft.lora.enabled=true"])
    assert isinstance(cfg, Config)
    assert cfg.sid.levels == 4 and cfg.sft.lr == 1e-4 and cfg.eval.ks == [1, 5]
    assert cfg.data.source == "minionerec" and cfg.sft.lora.enabled is True
    assert cfg.sid.codebook_size == 256  # untouched default


def test_yaml_then_override_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 7\nsid:\n  levels: 2\n")
    cfg = load_config(path, ["sid.levels=3"])
    assert cfg.run.seed == 7 and cfg.sid.levels == 3


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["run.seed=3", "sft.tasks.ts_align.loss_weight=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("sid.levels=abc", "sid.levels: expected an integer"),
        ("sid.nope=1", "unknown config key 'sid.nope'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("data.source=csv", "data.source: 'csv' is not one of"),
        ("sft.lora.enabled=3", "sft.lora.enabled: expected true/false"),
        ("eval.ks=[1,x]", "eval.ks[1]: expected an integer"),
        ("sft.lr=fast", "sft.lr: expected a number"),
        ("sid=3", "sid: expected a mapping"),
        ("novalue", "expected key.sub=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    typed = tmp_path / "typed.yaml"
    typed.write_text("sft:\n  tasks:\n    next_sid:\n      share: high\n")
    with pytest.raises(ConfigError, match="sft.tasks.next_sid.share: expected a number"):
        load_config(typed)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    if cfg.tune.space:  # a sweep file: its space, metric and scheduler are checked as `tsrec tune` does first
        from tsrec.tune.space import count_trials, parse_space, sft_best_metric

        assert count_trials(parse_space(cfg.tune), cfg.tune) > 0
        sft_best_metric(cfg)


def test_cli_reports_config_errors(capsys):
    assert main(["data", "prepare", "--out", "x", "sid.levels=abc"]) == 2
    assert "sid.levels: expected an integer" in capsys.readouterr().err


def test_unquoted_dates_are_strings(tmp_path):
    cfg = load_config(None, ["data.window_start=2015-10-01"])
    assert cfg.data.window_start == "2015-10-01"
