"""Moving the learner's weights into the rollout engines, and proving they arrived.

One interface, ``WeightSync``, with two halves that run in different processes:

* learner side (the process that holds the state dict: learner rank 0,
  ``LearnerWorker.publish_weights``; the driver only passes the handle on, and forwards the push
  transports' calls through ``RemoteSender``): ``publish(state_dict, version) -> WeightHandle``, a
  small picklable description of the new weights; ``transmit(handle, receivers)`` for transports that
  push (broadcast); ``attach(receiver, join)`` for transports that need a connection per
  receiver.
* sampler side (inside each ``actors.rollout.RolloutWorker``): ``await receive(handle, engine,
  who)`` loads the weights into the engine, resets its prefix cache, and verifies them.

Transports (``RolloutConfig.sync``):

1. ``SharedMemoryDirSync`` ("shm"): the state dict as one safetensors file in a versioned
   directory under /dev/shm (RAM); each engine reloads from it with
   ``collective_rpc("reload_weights", weights_path=dir)``. This is what works on vLLM's CPU
   backend (in-place ``load_weights`` fails there: weights are repacked after loading, docs/measurements.md §2).
   Single node only. The previous version's directory is kept (a lagging receiver may still read
   it), older ones are removed, and the publisher's directory goes when it is closed or its
   process exits; a process killed with SIGKILL leaves it behind (``rm -r /dev/shm/reft-weights``
   frees that memory).
2. ``RayObjectStoreSync`` ("object_store"): the same safetensors bytes, ``ray.put`` once; each
   sampler ``ray.get``s them (Ray moves them between nodes), writes them to its own node's
   /dev/shm and loads as in 1. For multi-node clusters without shared memory.
3. ``NcclBroadcastSync`` ("nccl", or "gloo" for the same code over gloo): a dedicated process
   group per rollout actor, independent of the DeepSpeed world, between the sender and that
   engine's vLLM worker processes; tensors are broadcast one by one and streamed into vLLM's
   layerwise in-place reload (``VllmWorkerExtension``). Rank layout of each group, after
   OpenRLHF's ``_init_vllm_sync_group``::

        rank 0            ranks 1 .. TP
        sender            rollout-k's vLLM workers (TP rank r = group rank 1 + r)
        (learner rank 0   each receives every full tensor; vLLM's
         or the driver)   weight loaders take their shard

   One group per actor rather than one for all (OpenRLHF) costs the sender one transfer per
   engine, but a dead actor never stalls the others' sync, and its replacement joins a fresh
   group without disturbing anybody. NCCL has no timeout of its own: the sender's transfer runs
   in a thread that is abandoned after ``sync_timeout_s`` (a stuck NCCL stream cannot be
   cancelled; restart the process). With "nccl" the sender needs a GPU and vLLM importable (it
   uses vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``); nothing of it is imported
   until a group is opened, so CPU machines import this module freely. The sender is
   learner rank 0 (``LearnerWorker``): the fleet on the driver calls its ``attach``/``transmit``
   there through ``RemoteSender``, so "nccl" sends from the learner's GPU and "gloo" from its CPU,
   one code path.

Verification (``RolloutConfig.verify``). The learner side puts its expectations in the handle;
the sampler checks whatever the handle carries and raises ``WeightSyncError`` naming itself and
the version on any mismatch:

* checksums: per tensor, exact integer sums of its bytes (16-bit words, plain and position-
  weighted; ``tensor_checksum``), over what the sampler fed to vLLM's loader: the file it
  read, the bytes it got, the buffers it received. Exact on CPU and GPU (the sums are exact
  integers, whatever the reduction order), so a missing or extra tensor and any one changed
  element are always caught (several changes escape only if they cancel in both sums). vLLM's
  own parameters cannot be read back for this: they are fused (qkv, gate_up) and, on CPU,
  repacked into kernel formats with the original tensors removed.
* probe: after loading, the engine greedily decodes ``probe_tokens`` tokens of a fixed
  ``probe_prompt_len``-token prompt; tokens and logprobs must match HF run on the published state
  dict (``hf_probe``). This proves the load took effect end to end: a reload that silently
  skipped tensors (it found vLLM's stale tied LM head on CPU,
  ``VllmWorkerExtension.reft_refresh_tied_lm_head``), a wrong name mapping, or a stale prefix
  cache all change the engine's logprobs. For the last one the prompt is longer than a KV block
  and is served once under the old weights just before loading, so its blocks are in the
  prefix cache: unless the reset worked, the probe reads the old weights' keys and values.

Where the checksums show corruption before anything was loaded (the pull transports check the
file or bytes first), the engine keeps its old weights and the error says so
(``WeightSyncError.weights_changed``); otherwise the sampler stops serving until a good sync.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime
import logging
import os
import random
import shutil
import socket
import threading
import time
import types
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import torch
from torch import Tensor

from actors.config import BROADCAST_TRANSPORTS, RolloutConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_POSITION_MODULUS = 32749             # largest prime below 2**15: position weights 1..32749
_CHECKSUM_CHUNK = _POSITION_MODULUS * 64    # ~2.1 M words per reduction: exact in float64 (tensor_checksum)


class WeightSyncError(RuntimeError):
    """A sampler could not load, or could not prove it holds, the learner's weights.

    ``weights_changed``: whether the engine's weights were touched before the problem was found
    (then it must not serve until a good sync), or are still the previous version's.
    """

    def __init__(self, message: str, weights_changed: bool = True):
        super().__init__(message)
        self.weights_changed = weights_changed

    def __reduce__(self):   # keep weights_changed across Ray's pickling of the error
        return (type(self), (self.args[0], self.weights_changed))


# ---------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str              # torch dtype name without "torch.": "float32", "bfloat16"
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ProbeExpectation:
    """HF's greedy decode of the probe prompt under the published weights (``hf_probe``).

    Per step i: the greedy token and its logprob, and the runner-up with its logprob, so that a
    near-tie (the engine picking the runner-up within ``probe_atol``) is not a false alarm.
    """
    prompt_token_ids: tuple[int, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    runner_up: tuple[int, ...]
    runner_up_logprobs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class WeightHandle:
    """What a sampler needs to load and check one published version. Small and picklable: it
    travels as a Ray call argument (an ObjectRef inside it is passed by reference)."""
    version: int
    transport: str
    tensors: tuple[TensorSpec, ...]                     # in send order; tied aliases left out
    checksums: Optional[dict[str, tuple[int, int]]]   # name -> tensor_checksum; None = not checked
    probe: Optional[ProbeExpectation]                   # None = not checked
    probe_atol: float
    location: Any = None                                # shm: directory; object store: [ObjectRef]


class SyncTarget(Protocol):
    """What ``receive`` needs from an engine (``actors.rollout``'s vLLM and HF engines)."""

    async def load_from_dir(self, path: str, timeout_s: float) -> None: ...

    async def call_workers(self, method: str, kwargs: dict, timeout_s: float) -> list: ...

    async def reset_prefix_cache(self) -> None: ...

    async def greedy(self, prompt_token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]: ...

    async def run_blocking(self, fn: Callable, *args) -> Any:
        """Run CPU work of the sync (checksums) where the engine wants torch work run: on the thread
        that runs its model when that is in this process, else in a worker thread."""


# ----------------------------------------------------------------------------------- checksums


def tensor_checksum(tensor: Tensor) -> tuple[int, int]:
    """(sum, position-weighted sum) of a tensor's bytes read as unsigned 16-bit words (bytes for
    1-byte dtypes), exact Python ints.

    Exact, and so independent of the order of reduction: the learner (CPU) and a sampler (CPU,
    or the GPU buffers a broadcast filled) get the same numbers for the same bytes. Changing any
    one element changes the plain sum; the weighted sum also catches moved elements (a
    transposed or permuted tensor). Word i is weighted by (i mod P) + 1, P = 32749 (a prime
    < 2**15). The sums run in float64 (BLAS dot: ~6x faster than integer ops in torch): every
    product is an integer < 2**31 and a chunk of 64 P ~ 2**21 words sums to < 2**52, so every
    partial sum is an integer float64 represents exactly, whatever the order. The chunk is a
    multiple of P, so one weight vector serves every chunk.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    weights = _position_weights(words.device)
    total, weighted = 0, 0
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        x = (words[start:start + _CHECKSUM_CHUNK].to(torch.int32) & 0xFFFF).to(torch.float64)   # unsigned words
        total += int(x.sum())
        weighted += int(torch.dot(x, weights[:x.numel()]))
    return total, weighted


_WEIGHTS: dict[torch.device, Tensor] = {}


def _position_weights(device: torch.device) -> Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(_CHECKSUM_CHUNK, dtype=torch.float64, device=device) % _POSITION_MODULUS + 1
    return _WEIGHTS[device]


def compare_checksums(expected: dict[str, tuple[int, int]], got: dict[str, tuple[int, int]]) -> Optional[str]:
    """None if equal, else a short description of the first differences."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = [name for name in expected if name in got and tuple(got[name]) != tuple(expected[name])]
    if not (missing or extra or differ):
        return None
    parts = []
    if differ:
        parts.append(f"checksum differs for {differ[:3]}{' ...' if len(differ) > 3 else ''} ({len(differ)} tensors)")
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}")
    return "; ".join(parts)


# ------------------------------------------------------------------------ model spec and probe


class ModelSpec:
    """What the learner side knows about the architecture: expected names and shapes (from the
    HF model built on the meta device, no memory), which names are tied aliases, the model class
    (for the probe) and the probe prompt. Built once per sender."""

    def __init__(self, model: str, probe_prompt_len: int):
        from transformers import AutoConfig, AutoModelForCausalLM

        from formats.hf import load_tokenizer

        self.model = model
        self.config = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(self.config)
        self.model_class = type(meta)
        self.shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        # Tied weights (lm_head.weight = embed_tokens.weight) are one Parameter under two names;
        # the later names are aliases: not sent, the receiving model ties them itself.
        seen: dict[int, str] = {}
        self.aliases: dict[str, str] = {}
        for name, param in meta.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                self.aliases[name] = seen[id(param)]
            else:
                seen[id(param)] = name
        vocab = min(self.config.vocab_size, len(load_tokenizer(model)))
        rng = random.Random(1234)   # fixed: the same probe prompt for every version and run
        self.probe_prompt = tuple(rng.randrange(vocab) for _ in range(probe_prompt_len))

    def ordered(self, state_dict: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
        """The tensors to send, in the state dict's order, after nanoGPT-style loud checks: every
        name the architecture expects is present (aliases may be absent), no unknown name, every
        shape equal, every tensor floating point."""
        given = set(state_dict)
        missing = sorted(set(self.shapes) - set(self.aliases) - given)
        unexpected = sorted(given - set(self.shapes))
        if missing or unexpected:
            raise ValueError(f"weights do not fit {self.model}: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        out = []
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != self.shapes[name]:
                raise ValueError(f"weights for {self.model}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {self.shapes[name]}")
            if not tensor.is_floating_point():
                raise ValueError(f"weights for {self.model}: {name} has dtype {tensor.dtype}, expected floating point")
            if name not in self.aliases:
                out.append((name, tensor))
        return out


@torch.no_grad()
def hf_probe(spec: ModelSpec, tensors: Sequence[tuple[str, Tensor]], max_tokens: int,
             model=None) -> ProbeExpectation:
    """HF's greedy decode of the probe prompt with exactly these tensors.

    ``model``: an HF causal LM that holds these very weights already (learner rank 0's own
    policy, on its device): decoded with it, nothing is rebuilt. Otherwise a model is built from
    the config with the given tensors as its weights (no random init), on CPU. One forward over
    the prompt, then one per token with the KV cache. EOS does not stop it (the engine's probe
    uses ignore_eos).
    """
    if model is None:
        state_dict = {name: t.detach().to("cpu") for name, t in tensors}
        dtype = next(iter(state_dict.values())).dtype
        model = spec.model_class.from_pretrained(None, config=spec.config, state_dict=state_dict, dtype=dtype)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens, logprobs, runner_up, runner_up_logprobs = [], [], [], []
    out = model(input_ids=torch.tensor([spec.probe_prompt], device=device), use_cache=True)
    for _ in range(max_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        top = lp.topk(2)
        token = int(top.indices[0])
        tokens.append(token)
        logprobs.append(float(top.values[0]))
        runner_up.append(int(top.indices[1]))
        runner_up_logprobs.append(float(top.values[1]))
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
    model.train(was_training)
    return ProbeExpectation(spec.probe_prompt, tuple(tokens), tuple(logprobs), tuple(runner_up),
                            tuple(runner_up_logprobs))


def compare_probe(expected: ProbeExpectation, tokens: Sequence[int], logprobs: Sequence[float],
                  atol: float) -> Optional[str]:
    """None if the engine's greedy decode matches HF's, else why not.

    Step by step: the same token with a logprob within ``atol`` passes. A different token passes
    only at a near-tie (the engine took HF's runner-up, whose logprob is within ``atol`` of the
    top one); the two paths then diverge and the comparison stops there.
    """
    if len(tokens) != len(expected.tokens) or len(logprobs) != len(tokens):
        return f"engine returned {len(tokens)} tokens / {len(logprobs)} logprobs, expected {len(expected.tokens)}"
    for i, (got, got_lp) in enumerate(zip(tokens, logprobs)):
        want, want_lp = expected.tokens[i], expected.logprobs[i]
        if got == want:
            if abs(got_lp - want_lp) > atol:
                return f"probe token {i} ({got}): engine logprob {got_lp:.6f}, HF {want_lp:.6f} (atol {atol})"
            continue
        other, other_lp = expected.runner_up[i], expected.runner_up_logprobs[i]
        if got == other and want_lp - other_lp <= atol and abs(got_lp - other_lp) <= atol:
            return None   # a near-tie broken the other way; nothing after it is comparable
        return (f"probe token {i}: engine chose {got} (logprob {got_lp:.6f}), HF chose {want} "
                f"({want_lp:.6f}; runner-up {other} at {other_lp:.6f})")
    return None


# ------------------------------------------------------------------------------- the interface


class WeightSync(abc.ABC):
    """Base of every transport: the learner side's checks and expectations, the sampler side's
    verification. Subclasses implement ``_put`` (learner side: make the weights reachable) and
    ``_load`` (sampler side: get them into the engine)."""

    transport: ClassVar[str]

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg
        self._spec: Optional[ModelSpec] = None

    # -------------------------------------------------------------- learner side

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = ModelSpec(self.cfg.model, self.cfg.probe_prompt_len)
        return self._spec

    def publish(self, state_dict: dict[str, Tensor], version: int, model=None) -> WeightHandle:
        """Check the names and shapes, compute the expectations ``cfg.verify`` asks for, make the
        weights reachable for the samplers, and describe them in a handle. ``model``: an HF model
        holding exactly ``state_dict`` (the learner's own policy), for the probe (``hf_probe``)."""
        tensors = self.spec.ordered(state_dict)
        checksums = {name: tensor_checksum(t) for name, t in tensors} if self.cfg.checks_checksums else None
        probe = hf_probe(self.spec, tensors, self.cfg.probe_tokens, model) if self.cfg.probes(version) else None
        specs = tuple(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors)
        location = self._put(tensors, version)
        return WeightHandle(version=version, transport=self.transport, tensors=specs, checksums=checksums,
                            probe=probe, probe_atol=self.cfg.probe_atol, location=location)

    @abc.abstractmethod
    def _put(self, tensors: list[tuple[str, Tensor]], version: int) -> Any:
        """Make the tensors reachable; return the handle's ``location``."""

    def attach(self, receiver: str, join: Callable[[dict], Any], timeout_s: float) -> None:
        """Connect a new receiver (a rollout actor's name). ``join(info)`` must start the
        receiver's side (``RolloutWorker.join_weight_sync.remote(info)``) and return its ref.
        Pull transports need no connection: a no-op."""

    def detach(self, receiver: str) -> None:
        """Forget a receiver (it died or left)."""

    def transmit(self, handle: WeightHandle, receivers: Sequence[str], timeout_s: float) -> None:
        """Push the weights of ``handle`` to ``receivers`` while they wait in ``receive``. Pull
        transports: nothing to do (the samplers fetch)."""

    def close(self) -> None:
        """Release what the learner side holds (files, groups)."""

    # -------------------------------------------------------------- sampler side

    async def receive(self, handle: WeightHandle, engine: SyncTarget, who: str) -> dict[str, float]:
        """Load ``handle``'s weights into ``engine``, reset its prefix cache and verify them.

        Returns timings {"load_s", "verify_s"}. Raises ``WeightSyncError`` naming ``who`` and the
        version if the weights cannot be loaded or do not match the learner's.
        """
        if handle.transport != self.transport:
            raise WeightSyncError(f"{who}: a {handle.transport!r} handle given to the {self.transport!r} "
                                  "receiver", weights_changed=False)
        start = time.perf_counter()
        if handle.probe is not None:
            # Serve the probe prompt under the OLD weights first: its full blocks enter the prefix
            # cache, so a load without a working cache reset fails the probe below, every time.
            await engine.greedy(handle.probe.prompt_token_ids, 1)
        await self._load(handle, engine, who)
        await engine.reset_prefix_cache()   # REQUIRED: cached prefixes hold the old weights' K/V
        loaded = time.perf_counter()
        if handle.probe is not None:
            tokens, logprobs = await engine.greedy(handle.probe.prompt_token_ids, len(handle.probe.tokens))
            why = compare_probe(handle.probe, tokens, logprobs, handle.probe_atol)
            if why:
                raise WeightSyncError(f"{who}: weights version {handle.version} fail the probe: {why}")
        return {"load_s": loaded - start, "verify_s": time.perf_counter() - loaded}

    @abc.abstractmethod
    async def _load(self, handle: WeightHandle, engine: SyncTarget, who: str) -> None:
        """Get the weights into the engine, checking ``handle.checksums`` (when given) against what
        is fed to the loader: before loading where the transport allows it (the engine then keeps
        its previous weights on a mismatch)."""

    @staticmethod
    def _check_checksums(handle: WeightHandle, got: dict, who: str, weights_changed: bool) -> None:
        why = compare_checksums(handle.checksums, got)
        if why:
            state = "the engine's weights are now unverified" if weights_changed else "nothing was loaded"
            raise WeightSyncError(f"{who}: weights version {handle.version} do not match the learner's: "
                                  f"{why} ({state})", weights_changed=weights_changed)


def make_weight_sync(cfg: RolloutConfig, transport: Optional[str] = None) -> WeightSync:
    """The ``WeightSync`` of ``transport`` (default ``cfg.sync``)."""
    transport = transport or cfg.sync
    if transport == "auto":
        raise ValueError("rollout.sync = 'auto' is the run mode's to resolve (cluster.placement, "
                         "PlacementPlan.rollout_config); a fleet on its own needs shm, object_store, nccl or gloo")
    if transport == "shm":
        return SharedMemoryDirSync(cfg)
    if transport == "object_store":
        return RayObjectStoreSync(cfg)
    if transport in BROADCAST_TRANSPORTS:
        return NcclBroadcastSync(cfg, backend=transport)
    raise ValueError(f"rollout.sync = {transport!r}: must be one of shm, object_store, nccl, gloo")


class RemoteSender:
    """The learner half of a transport, hosted by another actor: learner rank 0
    (``learner.worker.LearnerWorker``), which publishes its own weights. The fleet on the driver
    holds this in place of a local ``WeightSync``: it never sees the tensors, only the handles
    ``LearnerWorker.publish_weights`` returns, and forwards what the push transports need
    (``attach`` / ``transmit``) to the actor; for the pull transports (shm, object store) those are
    no-ops there. Every call has a deadline.

    ``actor``: the learner rank-0 actor, or a function returning it (called at the first call
    that needs it: the driver may start the fleet while the learner is still starting)."""

    def __init__(self, actor, transport: str, timeout_s: float):
        self._actor, self.transport, self.timeout_s = actor, transport, timeout_s

    @property
    def actor(self):
        if isinstance(self._actor, types.FunctionType):   # (an actor handle answers every attribute)
            self._actor = self._actor()
        return self._actor

    def publish(self, state_dict, version):
        raise TypeError("weights are published by learner rank 0 (LearnerWorker.publish_weights), not by the driver")

    def attach(self, receiver: str, join: Callable[[dict], Any], timeout_s: float) -> None:
        import ray
        if self.transport not in BROADCAST_TRANSPORTS:
            return
        try:
            info = dict(ray.get(self.actor.weight_sync_prepare.remote(receiver), timeout=self.timeout_s),
                        timeout_s=timeout_s)
            refs = [join(info), self.actor.weight_sync_open.remote(receiver, info, timeout_s)]
            ray.get(refs, timeout=timeout_s + self.timeout_s)
        except WeightSyncError:
            raise
        except Exception as e:
            raise WeightSyncError(f"{receiver}: could not open the {self.transport} weight-sync group with the "
                                  f"learner: {e}", weights_changed=False) from e

    def detach(self, receiver: str) -> None:
        import ray
        if self.transport in BROADCAST_TRANSPORTS:
            ray.get(self.actor.weight_sync_detach.remote(receiver), timeout=self.timeout_s)

    def transmit(self, handle: WeightHandle, receivers: Sequence[str], timeout_s: float) -> None:
        import ray
        if self.transport in BROADCAST_TRANSPORTS and receivers:
            ray.get(self.actor.weight_sync_transmit.remote(handle, list(receivers), timeout_s),
                    timeout=timeout_s * len(receivers) + self.timeout_s)

    def close(self) -> None:
        """The learner closes its publisher (``LearnerWorker.close_weight_sync``)."""


# ------------------------------------------------------------------- 1 and 2: files in /dev/shm


def _write_safetensors_dir(root: Path, version: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Write one version's file via ``write(path)`` into ``root/v{version}`` atomically (a temp
    directory renamed into place: a reader never sees half a file), then remove all but the
    newest ``keep`` version directories."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version:08d}"
    tmp = root / f".tmp-v{version:08d}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        write(tmp / WEIGHTS_FILE)
        if final.exists():
            shutil.rmtree(final)   # re-publishing a version (e.g. after a failed sync)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    versions = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("v"))
    for old in versions[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checksums_of_file(path: Path) -> dict[str, tuple[int, int]]:
    from safetensors.torch import load_file
    return {name: tensor_checksum(t) for name, t in load_file(str(path)).items()}


def _unique_dir(root: str, tag: str) -> Path:
    """A directory of our own under ``root``, removed when this object is collected or at exit."""
    return Path(root) / f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class SharedMemoryDirSync(WeightSync):
    """Transport 1 (module docstring): safetensors in /dev/shm, ``reload_weights`` from there."""

    transport = "shm"

    def __init__(self, cfg: RolloutConfig):
        super().__init__(cfg)
        self.root = _unique_dir(cfg.sync_dir, "publish")
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def _put(self, tensors, version):
        from safetensors.torch import save_file
        state = {name: t.detach().to("cpu").contiguous() for name, t in tensors}
        return str(_write_safetensors_dir(self.root, version, lambda p: save_file(state, str(p))))

    def close(self):
        self._finalizer()

    async def _load(self, handle, engine, who):
        directory = Path(handle.location)
        if not (directory / WEIGHTS_FILE).is_file():
            raise WeightSyncError(f"{who}: weights version {handle.version}: {directory / WEIGHTS_FILE} does not "
                                  "exist here (the shm transport works on one node only; use "
                                  "rollout.sync=object_store across nodes)", weights_changed=False)
        if handle.checksums is not None:   # verify the file before vLLM reads it
            got = await engine.run_blocking(_checksums_of_file, directory / WEIGHTS_FILE)
            self._check_checksums(handle, got, who, weights_changed=False)
        await engine.load_from_dir(str(directory), self.cfg.sync_timeout_s)


class RayObjectStoreSync(WeightSync):
    """Transport 2 (module docstring): safetensors bytes through the object store, loaded from
    the sampler node's /dev/shm."""

    transport = "object_store"

    def __init__(self, cfg: RolloutConfig):
        super().__init__(cfg)
        self._local: Optional[Path] = None   # sampler side: where received versions are written
        self._finalizer = None

    @staticmethod
    def receive_dir(cfg: RolloutConfig, who: str) -> Path:
        """Where sampler ``who`` writes what it receives: one directory per actor NAME, so that
        a replacement (``RolloutWorker.start`` empties it) reclaims what a killed predecessor,
        which had no chance to clean up, left in /dev/shm."""
        return Path(cfg.sync_dir) / f"received-{who}"

    def _put(self, tensors, version):
        import ray
        from safetensors.torch import save
        blob = save({name: t.detach().to("cpu").contiguous() for name, t in tensors})
        # In a list so that Ray passes the ref itself (not its value) when the handle is a call
        # argument; whoever holds the handle keeps the object alive (the fleet holds the latest).
        return [ray.put(blob)]

    async def _load(self, handle, engine, who):
        (ref,) = handle.location
        try:
            blob = await asyncio.wait_for(ref, timeout=self.cfg.sync_timeout_s)
        except asyncio.TimeoutError:
            raise WeightSyncError(f"{who}: weights version {handle.version}: the object store did not deliver "
                                  f"them within {self.cfg.sync_timeout_s:.0f} s", weights_changed=False) from None
        if handle.checksums is not None:
            from safetensors.torch import load
            got = await engine.run_blocking(lambda: {n: tensor_checksum(t) for n, t in load(blob).items()})
            self._check_checksums(handle, got, who, weights_changed=False)
        if self._local is None:
            self._local = self.receive_dir(self.cfg, who)
            shutil.rmtree(self._local, ignore_errors=True)
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._local), True)
        directory = await asyncio.to_thread(_write_safetensors_dir, self._local, handle.version,
                                            lambda p: p.write_bytes(blob), 1)
        await engine.load_from_dir(str(directory), self.cfg.sync_timeout_s)

    def close(self):
        if self._finalizer is not None:
            self._finalizer()


# -------------------------------------------------------------- 3: broadcast (NCCL, or gloo)


def _local_ip_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent): the interface gloo
    must bind to so that ``host`` can reach us."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Group:
    """One broadcast group, either backend: ``broadcast(tensor)`` from rank 0 (in place on the
    other ranks), ``finish()`` waits for the device, ``close()``."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device):
        self.backend, self.rank, self.device = backend, rank, device
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            import torch.distributed as dist
            self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout   # every broadcast fails after this instead of hanging
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=_local_ip_towards(host))]
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, options)
        elif backend == "nccl":
            # vLLM's helpers, as its own NCCL weight-transfer engine uses them: a TCPStore-based
            # group that leaves torch.distributed's global state (the DeepSpeed world) alone.
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
            pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                              store_timeout=int(timeout_s))
            try:
                from vllm.utils.nccl import unpinned_nccl_env
            except ImportError:   # older vLLM: no NCCL env pinning to undo
                from contextlib import nullcontext as unpinned_nccl_env
            with unpinned_nccl_env():
                self.comm = PyNcclCommunicator(pg, device=device)
        else:
            raise ValueError(f"broadcast backend must be 'nccl' or 'gloo', got {backend!r}")

    def broadcast(self, tensor: Tensor) -> None:
        if self.backend == "gloo":
            self.pg.broadcast(tensor, 0).wait()
        else:
            self.comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())

    def finish(self) -> None:
        if self.backend == "nccl":
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self.backend == "nccl":
            destroy = getattr(self.comm, "destroy", None)
            if callable(destroy):
                destroy()
        self.pg = self.comm = self.store = None


def _send_all(group: _Group, tensors: list[tuple[str, Tensor]], device: torch.device,
              errors: list[BaseException]) -> None:
    """Broadcast every tensor from rank 0 (a thread's body: errors are handed back in ``errors``)."""
    try:
        for _name, tensor in tensors:
            group.broadcast(tensor.detach().to(device).contiguous())
        group.finish()
    except BaseException as e:  # noqa: BLE001 -- reported by the caller, which raises
        errors.append(e)


class NcclBroadcastSync(WeightSync):
    """Transport 3 (module docstring): a broadcast group per rollout actor; tensors streamed into
    vLLM's in-place layerwise reload on the workers (``VllmWorkerExtension``).

    Learner side: ``attach`` opens the group with a receiver (both sides rendezvous at once);
    ``publish`` checks and describes the weights and keeps a reference to them (also for a
    replacement actor's catch-up: one more reference, not a copy); ``transmit`` sends them to
    each receiver in turn. Sampler side: ``receive`` asks the engine's workers to take part.
    """

    transport = "nccl"

    def __init__(self, cfg: RolloutConfig, backend: str = "nccl"):
        super().__init__(cfg)
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"broadcast backend must be 'nccl' or 'gloo', got {backend!r}")
        self.backend = backend
        self.transport = backend
        self._groups: dict[str, _Group] = {}
        self._tensors: dict[int, list[tuple[str, Tensor]]] = {}   # version -> tensors (latest only)

    # learner side

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def prepare(self, receiver: str) -> dict:
        """The rendezvous of ``receiver``'s group, rank 0 here: this node's address and a free port."""
        import ray
        self.detach(receiver)
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return {"backend": self.backend, "host": host, "port": _free_port(), "rank_offset": 1,
                "world_size": 1 + self.cfg.tensor_parallel_size}

    def open(self, receiver: str, info: dict, timeout_s: float) -> None:
        """Open rank 0 of ``receiver``'s group (blocks until the receiver's ranks join)."""
        try:
            group = _Group(self.backend, info["host"], info["port"], 0, info["world_size"], timeout_s, self._device())
        except Exception as e:
            raise WeightSyncError(f"{receiver}: could not open the {self.backend} weight-sync group: {e}",
                                  weights_changed=False) from e
        self._groups[receiver] = group

    def attach(self, receiver, join, timeout_s):
        """Open ``receiver``'s group: ``join(info)`` sends the receiver its rank-1.. rendezvous
        while this process opens rank 0; both wait for each other up to ``timeout_s``."""
        import ray
        info = dict(self.prepare(receiver), timeout_s=timeout_s)
        ref = join(info)
        try:
            self.open(receiver, info, timeout_s)
            ray.get(ref, timeout=timeout_s)
        except Exception as e:
            ray.cancel(ref, force=False)
            self.detach(receiver)
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"{receiver}: could not open the {self.backend} weight-sync group: {e}",
                                  weights_changed=False) from e

    def detach(self, receiver):
        group = self._groups.pop(receiver, None)
        if group is not None:
            group.close()

    def _put(self, tensors, version):
        self._tensors = {version: tensors}   # replaces the previous version's reference

    def transmit(self, handle, receivers, timeout_s):
        """Broadcast every tensor of ``handle`` to each receiver's group in turn. Raises
        ``WeightSyncError`` naming the receiver whose transfer failed or timed out (its group is
        then dropped: attach again before the next sync)."""
        tensors = self._tensors.get(handle.version)
        if tensors is None:
            raise WeightSyncError(f"version {handle.version} is not the latest published one; publish it again",
                                  weights_changed=False)
        device = self._device()
        for receiver in receivers:
            group = self._groups.get(receiver)
            if group is None:
                raise WeightSyncError(f"{receiver}: not attached to the {self.backend} weight sync",
                                      weights_changed=False)
            errors: list[BaseException] = []
            # A thread, so that a transfer that never completes (NCCL cannot time out) is
            # abandoned after timeout_s instead of hanging the learner side.
            thread = threading.Thread(target=_send_all, args=(group, tensors, device, errors),
                                      name=f"weight-sync-{receiver}", daemon=True)
            thread.start()
            thread.join(timeout_s)
            if thread.is_alive() or errors:
                self._groups.pop(receiver, None)   # unusable now; do not close a group in use
                why = errors[0] if errors else f"no completion within {timeout_s:.0f} s"
                raise WeightSyncError(f"{receiver}: broadcast of weights version {handle.version} failed: {why}")

    def close(self):
        for receiver in list(self._groups):
            self.detach(receiver)
        self._tensors = {}

    # sampler side

    async def join(self, info: dict, engine: SyncTarget, who: str) -> None:
        """The receiver's half of ``attach``: every vLLM worker of the engine joins the group."""
        await engine.call_workers("reft_join_group", info, info["timeout_s"])

    async def _load(self, handle, engine, who):
        tensors = [(t.name, t.dtype, list(t.shape)) for t in handle.tensors]
        per_worker = await engine.call_workers(
            "reft_receive_broadcast", {"tensors": tensors, "checksum": handle.checksums is not None},
            self.cfg.sync_timeout_s)
        if handle.checksums is not None:
            # Taken as the tensors streamed into the loader, so only after loading. Every TP
            # worker received every tensor: all must match.
            for rank, got in enumerate(per_worker):
                self._check_checksums(handle, {k: tuple(v) for k, v in got.items()}, f"{who} (TP worker {rank})",
                                      weights_changed=True)


class VllmWorkerExtension:
    """Methods mixed into vLLM's worker class (engine argument ``worker_extension_cls``), called
    through ``collective_rpc`` on every worker of an engine: the receiving end of the broadcast
    transport. Names carry a ``reft_`` prefix because vLLM refuses an extension whose attribute
    names collide with the worker's.

    The tensors are streamed into the worker's ``reload_weights(weights_iterator=...)``: vLLM's
    layerwise in-place reload, which re-runs each layer's post-load processing (the CPU backend's
    weight repacking, fused qkv/gate_up packing) as its tensors arrive, so it works where a bare
    ``model.load_weights`` does not (CPU) and holds at most a layer's tensors at a time.
    """

    def reft_set_idle_spin(self, seconds: float) -> int:
        """How long this worker busy-polls its input queue after a message before it sleeps on a
        notification. vLLM 0.32 hard-codes 1 s (``shm_broadcast.SpinCondition.busy_loop_s``): on a
        CPU machine that is a whole core taken from the learner for a second after every
        generation (docs/measurements.md §3). Sets it on every reader queue of this process;
        returns how many it changed (0 means vLLM changed its internals: the caller warns)."""
        import gc

        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
        readers = [o for o in gc.get_objects() if isinstance(o, SpinCondition) and o.is_reader]
        for reader in readers:
            reader.busy_loop_s = seconds
        return len(readers)

    def reft_join_group(self, backend: str, host: str, port: int, rank_offset: int, world_size: int,
                        timeout_s: float) -> int:
        old = getattr(self, "_reft_group", None)
        if old is not None:
            old.close()
        rank = rank_offset + self.rank   # self.rank: this worker's rank in the engine (TP rank)
        self._reft_group = _Group(backend, host, port, rank, world_size, timeout_s, self.device)
        return rank

    def reft_receive_broadcast(self, tensors: list, checksum: bool) -> dict:
        group = getattr(self, "_reft_group", None)
        if group is None:
            raise RuntimeError("reft_receive_broadcast before reft_join_group")
        sums: dict[str, tuple[int, int]] = {}

        def stream():
            for name, dtype, shape in tensors:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                group.broadcast(buffer)
                if checksum:
                    sums[name] = tensor_checksum(buffer)
                yield name, buffer

        iterator = stream()
        self.reload_weights(weights_iterator=iterator)
        # The loader may stop early (or skip names without reading them): the sender still
        # broadcasts every tensor, so take the rest to stay in step, then fail loudly.
        left = [name for name, _ in iterator]
        group.finish()
        if left:
            raise RuntimeError(f"vLLM's loader did not consume {len(left)} tensors: {left[:5]}")
        self.reft_refresh_tied_lm_head()
        return sums

    def reft_refresh_tied_lm_head(self) -> bool:
        """Re-run the LM head's post-load processing when it is tied to the embedding; call it
        after every reload. Returns whether the head is tied.

        Why: a tied head receives no tensor of its own, so vLLM's layerwise reload leaves it
        alone ("ParallelLMHead: Failed to load weights"). Its parameter IS the embedding's and
        holds the new values, but on CPU the head computes with a packed copy made at load time
        (``dispatch_cpu_unquantized_gemm(remove_weight=False)``), which stays stale: logits from
        the old embedding, hidden states from the new layers. Found by the weight-sync probe;
        re-processing rebuilds the packed copy. On GPU the head reads the parameter directly and
        this is a no-op.
        """
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        weight = getattr(lm_head, "weight", None)
        if weight is None or embed is None or weight is not getattr(embed, "weight", None):
            return False
        lm_head.quant_method.process_weights_after_loading(lm_head)
        return True
