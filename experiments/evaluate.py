"""Evaluation: greedy top-1 accuracy of a model on a dataset split.

The engine is any callable ``generate(prompts) -> completions``; `hf_greedy` is the plain
Hugging Face one (batched, left-padded), used where no vLLM engine is running (SFT's per-epoch
check inside the learner's process).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from experiments.records import Example, build_prompt
from rewards.score import Scorer, prepare_program


@dataclasses.dataclass(frozen=True)
class EvalResult:
    accuracy: float          # percent correct
    answered: float          # percent with an extractable answer
    n: int
    completions: list


@torch.no_grad()
def hf_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions with ``model.generate``; prompts are left-padded so they end aligned."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[i:i + batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        device = next(model.parameters()).device
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def score_completions(completions: Sequence[str], examples: Sequence[Example], scorer: Scorer) -> list:
    """Scores of completions of `build_prompt` prompts (P-CoT: the header is prepended)."""
    kind, dataset = examples[0].cot_kind, examples[0].dataset
    texts = list(completions)
    if kind == "pcot":
        texts = [prepare_program(c, question=e.question) for c, e in zip(completions, examples)]
    return scorer.score(texts, [e.answer for e in examples], kind, dataset, [e.options for e in examples])


def greedy_accuracy(generate: Callable[[list[str]], list[str]], examples: Sequence[Example],
                    scorer: Scorer) -> EvalResult:
    completions = generate([build_prompt(e.question, e.cot_kind) for e in examples])
    scores = score_completions(completions, examples, scorer)
    n = len(scores)
    return EvalResult(accuracy=100.0 * sum(s.correct for s in scores) / n,
                      answered=100.0 * sum(s.answer is not None for s in scores) / n, n=n,
                      completions=list(completions))
