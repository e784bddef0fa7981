"""learner/{config,model,engine,worker}.py without Ray: one process, world_size 1, gloo.

The model is a 2-layer Qwen2 (hidden 32, vocabulary 64) built from a config and saved to a temp
dir, so these tests depend on nothing but transformers and DeepSpeed.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import transformers

from formats.hf import load_causal_lm
from learner.config import LearnerConfig
from learner.engine import lr_multiplier
from learner.model import PolicyWithValue
from learner.worker import LearnerWorker, find_free_port, token_outputs

VOCAB = 64


def tiny_qwen2(out_dir, tie_word_embeddings=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie_word_embeddings,
    )
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


def make_batch(seed=0, rows=4, length=12):
    """Right-padded rows: a 3-token prompt, then a response of varying length, then padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    response_mask = torch.zeros(rows, length, dtype=torch.long)
    for i in range(rows):
        n = length - (i % 3) * 2  # 12, 10, 8, 12, ...
        attention_mask[i, :n] = 1
        response_mask[i, 3:n] = 1
    input_ids = torch.where(attention_mask.bool(), input_ids, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_qwen2(path)
    return str(path)


@pytest.fixture(scope="module")
def worker(model_dir):
    """A world of one on a free local port. The distributed environment variables and the process
    group are removed afterwards, so that later tests (Ray clusters started from this process)
    do not inherit RANK / WORLD_SIZE."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cfg = LearnerConfig(model=model_dir, zero_stage=2, lr=1e-3, micro_batch_size=3, ppo_epochs=1)
    w = LearnerWorker(0, 1, "127.0.0.1", find_free_port(), cfg)
    w.setup_seconds = w.setup()
    yield w
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------- the shift


def test_token_outputs_shift_by_hand():
    # One sequence of 3 tokens, vocabulary 2. Position t's logits score token t + 1.
    input_ids = torch.tensor([[0, 1, 0]])
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, 5.0]]])
    values = torch.tensor([[0.5, -1.0, 7.0]])
    out = token_outputs(input_ids, logits, values, with_entropy=True)
    # token 1 (= 1) under softmax([0, log 3]) = [1/4, 3/4]; token 2 (= 0) under [4/5, 1/5].
    torch.testing.assert_close(out.logprobs, torch.tensor([[0.0, math.log(0.75), math.log(0.8)]]))
    # V(state before token t) is the value head at position t - 1; the last position is dropped.
    torch.testing.assert_close(out.values, torch.tensor([[0.0, 0.5, -1.0]]))
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    torch.testing.assert_close(out.entropy, torch.tensor([[0.0, h([0.25, 0.75]), h([0.8, 0.2])]]))
    # Temperature divides the logits: at T = 2, softmax([0, log 3] / 2) = [1, sqrt 3] / (1 + sqrt 3).
    hot = token_outputs(input_ids, logits, temperature=2.0)
    assert hot.values is None and hot.entropy is None
    assert hot.logprobs[0, 1].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def test_token_outputs_match_a_prefix_forward(model_dir):
    """Independent check: log p(token t) from the full sequence equals the last position's
    distribution when the model reads only tokens 0..t-1."""
    model = load_causal_lm(model_dir, "fp32").eval()
    ids = make_batch()["input_ids"][:1]
    with torch.no_grad():
        full = token_outputs(ids, model(input_ids=ids).logits).logprobs
        for t in (1, 5, ids.shape[1] - 1):
            prefix_logits = model(input_ids=ids[:, :t]).logits[0, -1]
            expected = torch.log_softmax(prefix_logits, -1)[ids[0, t]]
            assert full[0, t].item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, message", [
    ({"zero_stage": 4}, "learner.zero_stage must be 0..3, got 4"),
    ({"dtype": "fp16"}, r"learner.dtype must be one of \['fp32', 'bf16'\], got 'fp16'"),
    ({"value_head": "both"}, "learner.value_head must be one of"),
    ({"lr": 0.0}, "learner.lr must be > 0, got 0.0"),
    ({"micro_batch_size": 0}, "learner.micro_batch_size must be >= 1, got 0"),
    ({"adam_betas": (0.9, 1.0)}, "learner.adam_betas must be two numbers in"),
    ({"loss_agg_mode": "sum"}, "learner.loss_agg_mode must be one of"),
    ({"lr_schedule": "linear_warmup_cosine"},
     r"learner.total_steps must be > 0 with learner.lr_schedule='linear_warmup_cosine'"),
])
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(model="m", **kwargs)


def test_config_validate_names_keys_and_values():
    cfg = LearnerConfig(model="m", ppo_mini_batches=2, micro_batch_size=3)
    cfg.validate(world_size=2, batch_size=8)  # 8 = 2 ranks x 2 mini-batches x 2 rows; micro may be ragged
    message = r"batch_size=6 must be divisible by world_size \(2\) x learner.ppo_mini_batches \(2\) = 4"
    with pytest.raises(ValueError, match=message):
        cfg.validate(world_size=2, batch_size=6)


def test_lr_multiplier_by_hand():
    cfg = LearnerConfig(model="m", lr_schedule="linear_warmup_cosine", warmup_ratio=0.2, total_steps=10)
    # warm-up = 2 steps: 1/2, 2/2; then cosine over the 8 remaining steps, 0 at step 10 and beyond.
    got = [lr_multiplier(cfg, s) for s in (0, 1, 2, 6, 10, 12)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    flat = LearnerConfig(model="m", lr_schedule="linear_warmup_constant", warmup_ratio=0.25, total_steps=8)
    assert [lr_multiplier(flat, s) for s in (0, 1, 2, 50)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert lr_multiplier(LearnerConfig(model="m"), 123) == 1.0


def test_linear_decay_matches_the_papers_schedule_and_continues_from_an_offset():
    # 40 steps, 10% warm-up = 4: (s+1)/4 for s < 4; then (40 - s) / 36, 1 at s = 4, 1/36 at s = 39, 0 after.
    cfg = LearnerConfig(model="m", lr_schedule="linear_warmup_decay", warmup_ratio=0.1, total_steps=40)
    got = [lr_multiplier(cfg, s) for s in (0, 3, 4, 22, 39, 40, 60)]
    assert got == pytest.approx([0.25, 1.0, 1.0, 0.5, 1 / 36, 0.0, 0.0])
    # HF's get_linear_schedule_with_warmup: the same decay (its warm-up is one step behind).
    from transformers import get_linear_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=40)
    hf_lrs = []
    for _ in range(40):
        hf_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    assert [lr_multiplier(cfg, s) for s in range(4, 40)] == pytest.approx(hf_lrs[4:])
    # A stage continuing the schedule at step 20 (the SFT baseline after a warm-up of 20 steps).
    later = LearnerConfig(model="m", lr_schedule="linear_warmup_decay", warmup_ratio=0.1, total_steps=40,
                          schedule_offset=20)
    assert [lr_multiplier(later, s) for s in (0, 2, 19)] == pytest.approx([lr_multiplier(cfg, s) for s in (20, 22, 39)])


# ---------------------------------------------------------------------------- model


def test_inference_state_dict_keeps_tied_names(tmp_path):
    """A tied LM head appears in the HF state_dict under both names; the export must too."""
    lm = tiny_qwen2(tmp_path, tie_word_embeddings=True)
    exported = PolicyWithValue(lm).state_dict_for_inference()
    reference = lm.state_dict()
    assert list(exported) == list(reference) and "lm_head.weight" in exported
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name


# ---------------------------------------------------------------------------- engine


def test_engine_scores_and_exports_the_checkpoint(worker, model_dir):
    print(f"\nengine setup (world 1, ZeRO-2, with reference): {worker.setup_seconds:.2f} s")
    batch = make_batch()
    hf = load_causal_lm(model_dir, "fp32").eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = token_outputs(batch["input_ids"], logits).logprobs
    expected = torch.where(batch["response_mask"].bool(), expected, 0.0)
    scores = worker.score(batch, 1.0, with_reference=True)
    # Micro-batches of 3 are cut to their longest row; the numbers agree up to float reordering.
    torch.testing.assert_close(scores.logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.ref_logprobs, expected, atol=1e-5, rtol=0)
    assert worker.score(batch, 1.0, with_reference=False).ref_logprobs is None   # no reference pass
    assert torch.equal(scores.values, torch.zeros_like(scores.values))  # zero-initialised head
    exported = worker.export_weights()
    assert list(exported) == list(hf.state_dict())
    for name, tensor in hf.state_dict().items():
        assert torch.equal(exported[name], tensor), name


def test_ppo_first_step_is_on_policy_and_bad_batches_fail(worker):
    batch = make_batch(seed=1)
    scores = worker.score(batch, 1.0, with_reference=False)
    mask = batch["response_mask"].float()
    ppo_batch = dict(batch, old_logprobs=scores.logprobs, old_values=scores.values,
                     advantages=torch.randn(mask.shape) * mask, returns=mask)
    metrics = worker.ppo_update(ppo_batch, 1.0)
    # ppo_epochs=1, one mini-batch: the only step runs at the old policy, so rho = 1 exactly.
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["clipfrac"] == 0.0
    assert metrics["optimizer_steps"] == 1 and metrics["grad_norm"] > 0 and metrics["lr"] == 1e-3
    # values start at 0, returns are 1: L_value = 1/2 * mean (0 - 1)^2 = 0.5.
    assert metrics["vf_loss"] == pytest.approx(0.5, abs=1e-6)
    assert set(metrics) == {"pg_loss", "vf_loss", "kl_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy",
                            "grad_norm", "lr", "optimizer_steps"}
    assert metrics["kl_loss"] == 0.0   # no KL loss term asked for
    # GRPO's k3 term: the policy now differs from the one that scored the batch (taken as the
    # reference), so the term is > 0; without the reference's log-probs the update refuses.
    with_kl = worker.ppo_update(dict(ppo_batch, ref_logprobs=scores.logprobs), 1.0, 0.04)
    assert with_kl["kl_loss"] > 0
    with pytest.raises(KeyError, match="ref_logprobs"):
        worker.ppo_update(ppo_batch, 1.0, 0.04)

    left_padded = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        worker.score(left_padded, 1.0, with_reference=False)
    with pytest.raises(KeyError, match="advantages"):
        worker.ppo_update(batch, 1.0)


def test_sft_step_lowers_the_loss_and_export_keeps_names(worker, model_dir):
    batch = make_batch(seed=2)
    losses = [worker.sft_step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    exported = worker.export_weights()
    reference = load_causal_lm(model_dir, "fp32").state_dict()
    assert list(exported) == list(reference)
    assert all(exported[k].shape == v.shape for k, v in reference.items())
    assert not torch.equal(exported["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])


def test_sft_step_loss_weights_mix_two_token_means(worker):
    # Online self-training's loss: 1/2 token mean NLL over rows 0-1 + 1/2 over rows 2-3. Rows 0-1
    # have 9 + 7 response tokens, rows 2-3 have 5 + 9: a single token mean over all 30 would
    # weigh the halves 16:14 instead of 1:1.
    batch = make_batch(seed=3)
    mask = batch["response_mask"].float()
    weights = torch.zeros_like(mask)
    weights[:2] = 0.5 / mask[:2].sum()
    weights[2:] = 0.5 / mask[2:].sum()
    nll = -worker.score(batch, 1.0, with_reference=False).logprobs   # the same parameters sft_step's loss is taken at
    expected = 0.5 * float((nll * mask)[:2].sum() / mask[:2].sum()) + 0.5 * float((nll * mask)[2:].sum() / mask[2:].sum())
    out = worker.sft_step(dict(batch, loss_weights=weights * mask))
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert out["num_tokens"] == 30
    plain = float((nll * mask).sum() / mask.sum())
    assert abs(plain - expected) > 1e-4   # the weighting changed the loss, or this test proves nothing


def test_separate_critic_with_checkpointing_under_zero3(worker, model_dir):
    """The ablation's critic (its own backbone), activation checkpointing, ZeRO-3, no reference.
    A second engine in the same world of one (the process group is already up)."""
    cfg = LearnerConfig(model=model_dir, value_head="separate", gradient_checkpointing=True, zero_stage=3,
                        with_reference=False, lr=1e-3, micro_batch_size=2, ppo_epochs=1)
    critic_worker = LearnerWorker(0, 1, worker.master_addr, worker.master_port, cfg)
    critic_worker.setup()
    batch = make_batch(seed=5)
    scores = critic_worker.score(batch, 1.0, with_reference=False)
    mask = batch["response_mask"].float()
    metrics = critic_worker.ppo_update(dict(batch, old_logprobs=scores.logprobs, old_values=scores.values,
                                            advantages=mask, returns=mask), 1.0)
    assert metrics["vf_loss"] == pytest.approx(0.5, abs=1e-6)  # 1/2 (0 - 1)^2: the head starts at 0
    after = critic_worker.score(batch, 1.0, with_reference=False)
    assert after.values.abs().max() > 0  # the critic learnt something
    # The values alone (PPO's old log-probs from the sampler): only the critic runs, same values.
    values_only = critic_worker.score(batch, 1.0, with_reference=False, with_policy=False)
    assert values_only.logprobs is None
    torch.testing.assert_close(values_only.values, after.values, atol=1e-6, rtol=0)
    exported = critic_worker.export_weights()  # the policy only: no critic, no value head
    assert list(exported) == list(load_causal_lm(model_dir, "fp32").state_dict())
    with pytest.raises(ValueError, match="without a reference model"):
        critic_worker.score(batch, 1.0, with_reference=True)


def test_without_a_critic_nothing_computes_values(worker, model_dir):
    """learner.value_head = none (SFT stages, GRPO/RLOO): no head, no values, the policy loss
    alone; the policy's scoring equals the shared-head learner's on the same weights."""
    cfg = LearnerConfig(model=model_dir, value_head="none", with_reference=False, lr=1e-3, micro_batch_size=2,
                        ppo_epochs=1)
    policy_only = LearnerWorker(0, 1, worker.master_addr, worker.master_port, cfg)
    policy_only.setup()
    assert policy_only.engine.module.value_head is None
    batch = make_batch(seed=7)
    scores = policy_only.score(batch, 1.0, with_reference=False)
    assert scores.values is None
    expected = token_outputs(batch["input_ids"], load_causal_lm(model_dir, "fp32")(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits).logprobs
    torch.testing.assert_close(scores.logprobs, expected * batch["response_mask"], atol=1e-5, rtol=0)
    mask = batch["response_mask"].float()
    metrics = policy_only.ppo_update(dict(batch, old_logprobs=scores.logprobs, old_values=mask * 0,
                                          advantages=mask, returns=mask), 1.0)
    assert metrics["vf_loss"] == 0.0 and metrics["vf_clipfrac"] == 0.0
    assert metrics["grad_norm"] > 0   # the policy loss moved the policy
    with pytest.raises(RuntimeError, match="without a value head"):
        policy_only.engine.module.values(batch["input_ids"], batch["attention_mask"])


def test_publish_exports_once_per_version_and_hands_out_a_small_handle(worker, model_dir, tmp_path):
    """Learner rank 0 publishes its own weights: what it returns (and the driver passes on) is a
    handle of bounded size, and a checkpoint of the same version reuses the sync's export."""
    import pickle

    from actors.config import RolloutConfig
    from actors.weight_sync import WeightHandle

    worker.sft_step(make_batch(seed=6))     # a new version
    before = worker.stats()["exports"]
    worker.open_weight_sync(RolloutConfig(model=model_dir, sync="shm", sync_dir=str(tmp_path / "shm")))
    try:
        handle = worker.publish_weights(11)   # probe_every 10: versions 1, 11, 21... carry the probe
        worker.save_policy(str(tmp_path / "policy"))
        assert worker.stats()["exports"] == before + 1   # the sync and the checkpoint share one export
        assert isinstance(handle, WeightHandle) and handle.version == 11 and handle.probe is not None
        weights_bytes = sum(t.numel() * t.element_size() for t in worker.export_weights().values())
        handle_bytes = len(pickle.dumps(handle))
        print(f"\nhandle {handle_bytes} bytes for {weights_bytes} bytes of weights")
        assert handle_bytes < 64 * 1024 < weights_bytes
        assert (tmp_path / "policy" / "config.json").is_file()
        worker.sft_step(make_batch(seed=7))
        worker.publish_weights(8)
        assert worker.stats()["exports"] == before + 2   # a new version, a new export
    finally:
        worker.close_weight_sync()


def test_the_driver_does_not_import_deepspeed():
    """The driver imports learner.worker only for the actor class: `import deepspeed` there cost ~1 s
    of start-up and printed DeepSpeed's accelerator warning as the console's first line
    (learner/engine.py, _DEEPSPEED_IMPORT)."""
    import subprocess
    import sys

    code = ("import sys, cluster.train, experiments.cli, learner.worker; "
            "print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "the driver's modules import deepspeed at the top"
    assert "Setting accelerator" not in out.stdout + out.stderr
