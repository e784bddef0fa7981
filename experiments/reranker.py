"""The reranker: a correctness classifier that rates sampled CoTs (the paper's "reward model
reranking", §4.4 / Table 4).

Notation: B = sequences, L = prompt + completion tokens (right-padded), H = hidden size.

Architecture: the policy checkpoint's transformer without its LM head (``AutoModel``), plus a
linear head ``H -> 1`` on the hidden state of each sequence's LAST token, as the value head of
``learner.model.PolicyWithValue`` reads the last hidden state. The last token has attended to the
whole question and solution, so its state is where "is this solution right?" can be read off.
The output is a logit: sigmoid(logit) = P(correct). Training is binary cross-entropy on samples
of the training questions labelled by the reward actor (1 = correct answer), 3 epochs in the
paper.

Training runs here, in the driver process, with plain torch on CPU (``train``): the reranker is
trained once per evaluated model and the tiny models of this project train in seconds. A 7B
reranker would want the DeepSpeed learner group instead; the model class and its directory
format would stay the same.

The directory (``save`` / ``load``), HF-style so that the backbone alone also loads with
``AutoModel.from_pretrained``:

    config.json, model.safetensors   the backbone (save_pretrained)
    reranker_head.safetensors        head.weight (1, H), head.bias (1,)
    tokenizer files                  copied verbatim from the source checkpoint
    reranker.json                    what it was trained from and on, and its training metrics
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from learner.data import Tokenized, collate

logger = logging.getLogger("reft")

HEAD_FILE = "reranker_head.safetensors"
META_FILE = "reranker.json"


class Reranker(nn.Module):
    """Backbone + ``nn.Linear(H, 1)`` on the last token's hidden state (module docstring)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        # Zero init, as the value head: every sample starts at P(correct) = 0.5 and the first
        # gradients reaching the pretrained backbone through the head are 0 rather than noise.
        self.head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_checkpoint(cls, path: str) -> "Reranker":
        """A new reranker whose backbone is the HF checkpoint's (dropout off, fp32) and head is 0."""
        from formats.hf import load_causal_lm
        return cls(load_causal_lm(path, "fp32", base_only=True))

    @classmethod
    def load(cls, path: str | Path) -> "Reranker":
        """A reranker saved by ``save``; FileNotFoundError names the missing file."""
        from safetensors.torch import load_file
        head_file = Path(path) / HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file}: not a reranker directory (made by reft train-reranker)")
        model = cls.from_checkpoint(str(path))
        model.head.load_state_dict(load_file(str(head_file)))
        return model

    def save(self, out_dir: Path, source: str, meta: dict) -> Path:
        """Backbone, head, the source checkpoint's tokenizer and ``meta`` into ``out_dir``."""
        from safetensors.torch import save_file

        from formats.hf import copy_tokenizer
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out_dir, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(out_dir / HEAD_FILE))
        copy_tokenizer(source, out_dir)
        (out_dir / META_FILE).write_text(json.dumps({"source_checkpoint": source, **meta}, indent=2) + "\n")
        return out_dir

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L), right-padded. Returns (B,) float32 logits."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1                               # (B,) index of each last token
        states = hidden[torch.arange(hidden.shape[0]), last]               # (B, H)
        return self.head(states).squeeze(-1).float()

    @torch.no_grad()
    def score(self, sequences: Sequence[Tokenized], pad_id: int, batch_size: int = 32,
              progress: Optional[str] = None) -> list[float]:
        """The logit of every (prompt, completion) sequence, in order. ``progress``: a tqdm label."""
        from tqdm import tqdm
        self.eval()
        # Batches of similar lengths pad less; the result goes back to the input order.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].prompt_ids) + len(sequences[i].response_ids))
        out = [0.0] * len(sequences)
        starts = range(0, len(order), batch_size)
        for start in (tqdm(starts, desc=progress, unit="batch") if progress else starts):
            rows = order[start:start + batch_size]
            batch = collate([sequences[i] for i in rows], pad_id)
            for i, logit in zip(rows, self(batch["input_ids"], batch["attention_mask"]).tolist()):
                out[i] = logit
        return out


def train(model: Reranker, sequences: Sequence[Tokenized], labels: Sequence[bool], pad_id: int, epochs: int,
          lr: float, batch_size: int, seed: int = 0, metrics=None) -> list[dict]:
    """Binary cross-entropy on (sequence, correct?) pairs, AdamW, gradient clipping at 1.0 (as the
    policy's training); shuffled each epoch with ``seed``. Returns one record per epoch: mean
    loss, the accuracy of "sigmoid > 0.5" on each batch before its update (a running figure, as
    the loss; no extra pass) and the share of correct samples (the accuracy of always guessing
    "wrong" is 100 minus it). ``metrics`` (a ``cluster.metrics.MetricsLogger``) also gets every
    step's loss."""
    from tqdm import tqdm
    if len(sequences) != len(labels) or not sequences:
        raise ValueError(f"need one label per sequence and at least one, got {len(sequences)} and {len(labels)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = random.Random(seed)
    target = torch.tensor([float(y) for y in labels])
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(sequences)))
        rng.shuffle(order)
        total_loss, hits = 0.0, 0
        bar = tqdm(range(0, len(order), batch_size), desc=f"reranker epoch {epoch}/{epochs}", unit="step")
        for start in bar:
            rows = order[start:start + batch_size]
            batch = collate([sequences[i] for i in rows], pad_id)
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits, target[rows])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            loss_value = loss.item()
            total_loss += loss_value * len(rows)
            hits += int(((logits.detach() > 0) == (target[rows] > 0.5)).sum())
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if metrics is not None:
                metrics.write(step, {"reranker/loss": loss_value})
        record = {"epoch": epoch, "reranker/epoch_loss": total_loss / len(order),
                  "reranker/train_accuracy": 100.0 * hits / len(order),
                  "reranker/positive_rate": 100.0 * float(target.mean())}
        history.append(record)
        if metrics is not None:
            metrics.write(step, record)
        logger.info("reranker epoch %d: loss %.4f, train accuracy %.1f%%", epoch,
                    record["reranker/epoch_loss"], record["reranker/train_accuracy"])
    return history
