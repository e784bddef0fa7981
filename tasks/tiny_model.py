"""A word-level tokenizer trained on the synthetic corpus and a tiny random-init Qwen2 (or Llama).

Both are saved with ``save_pretrained`` into one directory that HF (`AutoModelForCausalLM`,
`AutoTokenizer`) and vLLM load like any checkpoint.

Tokenizer. Text is split into pieces that keep their leading space (``" apples"``, ``" 19"``,
``" ="``), a newline on its own, and runs of spaces (indentation). ``_`` is a piece of its own,
so program variables such as ``mia_apples`` reuse the words' tokens instead of each adding one to
the vocabulary. Each piece seen in the corpus is one token, and so is every integer in
[0, max_value] with and without a leading space: any arithmetic result is one token, and
``decode(encode(text)) == text`` exactly (`decoders.Fuse` just concatenates). The newline is
never merged with the indentation after it, so that tokenizing a prompt (which ends with ``\\n``)
and its completion separately gives the same ids as tokenizing the two together: the ids vLLM
samples after a prompt are the ids SFT trained on.

The trap (docs/measurements.md §2): transformers 5 replaces the saved tokenizer class for some model types
(qwen2 among them, ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``) and `AutoTokenizer` then builds a
byte-level Qwen2 BPE from our vocabulary: other ids, every reward 0. ``tokenizer_config.json``
therefore names ``PreTrainedTokenizerFast`` AND carries an ``auto_map`` entry; transformers skips
its override when a checkpoint has one, and without ``trust_remote_code=True`` it then loads the
class the config names. (With ``trust_remote_code=True`` it fails loudly: there is no remote code.)
`formats.hf.load_tokenizer` sidesteps `AutoTokenizer` for our checkpoints altogether and checks a round trip.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Union

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from formats.hf import PROBE, TOKENIZER_CLASSES, check_round_trip
from formats.records import Example, build_prompt, pcot_header

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"   # Qwen2 uses no BOS token, so there is none

# A newline; a word, number or punctuation mark with its optional leading space; a run of spaces.
PIECE_PATTERN = r"\n| ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]| +"


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    arch: str = "qwen2"
    """"qwen2" (q/k/v biases), the architecture docs/measurements.md §2 calibrated; "llama" is CodeLLaMA's, the
    paper's main model (same blocks without biases). HF and vLLM run both without custom code."""
    hidden_size: int = 256
    """The calibrated width (docs/measurements.md §2): SFT from scratch learns 1-2 step problems in minutes on 2 cores."""
    num_layers: int = 4
    """The calibrated depth; with hidden 256 the model has ~3 M parameters, ~2,500 tokens/s of SFT here."""
    num_heads: int = 4
    """Head dimension 64 (256 / 4), the common size; vLLM's CPU attention runs it (tests/test_tiny_model.py)."""
    num_kv_heads: int = 2
    """Grouped-query attention as in real Qwen2 checkpoints, so the learner and vLLM exercise the
    same code paths as with a 7B model; the KV cache it saves is irrelevant at this size."""
    intermediate_size: int = 704
    """SwiGLU has three matrices, so ~8/3 x hidden (the Llama rule) matches a 4 x hidden GELU MLP in
    parameters; 8/3 x 256 = 683 rounded up to a multiple of 64."""
    max_position_embeddings: int = 1024
    """The paper's SFT max length (prompt + answer); RL uses 700."""
    tie_word_embeddings: bool = True
    """With a vocabulary of ~700 the untied head would be a sizeable share of a 3 M model for no gain."""
    seed: int = 0
    """Seeds the random initialisation: same seed, same weights."""

    def __post_init__(self):
        if self.arch not in ("qwen2", "llama"):
            raise ValueError(f"TinyModelConfig.arch = {self.arch!r}: must be 'qwen2' or 'llama'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyModelConfig.num_heads = {self.num_heads}: must divide hidden_size "
                             f"({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyModelConfig.num_kv_heads = {self.num_kv_heads}: must divide num_heads "
                             f"({self.num_heads})")


def corpus_from_examples(examples: Iterable[Example]) -> list[str]:
    """The texts the model will see: each prompt followed by its gold CoT.

    A P-CoT's first lines repeat the prompt's function header, so only the rest is appended.
    """
    texts = []
    for e in examples:
        completion = e.cot or ""
        if e.cot_kind == "pcot":
            completion = completion.removeprefix(pcot_header(e.question))
        texts.append(build_prompt(e.question, e.cot_kind) + completion)
    return texts


def train_tokenizer(corpus_texts: Iterable[str], max_value: int,
                    model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every piece of the corpus plus every integer 0..max_value."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    integers = [f"{prefix}{i}" for i in range(max_value + 1) for prefix in ("", " ")]
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK], min_frequency=0, show_progress=False)
    tokenizer.train_from_iterator([*corpus_texts, PROBE, *integers], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)


LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")   # ids 0, 1, 2 as in Llama / CodeLlama; no pad token


def train_llama_tokenizer(corpus_texts: Iterable[str], vocab_size: int = 2000,
                          model_max_length: int = 1024) -> PreTrainedTokenizerBase:
    """A tokenizer of the shape CodeLlama's has, trained on ``corpus_texts``: SentencePiece-style
    BPE ("▁" for spaces, prepended to the first piece; byte fallback, so any text encodes), ids
    0-2 = <unk>, <s>, </s>, then the 256 byte tokens; BOS added by ``encode`` unless
    ``add_special_tokens=False``; NO pad token. Decoding a sequence alone drops its first space
    (Llama's decoder strips the prepended "▁"), which is why a completion is decoded after its
    prompt (`formats.hf.decode_completion`). For tests of the pretrained-model path, where a real
    checkpoint cannot be downloaded."""
    bpe = Tokenizer(models.BPE(unk_token=LLAMA_SPECIALS[0], byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    specials = [*LLAMA_SPECIALS, *(f"<0x{i:02X}>" for i in range(256))]
    bpe.train_from_iterator(list(corpus_texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=2, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # LlamaTokenizer puts Llama's own normaliser, decoder and BOS template around the trained BPE.
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True, model_max_length=model_max_length)


def build_tiny_model(out_dir: Union[str, Path], corpus_texts: Iterable[str], cfg: TinyModelConfig,
                     max_value: int, tokenizer: str = "word") -> Path:
    """Train the tokenizer, build a random-init model around it, and save both (fp32 safetensors) in out_dir.

    ``tokenizer``: "word", the project's word-level tokenizer (integers 0..max_value one token
    each, exact round trip); "llama", a CodeLlama-shaped one (`train_llama_tokenizer`: BOS, no pad
    token) with the model's config naming BOS 1 and EOS 2 as a Llama checkpoint's does."""
    out_dir = Path(out_dir)
    corpus_texts = list(corpus_texts)
    if tokenizer == "llama":
        return _save_llama_like(out_dir, corpus_texts, cfg)
    if tokenizer != "word":
        raise ValueError(f"build_tiny_model: tokenizer must be 'word' or 'llama', got {tokenizer!r}")
    tokenizer = train_tokenizer(corpus_texts, max_value, cfg.max_position_embeddings)
    check_round_trip(tokenizer, corpus_texts, where="the corpus")

    config = AutoConfig.for_model(
        cfg.arch, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    config_file = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    # transformers 5 writes its backend's name ("TokenizersBackend"); name the public class, and
    # add the auto_map that turns off AutoTokenizer's qwen2 override (see the module docstring).
    tokenizer_config["tokenizer_class"] = TOKENIZER_CLASSES[0]
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_reft.NoRemoteCode"]}
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def _save_llama_like(out_dir: Path, corpus_texts: list[str], cfg: TinyModelConfig) -> Path:
    tokenizer = train_llama_tokenizer(corpus_texts, model_max_length=cfg.max_position_embeddings)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = AutoConfig.for_model(
        cfg.arch, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=None, dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
