"""Examples → token tensors for the learner.

Notation: B = sequences in a batch, L = prompt + response tokens (right-padded).
A batch is a dict of CPU tensors, the one format every learner method takes:

    input_ids      (B, L) long   prompt tokens, then response tokens, then padding
    attention_mask (B, L) long   1 on prompt and response tokens
    response_mask  (B, L) long   1 on response tokens only: the tokens a loss is taken on
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from formats.records import Example, pcot_header, prompt_token_ids


@dataclasses.dataclass(frozen=True)
class Tokenized:
    prompt_ids: list[int]
    response_ids: list[int]


def sft_target(example: Example) -> str:
    """The text the model learns to write after the prompt: the gold CoT (for N-CoT the loaders
    already made it the paper's target, `formats.records.ncot_target`).

    For P-CoT the prompt already ends with the ``def solution():`` header and docstring, so the
    target is the program's body: what follows the program's own header, whose docstring is not
    always the question as the record has it (37 of SVAMP's 3,043 programs quote it with other
    punctuation: "Bob's car" for "Bob ' s car").
    """
    if example.cot is None:
        raise ValueError(f"example {example.id!r} has no gold CoT to train on")
    if example.cot_kind == "pcot":
        header = pcot_header(example.question)
        if example.cot.startswith(header):
            return example.cot[len(header):]
        opening = header[:header.index('"""') + 3]        # 'def solution():\n    """'
        end = example.cot.find('"""\n', len(opening)) if example.cot.startswith(opening) else -1
        if end >= 0:
            return example.cot[end + 4:]
    return example.cot


def tokenize_sft(tokenizer, example: Example) -> Tokenized:
    """Prompt and target token ids; the target ends with EOS so the model learns to stop."""
    prompt_ids = prompt_token_ids(tokenizer, example)
    response_ids = tokenizer.encode(sft_target(example), add_special_tokens=False) + [tokenizer.eos_token_id]
    return Tokenized(prompt_ids, response_ids)


def collate(items: Sequence[Tokenized], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad (prompt + response) sequences into one batch. Too-long sequences raise."""
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in items]
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"a sequence has {max(lengths)} tokens, more than max_length={max_length}")
    width = max(lengths)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    response_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        p, n = len(t.prompt_ids), len(t.prompt_ids) + len(t.response_ids)
        input_ids[i, :n] = torch.tensor(t.prompt_ids + t.response_ids)
        attention_mask[i, :n] = 1
        response_mask[i, p:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
