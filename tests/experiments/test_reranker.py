"""The reranker model on a tiny Qwen2: reads the last real token, learns a separable label, and
round-trips through its directory."""
import pytest
import torch

from experiments.reranker import HEAD_FILE, Reranker, train
from formats.hf import load_tokenizer
from learner.data import Tokenized, tokenize_sft
from tasks.synthetic import SyntheticConfig, generate
from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

SYN = SyntheticConfig(num_train=64, num_test=8)
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    train_set, test_set = generate(SYN, cot_kind="ncot")
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus_from_examples(train_set + test_set), TINY,
                            SYN.max_value)


@pytest.fixture(scope="module")
def sequences(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    items = [tokenize_sft(tokenizer, e) for e in generate(SYN, cot_kind="ncot")[0][:16]]
    return items, tokenizer.pad_token_id


def test_score_reads_the_last_real_token(checkpoint, sequences):
    items, pad = sequences
    model = Reranker.from_checkpoint(str(checkpoint))
    torch.nn.init.normal_(model.head.weight)      # a non-zero head, so that scores differ
    alone = [model.score([item], pad)[0] for item in items[:4]]
    batched = model.score(items[:4], pad, batch_size=4)   # right-padded to the longest
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in alone)) > 1


def test_learns_a_label_and_round_trips(checkpoint, sequences, tmp_path):
    items, pad = sequences
    # A label the last token gives away: positives end with token 5, negatives with token 6.
    data = [Tokenized(t.prompt_ids, t.response_ids + [5 if i % 2 else 6]) for i, t in enumerate(items)]
    labels = [i % 2 == 1 for i in range(len(data))]
    model = Reranker.from_checkpoint(str(checkpoint))
    torch.manual_seed(0)
    history = train(model, data, labels, pad, epochs=5, lr=1e-2, batch_size=16)
    assert history[-1]["reranker/epoch_loss"] < 0.5 * history[0]["reranker/epoch_loss"]
    assert history[0]["reranker/positive_rate"] == 50.0

    model.save(tmp_path / "rr", str(checkpoint), {"note": "test"})
    assert (tmp_path / "rr" / HEAD_FILE).is_file() and (tmp_path / "rr" / "tokenizer.json").is_file()
    loaded = Reranker.load(tmp_path / "rr")
    assert loaded.score(data, pad) == pytest.approx(model.score(data, pad), abs=1e-6)
    with pytest.raises(FileNotFoundError, match="reranker"):
        Reranker.load(checkpoint)
