"""The reranker on the DeepSpeed learner group (``cluster.reranker``): a RerankerWorker rank in cpu
mode, placed as the SFT learners, learns a label the last token gives away, saves its directory,
and scores the same from it on the group as in this process."""
import pytest
import torch

from cluster.config import RunConfig
from cluster.config_io import load_config
from formats.hf import load_tokenizer
from learner.data import Tokenized, collate, tokenize_sft
from tasks.synthetic import SyntheticConfig, generate
from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

SYN = SyntheticConfig(num_train=64, num_test=8)
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.mark.slow
def test_reranker_learns_on_the_learner_group_and_round_trips(tmp_path, ray_local):
    from cluster.reranker import score_reranker, train_reranker
    from learner.reranker import META_FILE, Reranker, check_reranker_dir

    train_set, test_set = generate(SYN, cot_kind="ncot")
    checkpoint = build_tiny_model(tmp_path / "tiny", corpus_from_examples(train_set + test_set), TINY, SYN.max_value)
    tokenizer = load_tokenizer(checkpoint)
    # Positives end with token 5, negatives with token 6: what the last token's state must show.
    items = [tokenize_sft(tokenizer, e) for e in train_set[:32]]
    data = [Tokenized(t.prompt_ids, t.response_ids + [5 if i % 2 else 6]) for i, t in enumerate(items)]
    labels = [i % 2 == 1 for i in range(len(data))]
    # 3 epochs x 4 steps of 8 (2 micro-batches of 4 each), the paper's schedule shape at a rate for a tiny model
    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", [
        "reranker.lr=3e-3", "reranker.batch_size=8", "learner.micro_batch_size=4", "cluster.learner_cpus=1"])

    out = tmp_path / "reranker"
    history = train_reranker(cfg, str(checkpoint), data, labels, out, {"note": "test"}, tokenizer.pad_token_id)
    print("reranker history", history)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["step"] == 12
    assert history[0]["reranker/positive_rate"] == 50.0
    assert history[-1]["reranker/epoch_loss"] < 0.5 * history[0]["reranker/epoch_loss"]
    meta = check_reranker_dir(out)
    assert meta["note"] == "test" and meta["source_checkpoint"] == str(checkpoint) and len(meta["history"]) == 3
    assert (out / META_FILE).is_file() and (out / "tokenizer.json").is_file()

    scores = score_reranker(cfg, out, data, tokenizer.pad_token_id, progress=None)
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    assert min(positives) > 0.5 > max(negatives), scores
    # The directory loads in one process with the same scores as on the group (all rows in one padded batch).
    batch = collate(data, tokenizer.pad_token_id)
    with torch.no_grad():
        local = torch.softmax(Reranker.load(out).eval()(batch["input_ids"], batch["attention_mask"]), -1)[:, 1]
    assert local.tolist() == pytest.approx(scores, abs=1e-5)
