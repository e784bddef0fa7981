"""One learner rank: the PPO update, the SFT step, log-prob/value scoring, checkpoints, export.

A plain class: ``cluster.actor_group.ActorGroup`` turns it into a Ray actor per rank
(``ray.remote(LearnerWorker)``); tests also use it directly, without Ray.

Notation: B = sequences in this rank's shard, L = prompt + response tokens, right-padded.
Every batch is a dict of CPU tensors, all (B, L) and aligned with ``input_ids``:

    input_ids      long   prompt, response, padding
    attention_mask long   1 on prompt and response tokens (1s then 0s: right padding)
    response_mask  long   1 on generated tokens: the tokens losses and scores are about
    and, for ``ppo_update``, per-token float32 tensors, 0 (or anything) off the response:
    old_logprobs   log pi_old(token t | tokens < t), from ``score`` (or the sampler's, for a stale batch)
    old_values     V(state before token t), same call
    advantages     A_t (whitened over the WHOLE batch before sharding)
    returns        R_t, the value targets

Per-token outputs follow the same layout: column t is about token t (``token_outputs``).

Data parallelism. Each rank gets an interleaved shard (``cluster.actor_group.shard``). Each
optimizer step's loss is divided by counts of the whole step across ALL ranks (response tokens,
or sequences for the seq-mean modes), all-reduced before the step, so every rank's loss is its
share of the global loss: the shares sum to the loss one rank would compute on the whole batch.
DeepSpeed then AVERAGES gradients over ranks (all-reduce sum / world_size), so each rank's share
is multiplied by world_size before backward: sum_r world_size * g_r / world_size = sum_r g_r, the
full-batch gradient. Micro-batches are not divided by their number (``scale_wrt_gas=False``):
their shares simply add up. Hence 2 ranks x half a batch == 1 rank x the whole batch.
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from actors.naming import where
from actors.weight_sync import WeightHandle, WeightSync, make_weight_sync
from formats.hf import save_hf_checkpoint
from learner.algos import (
    entropy_from_logits,
    get_policy_loss,
    get_value_loss,
    kl_loss,
    logprobs_from_logits,
    ppo_total_loss,
)
from learner.config import LearnerConfig
from learner.engine import (
    Engine,
    StepStats,
    init_distributed,
    resolve_backend,
    seed_everything,
)
from learner.masked import masked_sum

logger = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "response_mask")
PPO_KEYS = BATCH_KEYS + ("old_logprobs", "old_values", "advantages", "returns")
# ppo_update's metrics. Per optimizer step: pg_loss and vf_loss as optimised (``loss_agg_mode``
# over the step's global counts); the rest are means over the step's response tokens on all ranks.
# Then averaged over the update's steps.
PPO_METRICS = ("pg_loss", "vf_loss", "kl_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy")


class TokenOutputs(NamedTuple):
    logprobs: Tensor  # (B, L) float32: log p(token t | tokens < t); column 0: 0
    values: Optional[Tensor]  # (B, L) float32: V(state before token t); column 0: 0
    entropy: Optional[Tensor]  # (B, L) float32: entropy of the distribution token t was drawn from


class Scores(NamedTuple):
    """What the learner computes of a sampled batch before an update, in one call (``score``)."""
    logprobs: Optional[Tensor]  # (B, L) float32 log pi_theta, 0 off the response: PPO's old policy; None if not asked
    values: Optional[Tensor]  # (B, L) float32 V(state before each token), 0 off the response; None without a critic
    ref_logprobs: Optional[Tensor]  # (B, L) float32 log pi_ref, 0 off the response; None without a reference


def token_outputs(
    input_ids: Tensor,
    logits: Tensor,
    values: Optional[Tensor] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenOutputs:
    """Move a causal LM's per-POSITION outputs onto the TOKEN they are about. The one place where
    the shift happens.

    Position t has read tokens 0..t, so ``logits[:, t]`` is the distribution of token t + 1 and
    ``values[:, t]`` the value of the state in which token t + 1 is chosen. Column t of every
    output here is therefore taken from position t - 1: logprobs[:, t] = log softmax(logits[:, t-1]
    / temperature)[input_ids[:, t]]. Nothing predicts token 0, so column 0 is 0 (a response never
    starts at token 0: there is always a prompt). The last position's outputs (after the last
    token) are about nothing and are dropped.

    Args:
        input_ids: (B, L).  logits: (B, L, V).  values: (B, L) or None.
        temperature: the sampler's; the log-probs are those of the distribution it sampled from.
        with_entropy: also the entropy of each token's distribution (at ``temperature``).
    """
    logits = logits[:, :-1]  # (B, L-1, V): row t predicts ...
    targets = input_ids[:, 1:]  # (B, L-1): ... this token

    logprobs = onto_tokens(logprobs_from_logits(logits, targets, temperature))
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a diagnostic: no entropy bonus in the paper's loss
            entropy = onto_tokens(entropy_from_logits(logits / temperature))
    token_values = values_onto_tokens(values) if values is not None else None
    return TokenOutputs(logprobs=logprobs, values=token_values, entropy=entropy)


def onto_tokens(per_position: Tensor) -> Tensor:
    """(B, L-1) outputs of positions 0..L-2 -> (B, L) about tokens 1..L-1; column 0 = 0."""
    return F.pad(per_position, (1, 0))


def values_onto_tokens(values: Tensor) -> Tensor:
    """(B, L) per-position values -> (B, L) float32 V(state before token t) (``token_outputs``)."""
    return onto_tokens(values[:, :-1].float())


def busy(method):
    """Count the seconds a learner method runs inside the actor (``LearnerWorker.stats``): the
    benchmark compares them with the driver's view of the same calls (Ray's share) and with the
    compute floor of the same passes."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.busy_s[method.__name__] += time.perf_counter() - start
    return timed


def find_free_port() -> int:
    """A TCP port free on this node now (the OS picks it; a race with another process grabbing it
    before the rendezvous binds is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def set_rendezvous(rank: int, world_size: int, master_addr: Optional[str],
                   master_port: Optional[int]) -> tuple[str, int]:
    """Set this process's torch.distributed environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
    LOCAL_RANK) and return the rendezvous address. Rank 0, given none, picks its node's IP and a
    free port (the ``cluster.actor_group`` protocol: the other ranks are then started with them)."""
    if master_addr is None:
        if rank != 0:
            raise ValueError(f"rank {rank} needs master_addr/master_port from rank 0")
        master_addr, master_port = where()["ip"], find_free_port()   # as Ray knows the node: reachable by the others
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        # Under Ray each actor sees only its own GPU(s) (CUDA_VISIBLE_DEVICES), as cuda:0.
        LOCAL_RANK="0",
    )
    return master_addr, int(master_port)


class LearnerWorker:
    """One data-parallel rank of the DeepSpeed learner.

    Two phases, because rank 0 hands out the rendezvous: ``__init__`` is cheap (it sets the
    torch.distributed environment; rank 0, given no address, picks its node's IP and a free port
    and reports them through ``get_master_addr_port``); ``setup()`` then joins the process group
    and builds the engine, on all ranks at once. A Ray actor cannot answer any call before its
    ``__init__`` returns, and rank 0's process-group init blocks until every rank has joined, so
    the address cannot be asked for if ``__init__`` already waited in the rendezvous.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: Optional[str],
        master_port: Optional[int],
        cfg: LearnerConfig,
    ):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.master_addr, self.master_port = set_rendezvous(rank, world_size, master_addr, master_port)
        self.engine: Optional[Engine] = None
        self._export: Optional[dict[str, Tensor]] = None   # this version's weights, exported once
        self._sync: Optional[WeightSync] = None             # rank 0: the samplers' weight publisher
        self.num_exports = 0
        self.busy_s: collections.Counter = collections.Counter()   # method -> seconds (``busy``)

    def get_master_addr_port(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def node(self) -> dict:
        """Where this rank runs: Ray node id, IP, process id (errors about the rank name them)."""
        return where()

    def setup(self) -> float:
        """Join the process group and build the engine (collective: all ranks at once). Returns the
        seconds it took."""
        start = time.perf_counter()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        seed_everything(self.cfg.seed + self.rank)
        init_distributed(resolve_backend(self.cfg.backend), self.cfg.collective_timeout_s)
        self.engine = Engine(self.cfg)
        seconds = time.perf_counter() - start
        logger.info("rank %d/%d: engine ready in %.1f s on %s", self.rank, self.world_size, seconds,
                    self.engine.device)
        return seconds

    # ------------------------------------------------------------------ scoring (no grad)

    @torch.no_grad()
    @busy
    def score(self, batch: dict[str, Tensor], temperature: float, with_reference: bool,
              with_policy: bool = True) -> Scores:
        """Before an update, at the sampler's ``temperature``, one forward per micro-batch and
        model: log pi(token t) of the current policy (``with_policy``; PPO's old policy, unless the
        sampler's log-probs are used instead), V(state before token t) when the learner has a
        critic, and, with ``with_reference``, log pi_ref. Without ``with_policy`` and with a
        separate critic only the critic runs. One call, so the batch crosses to the learner once."""
        _check_batch(batch, BATCH_KEYS)
        if with_reference and self.engine.reference is None:
            raise ValueError(f"rank {self.rank}: score(with_reference=True) on a learner built without "
                             "a reference model (learner.with_reference)")
        module = self.engine.module
        has_critic = module.value_head is not None
        # With a shared head the policy's forward gives the values: its log-probs come for free.
        with_policy = with_policy or (has_critic and module.critic is None)
        self.engine.train(False)
        logprobs = _zeros_like_tokens(batch) if with_policy else None
        values = _zeros_like_tokens(batch) if has_critic else None
        ref = _zeros_like_tokens(batch) if with_reference else None
        for rows, mb in self._micro_batches(batch, BATCH_KEYS, 0, _num_rows(batch)):
            width = mb["input_ids"].shape[1]
            if with_policy:
                out = self.engine.forward(mb["input_ids"], mb["attention_mask"])
                tok = token_outputs(mb["input_ids"], out.logits, out.values, temperature)
                logprobs[rows, :width] = tok.logprobs.cpu()
                if has_critic:
                    values[rows, :width] = tok.values.cpu()
            elif has_critic:
                per_position = module.values(mb["input_ids"], mb["attention_mask"])
                values[rows, :width] = values_onto_tokens(per_position).cpu()
            if ref is not None:
                logits = self.engine.reference_logits(mb["input_ids"], mb["attention_mask"])
                ref[rows, :width] = token_outputs(mb["input_ids"], logits, temperature=temperature).logprobs.cpu()
        return Scores(*(None if t is None else _on_response(t, batch) for t in (logprobs, values, ref)))

    # ------------------------------------------------------------------ training

    @busy
    def ppo_update(self, batch: dict[str, Tensor], temperature: float, kl_loss_coef: float = 0.0) -> dict[str, float]:
        """``ppo_epochs`` passes over this rank's shard, each cut into ``ppo_mini_batches``
        mini-batches taken in order (one optimizer step each, accumulated over micro-batches).

        Loss per step: L = L_policy + vf_coef * L_value, the registered losses that
        ``learner.policy_loss`` and ``learner.value_loss`` name (``learner.algos``), aggregated with
        ``loss_agg_mode`` over the step's GLOBAL counts (module docstring); with ``kl_loss_coef``
        > 0 also + kl_loss_coef * k3 KL to the reference (``algos.kl_loss``: GRPO's term), which
        needs ``ref_logprobs`` in the batch. Returns ``PPO_METRICS``
        (global per step, averaged over the steps),
        ``grad_norm`` (pre-clip, averaged over the steps), ``lr`` (of the last step) and
        ``optimizer_steps``. All ranks return the same numbers.
        """
        keys = PPO_KEYS + (("ref_logprobs",) if kl_loss_coef else ())
        _check_batch(batch, keys)
        cfg = self.cfg
        policy_loss, value_loss = get_policy_loss(cfg.policy_loss), get_value_loss(cfg.value_loss)
        bounds = self._mini_batch_bounds(batch)
        token_counts, seq_counts = self._global_counts(batch, bounds)
        self.engine.train(True)
        sums = []  # per optimizer step: (len(PPO_METRICS),) this rank's shares
        steps: list[StepStats] = []
        for _epoch in range(cfg.ppo_epochs):
            for k, (start, stop) in enumerate(bounds):
                n_tokens, n_seqs = token_counts[k], seq_counts[k]
                step_sums = torch.zeros(len(PPO_METRICS), dtype=torch.float64, device=self.engine.device)
                for mb in self._accumulation(batch, keys, start, stop):
                    out = self.engine.forward(mb["input_ids"], mb["attention_mask"])
                    tok = token_outputs(mb["input_ids"], out.logits, out.values, temperature, with_entropy=True)
                    mask = mb["response_mask"]
                    # Divided by the step's GLOBAL counts: the micro-batch losses of all ranks
                    # add up to the loss of the whole step.
                    global_counts = {"num_tokens_global": n_tokens, "num_seqs_global": n_seqs}
                    pg = policy_loss(
                        tok.logprobs, mb["old_logprobs"], mb["advantages"], mask,
                        clip_eps=cfg.clip_eps, agg_mode=cfg.loss_agg_mode, **global_counts,
                    )
                    if tok.values is not None:
                        vf = value_loss(
                            tok.values, mb["old_values"], mb["returns"], mask,
                            clip_eps=cfg.vf_clip_eps, agg_mode=cfg.loss_agg_mode, **global_counts,
                        )
                        vf_loss, vf_clipfrac = vf.loss, vf.metrics["vf_clipfrac"]
                    else:  # no critic (learner.value_head = none): the policy loss alone
                        vf_loss = vf_clipfrac = torch.zeros((), device=pg.loss.device)
                    pg_loss = pg.loss
                    kl_term = (kl_loss(tok.logprobs, mb["ref_logprobs"], mask, cfg.loss_agg_mode, **global_counts)
                               if kl_loss_coef else torch.zeros((), device=pg.loss.device))
                    # x world_size: DeepSpeed averages gradients over ranks (module docstring).
                    total = ppo_total_loss(pg_loss, vf_loss, cfg.vf_coef, kl_term, kl_loss_coef)
                    self.engine.backward(total * self.world_size)
                    with torch.no_grad():
                        weight = mask.sum() / n_tokens  # this micro-batch's share of the step's tokens
                        step_sums += torch.stack([
                            pg_loss.detach(),
                            vf_loss.detach(),
                            kl_term.detach(),
                            pg.metrics["approx_kl"] * weight,
                            pg.metrics["clipfrac"] * weight,
                            vf_clipfrac * weight,
                            masked_sum(tok.entropy, mask) / n_tokens,
                        ]).double()  # stays on the device: no sync per micro-batch
                steps.append(self.engine.step())
                sums.append(step_sums)
        # One collective for all metrics: sum the ranks' shares, then average over the steps.
        per_step = self._all_reduce_sum(torch.stack(sums))  # (steps, metrics)
        metrics = dict(zip(PPO_METRICS, per_step.mean(dim=0).tolist()))
        metrics["grad_norm"] = sum(s.grad_norm for s in steps) / len(steps)
        metrics["lr"] = steps[-1].lr
        metrics["optimizer_steps"] = float(len(steps))
        self._changed()
        return metrics

    @busy
    def sft_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning on this rank's shard: cross-entropy on the
        response tokens only (the same as HF's loss with labels = -100 off ``response_mask``),
        averaged over the GLOBAL number of response tokens (HF's token mean, across ranks). At
        temperature 1: SFT fits the model itself; ``temperature`` only describes the sampler.

        With a ``loss_weights`` (B, L) float32 tensor in the batch, the loss is instead the sum of
        each response token's NLL times its weight. The driver normalises the weights over the
        WHOLE batch before sharding (so the ranks' shares still add up to the full-batch loss):
        online self-training's 1/2 token mean over sampled CoTs + 1/2 over gold CoTs is one such
        weighting, which a single token mean over both cannot express.
        Returns ``loss`` (mean NLL per response token, or the weighted sum), ``grad_norm``, ``lr``,
        ``num_tokens``."""
        keys = BATCH_KEYS + (("loss_weights",) if "loss_weights" in batch else ())
        _check_batch(batch, keys)
        (n_tokens,), _ = self._global_counts(batch, [(0, _num_rows(batch))])
        self.engine.train(True)
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for mb in self._accumulation(batch, keys, 0, _num_rows(batch)):
            out = self.engine.forward(mb["input_ids"], mb["attention_mask"])
            logprobs = token_outputs(mb["input_ids"], out.logits).logprobs
            if "loss_weights" in mb:
                loss = -masked_sum(logprobs * mb["loss_weights"], mb["response_mask"])
            else:
                loss = -masked_sum(logprobs, mb["response_mask"]) / n_tokens
            self.engine.backward(loss * self.world_size)  # x world_size: see the module docstring
            total += loss.detach().double()
        stats = self.engine.step()
        self._changed()
        return {
            "loss": float(self._all_reduce_sum(total)),
            "grad_norm": stats.grad_norm,
            "lr": stats.lr,
            "num_tokens": float(n_tokens),
        }

    # ------------------------------------------------------------------ state

    @busy
    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> None:
        """Model, optimizer, LR schedule, RNG states and ``client_state`` (e.g. step, data position);
        collective."""
        self.engine.save_checkpoint(ckpt_dir, client_state)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore ``save_checkpoint``'s state; returns its ``client_state``. Collective."""
        state = self.engine.load_checkpoint(ckpt_dir)
        self._changed()
        return state

    # ------------------------------------------------------------------ weights out

    def export_weights(self) -> Optional[dict[str, Tensor]]:
        """The policy's full weights under the HF model's names, on CPU, no value head: the dict on
        rank 0, None elsewhere. Collective (under ZeRO-3 the ranks gather each parameter). Exported
        once per version: until the next update, later calls return the same dict (the sync and a
        checkpoint of one step share it)."""
        if self._export is None:
            self._export = self.engine.export_weights()
            self.num_exports += 1
        return self._export

    def open_weight_sync(self, rollout_cfg) -> None:
        """Rank 0 becomes the publisher of the weights for the samplers of ``rollout_cfg`` (its
        ``sync`` transport): ``publish_weights`` then writes or sends them from here, and the
        driver only passes the small handle on."""
        if self.rank == 0:
            self.close_weight_sync()
            self._sync = make_weight_sync(rollout_cfg)

    @busy
    def publish_weights(self, version: int) -> Optional[WeightHandle]:
        """Export (collective) and, on rank 0, publish the weights as ``version``: checks, checksums,
        the probe's expectation (HF on these very tensors), then the transport's write / put /
        held for the broadcast. Returns the handle on rank 0, None elsewhere."""
        weights = self.export_weights()
        if self.rank != 0:
            return None
        if self._sync is None:
            raise RuntimeError("publish_weights before open_weight_sync")
        # The probe decodes with the policy itself where rank 0 holds all of it (ZeRO 0-2), on its
        # device; under ZeRO-3 it is rebuilt on CPU from the exported tensors.
        model = self.engine.module.lm if self.cfg.zero_stage < 3 else None
        return self._sync.publish(weights, version, model=model)

    @busy
    def save_policy(self, out_dir: str) -> Optional[str]:
        """The policy as an HF model directory (``reft eval`` loads it) from this version's export
        (collective; rank 0 writes)."""
        weights = self.export_weights()
        if self.rank != 0:
            return None
        return str(save_hf_checkpoint(weights, self.cfg.model, Path(out_dir)))

    # The broadcast transports' sender half, for the fleet on the driver (``actors.weight_sync.RemoteSender``).
    def weight_sync_prepare(self, receiver: str) -> dict:
        return self._sync.prepare(receiver)

    def weight_sync_open(self, receiver: str, info: dict, timeout_s: float) -> None:
        self._sync.open(receiver, info, timeout_s)

    def weight_sync_detach(self, receiver: str) -> None:
        if self._sync is not None:
            self._sync.detach(receiver)

    def weight_sync_transmit(self, handle: WeightHandle, receivers: list[str], timeout_s: float) -> None:
        self._sync.transmit(handle, receivers, timeout_s)

    def close_weight_sync(self) -> None:
        """Release what the publisher holds (its /dev/shm directory, broadcast groups)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def stats(self) -> dict:
        """Counters for tests and benchmarks: how often the weights were exported, the seconds
        each method ran here (``busy``), the torch threads and the process id."""
        return {"exports": self.num_exports, "busy_s": dict(self.busy_s), "threads": torch.get_num_threads(),
                "pid": os.getpid()}

    def _changed(self) -> None:
        """The weights changed (an optimizer step, a restore): the next export is a new one."""
        self._export = None

    # ------------------------------------------------------------------ helpers

    def _mini_batch_bounds(self, batch: dict[str, Tensor]) -> list[tuple[int, int]]:
        rows, parts = _num_rows(batch), self.cfg.ppo_mini_batches
        if rows % parts:
            raise ValueError(
                f"rank {self.rank}: shard of {rows} sequences does not split into "
                f"learner.ppo_mini_batches={parts} equal mini-batches (see LearnerConfig.validate)"
            )
        size = rows // parts
        return [(k * size, (k + 1) * size) for k in range(parts)]

    def _global_counts(
        self, batch: dict[str, Tensor], bounds: list[tuple[int, int]]
    ) -> tuple[list[float], list[float]]:
        """Response tokens and non-empty sequences of each mini-batch, summed over all ranks (one
        all-reduce). Every rank gets the same numbers."""
        mask = batch["response_mask"].bool()
        local = torch.tensor(
            [[float(mask[a:b].sum()), float(mask[a:b].any(dim=1).sum())] for a, b in bounds], dtype=torch.float64
        )
        counts = self._all_reduce_sum(local)
        if (counts[:, 0] == 0).any():  # every rank sees the same counts, so all raise: no hang
            raise ValueError(
                f"a mini-batch has no response token on any rank (tokens per mini-batch: {counts[:, 0].tolist()})"
            )
        return counts[:, 0].tolist(), counts[:, 1].tolist()

    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum a small tensor over ranks; returns it on the CPU. (It goes through the device: NCCL
        has no CPU path. Reading the result is a sync point, paid once per call.)"""
        on_device = tensor.to(self.engine.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()

    def _micro_batches(self, batch: dict[str, Tensor], keys: tuple[str, ...], start: int, stop: int):
        """Yield (row slice, micro-batch of ``keys`` on the device) over rows [start, stop), each
        micro-batch cut to the width of its longest sequence (right padding: the columns after it
        are all padding). Other keys of the batch (the driver's bookkeeping) stay behind."""
        size = self.cfg.micro_batch_size
        for a in range(start, stop, size):
            rows = slice(a, min(a + size, stop))
            width = int(batch["attention_mask"][rows].sum(dim=1).max())
            yield rows, {key: batch[key][rows, :width].to(self.engine.device) for key in keys}

    def _accumulation(self, batch: dict[str, Tensor], keys: tuple[str, ...], start: int, stop: int):
        """The micro-batches of one optimizer step (``_micro_batches``), telling the engine before
        each one whether its backward closes the accumulation."""
        micro = [mb for _rows, mb in self._micro_batches(batch, keys, start, stop)]
        for i, mb in enumerate(micro):
            self.engine.set_boundary(i == len(micro) - 1)
            yield mb


def _num_rows(batch: dict[str, Tensor]) -> int:
    return batch["input_ids"].shape[0]


def _zeros_like_tokens(batch: dict[str, Tensor]) -> Tensor:
    return torch.zeros(batch["input_ids"].shape, dtype=torch.float32)


def _on_response(per_token: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return torch.where(batch["response_mask"].bool(), per_token, 0.0)


def _check_batch(batch: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    """Fail early, naming the problem, on what would otherwise give silently wrong numbers."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; it has {sorted(batch)}")
    shape = tuple(batch["input_ids"].shape)
    wrong = {k: tuple(batch[k].shape) for k in keys if tuple(batch[k].shape) != shape or len(shape) != 2}
    if wrong:
        raise ValueError(f"every batch tensor must be (B, L) = {shape}; got {wrong}")
    attention, response = batch["attention_mask"].bool(), batch["response_mask"].bool()
    if (attention[:, 1:] & ~attention[:, :-1]).any():
        raise ValueError("attention_mask must be right-padded (1s, then 0s) in every row")
    if (response & ~attention).any():
        raise ValueError("response_mask marks tokens outside attention_mask")
    if response[:, 0].any():
        raise ValueError("response_mask marks token 0: a response needs at least one prompt token before it")
