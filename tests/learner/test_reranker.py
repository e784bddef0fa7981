"""The reranker model (``learner.reranker``) against hand-computed numbers, and on a tiny Qwen2:
two-class cross-entropy, the last real token under right padding, the directory round trip."""
import math

import pytest
import torch

from formats.hf import load_tokenizer
from formats.records import prompt_token_ids
from learner.data import Tokenized, collate, tokenize_sft
from learner.reranker import (
    HEAD_FILE,
    Reranker,
    check_reranker_dir,
    correct_probability,
    last_token_states,
    save_reranker,
    tokenize_reranker,
    two_class_loss,
)
from tasks.synthetic import SyntheticConfig, generate
from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

SYN = SyntheticConfig(num_train=64, num_test=8)
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


def test_two_class_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])    # P(correct) = 3/4 and 1/2
    labels = torch.tensor([1, 0])
    by_hand = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    assert two_class_loss(logits, labels, 2).item() == pytest.approx(by_hand)
    # a rank's share: its rows' sum over the GLOBAL number of rows (here 4 on all ranks)
    assert two_class_loss(logits, labels, 4).item() == pytest.approx(by_hand / 2)
    assert correct_probability(logits).tolist() == pytest.approx([0.75, 0.5])


def test_last_token_states_under_right_padding():
    hidden = (torch.arange(4.0) + 10 * torch.arange(2.0)[:, None])[:, :, None]    # (2, 4, 1): 10 * row + position
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert last_token_states(hidden, mask).squeeze(-1).tolist() == [2.0, 11.0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    train_set, test_set = generate(SYN, cot_kind="ncot")
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus_from_examples(train_set + test_set), TINY,
                            SYN.max_value)


@pytest.fixture(scope="module")
def items(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    return [tokenize_sft(tokenizer, e) for e in generate(SYN, cot_kind="ncot")[0][:6]], tokenizer.pad_token_id


def _logits(model, items, pad):
    batch = collate(items, pad)
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def test_a_padded_batch_reads_each_rows_last_token(checkpoint, items):
    rows, pad = items
    model = Reranker.from_checkpoint(str(checkpoint)).eval()
    assert _logits(model, rows, pad).abs().max() == 0          # a fresh head: P(correct) = 1/2 for all
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight)
    alone = torch.cat([_logits(model, [row], pad) for row in rows])
    batched = _logits(model, rows, pad)                         # right-padded to the longest
    assert batched.shape == (len(rows), 2) and len({len(r.prompt_ids) + len(r.response_ids) for r in rows}) > 1
    assert torch.allclose(batched, alone, atol=1e-5)
    assert len(set(alone[:, 1].round(decimals=4).tolist())) > 1


def test_directory_round_trip_and_old_heads_refused(checkpoint, items, tmp_path):
    rows, pad = items
    model = Reranker.from_checkpoint(str(checkpoint)).eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight)
    out = save_reranker(model.state_dict_for_inference(), str(checkpoint), tmp_path / "rr", {"note": "test"})
    assert check_reranker_dir(out) == {"source_checkpoint": str(checkpoint), "note": "test"}
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert torch.allclose(_logits(Reranker.load(out).eval(), rows, pad), _logits(model, rows, pad), atol=1e-6)

    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(1, TINY.hidden_size), "bias": torch.zeros(1)}, str(out / HEAD_FILE))
    with pytest.raises(ValueError, match="earlier version"):
        Reranker.load(out)
    with pytest.raises(FileNotFoundError, match="not a reranker"):
        check_reranker_dir(checkpoint)


def test_tokenize_reranker_reads_prompt_and_completion_text(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    example = generate(SYN, cot_kind="ncot")[0][0]
    item = tokenize_reranker(tokenizer, example, example.cot, max_length=10_000)
    assert item.prompt_ids == prompt_token_ids(tokenizer, example)
    assert tokenizer.decode(item.response_ids) == example.cot and tokenizer.eos_token_id not in item.response_ids
    cut = tokenize_reranker(tokenizer, example, example.cot, max_length=len(item.prompt_ids) + 3)
    assert cut == Tokenized(item.prompt_ids, item.response_ids[:3])
