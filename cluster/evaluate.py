"""The one evaluation path: questions → prompt token ids → an engine decodes → the reward scores.

Every accuracy in a run comes from here: the warm-up's epochs, SFT continued, the RL loop, the
baselines and ``reft eval``. What is the same for all of them:

* prompts: ``formats.records.prompt_token_ids``, the function SFT's ``tokenize_sft`` uses, so an
  engine decodes after exactly the tokens the model trained on (no special tokens added on the way);
* decoding: a ``SampleRequest`` per question (greedy = temperature 0, the same ``max_tokens``);
* scoring: ``actors.reward.RewardWorker.score`` on ``reward_item``s, the RL reward's own code (in
  the reward actor where one runs, in this process otherwise).

Two engines, chosen by where the evaluation runs:

    FleetEvaluator   the vLLM rollout fleet + the reward actor; samples are scored chunk by chunk
                     while the rest still decode (the RL loop's evaluator; ``reft eval``; the
                     samples of offline self-training and of the reranker's training data)
    HFEvaluator      batched HF ``generate`` and an in-process reward worker: greedy only, where no
                     fleet runs (SFT's per-epoch evaluation, which must not start engines)

``tests/cluster/test_evaluate.py`` shows the two give the same greedy completions on one checkpoint.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from actors.config import RAY_NAMESPACE
from actors.naming import wait_name_free
from formats.records import Example, prompt_token_ids

if TYPE_CHECKING:   # torch and Ray: imported where used, so that the CLI's --help stays light
    from actors.rollout import Sample, SampleRequest
    from cluster.config import RunConfig
    from rewards.score import Score

# Request seeds: base + phase offset + question index, so that greedy, evaluation samples,
# reranker-training samples and offline self-training's samples (``cluster.baselines``) of one
# question never share a seed.
SEED_OFFSETS = {"greedy": 0, "eval": 10_000_000, "reranker": 20_000_000, "self_training": 30_000_000}


@dataclasses.dataclass(frozen=True)
class Scored:
    """One sample of a question and the reward's verdict on it."""
    sample: "Sample"
    score: "Score"


@dataclasses.dataclass(frozen=True)
class EvalResult:
    accuracy: float          # percent correct
    answered: float          # percent with an extractable answer
    n: int
    scored: list             # [Scored], one per question, in question order

    @property
    def completions(self) -> list[str]:
        return [s.sample.completion_text for s in self.scored]

    @classmethod
    def of(cls, scored: Sequence[Scored]) -> "EvalResult":
        n = len(scored)
        return cls(accuracy=100.0 * sum(s.score.correct for s in scored) / n,
                   answered=100.0 * sum(s.score.answer is not None for s in scored) / n, n=n, scored=list(scored))


def eval_requests(examples: Sequence[Example], tokenizer, n: int, temperature: float, max_tokens: int,
                  seed: int) -> list["SampleRequest"]:
    """One request per question; ``question_index`` is its position in ``examples``."""
    from actors.rollout import SampleRequest
    return [SampleRequest(request_id=f"eval-q{i}-{seed}", prompt=tuple(prompt_token_ids(tokenizer, e)), n=n,
                          temperature=temperature, max_tokens=max_tokens, seed=seed + i, question_index=i)
            for i, e in enumerate(examples)]


class Evaluator(abc.ABC):
    """Greedy and sampled evaluation of one model (module docstring)."""

    def __init__(self, cfg: "RunConfig", tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def sample(self, examples: Sequence[Example], n: int, temperature: float, max_tokens: int,
               phase: str = "eval") -> list[list[Scored]]:
        """``n`` scored samples of every question (``[question][i]``, in sample order)."""
        requests = eval_requests(examples, self.tokenizer, n, temperature, max_tokens,
                                 self.cfg.seed * 1_000_003 + SEED_OFFSETS[phase])
        samples, scores = self._run(requests, examples, phase)
        out: list[list[Scored]] = [[] for _ in examples]
        for sample, score in zip(samples, scores, strict=True):
            out[sample.question_index].append(Scored(sample, score))
        for row in out:
            row.sort(key=lambda s: s.sample.index)
        return out

    def greedy(self, examples: Sequence[Example], max_tokens: int) -> EvalResult:
        """Greedy top-1 accuracy (and the answered share) on ``examples``."""
        return EvalResult.of([row[0] for row in self.sample(examples, 1, 0.0, max_tokens, "greedy")])

    @abc.abstractmethod
    def _run(self, requests: list["SampleRequest"], examples: Sequence[Example],
             phase: str) -> tuple[list["Sample"], list["Score"]]:
        """Every sample of ``requests`` and its score, in any order."""

    def close(self) -> None:
        """Release what this evaluator started (nothing it was lent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FleetEvaluator(Evaluator):
    """Decodes on a ``RolloutFleet``, scores in a reward actor. ``start`` launches both for a
    checkpoint (actor names ``eval-rollout-N``, ``reward-eval``: an evaluation can share a Ray
    cluster with a training run); the RL loop lends its own."""

    REWARD_NAME = "reward-eval"

    def __init__(self, cfg: "RunConfig", tokenizer, fleet, reward, owned: bool = False, progress: bool = False):
        super().__init__(cfg, tokenizer)
        self.fleet, self.reward, self.owned, self.progress = fleet, reward, owned, progress

    @classmethod
    def start(cls, cfg: "RunConfig", checkpoint: Path) -> "FleetEvaluator":
        from actors.fleet import RolloutFleet
        from actors.reward import launch
        from cluster.runtime import init_ray
        from formats.hf import load_tokenizer

        init_ray(cfg)
        # Evaluation never moves weights, so the transport is never used: "shm" needs nothing (a
        # run config's "auto" would otherwise need a run mode's plan to resolve it).
        rollout = dataclasses.replace(cfg.rollout, model=str(checkpoint), sync="shm")
        fleet = RolloutFleet(rollout, name_prefix="eval-rollout")
        try:
            reward = launch(cfg.reward, name=cls.REWARD_NAME)
        except BaseException:
            fleet.shutdown()
            raise
        return cls(cfg, load_tokenizer(checkpoint), fleet, reward, owned=True, progress=True)

    def _run(self, requests, examples, phase):
        from actors.reward import collect_scored

        self.fleet.submit(requests)
        total = sum(r.n for r in requests)
        bar = None
        if self.progress:
            from cluster.metrics import progress
            bar = progress(total=total, desc=f"{phase} (n={requests[0].n}, T={requests[0].temperature:g})",
                           unit="sample")
        try:
            return collect_scored(self.fleet, self.reward, lambda s: examples[s.question_index], total,
                                  self.cfg.rollout.call_timeout_s, self.cfg.cluster.call_timeout_s,
                                  on_chunk=(lambda c: bar.update(len(c))) if bar else None,
                                  request_ids={r.request_id for r in requests})   # not a prefetched RL batch
        finally:
            if bar is not None:
                bar.close()

    def close(self) -> None:
        if not self.owned:
            return
        import ray
        try:
            self.fleet.shutdown()
            ray.get(self.reward.close.remote(), timeout=30)   # stops its sandbox workers
        finally:
            ray.kill(self.reward, no_restart=True)
        wait_name_free(self.REWARD_NAME, RAY_NAMESPACE, 30)   # free for the next evaluator in this cluster


class HFEvaluator(Evaluator):
    """Batched HF ``generate`` of a checkpoint in this process, scored by an in-process
    ``RewardWorker``: greedy only (sampled evaluation needs the fleet's seeded samplers)."""

    def __init__(self, cfg: "RunConfig", checkpoint: Path, batch_size: int = 64):
        from actors.reward import RewardWorker
        from formats.hf import load_causal_lm, load_tokenizer

        super().__init__(cfg, load_tokenizer(checkpoint))
        self.model = load_causal_lm(str(checkpoint), "fp32").eval()
        self.batch_size = batch_size
        self.rewards = RewardWorker(cfg.reward)

    def load(self, checkpoint: Path) -> "HFEvaluator":
        """Evaluate another checkpoint of the same model (the next epoch's): new weights, same
        tokenizer and reward workers."""
        from formats.hf import load_causal_lm
        self.model = load_causal_lm(str(checkpoint), "fp32").eval()
        return self

    def _run(self, requests, examples, phase):
        from actors.reward import reward_item
        if any(r.temperature != 0 or r.n != 1 for r in requests):
            raise ValueError("HFEvaluator decodes greedily only (temperature 0, n = 1); sample through a fleet")
        samples = []
        for first in range(0, len(requests), self.batch_size):
            samples += hf_greedy(self.model, self.tokenizer, requests[first:first + self.batch_size])
        scores = self.rewards.score([reward_item(s.completion_text, examples[s.question_index]) for s in samples])
        return samples, scores

    def close(self) -> None:
        self.rewards.close()


def hf_greedy(model, tokenizer, requests: Sequence["SampleRequest"]) -> list["Sample"]:
    """Greedy completions of token-id prompts with one batched ``model.generate`` (left-padded),
    as ``Sample``s: the completion's tokens up to and including EOS, its text decoded without
    special tokens and after its prompt (as vLLM's, `formats.hf.decode_completion`).
    ``max_tokens`` of the first request applies to all."""
    import torch

    from actors.rollout import Sample
    from formats.hf import decode_completion

    pad_id = tokenizer.pad_token_id   # formats.hf.load_tokenizer: EOS when the tokenizer has none
    eos = tokenizer.eos_token_id
    prompts = [list(r.prompt) for r in requests]
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=requests[0].max_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=eos)
    out = []
    for request, ids, row in zip(requests, prompts, generated[:, width:].tolist()):
        finish = "length"
        if eos in row:
            row, finish = row[:row.index(eos) + 1], "stop"
        out.append(Sample(request.request_id, 0, tuple(ids), tuple(row),
                          decode_completion(tokenizer, ids, row), (), finish, 0, "hf",
                          question_index=request.question_index))
    return out
