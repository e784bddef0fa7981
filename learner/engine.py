"""DeepSpeed around ``PolicyWithValue`` (or another module: the reranker, ``learner.reranker``):
process group, ZeRO engine, reference model, weight export and checkpoints. Knows nothing about
PPO; ``learner.worker`` and ``learner.reranker_worker`` drive it.

The same code runs on CPU (gloo, fp32) and on GPUs (NCCL, bf16) by changing
``LearnerConfig.backend`` / ``dtype``. Three DeepSpeed habits are avoided on purpose (docs/measurements.md §2):
its own optimizers (``optimizer`` config block) compile FusedAdam / cpu_adam C++ extensions for
minutes, so a plain ``torch.optim.AdamW`` is passed in; its CPU shared-memory all-reduce is also
compiled on first use (~100 s), so ``init_distributed`` switches that build off; and its LR
schedulers are replaced by a ``LambdaLR`` whose rule is a pure function (``lr_multiplier``).
"""
from __future__ import annotations

import datetime
import importlib
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from learner.config import LearnerConfig
from learner.model import Output, PolicyWithValue, load_reference

logger = logging.getLogger(__name__)

# _DEEPSPEED_IMPORT: deepspeed is imported where it is used (the learner's process), not at the top.
# The driver imports this module (through learner.worker) only for the actor's class; there
# `import deepspeed` cost ~1 s and printed DeepSpeed's "Setting accelerator to CPU" warning as the
# console's first line.
CHECKPOINT_TAG = "deepspeed"  # DeepSpeed writes <dir>/deepspeed/...; our RNG files sit beside it
# DeepSpeed returns its own bookkeeping (param_shapes, ds_config, ...) mixed into the client state
# it loads; ours travels under one key so that load returns exactly what save was given.
CLIENT_STATE_KEY = "reft_client_state"


def resolve_backend(backend: str) -> str:
    """"auto" -> "nccl" when CUDA is available, else "gloo". Asking for NCCL without CUDA fails here,
    with the key named, instead of deep inside torch.distributed."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("learner.backend='nccl' needs CUDA, and torch sees no GPU; use 'gloo' or 'auto'")
    return backend


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu. (Under Ray each learner actor sees only
    its own GPU, so LOCAL_RANK is 0 there.)"""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(backend: str, timeout_s: float = 1800.0) -> None:
    """Join the process group described by MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; every
    collective of the group (and the rendezvous itself) fails after ``timeout_s`` instead of
    waiting forever for a rank that died or hangs (``learner.collective_timeout_s``).

    DeepSpeed's ``TorchBackend`` first builds a shared-memory all-reduce C++ op for CPU tensors
    (``deepspeed.comm.torch.build_shm_op``), ~100 s of compiling on 2 cores. It is only a fast
    path for CPU all-reduces, which gloo does too; on GPUs the op does not exist. So the builder
    is replaced by one that returns None ("no op available") before the backend is created. The
    module has to be taken from ``sys.modules`` via importlib: ``deepspeed.comm.torch`` as an
    attribute is the torch package, which ``deepspeed.comm`` re-exports under that name.
    """
    import deepspeed   # here and in Engine, not at the top: _DEEPSPEED_IMPORT

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def lr_multiplier(cfg: LearnerConfig, step: int) -> float:
    """The learning rate at this learner's optimizer step ``step`` (0-based), as a fraction of
    ``cfg.lr``. The schedule's position is s = step + ``cfg.schedule_offset``.

    1. "constant": 1.
    2. warm-up (the other schedules): (s + 1) / warmup for s < warmup, with
       warmup = round(warmup_ratio * total_steps); the first step already moves (1 / warmup), the
       last warm-up step reaches 1.
    3. "linear_warmup_constant": 1 after the warm-up.
    4. "linear_warmup_decay": (total_steps - s) / (total_steps - warmup) after it: 1 at the first
       step after the warm-up, 1 / (total_steps - warmup) at the last, 0 beyond. This is HF's
       ``get_linear_schedule_with_warmup`` (the paper's), whose first step runs at lr 0 during a
       warm-up; here the warm-up is one step ahead, the decay the same.
    5. "linear_warmup_cosine": 0.5 * (1 + cos(pi * progress)) after it, progress going from 0 at
       the end of the warm-up to 1 at ``total_steps`` (and staying there: 0 beyond).
    """
    if cfg.lr_schedule == "constant":
        return 1.0
    s = step + cfg.schedule_offset
    warmup = round(cfg.warmup_ratio * cfg.total_steps)
    if s < warmup:
        return (s + 1) / warmup
    if cfg.lr_schedule == "linear_warmup_constant":
        return 1.0
    if cfg.lr_schedule == "linear_warmup_decay":
        return max(0.0, (cfg.total_steps - s) / max(1, cfg.total_steps - warmup))
    progress = min(1.0, (s - warmup) / max(1, cfg.total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for the trained model.

    ``gradient_accumulation_steps`` is 1 because the worker marks the accumulation boundary itself
    (``Engine.set_boundary``): the number of micro-batches follows the batch it is given, which
    differs between PPO (rollout batch) and SFT, so it cannot be fixed here. No ``optimizer`` and
    no ``scheduler`` block: see the module docstring.
    """
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def reference_deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """Inference-only ZeRO-3 config for pi_ref (no optimizer): parameters partitioned like the
    policy's, gathered layer by layer in each forward."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class StepStats(NamedTuple):
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate this step used


class Engine:
    """The DeepSpeed engine for one rank (``init_distributed`` must have run).

    The reference model: under ZeRO-3 it is itself wrapped in an inference-only ZeRO-3 DeepSpeed
    engine, so each rank holds 1/world of it, as of the policy; a whole frozen 7B copy per GPU is
    what ZeRO-3 is chosen to avoid. Under ZeRO 0-2 the policy is whole on every rank anyway, so
    the reference is simply kept whole too (eval mode, no grad, on the device); a ZeRO engine
    would only add gathers to every forward. This is also what the paper's code (via TRL's
    ``prepare_deepspeed``) does.
    """

    def __init__(self, cfg: LearnerConfig, model: Optional[torch.nn.Module] = None):
        """``model``: the module to train, None = the policy of ``cfg.model`` (``PolicyWithValue``
        with ``cfg.value_head``). Another module needs a ``state_dict_for_inference(gather, keep)``
        for ``export_weights`` and, with ``cfg.gradient_checkpointing``, a
        ``gradient_checkpointing_enable()``; ``forward`` returns what its forward returns."""
        import deepspeed   # _DEEPSPEED_IMPORT

        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if model is None:
            model = PolicyWithValue.from_pretrained(cfg.model, cfg.value_head, cfg.dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not biases or norms
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(cfg, s)),
            config=deepspeed_config(cfg),
        )
        self.device = self.engine.device
        self.reference = None
        if cfg.with_reference:
            reference = load_reference(cfg.model, cfg.dtype)
            if cfg.zero_stage == 3:
                ref_config = reference_deepspeed_config(cfg)
                self.reference, _, _, _ = deepspeed.initialize(model=reference, config=ref_config)
            else:
                self.reference = reference.to(self.device)

    @property
    def module(self) -> PolicyWithValue:
        return self.engine.module

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Output:
        """The module's forward on the device: the policy's ``Output`` (another module's own result)."""
        return self.engine(input_ids.to(self.device), attention_mask.to(self.device))

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.reference is None:
            raise RuntimeError("no reference model: the learner was built with learner.with_reference=False")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self.reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def set_boundary(self, is_last_micro_batch: bool) -> None:
        """Tell DeepSpeed whether the next backward ends the optimizer step's accumulation (ZeRO
        reduces and partitions gradients there)."""
        self.engine.set_gradient_accumulation_boundary(is_last_micro_batch)

    def backward(self, loss: Tensor) -> None:
        # scale_wrt_gas=False: the caller's loss already carries its normalisation (global counts).
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepStats:
        """Clip, apply AdamW, advance the LR schedule; returns the pre-clip global grad norm."""
        lr = self.engine.get_lr()[0]
        norm = None
        if self.cfg.zero_stage == 0 and self.cfg.dtype == "fp32":
            # The one path where DeepSpeed clips (``clip_fp32_gradients``) but keeps no norm. The
            # gradients are already all-reduced (whole on every rank) at the boundary backward.
            grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return StepStats(grad_norm=float(norm), lr=float(lr))

    def export_weights(self) -> Optional[dict[str, Tensor]]:
        """The policy's full weights under HF names, on CPU, without the value head; rank 0 gets
        the dict, the other ranks None. Under ZeRO-3 every rank must call it (each parameter is
        all-gathered in turn); otherwise only rank 0 copies."""
        start = time.perf_counter()
        if self.cfg.zero_stage == 3:
            import deepspeed   # _DEEPSPEED_IMPORT

            gather = lambda params: deepspeed.zero.GatheredParameters(params)  # noqa: E731
        else:
            gather = lambda params: nullcontext()  # noqa: E731
        weights = self.module.state_dict_for_inference(gather=gather, keep=self.rank == 0)
        logger.info("export_weights: %.3f s (zero_stage=%d)", time.perf_counter() - start, self.cfg.zero_stage)
        return weights

    def save_checkpoint(self, ckpt_dir: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint (module, ZeRO-partitioned optimizer, LR scheduler, ``client_state``)
        under ``ckpt_dir/deepspeed``, plus this rank's RNG states in ``ckpt_dir/rng_rank{r}.pt``.
        Every rank must call it; on several nodes ``ckpt_dir`` must be on a shared file system."""
        self.engine.save_checkpoint(
            ckpt_dir, tag=CHECKPOINT_TAG, client_state={CLIENT_STATE_KEY: client_state}, save_latest=False
        )
        torch.save(_rng_state(), Path(ckpt_dir) / f"rng_rank{self.rank}.pt")
        dist.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote (same world size and ZeRO stage); returns the
        client state. Continuing from here equals never having stopped."""
        path, states = self.engine.load_checkpoint(
            ckpt_dir, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt_dir}/{CHECKPOINT_TAG}")
        _set_rng_state(torch.load(Path(ckpt_dir) / f"rng_rank{self.rank}.pt", weights_only=False))
        return states[CLIENT_STATE_KEY]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
