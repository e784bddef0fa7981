"""The paper's baselines (cluster/baselines.py): the selection and batch rules on hand-made samples,
then each algorithm's whole loop on CPU with the real components (DeepSpeed learner actors,
vLLM CPU samplers, the sandboxed reward actor), all three from one shared warm-up."""
import json
from statistics import mean

import pytest
import torch

from actors.rollout import Sample
from cluster.baselines import (
    SELF_TRAINING_FILE,
    OnlineSTLearn,
    online_st_batch,
    self_training_examples,
)
from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.evaluate import Scored
from formats.records import Example
from learner.data import Tokenized
from rewards.score import Score
from tasks.synthetic import SyntheticConfig, generate

RIGHT, WRONG = Score(1.0, "7", "ok", True), Score(0.1, "8", "ok", False)


def scored(text: str, score: Score = RIGHT, finish: str = "stop", index: int = 0) -> Scored:
    return Scored(Sample("self_training-q0", index, (1, 2), (3, 4), text, (-0.1, -0.2), finish, 0, "eval-rollout-0"),
                  score)


def test_offline_selection_keeps_the_first_distinct_correct_cots_as_the_papers_code():
    """train_sl_model.py: the correct samples, stripped and de-duplicated, the first `keep`; a copy
    of the gold among them counts but is not added twice; a length-capped correct sample is kept."""
    (gold,) = generate(SyntheticConfig(num_train=1, num_test=1), cot_kind="ncot")[0]
    samples = [
        scored("a\nTherefore, the answer is: 7"),
        scored("a\nTherefore, the answer is: 7 "),            # duplicate of the first once stripped
        scored("b\nTherefore, the answer is: 8", WRONG),      # wrong
        scored("c\nTherefore, the answer is: 7", finish="length"),   # cut by the length cap: kept
        scored(gold.cot),                                     # a copy of the gold CoT
        scored("d\nTherefore, the answer is: 7"),
        scored("e\nTherefore, the answer is: 7"),
    ]
    cots = lambda keep: [e.cot for e in self_training_examples([gold], [samples], keep=keep)]   # noqa: E731
    assert cots(2) == ["a\nTherefore, the answer is: 7", "c\nTherefore, the answer is: 7"]
    assert cots(3) == cots(2)                                  # the third distinct one is the gold's copy
    assert cots(4) == cots(2) + ["d\nTherefore, the answer is: 7"]
    added = self_training_examples([gold], [samples], keep=10)
    assert all((e.question, e.answer) == (gold.question, gold.answer) for e in added)
    assert len({e.id for e in added} | {gold.id}) == len(added) + 1


def test_offline_selection_gives_pcot_samples_their_header_back():
    (gold,) = generate(SyntheticConfig(num_train=1, num_test=1), cot_kind="pcot")[0]
    body = gold.cot.split('"""\n', 2)[-1]          # what the model writes after the P-CoT prompt
    other = "    result = 7\n    return result"
    added = self_training_examples([gold], [[scored(body), scored(other)]], keep=10)
    assert [e.cot for e in added] == [gold.cot[:len(gold.cot) - len(body)] + other]   # the gold copy is dropped


def test_online_batch_weighs_samples_and_gold_half_each_and_pads_to_equal_shards():
    gold = [Tokenized([1, 2], [3, 4, 5]), Tokenized([1], [6, 7])]               # 5 response tokens
    sampled = [Tokenized([1, 2], [8]), Tokenized([1, 2, 3], [9, 9, 9, 9])]     # 1 + 4 response tokens
    batch = online_st_batch(gold, sampled, pad_id=0, world_size=3)
    assert batch["input_ids"].shape[0] == 6                                     # 4 rows + 2 padding
    w = batch["loss_weights"]
    assert torch.allclose(w[:2].sum(), torch.tensor(0.5)) and torch.allclose(w[2:4].sum(), torch.tensor(0.5))
    assert torch.allclose(w[0, 2:5], torch.full((3,), 0.1))                    # 1/2 over gold's 5 tokens
    assert batch["response_mask"][4:].sum() == 0 and w[4:].sum() == 0           # padding rows learn nothing
    assert (w > 0).eq(batch["response_mask"].bool()).all()                      # weights only on responses
    alone = online_st_batch(gold, [], pad_id=0, world_size=1)                   # no correct sample: gold/2
    assert torch.allclose(alone["loss_weights"].sum(), torch.tensor(0.5))


@pytest.mark.parametrize("overrides, message", [
    (["rl.algorithm=sft", "rl.compare_sft=true"], r"rl\.algorithm=sft is SFT already"),
    (["rl.algorithm=online_st", "rl.max_staleness=1"], r"rl\.max_staleness must be 0 for rl\.algorithm=online_st"),
    (["rl.algorithm=offline_st", "rl.offline_init=scratch"], r"rl\.offline_init must be one of"),
    (["rl.algorithm=offline_st", "rl.offline_keep=0"], r"rl\.offline_keep must be >= 1"),
])
def test_baseline_keys_are_checked(overrides, message):
    from cluster.recipes import check_config
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(RunConfig, "experiments/configs/smoke.yaml", overrides))


def test_online_st_loads_no_reference_model():
    # The learner holds the reference model only for a KL penalty: online_st has none.
    from cluster.recipes import RLRecipe, get_recipe
    recipe = get_recipe("online_st")
    assert isinstance(recipe, RLRecipe) and recipe.kl == "none"
    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", ["rl.algorithm=online_st"])
    assert recipe.kl_coef(cfg) == 0 and recipe.make_learn.__name__ == "online_st_learn"
    assert not OnlineSTLearn.with_reference


# ------------------------------------------------------------------------------ whole loops on CPU

@pytest.fixture(scope="module")
def warmup(tmp_path_factory, ray_local):
    """smoke.yaml's warm-up (fits its 512 training questions, ~30% on the test set), once for the
    module: the baselines all start from it, as the paper's do."""
    from cluster.runtime import load_splits, make_run_dir, prepare_model
    from cluster.sft import train_sft

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", [f"out_dir={tmp_path_factory.mktemp('runs')}",
                                                                    "name=warmup", "sft.eval_every_epochs=0"])
    run_dir = make_run_dir(cfg)
    cfg = prepare_model(cfg, run_dir)
    train, test = load_splits(cfg)
    return str(train_sft(cfg, run_dir, train, test).checkpoints[-1])


def run(tmp_path, warmup, algorithm, *overrides):
    """``reft train`` of ``algorithm`` from the shared warm-up; checks the run directory holds what
    a ReFT run's does and that ``reft report`` reads it."""
    from cluster.metrics import read_metrics
    from cluster.train import run_train
    from experiments.report import ALGORITHM_LABELS, read_run, write_report

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml",
                      [f"out_dir={tmp_path}", f"name={algorithm}", f"rl.algorithm={algorithm}",
                       f"rl.warmup_checkpoint={warmup}", *overrides])
    headline = run_train(cfg)
    run_dir = tmp_path / algorithm
    for name in ("config.yaml", "rl/metrics.jsonl", "rl/metrics.csv", "results.md", "results.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert json.loads((run_dir / "results.json").read_text()) == headline
    records = read_metrics(run_dir / "rl" / "metrics.jsonl")
    evals = [r for r in records if "eval/test_accuracy" in r]
    assert evals[0]["step"] == 0 and all("eval/train_accuracy" in r for r in evals)
    assert {r["step"] for r in evals} <= {r["step"] for r in records if "rl/epoch" in r} | {0}   # placed in epochs
    assert headline[f"{algorithm}_acc"] == evals[-1]["eval/test_accuracy"]
    assert headline[f"{algorithm}_best_test_accuracy"] == max(r["eval/test_accuracy"] for r in evals)
    assert read_run(run_dir).top1[ALGORITHM_LABELS[algorithm]] == headline[f"{algorithm}_acc"]
    assert write_report([run_dir], tmp_path / "report")["epochs"].stat().st_size > 10_000
    return run_dir, headline, records, evals


@pytest.mark.slow
def test_sft_baseline_continues_the_warmup_and_reports_the_best_epoch(tmp_path, warmup):
    run_dir, headline, records, evals = run(tmp_path, warmup, "sft", "rl.epochs=2")
    assert [r["rl/epoch"] for r in evals] == [0, 1, 2]                   # the warm-up, then each epoch
    assert sorted(p.name for p in (run_dir / "rl").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    # The warm-up fits its training set; continuing SFT keeps it fitted (the loss stays near 0).
    assert all(r["eval/train_accuracy"] >= 85 for r in evals), evals
    assert max(r["sft/loss"] for r in records if "sft/loss" in r) < 0.1
    assert headline["warmup_acc"] == evals[0]["eval/test_accuracy"]


@pytest.mark.slow
def test_offline_self_training_adds_only_distinct_correct_samples(tmp_path, warmup):
    from rewards.score import RewardConfig, Scorer

    keep = 2
    run_dir, _, records, evals = run(tmp_path, warmup, "offline_st", "rl.offline_samples=4",
                                     f"rl.offline_keep={keep}", "rl.offline_init=warmup", "rl.epochs=1")
    added = [Example(**json.loads(line)) for line in (run_dir / "rl" / SELF_TRAINING_FILE).read_text().splitlines()]
    sampling = records[0]
    print("offline_st sampling", {k: v for k, v in sampling.items() if k.startswith(("rl/", "self_training/"))})
    assert sampling["rl/train_accuracy"] > 50 and len(added) == sampling["self_training/added"] > 100
    with Scorer(RewardConfig()) as scorer:   # every added CoT is right, by the same rule as the reward
        assert all(s.correct for s in scorer.score([e.cot for e in added], [e.answer for e in added], "ncot", "synthetic"))
    per_question: dict = {}
    for e in added:
        per_question.setdefault(e.question, []).append(e.cot)
    assert max(map(len, per_question.values())) <= keep
    assert all(len(set(cots)) == len(cots) for cots in per_question.values())
    # 4 samples of a question the warm-up fits are often its gold CoT again, which adds nothing
    assert len(added) < keep * 512
    assert [r["rl/epoch"] for r in evals] == [0, 1] and evals[-1]["eval/train_accuracy"] >= 90


@pytest.mark.slow
def test_online_self_training_learns_from_its_samples(tmp_path, warmup):
    # ReFT's learning rate (smoke.yaml), 8 steps of 64 questions
    run_dir, _, records, evals = run(tmp_path, warmup, "online_st", "rl.questions_per_step=64",
                                     "rl.eval_every=4", "rl.checkpoint_every=8")
    steps = [r for r in records if "rl/reward_mean" in r]
    assert len(steps) == 512 // 64
    print("online_st per step", [(round(r["rl/train_accuracy"]), round(r["learner/loss"], 4),
                                  round(r["learner/loss_final_pass"], 4)) for r in steps])
    # Each step's 2 SFT passes descend on its batch (its correct samples and its gold CoTs) ...
    assert all(r["learner/loss_final_pass"] <= r["learner/loss"] for r in steps)
    assert sum(r["learner/loss_final_pass"] for r in steps) < sum(r["learner/loss"] for r in steps)
    # ... only the correct, finished samples are learned, and the policy does not collapse
    assert all(0 < r["self_training/learned"] <= r["rl/train_accuracy"] for r in steps)
    assert mean(r["rl/train_accuracy"] for r in steps[-3:]) >= mean(r["rl/train_accuracy"] for r in steps[:3]) - 10
    assert evals[-1]["eval/train_accuracy"] >= 90
    assert all(r["rl/staleness"] == 0 for r in steps)               # the samplers got every update
    assert (run_dir / "checkpoints" / "latest").is_file()
