"""Write exported learner weights as a Hugging Face checkpoint directory.

The directory loads with ``AutoModelForCausalLM.from_pretrained`` and with vLLM, so it serves as
the SFT warm-up's per-epoch checkpoint, the RL stage's starting point and reference policy, and an
evaluation target. The tokenizer travels with it: its files are copied verbatim from the base
model directory (re-saving could change the class a custom tokenizer loads as), or saved from
the hub tokenizer when the base is a hub id.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], base_model: str, out_dir: Path) -> Path:
    """Save ``state_dict`` (the HF model's own parameter names) with ``base_model``'s config and
    tokenizer into ``out_dir``. Raises if names or shapes do not match the architecture."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"exported weights do not fit {base_model}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != tuple(shape):
            raise ValueError(f"exported {name} has shape {tuple(state_dict[name].shape)}, the model expects {tuple(shape)}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    try:
        GenerationConfig.from_pretrained(base_model).save_pretrained(out_dir)
    except OSError:
        pass  # the base has no generation_config.json; HF's defaults apply
    copy_tokenizer(base_model, out_dir)
    return out_dir


def copy_tokenizer(base_model: str, out_dir: Path) -> None:
    base = Path(base_model)
    if base.is_dir():
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, Path(out_dir) / name)
    else:
        AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
