"""One rank of the reranker's DeepSpeed group: the classifier of ``learner.reranker`` trained and
run where the policy trains (a 7B reranker needs the GPUs and ZeRO partitioning a 7B policy does).

A plain class, the ``cluster.actor_group.ActorGroup`` protocol (as ``learner.worker.LearnerWorker``):
``__init__`` sets the rendezvous, ``setup()`` joins the process group and builds the engine with
the policy's builder (``learner.engine.Engine``: the same ZeRO stage, dtype, AdamW, clipping and
LR schedule code). ``cfg.model`` decides what is built: a reranker directory loads its backbone and
head (scoring, ``reft eval --rerank``); any other HF model directory gives its transformer and a
fresh head (training, ``reft train-reranker``: initialised from the model it will rerank).

Batches are dicts of CPU tensors, rows first, sharded by the driver (``ActorGroup.run_sharded``):

    input_ids      (B, L) long   prompt + completion tokens, right-padded
    attention_mask (B, L) long   1 on real tokens, 1s then 0s
    labels         (B,)   long   1 = the reward judged the sample correct, 0 = wrong (training only)

Data parallelism as the policy's learner: each rank's loss is its rows' summed cross-entropy over
the GLOBAL number of rows of the step (all-reduced), times world_size because DeepSpeed averages
gradients over ranks, so 2 ranks x half a batch == 1 rank x the whole batch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from actors.naming import where
from learner.config import LearnerConfig
from learner.engine import Engine, init_distributed, resolve_backend, seed_everything
from learner.reranker import Reranker, correct_probability, is_reranker_dir, save_reranker, two_class_loss
from learner.worker import set_rendezvous

logger = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "attention_mask")


class RerankerWorker:
    """One data-parallel rank of the reranker (module docstring)."""

    def __init__(self, rank: int, world_size: int, master_addr: Optional[str], master_port: Optional[int],
                 cfg: LearnerConfig):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.master_addr, self.master_port = set_rendezvous(rank, world_size, master_addr, master_port)
        self.engine: Optional[Engine] = None

    def get_master_addr_port(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def node(self) -> dict:
        """Where this rank runs: Ray node id, IP, process id (errors about the rank name them)."""
        return where()

    def setup(self) -> float:
        """Join the process group, build the reranker and its engine (collective). Returns seconds."""
        start = time.perf_counter()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        seed_everything(self.cfg.seed + self.rank)
        init_distributed(resolve_backend(self.cfg.backend), self.cfg.collective_timeout_s)
        build = Reranker.load if is_reranker_dir(self.cfg.model) else Reranker.from_checkpoint
        self.engine = Engine(self.cfg, model=build(self.cfg.model, self.cfg.dtype))
        seconds = time.perf_counter() - start
        logger.info("reranker rank %d/%d: engine ready in %.1f s on %s", self.rank, self.world_size, seconds,
                    self.engine.device)
        return seconds

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's shard: two-class cross-entropy, the mean over the
        global batch (module docstring). Returns, the same on every rank: ``loss`` (that mean),
        ``accuracy`` (percent of the batch whose argmax class was its label, before the update),
        ``grad_norm`` (pre-clip), ``lr``."""
        _check_batch(batch, INPUT_KEYS + ("labels",))
        rows = self._all_reduce_sum(torch.tensor([float(_num_rows(batch))], dtype=torch.float64))
        num_global = float(rows[0])
        self.engine.train(True)
        sums = torch.zeros(2, dtype=torch.float64, device=self.engine.device)   # loss share, hits
        micro = list(self._micro_batches(batch, INPUT_KEYS + ("labels",)))
        for i, (_rows, mb) in enumerate(micro):
            self.engine.set_boundary(i == len(micro) - 1)
            logits = self.engine.forward(mb["input_ids"], mb["attention_mask"])
            loss = two_class_loss(logits, mb["labels"], num_global)
            self.engine.backward(loss * self.world_size)   # x world_size: see the module docstring
            with torch.no_grad():
                hits = (logits.argmax(dim=-1) == mb["labels"]).sum()
                sums += torch.stack([loss.detach().double(), hits.double()])
        stats = self.engine.step()
        loss_sum, hits = self._all_reduce_sum(sums).tolist()
        return {"loss": loss_sum, "accuracy": 100.0 * hits / num_global, "grad_norm": stats.grad_norm,
                "lr": stats.lr}

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """(B,) float32 P(correct) of every row of this rank's shard, on CPU."""
        _check_batch(batch, INPUT_KEYS)
        self.engine.train(False)
        out = torch.zeros(_num_rows(batch), dtype=torch.float32)
        for rows, mb in self._micro_batches(batch, INPUT_KEYS):
            out[rows] = correct_probability(self.engine.forward(mb["input_ids"], mb["attention_mask"])).cpu()
        return out

    def save(self, out_dir: str, meta: dict) -> Optional[str]:
        """The reranker directory (``learner.reranker.save_reranker``; collective: under ZeRO-3 the
        ranks gather each parameter, rank 0 writes). Returns the path on rank 0, None elsewhere."""
        weights = self.engine.export_weights()
        if self.rank != 0:
            return None
        return str(save_reranker(weights, self.cfg.model, Path(out_dir), meta))

    # ------------------------------------------------------------------ helpers

    def _micro_batches(self, batch: dict[str, Tensor], keys: tuple[str, ...]):
        """(row slice, micro-batch of ``keys`` on the device), ``cfg.micro_batch_size`` rows each,
        cut to the width of its longest row."""
        size, num_rows = self.cfg.micro_batch_size, _num_rows(batch)
        for a in range(0, num_rows, size):
            rows = slice(a, min(a + size, num_rows))
            width = int(batch["attention_mask"][rows].sum(dim=1).max())
            yield rows, {k: (batch[k][rows, :width] if batch[k].dim() == 2 else batch[k][rows]).to(self.engine.device)
                         for k in keys}

    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        on_device = tensor.to(self.engine.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()


def _num_rows(batch: dict[str, Tensor]) -> int:
    return batch["input_ids"].shape[0]


def _check_batch(batch: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    """Fail early, naming the problem, on what would otherwise read the wrong token or label."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"reranker batch lacks {missing}; it has {sorted(batch)}")
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2 or tuple(batch["attention_mask"].shape) != shape:
        raise ValueError(f"input_ids and attention_mask must be one (B, L) shape; got {shape}, "
                         f"{tuple(batch['attention_mask'].shape)}")
    attention = batch["attention_mask"].bool()
    if (attention[:, 1:] & ~attention[:, :-1]).any() or not attention[:, 0].all():
        raise ValueError("attention_mask must be right-padded (1s, then 0s) with at least one token in every row")
    if "labels" in keys:
        labels = batch["labels"]
        if tuple(labels.shape) != shape[:1] or not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"labels must be (B,) = {shape[:1]} of 0 / 1, got shape {tuple(labels.shape)}")
