"""The rollout side with real engines: vLLM's CPU backend in Ray actors, on a tiny Qwen2.

One fleet of two rollout actors is shared by the slow tests of this module (each engine start
costs 30-50 s on 2 cores; vLLM uses both cores, so never run this in parallel with other tests).
The tests move the fleet's weights forward (versions 1, 2, ...) and each one compares against
HF run on whatever weights the fleet holds when it starts (``Policy``), so they do not depend on
each other's order. The HF-fallback tests at the end need no vLLM and are fast.

    (1) sampled tokens' logprobs == HF's recomputation (fp32, 1e-4), at temperature 1 and 0.7
    (2) after a weight update, greedy == HF's greedy on prompts longer than a KV block that were
        served (cached) before the update: the stale-prefix-cache case
    (3) two actors serve one request stream: every request once, both actors used, short
        requests come out before long ones finish (streaming, no batch barrier)
    (4) a corrupted sync raises WeightSyncError naming the actor and the version: one changed
        element (checksums, shm) and a changed tensor (probe, object store); the fleet recovers
    (5) the broadcast transport (gloo on CPU) through the vLLM worker extension
    (6) an actor killed mid-stream: every request answered exactly once, the replacement serves
        the current version
"""
import asyncio
import dataclasses
import logging
import sys
import time

import pytest
import torch

from actors.config import RolloutConfig
from actors.rollout import RolloutWorker, SampleRequest
from actors.weight_sync import NcclBroadcastSync, WeightSyncError, make_weight_sync
from formats.hf import load_causal_lm, load_tokenizer
from formats.records import build_prompt
from learner.algos import logprobs_from_logits
from tasks.synthetic import SyntheticConfig, generate
from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

SYN = SyntheticConfig(num_train=200, num_test=20)
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
LOGPROB_ATOL = 1e-4   # fp32 vLLM vs HF measured ~3e-6 (docs/measurements.md §2); a wrong temperature is off by >1e-2

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def examples():
    return [e for kind in ("ncot", "pcot") for split in generate(SYN, cot_kind=kind) for e in split]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, examples):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus_from_examples(examples), TINY, SYN.max_value))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def cfg(model_dir):
    # probe_every=1: every sync of these tests is probed (what they check is the probe's verdict)
    return RolloutConfig(model=model_dir, max_model_len=512, num_actors=2, start_timeout_s=300,
                         call_timeout_s=60, sync_timeout_s=120, probe_every=1)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="reft")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_cluster, cfg):
    from actors.fleet import RolloutFleet
    fleet = RolloutFleet(cfg)
    yield fleet
    fleet.shutdown()


class Policy:
    """The learner side of the tests: the weights the fleet should hold, and HF on them."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.state_dict = load_causal_lm(model_dir, "fp32").state_dict()

    def model(self, state_dict=None):
        model = load_causal_lm(self.model_dir, "fp32").eval()
        model.load_state_dict(state_dict or self.state_dict)
        return model

    def trained(self, texts, tokenizer, steps=30, seed=0):
        """A few AdamW steps of SFT from the current weights: peaked distributions, so greedy
        paths are meaningful (a random-init model's logits are nearly flat)."""
        torch.manual_seed(seed)
        model = self.model().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = tokenizer(texts[:16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for _ in range(steps):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def policy(model_dir):
    return Policy(model_dir)


def update(fleet, policy, state_dict):
    """Move the fleet (and the test's view of the learner) to new weights."""
    reports = fleet.update_weights(state_dict, fleet.version + 1)
    policy.state_dict = state_dict
    return reports


@torch.no_grad()
def hf_logprobs(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0, :-1]            # row t predicts token t + 1
    per_token = logprobs_from_logits(logits, ids[0, 1:], temperature)
    return per_token[len(prompt_ids) - 1:]                   # the completion's tokens


@torch.no_grad()
def hf_greedy_ids(model, prompt_ids, max_tokens, eos_id):
    """Greedy ids as vLLM returns them: up to and including EOS."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return out


def prompts(examples, k):
    return [build_prompt(e.question, e.cot_kind) for e in examples[:k]]


# ------------------------------------------------------------------------------------ (1)


@pytest.mark.slow
def test_sampled_logprobs_equal_hf_recomputation(fleet, policy, examples, tokenizer):
    texts = prompts(examples[::7], 4)
    requests = [SampleRequest(f"lp-{i}", text, n=2, temperature=1.0, max_tokens=30, seed=i, ignore_eos=True)
                for i, text in enumerate(texts)]
    requests.append(SampleRequest("lp-t07", texts[0], n=2, temperature=0.7, max_tokens=30, seed=9, ignore_eos=True))
    samples = fleet.generate(requests, timeout_s=120)
    assert [(s.request_id, s.index) for s in samples] == [(r.request_id, i) for r in requests for i in range(r.n)]
    model = policy.model()
    for sample, request in zip(samples, [r for r in requests for _ in range(r.n)]):
        assert sample.finish_reason == "length" and len(sample.completion_token_ids) == 30
        assert sample.prompt_token_ids == tuple(tokenizer.encode(request.prompt))
        assert sample.completion_text == tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
        assert sample.policy_version == fleet.version
        expected = hf_logprobs(model, sample.prompt_token_ids, sample.completion_token_ids, request.temperature)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)
    # The two samples of a request differ (sampling, not greedy), so the check above covered
    # tokens the model did not rank first.
    assert samples[0].completion_token_ids != samples[1].completion_token_ids


@pytest.mark.slow
def test_stop_strings_end_the_text_and_it_reads_as_the_sampler_decodes_it(fleet, examples, tokenizer):
    # With stop strings vLLM detokenizes while it samples; without, the actor decodes once at the
    # end. Same seeds, so the same tokens up to the stop: both texts must agree.
    texts = prompts(examples[::5], 3)
    plain = fleet.generate([SampleRequest(f"nostop-{i}", t, temperature=1.0, max_tokens=40, seed=i)
                            for i, t in enumerate(texts)], timeout_s=120)
    # A stop string the first completion reaches half-way, whatever the (untrained) policy writes.
    words = plain[0].completion_text.split()
    assert len(words) >= 2, plain[0].completion_text
    stop = words[len(words) // 2]
    stopped = fleet.generate([SampleRequest(f"stop-{i}", t, temperature=1.0, max_tokens=40, seed=i, stop=(stop,))
                              for i, t in enumerate(texts)], timeout_s=120)
    for p, s in zip(plain, stopped):
        assert p.completion_text == tokenizer.decode(p.completion_token_ids, skip_special_tokens=True)
        # vLLM ends the text at the stop string's end, which may fall inside the last token.
        assert tokenizer.decode(s.completion_token_ids, skip_special_tokens=True).startswith(s.completion_text)
        if stop in p.completion_text:
            cut = p.completion_text.index(stop) + len(stop)
            assert s.finish_reason == "stop" and s.completion_text == p.completion_text[:cut]
            assert s.completion_token_ids == p.completion_token_ids[:len(s.completion_token_ids)]
        else:
            assert s.completion_token_ids == p.completion_token_ids


# ------------------------------------------------------------------------------------ (2)


@pytest.mark.slow
def test_greedy_after_update_equals_hf_on_prompts_longer_than_a_block(fleet, policy, examples, tokenizer):
    block = fleet.health()[0]["block_size"]
    # Long prompts: several questions in one, > 1 block, so their first block is prefix-cached.
    questions = [e.question for e in examples if e.cot_kind == "ncot"]
    texts = [build_prompt(" ".join(questions[i:i + 6]), "ncot") for i in range(0, 24, 6)]
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert min(lengths) > block + 8, (lengths, block)

    def greedy(tag):
        # Each prompt twice, adjacent: the balancer sends the two copies to different actors,
        # so BOTH engines serve (and cache) every prompt.
        requests = [SampleRequest(f"{tag}-{i}-{copy}", t, temperature=0.0, max_tokens=24)
                    for i, t in enumerate(texts) for copy in range(2)]
        samples = fleet.generate(requests, timeout_s=120)
        assert {s.actor for s in samples} == {"rollout-0", "rollout-1"}
        return samples

    before = greedy("before")
    new_weights = policy.trained(corpus_from_examples(examples), tokenizer)
    reports = update(fleet, policy, new_weights)
    assert set(reports) == {"rollout-0", "rollout-1"}
    after = greedy("after")

    model = policy.model()
    for sample in after:
        assert sample.policy_version == fleet.version
        expected = hf_greedy_ids(model, sample.prompt_token_ids, 24, tokenizer.eos_token_id)
        assert list(sample.completion_token_ids) == expected, sample.request_id
    # The update changed what the engines say, or this test would prove nothing.
    assert [s.completion_token_ids for s in before] != [s.completion_token_ids for s in after]


# ------------------------------------------------------------------------------------ (3)


@pytest.mark.slow
def test_two_actors_serve_one_stream_each_request_once_and_short_ones_first(fleet, examples):
    texts = prompts(examples, 12)
    short = {f"s-{i}" for i in range(6)}
    requests = []
    for i, text in enumerate(texts):   # interleaved, so both actors get short and long requests
        rid, tokens = (f"s-{i // 2}", 3) if i % 2 == 0 else (f"l-{i // 2}", 250)
        requests.append(SampleRequest(rid, text, n=2, max_tokens=tokens, seed=i, ignore_eos=True))
    fleet.submit(requests)
    samples = list(fleet.stream(timeout_s=120))
    arrivals = [s.request_id for s in samples]
    assert sorted(arrivals) == sorted(r.request_id for r in requests for _ in range(2))   # each once, n each
    first_long = min(i for i, rid in enumerate(arrivals) if rid not in short)
    assert set(arrivals[:first_long]) == short, "short requests must stream out before long ones finish"
    assert {s.actor for s in samples} == {"rollout-0", "rollout-1"}


@pytest.mark.slow
def test_sleep_and_wake_up_are_no_ops_on_cpu_engines(fleet, examples):
    """The driver's calls around the learner phase (local-gpu mode) reach every engine; vLLM's
    CPU engines have no sleep mode, so they keep serving. Sleeping mid-rollout is refused."""
    fleet.sleep()
    assert [h["asleep"] for h in fleet.health()] == [False, False]
    fleet.wake_up()
    fleet.submit([SampleRequest("during-sleep", prompts(examples, 1)[0], max_tokens=4, seed=0)])
    with pytest.raises(RuntimeError, match="rollout sleep with 1 requests in flight"):
        fleet.sleep()
    assert [s.request_id for s in fleet.stream(timeout_s=60)] == ["during-sleep"]


# ------------------------------------------------------------------------------------ (4)


@pytest.mark.slow
def test_corrupted_sync_is_caught_and_the_fleet_recovers(fleet, policy, cfg, tokenizer, examples):
    import ray
    from safetensors.torch import load_file, save, save_file

    next_weights = policy.trained(corpus_from_examples(examples[5:]), tokenizer, steps=5, seed=1)
    old_version = fleet.version

    # (a) one element of one tensor changed in the published file after the learner's checksum
    checksum_sync = make_weight_sync(dataclasses.replace(cfg, verify="checksum"), "shm")
    handle = checksum_sync.publish(next_weights, old_version + 1)
    path = f"{handle.location}/model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    save_file(tensors, path)
    with pytest.raises(WeightSyncError) as caught:
        fleet.push(handle, checksum_sync)
    message = str(caught.value)
    assert "rollout-0" in message and "rollout-1" in message and f"version {old_version + 1}" in message
    assert "model.layers.1.mlp.down_proj.weight" in message and "nothing was loaded" in message
    checksum_sync.close()

    # (b) a tensor changed in the object store's bytes: only the probe can see it (checksums off)
    probe_sync = make_weight_sync(dataclasses.replace(cfg, verify="probe"), "object_store")
    handle = probe_sync.publish(next_weights, old_version + 2)
    corrupted = dict(next_weights)
    corrupted["model.norm.weight"] = corrupted["model.norm.weight"] * 3
    handle = dataclasses.replace(handle, location=[ray.put(save({k: v.contiguous() for k, v in corrupted.items()
                                                                  if k != "lm_head.weight"}))])
    with pytest.raises(WeightSyncError, match=rf"rollout-\d: weights version {old_version + 2} fail the probe"):
        fleet.push(handle, probe_sync)
    assert all(h["serving"] is False and h["weights_ok"] is False for h in fleet.health())

    # Recovery: a good sync makes both actors serve the new version again.
    update(fleet, policy, next_weights)
    assert fleet.versions() == {"rollout-0": fleet.version, "rollout-1": fleet.version}
    samples = fleet.generate([SampleRequest("after-recovery", prompts(examples, 1)[0], max_tokens=4)])
    assert samples[0].policy_version == fleet.version


# ------------------------------------------------------------------------------------ (5)


@pytest.mark.slow
def test_gloo_broadcast_through_the_worker_extension(fleet, policy, cfg, tokenizer, examples):
    sync = NcclBroadcastSync(cfg, backend="gloo")
    try:
        for slot in fleet.slots:
            sync.attach(slot.name, lambda info, actor=slot.actor: actor.join_weight_sync.remote(info), 60)
        new_weights = policy.trained(corpus_from_examples(examples[11:]), tokenizer, steps=5, seed=2)
        handle = sync.publish(new_weights, fleet.version + 1)
        assert handle.checksums is not None and handle.probe is not None   # verify="both"
        reports = fleet.push(handle, sync)
        policy.state_dict = new_weights
        assert set(reports) == {"rollout-0", "rollout-1"}
        model = policy.model()
        texts = prompts(examples[3:], 2)
        samples = fleet.generate([SampleRequest(f"gloo-{i}", t, temperature=0.0, max_tokens=16)
                                  for i, t in enumerate(texts)])
        for sample in samples:
            assert list(sample.completion_token_ids) == hf_greedy_ids(model, sample.prompt_token_ids, 16,
                                                                      tokenizer.eos_token_id)
    finally:
        # Back to the fleet's own transport, so that a replacement catches up via shm.
        update(fleet, policy, policy.state_dict)
        sync.close()


# ------------------------------------------------------------------------------------ (6)


@pytest.mark.slow
def test_killed_actor_is_replaced_and_every_request_is_answered_once(fleet, policy, examples, ray_cluster):
    ray = ray_cluster
    version = fleet.version
    assert version >= 1   # the replacement must catch up, not just start from the model directory
    old_pids = {h["actor"]: h["pid"] for h in fleet.health()}
    texts = prompts(examples, 16)
    # Staggered lengths: requests finish one after another, so the kill lands mid-stream.
    requests = [SampleRequest(f"k-{i}", t, max_tokens=20 + 15 * i, seed=i, ignore_eos=True)
                for i, t in enumerate(texts)]
    fleet.submit(requests)
    received, victim = [], None
    for sample in fleet.stream(timeout_s=180):
        received.append(sample)
        if victim is None and len(received) >= 3:
            victim = max(fleet.slots, key=lambda slot: len(slot.assigned))
            assert len(victim.assigned) >= 2, "the victim must have unfinished requests"
            ray.kill(victim.actor)
    ids = [s.request_id for s in received]
    assert sorted(ids) == sorted(r.request_id for r in requests)   # each exactly once
    assert fleet.stats["replacements"] == 1 and fleet.stats["reissued_requests"] >= 2
    fleet.wait_until_serving(300)
    assert fleet.versions() == {"rollout-0": version, "rollout-1": version}
    health = {h["actor"]: h for h in fleet.health()}
    assert health[victim.name]["pid"] != old_pids[victim.name] and health[victim.name]["syncs"] == 1
    # The replacement serves the current weights.
    sample = fleet.generate([SampleRequest("after-kill", texts[0], temperature=0.0, max_tokens=8)])[0]
    assert sample.policy_version == version


# ------------------------------------------------------------------------------------ fallback


def test_hf_fallback_is_loud_and_serves_with_verified_syncs(model_dir, tokenizer, examples, monkeypatch, caplog,
                                                            tmp_path):
    """No vLLM (import made to fail): the actor logic (gate, outbox, poll, update with checksum
    and probe verification) on the HF engine, without Ray, in this process."""
    monkeypatch.setitem(sys.modules, "vllm", None)   # `import vllm` now raises ImportError
    cfg = RolloutConfig(model=model_dir, max_model_len=512, sync_dir=str(tmp_path), probe_every=1)
    policy = Policy(model_dir)

    async def scenario():
        worker = RolloutWorker(cfg, "rollout-hf")
        with caplog.at_level(logging.WARNING, logger="actors.rollout"):
            health = await worker.start()
        assert health["engine"] == "hf-fallback" and "import vllm" in health["fallback_reason"]
        assert "FALLBACK" in caplog.text.upper()
        text = prompts(examples, 1)[0]
        await worker.submit([SampleRequest("a", text, n=2, max_tokens=6, seed=1, temperature=0.8),
                             SampleRequest("b", text, max_tokens=3, seed=2, ignore_eos=True)])
        got = []
        while len(got) < 3:
            got += await worker.poll(timeout_s=30)
        model = policy.model()
        for s in got:
            temperature = 0.8 if s.request_id == "a" else 1.0
            expected = hf_logprobs(model, s.prompt_token_ids, s.completion_token_ids, temperature)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-5, rtol=0)

        sync = make_weight_sync(cfg, "shm")
        new_weights = policy.trained(corpus_from_examples(examples), tokenizer, steps=3)
        report = await worker.update_weights(sync.publish(new_weights, 1))
        assert report["version"] == 1 and worker.version() == 1
        bad = sync.publish(new_weights, 2)   # the right weights, a wrong expectation: the probe must object
        wrong = dataclasses.replace(bad.probe, logprobs=tuple(x + 1 for x in bad.probe.logprobs))
        bad = dataclasses.replace(bad, probe=wrong)
        with pytest.raises(WeightSyncError, match="rollout-hf: weights version 2 fail the probe"):
            await worker.update_weights(bad)
        assert (await worker.health())["serving"] is False   # unverified weights: serve nothing
        sync.close()

    asyncio.run(scenario())


def test_a_poll_lingers_for_requests_decoding_but_never_for_samples_that_waited(model_dir, examples, monkeypatch):
    """``rollout.poll_linger_s``: a reply waits for requests still decoding until its oldest
    sample has waited the linger, returns at once when nothing decodes, and does not hold
    samples that have waited that long already (a batch decoded ahead of the learner). The
    engine is the real HF one; each request is held until the test releases it."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    linger = 0.5
    cfg = RolloutConfig(model=model_dir, max_model_len=512, poll_linger_s=linger)

    async def scenario():
        worker = RolloutWorker(cfg, "rollout-hf")
        await worker.start()
        release: dict[str, asyncio.Event] = {}
        real = worker.engine.generate

        async def held(request, engine_request_id):
            await release[request.request_id].wait()
            return await real(request, engine_request_id)

        worker.engine.generate = held
        text = prompts(examples, 1)[0]

        async def submit(*ids):
            release.update({i: asyncio.Event() for i in ids})
            await worker.submit([SampleRequest(i, text, max_tokens=2, seed=k) for k, i in enumerate(ids)])

        async def timed_poll():
            t = time.monotonic()
            got = await worker.poll(timeout_s=5)
            return sorted({s.request_id for s in got}), time.monotonic() - t

        await submit("a", "b", "c")
        release["a"].set()
        poll = asyncio.create_task(timed_poll())
        await asyncio.sleep(0.1)
        release["b"].set()                           # finishes within a's linger: the same reply
        ids, waited = await poll                     # c still decoding: the reply goes at a's linger
        assert ids == ["a", "b"] and linger - 0.15 < waited < linger + 0.5, (ids, waited)
        release["c"].set()
        ids, waited = await timed_poll()             # nothing decoding after c: no linger
        assert ids == ["c"] and waited < linger - 0.2, (ids, waited)

        await submit("d", "e")
        release["d"].set()
        while not (await worker.health())["outbox"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(linger + 0.1)            # d has waited its linger; e decodes on
        ids, waited = await timed_poll()
        assert ids == ["d"] and waited < 0.2, (ids, waited)

        worker.cfg = dataclasses.replace(cfg, poll_linger_s=0.0)   # 0: every reply at once
        release["e"].set()
        await submit("f")
        ids, waited = await timed_poll()
        assert ids == ["e"] and waited < 0.3, (ids, waited)
        release["f"].set()
        assert (await timed_poll())[0] == ["f"]

    asyncio.run(scenario())


def test_sleep_is_a_no_op_on_an_engine_without_sleep_mode(model_dir, examples, monkeypatch):
    """``sleep``/``wake_up`` answer False and leave the engine serving where there is no sleep
    mode (the HF engine here, every engine on CPU), even with ``enable_sleep_mode`` asked for."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = RolloutConfig(model=model_dir, max_model_len=512, enable_sleep_mode=True)

    async def scenario():
        worker = RolloutWorker(cfg, "rollout-hf")
        await worker.start()
        assert await worker.sleep() is False and await worker.wake_up() is False
        health = await worker.health()
        assert health["serving"] and not health["asleep"] and "sleeps" not in health
        samples = await worker.generate([SampleRequest("a", prompts(examples, 1)[0], max_tokens=3, seed=0)], 60)
        assert samples[0].finish_reason in ("stop", "length")

    asyncio.run(scenario())


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    from actors.rollout import _top_p_filter
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_top_p_filter(logits.clone(), 0.8))
    assert kept.tolist() == [True, True, False, False]   # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(_top_p_filter(logits.clone(), 1.0)).all()


def test_sample_request_validates_and_normalises():
    r = SampleRequest("x", [1, 2, 3], stop=["\n\n"])
    assert r.prompt == (1, 2, 3) and r.stop == ("\n\n",)
    with pytest.raises(ValueError, match="top_p"):
        SampleRequest("x", "hi", top_p=0)
    with pytest.raises(ValueError, match="empty prompt"):
        SampleRequest("x", "")


# ------------------------------------------------------------------------------------ (7)


@pytest.mark.slow
def test_both_engine_cores_sample_alike_and_the_in_process_one_answers_between_steps(fleet, cfg, examples,
                                                                                     ray_cluster):
    """``rollout.engine_core``: the actor stepping vLLM's LLMEngine itself (CPU default) samples
    what AsyncLLM with its engine-core process samples, for the same seeds, and answers other
    calls while a long generation runs (the step loop yields between steps)."""
    import time

    import ray

    assert {h["engine_core"] for h in fleet.health()} == {"in_process"}   # the CPU default
    # Two engines share the cores (rollout.num_threads), not Ray's one thread of a fractional actor.
    assert {h["threads"] for h in fleet.health()} == {cfg.resolved_num_threads(on_gpu=False)}
    requests = [SampleRequest(f"core-{i}", text, n=2, temperature=1.0, max_tokens=24, seed=i)
                for i, text in enumerate(prompts(examples[::3], 4))]
    actors = {core: ray.remote(RolloutWorker).options(num_cpus=0).remote(
                  dataclasses.replace(cfg, engine_core=core, num_actors=1), f"rollout-{core}")
              for core in ("in_process", "own_process")}
    try:
        for core, actor in actors.items():
            assert ray.get(actor.start.remote(), timeout=300)["engine_core"] == core
            assert ray.get(actor.health.remote(), timeout=30)["log_stats"] is False   # rollout.log_stats
        got = {core: ray.get(actor.generate.remote(requests, 120), timeout=180) for core, actor in actors.items()}
        assert [(s.completion_token_ids, s.completion_text) for s in got["in_process"]] == \
               [(s.completion_token_ids, s.completion_text) for s in got["own_process"]]
        for a, b in zip(got["in_process"], got["own_process"]):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)

        actor = actors["in_process"]
        long = SampleRequest("core-long", requests[0].prompt, n=4, temperature=1.0, max_tokens=300,
                             seed=1, ignore_eos=True)
        ray.get(actor.submit.remote([long]), timeout=30)
        answered = []
        while True:
            t = time.perf_counter()
            health = ray.get(actor.health.remote(), timeout=30)
            answered.append(time.perf_counter() - t)
            if health["in_flight"] == 0:
                break
        assert len(answered) >= 3 and max(answered[:-1]) < 1.0, answered   # answered while it decoded
        (samples,) = [ray.get(actor.poll.remote(16, 5.0), timeout=30)]
        assert [len(s.completion_token_ids) for s in samples] == [300] * 4

        # A request vLLM refuses (prompt longer than max_model_len) is answered with an error,
        # and the engine goes on serving.
        too_long = SampleRequest("core-too-long", tuple([5] * (cfg.max_model_len + 10)), max_tokens=4)
        (bad,) = ray.get(actor.generate.remote([too_long], 60), timeout=90)
        assert bad.finish_reason == "error" and bad.error
        again = ray.get(actor.generate.remote(requests[:1], 60), timeout=90)
        assert [s.completion_token_ids for s in again] == [s.completion_token_ids for s in got["in_process"][:2]]
        assert ray.get(actor.health.remote(), timeout=30)["in_flight"] == 0
    finally:
        for actor in actors.values():
            ray.get(actor.shutdown.remote(), timeout=60)
            ray.kill(actor)


_START_AND_STOP = """
import asyncio, sys
from actors.config import RolloutConfig
from actors.rollout import RolloutWorker

async def main():
    worker = RolloutWorker(RolloutConfig(model=sys.argv[1], max_model_len=512, num_actors=1,
                                         engine_core="own_process", start_timeout_s=300), "rollout-exit")
    await worker.start()
    await worker.shutdown()

if __name__ == "__main__":   # vLLM spawns its engine-core process
    asyncio.run(main())
    print("stopped", flush=True)
"""


@pytest.mark.slow
def test_the_own_process_engine_stops_without_errors_at_exit(model_dir, tmp_path):
    """AsyncLLM is collected at shutdown, not at interpreter exit, where its ``__del__`` (a
    second shutdown) raised ``TypeError: 'NoneType' object is not callable`` into the log."""
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "start_and_stop.py"
    script.write_text(_START_AND_STOP)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), model_dir], capture_output=True, text=True,
                          timeout=400, env=env)
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
