"""The tokenizer shapes of the paper's models, built locally (nothing can be downloaded): the one
prompt tokenisation never adds special tokens, a tokenizer without a pad token pads with EOS, and
a completion decodes after its prompt as the samplers decode it.

    Llama / CodeLlama   SentencePiece-style BPE, BOS <s> added by encode, no pad token
    OPT / Galactica     byte-level BPE, encode adds </s> as BOS, pad <pad> = 1
    Qwen2               byte-level BPE, no BOS, pad = EOS in the checkpoints (the project's tiny model)
"""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from formats.hf import decode_completion, with_pad_token
from formats.records import Example, build_prompt, prompt_token_ids
from tasks.tiny_model import train_llama_tokenizer

CORPUS = [build_prompt("Tom has 3 apples and buys 4 more . How many apples ?", kind)
          + ("    apples = 3 + 4\n    result = apples\n    return result" if kind == "pcot"
             else "Tom has 3 + 4 = 7 apples.\nTherefore, the answer is: 7")
          for kind in ("ncot", "pcot")] * 20
EXAMPLE = Example(id="t0", question="Tom has 3 apples and buys 4 more . How many apples ?", answer="7",
                  dataset="gsm8k", cot_kind="pcot")


def opt_style(with_pad: bool) -> PreTrainedTokenizerFast:
    """Galactica's shape: byte-level BPE; encode() prepends </s> (OPT's BOS is its EOS token)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if with_pad else None)


@pytest.fixture(scope="module")
def llama():
    return train_llama_tokenizer(CORPUS, vocab_size=400)


@pytest.mark.parametrize("shape", ["llama", "opt", "opt-no-pad"])
def test_the_prompt_carries_no_special_token_and_padding_exists(shape, llama):
    tokenizer = {"llama": lambda: llama, "opt": lambda: opt_style(True), "opt-no-pad": lambda: opt_style(False)}[shape]()
    special = set(tokenizer.all_special_ids)
    assert tokenizer.encode("Question:")[0] in special            # the tokenizer's own encode adds one ...
    ids = prompt_token_ids(tokenizer, EXAMPLE)
    assert not special & set(ids)                                  # ... the project's prompts never
    assert tokenizer.decode(ids) == build_prompt(EXAMPLE.question, "pcot")
    padded = with_pad_token(tokenizer, where=shape)
    expected = {"llama": padded.eos_token_id, "opt": 1, "opt-no-pad": padded.eos_token_id}[shape]
    assert padded.pad_token_id == expected


@pytest.mark.parametrize("shape", ["llama", "opt"])
def test_a_pcot_body_keeps_its_indentation_decoded_after_its_prompt(shape, llama):
    tokenizer = llama if shape == "llama" else opt_style(True)
    prompt = prompt_token_ids(tokenizer, EXAMPLE)
    body = "    apples = 3 + 4\n    return apples"
    assert decode_completion(tokenizer, prompt, tokenizer.encode(body, add_special_tokens=False)) == body


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused():
    tokenizer = opt_style(False)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="has neither a pad nor an EOS token"):
        with_pad_token(tokenizer, where="/models/x")
