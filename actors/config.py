"""Configuration of the rollout side: the vLLM engines, their Ray actors and the weight sync.

One frozen dataclass, ``RolloutConfig``. The same file runs on a 2-core laptop (vLLM's CPU
backend) and on GPUs: the fields whose right value depends on the device default to ``None`` or
``"auto"`` and are resolved inside the actor, where the device is known (`resolved_dtype`,
`resolved_enforce_eager`). ``__post_init__`` checks each value on its own; every error names
the key (``rollout.<field>``) and the value, as ``learner.config`` does.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
SYNC_TRANSPORTS = ("shm", "object_store", "nccl", "gloo")
BROADCAST_TRANSPORTS = ("nccl", "gloo")   # the learner pushes to samplers joined to its group
AUTO_SYNC = "auto"   # rollout.sync in a run config: the run mode picks (cluster.placement)
VERIFY_MODES = ("both", "checksum", "probe", "off")
EXECUTORS = (None, "uni", "mp")
ENGINE_CORES = (None, "in_process", "own_process")
# The Ray namespace of every actor a run starts (rollout-N, reward-0, learner-N): the dashboard
# and ray.get_actor find them there.
RAY_NAMESPACE = "reft"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    model: str
    """Local directory (or HF hub id) of the starting weights: the SFT warm-up checkpoint for the
    RL stage. Weight syncs replace the weights later; the tokenizer and config stay this one's.
    No default: every run must say which model it samples from."""

    dtype: str = "auto"
    """vLLM's compute dtype. "auto" = "float32" on CPU (bf16 measured slower on AVX2 CPUs,
    docs/measurements.md §2, and fp32 makes the sampler's logprobs match the learner's to ~1e-6) and "bfloat16"
    on GPU (the paper's setting, half the memory)."""

    max_model_len: int = 1024
    """Prompt + completion tokens per sequence. The paper's RL stage caps prompt + answer at 700
    tokens; 1024 (the SFT max length) leaves room without wasting KV-cache blocks."""

    kv_cache_gib: int = 1
    """CPU only: GiB of KV cache (vLLM's ``VLLM_CPU_KVCACHE_SPACE``, an integer). 1 GiB holds
    ~thousands of sequences of the tiny model; each engine on a node takes this much RAM."""

    gpu_memory_utilization: float = 0.9
    """GPU only: fraction of the GPU vLLM may take (weights + KV cache). vLLM's default; lower it
    (e.g. 0.4) when the learner shares the GPU (local-gpu mode)."""

    tensor_parallel_size: int = 1
    """GPU only: GPUs per engine. The actor reserves that many GPUs and vLLM starts one worker
    process per GPU (multiprocessing executor, inside the actor's GPU allocation)."""

    enforce_eager: Optional[bool] = None
    """None = True on CPU (no graph capture there) and False on GPU, where CUDA graphs speed up
    decoding several-fold. Weight reloads keep the graphs valid: parameters are updated in place."""

    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (K samples of one question share the whole
    prompt). After every weight load the cache is reset, or cached prefixes keep the old
    weights' keys and values (docs/measurements.md §2); the weight-sync probe checks exactly that."""

    enable_chunked_prefill: Optional[bool] = None
    """None = False on CPU, True on GPU. vLLM 0.32's CPU backend crashes the engine ("CPU
    Generator does not use offset", in ``_bookkeeping_sync``) when a request with its own seed
    has its prefill split over two steps, which chunked prefill does as soon as a step's token
    budget fills up (a few dozen prompts at once). Without chunking, whole prompts only."""

    executor: Optional[str] = None
    """vLLM's executor (``distributed_executor_backend``). None = "uni" on CPU with one worker:
    the model runs inside the engine core's process, one process and one shared-memory hop fewer
    per decode step than vLLM's "mp" (32 x ~32 tokens: 0.33 vs 0.41 s, docs/measurements.md §4);
    vLLM's own choice on GPU ("mp" when tensor_parallel_size > 1)."""

    engine_core: Optional[str] = None
    """Where vLLM's engine core (scheduler + model) runs. None = "in_process" on CPU: the actor
    steps vLLM's LLMEngine itself, one process instead of two, no zmq message per decode step
    (the embedded default's rollout 0.15 -> 0.14 s a step, engine start-up 12 -> 7 s, 0.55 GiB
    less memory: docs/measurements.md §5); "own_process" on GPU: vLLM's AsyncLLM, whose engine
    core schedules the next step in its own process while the GPU runs this one."""

    idle_spin_s: Optional[float] = None
    """Seconds an engine's worker process busy-polls for the next step after the last one before
    it sleeps. None = 0.01 on CPU, where vLLM's own 1 s took a whole core from the learner after
    every generation (measured: the learner's step ~1.6x its floor beside it), and vLLM's default
    (1 s) on GPU, where the host has cores to spare and a sleeping worker adds latency."""

    log_stats: bool = False
    """vLLM's per-step statistics (its periodic throughput lines in the engine log, its
    Prometheus metrics). Nothing in this project reads them, and on CPU they cost 3-9% of a decode
    step of the embedded default's model (docs/measurements.md §10)."""

    max_num_seqs: Optional[int] = None
    """Sequences decoded together per engine step; None = vLLM's default for the platform."""

    seed: int = 0
    """vLLM's engine seed. Requests may carry their own seed (``SampleRequest.seed``), which makes
    a re-issued request (after an actor died) sample the same tokens again."""

    num_actors: int = 1
    """Rollout actors (engines) in the fleet, named rollout-0, rollout-1, ... in namespace reft."""

    num_threads: Optional[int] = None
    """torch intra-op threads of the engine's model (the actor's process with the in-process engine
    core and the HF fallback; an engine-core process inherits it as OMP_NUM_THREADS). None = on
    CPU, the cores this process may run on shared among ``num_actors`` (all of them for one
    engine): on-policy, the samplers decode while the learner waits, and Ray's OMP_NUM_THREADS of a
    fractional actor (1) left the embedded default's rollout at ~1.6x HF generate on two cores
    (docs/measurements.md §6). On GPU None leaves vLLM's choice (one thread while serving). Set it
    where engines spread over several CPU nodes, or decode beside a training learner
    (``rl.max_staleness`` 1)."""

    num_cpus_per_actor: float = 0.5
    """Ray CPUs reserved per actor: a scheduling share only (the engine's threads are
    ``num_threads``, whatever Ray reserves). Fractional because two num_cpus=1 actors fill a 2-CPU node and
    the next actor waits forever without an error (docs/measurements.md §2)."""

    num_gpus_per_actor: Optional[float] = None
    """For a fleet on its own: None = ``tensor_parallel_size`` when the Ray cluster has GPUs,
    else 0. ``reft train`` does not read it: the run mode's placement plan gives each actor its
    resources and bundle (``cluster.placement.actor_options``; 0.5 GPU each in local-gpu)."""

    sync: str = "shm"
    """How new weights reach the engines (``actors.weight_sync``):
    "shm": safetensors in /dev/shm, loaded from there: what works on CPU, single node only.
    "object_store": the safetensors bytes through Ray's object store, written to each sampler
    node's /dev/shm: multi-node without shared memory.
    "nccl": broadcast from the learner to the engines' GPU workers (GPU clusters).
    "gloo": the same broadcast over gloo (CPU, or GPUs without NCCL between the two sides).
    "auto" (``reft train``'s default): the run mode picks, ``cluster.placement``: "shm" in the
    single-node modes (cpu, local-gpu), "object_store" in cluster mode. A fleet started on its own
    has no run mode and needs a transport named here (``make_weight_sync`` refuses "auto")."""

    enable_sleep_mode: Optional[bool] = None
    """GPU only: start vLLM with its sleep mode, so that ``RolloutWorker.sleep`` frees the
    engine's GPU memory (weights offloaded to CPU RAM, KV cache dropped) while a learner on the
    same GPU trains. None = the run mode decides (``cluster.placement``: on in local-gpu, where
    they share the GPU), and off for a fleet on its own. Ignored on CPU: vLLM's CPU platform has
    no sleep mode (``Platform.is_sleep_mode_available``; vLLM refuses the engine argument there)."""

    sync_dir: str = "/dev/shm/reft-weights"
    """Where the shm and object-store transports write versioned weight directories. /dev/shm is
    RAM: loading from it costs no disk I/O. Old versions are removed as new ones arrive."""

    verify: str = "both"
    """How each sampler proves it holds the learner's weights after a sync (a mismatch raises
    ``WeightSyncError`` naming the sampler and version):
    "checksum": exact integer checksums of every tensor the sampler fed to vLLM's loader, against
    the learner's (catches any changed, missing or extra tensor; transport integrity).
    "probe": greedy tokens + logprobs of a fixed prompt from the engine, against HF run on the
    published state dict (catches a load that did not take effect, a stale prefix cache, a wrong
    name mapping). Costs one HF greedy decode of ``probe_tokens`` tokens per sync on the learner
    side: cheap for small models; use "checksum" for 7B-class models on CPU publishers.
    "both" (default): both. "off": neither (benchmarks only)."""

    probe_tokens: int = 8
    """Greedy tokens the probe generates."""

    probe_every: int = 10
    """With the probe on: probe versions 1, 1 + N, 1 + 2N, ... (1 = every sync). What the probe
    catches (a load that does not take effect, a stale prefix cache, a wrong name mapping) is
    systematic: it fails the first probed version and every one after. The checksums, which
    catch what differs from one sync to the next, still run on every sync and always raise on a
    mismatch. 10 saves ~40% of a sync of the embedded default (two greedy decodes per sampler
    and one HF decode on the learner)."""

    probe_prompt_len: int = 160
    """Tokens in the probe prompt: longer than one KV-cache block on both backends (vLLM's default
    block is 16 tokens on GPU and 128 on CPU). Only full blocks enter the prefix cache, so a probe
    longer than a block is served from the cache at the next version unless the cache was reset:
    the probe then sees the old weights' keys/values and fails."""

    probe_atol: float = 1e-3
    """Largest |vLLM - HF| logprob difference the probe accepts. fp32 on CPU agrees to ~1e-5;
    raise it to ~0.1 for bfloat16, where vLLM's kernels and HF's round differently."""

    start_timeout_s: float = 600.0
    """How long the fleet waits for an engine to start (vLLM start on CPU: 30-50 s; a 7B model on
    GPU: minutes, mostly loading weights and capturing CUDA graphs)."""

    poll_linger_s: float = 0.2
    """How long a finished request's samples may wait in the actor for others to join the same
    poll reply, while requests are still decoding (like Kafka's ``linger.ms``). Each reply in
    the middle of a rollout cost the engine's decode ~5 ms on 2 cores (its Ray and Python work
    runs beside the engine's threads): the embedded default's 32 prompts went out in ~3 replies
    and decoded ~10% slower than in one reply (docs/measurements.md §7). 0.2 s holds a CPU
    rollout of the tiny model (~0.12 s) to one reply; on GPU a rollout takes seconds, so its
    samples still stream to the reward actor in chunks while the rest decode. A reply never
    waits once nothing is decoding, nor for samples that have already waited this long
    (a batch decoded ahead, ``rl.max_staleness`` 1, is answered at once). 0 = reply at once."""

    call_timeout_s: float = 60.0
    """Deadline of every ordinary remote call (submit, poll, version, health) beyond its own
    wait. A rollout actor that does not answer within it is treated as dead and replaced."""

    sync_timeout_s: float = 300.0
    """Deadline of one weight sync on the sampler side (drain in-flight requests, transfer, load,
    verify) and of the learner side's transfer. Generous: a sync drains running requests first."""

    max_actor_restarts: int = 3
    """How many times the fleet replaces a dead actor in one slot before giving up (raising),
    so that a crash loop (e.g. out of memory at every start) stops the run loudly."""

    def __post_init__(self):
        def check(ok: bool, field: str, why: str):
            if not ok:
                raise ValueError(f"rollout.{field} = {getattr(self, field)!r}: {why}")

        check(bool(self.model), "model", "must name a model directory or hub id")
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        check(self.max_model_len >= 16, "max_model_len", "must be >= 16")
        check(isinstance(self.kv_cache_gib, int) and self.kv_cache_gib >= 1, "kv_cache_gib",
              "must be an integer >= 1 (vLLM reads VLLM_CPU_KVCACHE_SPACE as whole GiB)")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.max_num_seqs is None or self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1 or None")
        check(self.idle_spin_s is None or self.idle_spin_s >= 0, "idle_spin_s", "must be >= 0 or None")
        check(self.executor in EXECUTORS, "executor", f"must be one of {EXECUTORS}")
        check(self.engine_core in ENGINE_CORES, "engine_core", f"must be one of {ENGINE_CORES}")
        check(self.num_actors >= 1, "num_actors", "must be >= 1")
        check(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1 or None")
        check(self.num_cpus_per_actor >= 0, "num_cpus_per_actor", "must be >= 0")
        check(self.num_gpus_per_actor is None or self.num_gpus_per_actor >= 0, "num_gpus_per_actor",
              "must be >= 0 or None")
        check(self.sync in SYNC_TRANSPORTS + (AUTO_SYNC,), "sync", f"must be one of {SYNC_TRANSPORTS + (AUTO_SYNC,)}")
        check(bool(self.sync_dir), "sync_dir", "must be a directory path")
        check(self.verify in VERIFY_MODES, "verify", f"must be one of {VERIFY_MODES}")
        check(self.probe_tokens >= 1, "probe_tokens", "must be >= 1")
        check(self.probe_every >= 1, "probe_every", "must be >= 1")
        check(2 <= self.probe_prompt_len < self.max_model_len - self.probe_tokens, "probe_prompt_len",
              f"must be >= 2 and leave room for probe_tokens within max_model_len ({self.max_model_len})")
        check(self.probe_atol > 0, "probe_atol", "must be > 0")
        check(0.0 <= self.poll_linger_s < self.call_timeout_s, "poll_linger_s",
              "must be >= 0 and below call_timeout_s (a poll must answer within its deadline)")
        for field in ("start_timeout_s", "call_timeout_s", "sync_timeout_s"):
            check(getattr(self, field) > 0, field, "must be > 0 seconds")
        check(self.max_actor_restarts >= 0, "max_actor_restarts", "must be >= 0")

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The dtype the engine runs in on this device ("auto" resolved)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if on_gpu else "float32"

    def resolved_enforce_eager(self, on_gpu: bool) -> bool:
        return (not on_gpu) if self.enforce_eager is None else self.enforce_eager

    def resolved_executor(self, on_gpu: bool) -> Optional[str]:
        """vLLM's executor on this device; None = vLLM's choice."""
        if self.executor is not None:
            return self.executor
        return "uni" if not on_gpu and self.tensor_parallel_size == 1 else None

    def resolved_engine_core(self, on_gpu: bool) -> str:
        if self.engine_core is not None:
            return self.engine_core
        return "own_process" if on_gpu else "in_process"

    def resolved_idle_spin(self, on_gpu: bool) -> Optional[float]:
        """The worker's idle busy-poll in seconds; None = leave vLLM's."""
        if self.idle_spin_s is not None:
            return self.idle_spin_s
        return None if on_gpu else 0.01

    def resolved_num_threads(self, on_gpu: bool) -> Optional[int]:
        """The engine's torch threads; None = leave them as they are (vLLM's on GPU)."""
        if self.num_threads is not None:
            return self.num_threads
        return None if on_gpu else max(1, len(os.sched_getaffinity(0)) // self.num_actors)

    def resolved_chunked_prefill(self, on_gpu: bool) -> bool:
        return on_gpu if self.enable_chunked_prefill is None else self.enable_chunked_prefill

    def resolved_sleep_mode(self, on_gpu: bool) -> bool:
        """Whether the engine starts with vLLM's sleep mode: only on GPU, and only when asked
        (on CPU vLLM would refuse to start the engine: no sleep mode on that platform)."""
        return on_gpu and bool(self.enable_sleep_mode)

    @property
    def checks_checksums(self) -> bool:
        return self.verify in ("both", "checksum")

    @property
    def checks_probe(self) -> bool:
        return self.verify in ("both", "probe")

    def probes(self, version: int) -> bool:
        """Whether the sync of ``version`` runs the probe (``probe_every``)."""
        return self.checks_probe and (version - 1) % self.probe_every == 0
