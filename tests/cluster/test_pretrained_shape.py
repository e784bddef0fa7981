"""The path a GPU user takes, on CPU: a paper config's recipe with a checkpoint shaped like
CodeLlama's (Llama blocks; a SentencePiece-style tokenizer that adds BOS and has no pad token),
built here from the SVAMP corpus because nothing can be downloaded, and run through `reft train`
on SVAMP N-CoT and P-CoT with sizes and steps shrunk by overrides.

What must hold, and what broke before: the run finishes (a missing pad token reached `collate`);
the samplers saw exactly the prompt tokens SFT trained on, with no BOS added on the way (vLLM adds
one to a text prompt); the completion texts are the ones HF's decoder gives after the prompt (a
Llama decoder drops the first space of a sequence decoded alone); the rewards are the paper's rule.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ROWS, TEST_ROWS = 48, 8
FILES = {"ncot": "svamp_nl.json", "pcot": "svamp_python_sdp.json"}


@pytest.fixture(scope="module")
def llama_like(data_dir, tmp_path_factory):
    """A tiny random-init Llama and a CodeLlama-shaped tokenizer trained on SVAMP (both CoT kinds)."""
    from tasks.datasets import load_dataset
    from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

    examples = [e for kind in FILES for e in load_dataset("svamp", "train", kind, data_dir=data_dir)]
    cfg = TinyModelConfig(arch="llama", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                          intermediate_size=192, tie_word_embeddings=False)
    return build_tiny_model(tmp_path_factory.mktemp("llama") / "model", corpus_from_examples(examples), cfg,
                            max_value=0, tokenizer="llama")


def test_the_built_tokenizer_has_codellamas_shape(llama_like):
    from transformers import AutoTokenizer

    from formats.hf import decode_completion, load_tokenizer
    raw = AutoTokenizer.from_pretrained(llama_like)
    assert (raw.bos_token_id, raw.eos_token_id, raw.pad_token_id) == (1, 2, None)
    assert raw.encode("Question:")[0] == 1 and raw.encode("Question:", add_special_tokens=False)[0] != 1
    tokenizer = load_tokenizer(llama_like)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2   # the fallback, as the paper pads CodeLlama
    prompt = tokenizer.encode("Question:\nx\nAnswer reasoning:\ndef solution():\n", add_special_tokens=False)
    body = tokenizer.encode("    a = 1\n    return a", add_special_tokens=False)
    assert tokenizer.decode(body) == "   a = 1\n    return a"       # alone: Llama's decoder eats a space
    assert decode_completion(tokenizer, prompt, body) == "    a = 1\n    return a"


@pytest.mark.slow
@pytest.mark.parametrize("cot_kind", ["ncot", "pcot"])
def test_paper_recipe_with_a_llama_shaped_checkpoint(cot_kind, llama_like, data_dir, tmp_path):
    from formats.hf import decode_completion, load_tokenizer
    from learner.data import tokenize_sft
    from rewards.score import RewardConfig, Scorer
    from tasks.datasets import load_dataset

    # A slice of SVAMP, through the loader's own train_path / test_path keys.
    rows = json.loads((data_dir / "reft" / "data" / FILES[cot_kind]).read_text())[:TRAIN_ROWS]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    test_rows = json.loads((data_dir / "reft" / "data" / "svamp_test_set.json").read_text())[:TEST_ROWS]
    (tmp_path / "test.json").write_text(json.dumps(test_rows))
    config = ROOT / "experiments" / "configs" / "paper" / f"svamp-{cot_kind}-codellama-7b.yaml"
    overrides = [
        f"out_dir={tmp_path / 'runs'}", "name=llama", f"learner.model={llama_like}",
        f"data.train_path={tmp_path / 'train.json'}", f"data.test_path={tmp_path / 'test.json'}",
        "data.train_eval_size=8",
        # CPU sizes: one learner rank and one engine, fp32, short generations
        "cluster.mode=cpu", "cluster.num_learners=1", "cluster.dashboard=false", "rollout.num_actors=1",
        "learner.dtype=fp32", "learner.gradient_checkpointing=false", "learner.micro_batch_size=16",
        "rollout.max_model_len=512",
        # the paper's schedule shape: the warm-up is the first epoch(s) of a longer schedule
        "sft.epochs=1", "sft.schedule_epochs=20", "sft.batch_size=16", "sft.eval_max_new_tokens=32",
        "rl.epochs=1", "rl.questions_per_step=8", "rl.max_new_tokens=48", "rl.eval_every=3",
        "rl.checkpoint_every=6",
    ]
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "train", "--config", str(config), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "llama"
    assert (run_dir / "results.json").is_file()

    tokenizer = load_tokenizer(str(run_dir / "sft" / "epoch-1"))
    train = {e.id: e for e in load_dataset("svamp", "train", cot_kind, path=tmp_path / "train.json")}
    samples = [json.loads(line) for line in (run_dir / "rl" / "samples.jsonl").read_text().splitlines()]
    first = [s for s in samples if s["step"] == 0]
    assert len(first) == 8
    for s in first:
        # the samplers' prompt tokens are SFT's for the same question, token for token: no BOS added
        assert s["prompt_token_ids"] == tokenize_sft(tokenizer, train[s["question_id"]]).prompt_ids
        assert s["prompt_token_ids"][0] != tokenizer.bos_token_id
        # vLLM's completion text is HF's decoding of the same ids after the prompt, up to the first
        # byte-fallback token (the barely trained model samples stray bytes, invalid UTF-8, which
        # the two detokenizers render differently)
        ids = s["completion_token_ids"]
        clean = next((i for i, t in enumerate(ids) if 3 <= t < 3 + 256), len(ids))
        assert s["completion"].startswith(decode_completion(tokenizer, s["prompt_token_ids"], ids[:clean]))
    # the rewards are the paper rule's: recorded as such, and the same when rescored here
    assert {s["rule"] for s in samples} == {"paper"}
    with Scorer(RewardConfig(rule="paper", sandbox_workers=1)) as scorer:
        again = scorer.score([s["completion"] for s in samples], [train[s["question_id"]].answer for s in samples],
                             cot_kind, "svamp", questions=[train[s["question_id"]].question for s in samples])
    assert [sc.reward for sc in again] == [s["reward"] for s in samples]
