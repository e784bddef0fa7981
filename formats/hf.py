"""Loading and saving Hugging Face tokenizers and models: the one place every layer goes through.

Tokenizers. ``load_tokenizer`` loads the project's own word-level tokenizers (``tasks.tiny_model``
builds them) with the class their config names, never through AutoTokenizer's model-type overrides,
and checks an exact round trip; any other checkpoint's tokenizer comes from AutoTokenizer.

The trap (docs/measurements.md §2): transformers 5 replaces the saved tokenizer class for some model types
(qwen2 among them) and `AutoTokenizer` then builds a byte-level Qwen2 BPE from our vocabulary:
other ids, every reward 0. Our ``tokenizer_config.json`` therefore names
``PreTrainedTokenizerFast`` AND carries an ``auto_map`` entry (transformers skips its override when
a checkpoint has one).

Models. ``load_causal_lm`` loads any HF causal LM with dropout off; ``save_hf_checkpoint`` writes
exported weights as an HF directory (loads with ``AutoModelForCausalLM`` and vLLM) with the base
model's config and tokenizer files copied verbatim (re-saving could change the class a custom
tokenizer loads as).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from formats.records import ANSWER_TRIGGER, build_prompt

# transformers 5's names for the generic tokenizers-backed class: ``tasks.tiny_model`` writes the
# first, a re-save (e.g. with a learner checkpoint) writes the second. The auto_map survives a re-save.
TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")

# Always in a project tokenizer's training corpus, so every tokenizer built here can encode it:
# `load_tokenizer`'s round-trip check. It holds the prompt/CoT scaffolding (newlines, indentation,
# quotes, digits).
PROBE = build_prompt("2 + 3 = 5", "pcot") + "    result = 5\n    return result\n" + f"{ANSWER_TRIGGER} 5"

logger = logging.getLogger("reft")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


# ------------------------------------------------------------------------------- tokenizers

def load_tokenizer(path: Union[str, Path]) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint: ours (checked) or any HF model's (via AutoTokenizer).

    A checkpoint whose tokenizer_config.json names the generic class (``PreTrainedTokenizerFast``
    or ``TokenizersBackend``, as ours do) is loaded with that class directly, never through
    AutoTokenizer's model-type overrides, and must reproduce text exactly: the reward parses the
    decoded text, so a tokenizer that alters it cannot be used.
    """
    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file() or json.loads(config_file.read_text()).get("tokenizer_class") not in TOKENIZER_CLASSES:
        return with_pad_token(AutoTokenizer.from_pretrained(path), where=str(path))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    check_round_trip(tokenizer, [PROBE], where=f"the tokenizer at {path}")
    return with_pad_token(tokenizer, where=str(path))


def with_pad_token(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token: its own, else its EOS (logged), as the paper's code pads
    CodeLlama, whose tokenizer has none. Padding is never read: every batch carries its attention
    and response masks, built from lengths, not by comparing ids with the pad id (with pad = EOS
    such a comparison would drop the EOS every target ends with)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer at {where} has neither a pad nor an EOS token: a model must end its "
                             "answers with EOS (set eos_token in its tokenizer_config.json)")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer at %s has no pad token: padding with EOS %r (id %d)", where,
                    tokenizer.eos_token, tokenizer.eos_token_id)
    return tokenizer


def check_round_trip(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], where: str):
    """Raise unless every text encodes without <unk> and decodes back to itself exactly.

    A tokenizer that fails this would make the model's outputs differ from what the reward parses.
    """
    for text in texts:
        ids = tokenizer.encode(text)
        decoded = tokenizer.decode(ids)
        if tokenizer.unk_token_id in ids or decoded != text:
            raise ValueError(f"{where}: the tokenizer does not round-trip {text[:80]!r} (got {decoded[:80]!r}); "
                             "build the tokenizer with tasks.tiny_model.build_tiny_model from a corpus that "
                             "covers this text")


def decode_completion(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int],
                      completion_ids: Sequence[int]) -> str:
    """The text a completion adds to its prompt, special tokens skipped: decode(prompt +
    completion) minus decode(prompt), as vLLM's incremental detokenizer gives it. Decoding the
    completion alone is not the same for SentencePiece-style tokenizers (Llama's), whose decoder
    drops the first space of a sequence: a P-CoT body's first line would lose one space of its
    indentation and fail to run."""
    prefix = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    whole = tokenizer.decode(list(prompt_ids) + list(completion_ids), skip_special_tokens=True)
    if whole.startswith(prefix):
        return whole[len(prefix):]
    return tokenizer.decode(list(completion_ids), skip_special_tokens=True)   # a decoder that rewrites the prompt


# ------------------------------------------------------------------------------- models


def load_causal_lm(path_or_id: str, dtype: str, base_only: bool = False) -> PreTrainedModel:
    """An HF model with every dropout set to 0 (``base_only``: without the LM head, for a critic).

    Dropout is switched off in the config, before the modules copy their rates: PPO's ratio
    compares the policy under training with the log-probs recomputed in eval mode, and dropout
    would make them differ before any update (the paper's code calls ``disable_dropout_in_model``).
    Every config float whose name says dropout ("attention_dropout", GPT-2's "attn_pdrop", ...) is
    zeroed; the nn.Dropout modules are zeroed too, for models that hard-code a rate.
    """
    config = AutoConfig.from_pretrained(path_or_id)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    cls = AutoModel if base_only else AutoModelForCausalLM
    model = cls.from_pretrained(path_or_id, config=config, dtype=TORCH_DTYPES[dtype])
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


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
