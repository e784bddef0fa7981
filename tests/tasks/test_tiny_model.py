"""The tiny tokenizer and model: exact round trips, one token per integer, and HF/vLLM load them as saved."""
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from formats.hf import load_tokenizer
from formats.records import build_prompt, pcot_header
from tasks.synthetic import SyntheticConfig, generate
from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

SYN = SyntheticConfig(num_train=200, num_test=50)


@pytest.fixture(scope="module")
def examples():
    return [e for kind in ("ncot", "pcot") for split in generate(SYN, cot_kind=kind) for e in split]


@pytest.fixture(scope="module")
def corpus(examples):
    return corpus_from_examples(examples)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, TinyModelConfig(), SYN.max_value)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def _prompt_and_completion(e):
    """What the rollout sends to the engine and what the model should write after it."""
    completion = e.cot[len(pcot_header(e.question)):] if e.cot_kind == "pcot" else e.cot
    return build_prompt(e.question, e.cot_kind), completion


def test_corpus_is_prompt_then_cot(examples, corpus):
    ncot = next(e for e in examples if e.cot_kind == "ncot")
    pcot = next(e for e in examples if e.cot_kind == "pcot")
    assert corpus[examples.index(ncot)] == build_prompt(ncot.question, "ncot") + ncot.cot
    body = pcot.cot[len(pcot_header(pcot.question)):]
    assert corpus[examples.index(pcot)] == build_prompt(pcot.question, "pcot") + body


def test_every_text_round_trips_exactly_without_unk(tokenizer, examples, corpus):
    for text in corpus + [e.cot for e in examples]:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_prompt_and_completion_tokenize_the_same_apart_and_together(tokenizer, examples):
    # vLLM samples after the prompt's ids; SFT must have trained on the same ids at the boundary.
    for e in examples:
        prompt, completion = _prompt_and_completion(e)
        assert tokenizer.encode(prompt) + tokenizer.encode(completion) == tokenizer.encode(prompt + completion)


def test_every_integer_up_to_max_value_is_one_token(tokenizer):
    for i in range(SYN.max_value + 1):
        for text in (str(i), f" {i}"):
            ids = tokenizer.encode(text)
            assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, text


def test_special_tokens_and_no_bos(tokenizer, model_dir):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, None)
    assert tokenizer.encode("Question:") == tokenizer.convert_tokens_to_ids(["Question", ":"]), "no BOS/EOS added"
    assert tokenizer.decode([5, 1, 0], skip_special_tokens=True) == tokenizer.decode([5])
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("trust_remote_code", [None, False])
def test_auto_tokenizer_is_not_replaced_by_a_byte_level_qwen2_one(model_dir, tokenizer, corpus, trust_remote_code):
    auto = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    assert type(auto).__name__ != "Qwen2Tokenizer"
    assert [auto.encode(t) for t in corpus] == [tokenizer.encode(t) for t in corpus]
    assert (auto.eos_token_id, auto.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_a_resaved_tokenizer_still_loads_as_ours(model_dir, tokenizer, corpus, tmp_path):
    # A learner checkpoint saves the tokenizer again next to new weights: the trap must stay closed.
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(model_dir / "config.json", tmp_path)
    expected = [tokenizer.encode(t) for t in corpus]
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert [loaded.encode(t) for t in corpus] == expected


def test_model_loads_with_hf_and_matches_the_tokenizer(model_dir, tokenizer, corpus):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (1, 0, None)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(corpus[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.5e6 < n_params < 4e6, n_params   # ~2.95 M in the blocks + 256 per vocabulary entry


def test_llama_arch_and_seeded_init(tmp_path, corpus):
    cfg = TinyModelConfig(arch="llama", num_layers=1, hidden_size=64, intermediate_size=128)
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", corpus[:50], cfg, 30))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", corpus[:50], cfg, 30))
    assert type(a).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    auto = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert [auto.encode(t) for t in corpus[:50]] == [load_tokenizer(tmp_path / "a").encode(t) for t in corpus[:50]]


def test_load_tokenizer_rejects_a_tokenizer_that_cannot_reproduce_text(tmp_path):
    foreign = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=foreign, unk_token="<unk>").save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match="does not round-trip"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("field, value", [("arch", "gpt2"), ("num_heads", 3), ("num_kv_heads", 3)])
def test_model_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TinyModelConfig\.{field} ="):
        TinyModelConfig(**{field: value})


@pytest.mark.slow
def test_vllm_serves_the_saved_model_with_our_tokenizer(model_dir, tokenizer, examples, monkeypatch):
    """A real vLLM engine (CPU, ~1 min): same prompt ids as ours, and its text is our decode of its ids."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB; must be set before vLLM is imported
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    prompts = [_prompt_and_completion(e)[0] for e in (examples[0], examples[-1])]   # one N-CoT, one P-CoT
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    finally:
        llm.llm_engine.engine_core.shutdown()   # now, not at exit when pytest has closed the log streams
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == tokenizer.encode(prompt)
        ids = list(out.outputs[0].token_ids)
        assert len(ids) == 20
        assert out.outputs[0].text == tokenizer.decode(ids, skip_special_tokens=True)   # vLLM skips them too
