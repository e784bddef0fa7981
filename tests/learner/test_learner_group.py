"""The learner as a Ray actor group on a real local Ray cluster (2 CPUs), DeepSpeed over gloo.

Checks that (1) a PPO update with 2 ranks under ZeRO-2 and ZeRO-3 gives the parameters of 1 rank
on the same global batch, (2) save -> load -> continue equals continuing without the stop, (3)
the actors are named learner-0, learner-1 in namespace reft and errors name them. Each group
costs ~10-20 s to start on 2 cores (imports in each actor), so the tests share groups where
they can: 4 groups in all.
"""
import pytest
import ray
import torch

from cluster.actor_group import ActorGroup, shard, unshard
from learner.config import LearnerConfig
from learner.worker import LearnerWorker, Scores
from tests.learner.test_learner_engine import make_batch, tiny_qwen2

# Parameters of the 2-rank runs may differ from the 1-rank run's by at most this much (fp32,
# parameters of magnitude ~0.01-1, 4 AdamW steps at lr 1e-3). Not bit-exact because float addition
# is not associative: 2 ranks sum each gradient as (rank-0 part + rank-1 part) in the all-reduce,
# over micro-batches of other sizes and padded widths (other matmul blocking), while 1 rank
# accumulates it in another order; the last bits differ (~1e-7 relative) and AdamW carries them
# into the update. A wrong normalisation (local instead of global counts, a missing world_size
# factor) moves parameters by ~lr = 1e-3 or changes the grad norm by 2x: far outside.
PARAM_ATOL = 1e-5
# Adam is invariant to a constant gradient scale, so parameters alone would not catch a wrong
# constant factor; the pre-clip gradient norm does.
METRIC_RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_shard_interleaves_and_unshard_inverts():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": torch.arange(6)}
    parts = shard(batch, 2)
    assert parts[0]["y"].tolist() == [0, 2, 4] and parts[1]["y"].tolist() == [1, 3, 5]
    assert torch.equal(unshard([p["x"] for p in parts]), batch["x"])
    scores = [Scores(p["x"], p["x"] * 2, None) for p in parts]
    assert torch.equal(unshard(scores).values, batch["x"] * 2)
    with pytest.raises(ValueError, match="does not split into 4 equal shards"):
        shard(batch, 4)


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a fresh cluster, never one that `ray start` left on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_qwen2(path)
    return str(path)


def config(model_dir, **overrides):
    # 8 rows = 2 ranks x 2 mini-batches x 2 rows. micro_batch_size=3: 1 rank accumulates a
    # ragged [3, 1] per mini-batch, 2 ranks a single micro-batch of 2: different partitions.
    base = dict(model=model_dir, lr=1e-3, micro_batch_size=3, ppo_mini_batches=2, ppo_epochs=2,
                lr_schedule="linear_warmup_cosine", warmup_ratio=0.25, total_steps=12)
    return LearnerConfig(**{**base, **overrides})


def ppo_batch(group):
    """A PPO batch whose old log-probs and values come from the group itself (scored sharded and
    put back in order)."""
    batch = make_batch(seed=3, rows=8)
    scores = unshard(group.run_sharded(LearnerWorker.score, batch, 1.0, False))
    mask = batch["response_mask"].float()
    g = torch.Generator().manual_seed(4)
    return dict(
        batch,
        old_logprobs=scores.logprobs,
        old_values=scores.values,
        advantages=torch.randn(mask.shape, generator=g) * mask,
        returns=torch.rand(mask.shape, generator=g) * mask,
    )


def params_of(group):
    weights = group.run(LearnerWorker.export_weights)
    assert all(w is None for w in weights[1:])  # only rank 0 keeps the gathered copy
    return weights[0]


def max_abs_diff(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_metrics_close(got, expected):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=METRIC_RTOL, abs=1e-7), key


@pytest.fixture(scope="module")
def one_rank_reference(ray_cluster, model_dir):
    """1 rank, ZeRO-0: the batch, the PPO metrics and the parameters after one update."""
    group = ActorGroup(LearnerWorker, 1, config(model_dir, zero_stage=0), timeout_s=300)
    try:
        batch = ppo_batch(group)
        (metrics,) = group.run_sharded(LearnerWorker.ppo_update, batch, 1.0)
        return batch, metrics, params_of(group)
    finally:
        group.kill()


@pytest.mark.slow
def test_two_ranks_zero2_equal_one_rank_and_actors_are_named(one_rank_reference, model_dir):
    batch, metrics_1, params_1 = one_rank_reference
    group = ActorGroup(LearnerWorker, 2, config(model_dir, zero_stage=2), timeout_s=300)
    try:
        print(f"\nsetup seconds (2 ranks, ZeRO-2): {group.setup_seconds}")
        for rank in range(2):
            actor = ray.get_actor(f"learner-{rank}", namespace="reft")
            assert actor._actor_id == group.actors[rank]._actor_id
        # The old log-probs scored by 2 ranks equal the 1-rank ones (same initial weights).
        scores = unshard(group.run_sharded(LearnerWorker.score, batch, 1.0, False))
        torch.testing.assert_close(scores.logprobs, batch["old_logprobs"], atol=1e-6, rtol=0)

        metrics_2 = group.run_sharded(LearnerWorker.ppo_update, batch, 1.0)
        assert metrics_2[0] == metrics_2[1]  # every rank reports the global numbers
        assert_metrics_close(metrics_2[0], metrics_1)
        diff = max_abs_diff(params_of(group), params_1)
        print(f"ZeRO-2, 2 ranks vs 1 rank: max |param diff| = {diff:.2e}")
        assert diff <= PARAM_ATOL

        left_padded = dict(batch, attention_mask=batch["attention_mask"].flip(1))
        failed = r"(?s)reft/learner-\d \(rank \d of 2, node \w{12} \([\d.]+\), pid \d+\) failed in score: .*right-padded"
        with pytest.raises(RuntimeError, match=failed):
            group.run_sharded(LearnerWorker.score, left_padded, 1.0, False)
    finally:
        group.kill()


@pytest.mark.slow
def test_two_ranks_zero3_equal_one_rank_and_resume_equals_no_stop(one_rank_reference, model_dir, tmp_path):
    batch, metrics_1, params_1 = one_rank_reference
    cfg = config(model_dir, zero_stage=3)
    group = ActorGroup(LearnerWorker, 2, cfg, timeout_s=300)
    try:
        metrics_2 = group.run_sharded(LearnerWorker.ppo_update, batch, 1.0)
        assert_metrics_close(metrics_2[0], metrics_1)
        diff = max_abs_diff(params_of(group), params_1)
        print(f"\nZeRO-3, 2 ranks vs 1 rank: max |param diff| = {diff:.2e}")
        assert diff <= PARAM_ATOL
        # pi_ref is ZeRO-3-partitioned too, and still the initial policy.
        ref = unshard(group.run_sharded(LearnerWorker.score, batch, 1.0, True)).ref_logprobs
        torch.testing.assert_close(ref, batch["old_logprobs"], atol=1e-6, rtol=0)

        # Save after 1 update (4 optimizer steps), then run 2 more: the uninterrupted run.
        group.run(LearnerWorker.save_checkpoint, str(tmp_path), {"updates": 1})
        uninterrupted = [group.run_sharded(LearnerWorker.ppo_update, batch, 1.0)[0] for _ in range(2)]
        params_uninterrupted = params_of(group)
    finally:
        group.kill()

    resumed_group = ActorGroup(LearnerWorker, 2, cfg, timeout_s=300)
    try:
        assert resumed_group.run(LearnerWorker.load_checkpoint, str(tmp_path)) == [{"updates": 1}] * 2
        resumed = [resumed_group.run_sharded(LearnerWorker.ppo_update, batch, 1.0)[0] for _ in range(2)]
        assert resumed == uninterrupted  # metrics, lr schedule position included: bit for bit
        diff = max_abs_diff(params_of(resumed_group), params_uninterrupted)
        print(f"resume vs no stop: max |param diff| = {diff:.2e}")
        assert diff == 0.0
    finally:
        resumed_group.kill()
