"""The reranker: a two-class correctness classifier over sampled CoTs (the paper's "reward model
reranking", §4.4 / Table 4; its code: ``train_reward_model.py``).

Notation: B = sequences, L = prompt + completion tokens (right-padded), H = hidden size.

Architecture, as the paper's ``AutoModelForSequenceClassification(num_labels=2)``: the transformer
of the model being reranked without its LM head (``AutoModel``), plus a linear head ``H -> 2`` on
the hidden state of each sequence's LAST real token. Class 1 = "correct"; the score of a sample is
P(correct) = softmax(logits)[1]. The last token is read from the attention mask (right padding:
1s then 0s), not by looking for the pad id as HF's classifier does: with pad = EOS (CodeLlama has
no pad token) that search would miss the real last token.

The head starts at zero (weight and bias), where HF draws it at random: every sample starts at
P(correct) = 1/2, the first gradients reaching the backbone through the head are 0 rather than
noise, and every data-parallel rank builds the same head without a broadcast.

Training (``learner.reranker_worker``): two-class cross-entropy on (sequence, correct?) pairs.

The directory (``save_reranker`` / ``Reranker.load``), HF-style, so that the backbone alone also
loads with ``AutoModel.from_pretrained``:

    config.json, model.safetensors   the backbone (save_pretrained)
    reranker_head.safetensors        head.weight (2, H), head.bias (2,)
    tokenizer files                  copied verbatim from the model it was initialised from
    reranker.json                    what it was trained from and on, and its training metrics
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formats.records import Example, prompt_token_ids
from learner.data import Tokenized
from learner.model import gathered_state_dict

HEAD_FILE = "reranker_head.safetensors"
META_FILE = "reranker.json"
NUM_CLASSES = 2   # 0 = wrong, 1 = correct (the paper's num_labels=2)


def last_token_states(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, H) hidden states, (B, L) right-padded mask -> (B, H): each row's last real token."""
    last = attention_mask.sum(dim=1) - 1                                   # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def two_class_loss(logits: Tensor, labels: Tensor, num_global: float) -> Tensor:
    """Cross-entropy of (B, 2) logits against (B,) labels in {0, 1}, summed over the rows and divided
    by ``num_global``, the rows of the whole optimizer step on all ranks: the ranks' shares add up
    to the mean over the global batch (``learner.worker``'s convention)."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="sum") / num_global


def correct_probability(logits: Tensor) -> Tensor:
    """(B, 2) logits -> (B,) float32 P(correct): the score the paper reranks by (``probs[1]``)."""
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def is_reranker_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def check_reranker_dir(path: str | Path) -> dict:
    """reranker.json of a reranker directory. FileNotFoundError names a missing file; ValueError
    refuses a one-logit head (the BCE reranker of earlier versions), saying what to do."""
    from safetensors import safe_open
    path = Path(path)
    for name in (HEAD_FILE, META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not a reranker directory (made by reft train-reranker)")
    with safe_open(str(path / HEAD_FILE), framework="pt") as f:
        shape = tuple(f.get_slice("weight").get_shape())
    if shape[:1] != (NUM_CLASSES,):
        raise ValueError(f"{path}: a reranker with a {shape} head, made by an earlier version (one logit, binary "
                         "cross-entropy, trained on the checkpoint's own samples); retrain it with reft "
                         "train-reranker (two classes, the warm-up's samples, as the paper)")
    return json.loads((path / META_FILE).read_text())


class Reranker(nn.Module):
    """Backbone + ``nn.Linear(H, 2)`` on the last real token's hidden state (module docstring)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, NUM_CLASSES, dtype=backbone.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_checkpoint(cls, path: str, dtype: str = "fp32") -> "Reranker":
        """A new reranker initialised from the HF model at ``path``: its transformer (dropout off),
        a zero head."""
        from formats.hf import load_causal_lm
        return cls(load_causal_lm(path, dtype, base_only=True))

    @classmethod
    def load(cls, path: str | Path, dtype: str = "fp32") -> "Reranker":
        """A reranker saved by ``save_reranker`` (``check_reranker_dir`` first)."""
        from safetensors.torch import load_file
        check_reranker_dir(path)
        model = cls.from_checkpoint(str(path), dtype)
        head = load_file(str(Path(path) / HEAD_FILE))
        model.head.load_state_dict({k: v.to(model.head.weight.dtype) for k, v in head.items()})
        return model

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L), right-padded. Returns (B, 2) float32 logits."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(last_token_states(hidden, attention_mask)).float()

    def state_dict_for_inference(
        self,
        gather: Callable[[list[nn.Parameter]], ContextManager] = lambda params: nullcontext(),
        keep: bool = True,
    ) -> Optional[dict[str, Tensor]]:
        """Backbone and head weights on CPU (``backbone.*``, ``head.*``), gathered one parameter at a
        time (``learner.model.gathered_state_dict``): what ``save_reranker`` writes."""
        return gathered_state_dict(self, gather, keep)


def save_reranker(weights: dict[str, Tensor], source: str, out_dir: Path, meta: dict) -> Path:
    """Write ``Reranker.state_dict_for_inference``'s ``weights`` as a reranker directory (module
    docstring): the backbone with ``source``'s config, the head, ``source``'s tokenizer files and
    ``meta`` (plus ``source_checkpoint``) in reranker.json. ``source``: the directory the reranker
    was built from (the model it reranks, or a reranker directory)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    from formats.hf import copy_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v.contiguous() for k, v in weights.items() if k.startswith("head.")}
    if set(head) != {"weight", "bias"} or len(backbone) + len(head) != len(weights):
        raise ValueError(f"not a reranker's weights: {sorted(weights)[:6]} ...")
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    model.load_state_dict(backbone, strict=True, assign=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_file(head, str(out_dir / HEAD_FILE))
    copy_tokenizer(source, out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"source_checkpoint": source, **meta}, indent=2) + "\n")
    return out_dir


def tokenize_reranker(tokenizer, example: Example, completion: str, max_length: int) -> Tokenized:
    """What the reranker reads of one sample: the policy's prompt (``prompt_token_ids``, as the
    sampler saw it) and the completion's TEXT re-encoded without special tokens, cut to the first
    ``max_length`` tokens (the paper's code: ``input_ids[:max_input_length]``, 700). From text, as
    the paper's code, so that training (on cached samples) and reranking (on fresh ones) read
    samples the same way."""
    prompt = prompt_token_ids(tokenizer, example)
    response = tokenizer.encode(completion, add_special_tokens=False)
    return Tokenized(prompt[:max_length], response[:max(0, max_length - len(prompt))])


class RerankerInputs(Sequence[Tokenized]):
    """Samples as the reranker reads them, tokenised when asked for (``tokenize_reranker``): the
    driver holds the texts of the paper's 100 samples x 7k questions, not their token lists.
    ``samples``: (index into ``examples``, completion text) pairs."""

    def __init__(self, tokenizer, examples: Sequence[Example], samples: Sequence[tuple[int, str]], max_length: int):
        self.tokenizer, self.examples, self.samples, self.max_length = tokenizer, examples, samples, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        question, completion = self.samples[i]
        return tokenize_reranker(self.tokenizer, self.examples[question], completion, self.max_length)
