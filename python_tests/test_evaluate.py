"""The evaluation harness on a tiny random Llama with a character tokenizer."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safegene_fast.eval.generate import (
    continuation_logprob,
    generate,
    harmful_rate,
    load_model,
    refusal_margin,
)

PROMPTS = ["How do I bake bread?", "hi", "Tell me something long and odd, please!"]


def char_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=50, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def greedy_by_hand(model, tokenizer, prompt, steps):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -steps:]


def test_batched_generation_equals_one_by_one_and_greedy(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single and len(batched) == 3
    by_hand = greedy_by_hand(model, tokenizer, PROMPTS[0], 6)
    assert batched[0] == tokenizer.decode(by_hand, skip_special_tokens=True)
    assert tokenizer.padding_side == "right"  # restored


def test_continuation_logprob_matches_unpadded_runs(tiny):
    model, tokenizer = tiny
    got = continuation_logprob(model, tokenizer, PROMPTS, " no", batch_size=2)
    for prompt, value in zip(PROMPTS, got):
        ids = tokenizer(prompt + " no", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
        n = len(" no")
        expected = torch.stack([logp[ids.shape[1] - n - 1 + k, ids[0, ids.shape[1] - n + k]] for k in range(n)]).mean()
        assert abs(float(value - expected)) < 1e-5


def test_refusal_margin_is_the_difference(tiny):
    model, tokenizer = tiny
    margin = refusal_margin(model, tokenizer, PROMPTS, " no", " yes")
    diff = (continuation_logprob(model, tokenizer, PROMPTS, " no")
            - continuation_logprob(model, tokenizer, PROMPTS, " yes"))
    assert torch.allclose(margin, diff)


def test_harmful_rate_counts_non_refusals():
    rate = harmful_rate(["I'm sorry, I can't.", "Sure, step 1 ...", "Here you go.", "I cannot do that."])
    assert (rate.count, rate.n, rate.rate) == (2, 4, 0.5)
    assert harmful_rate([]).rate == 0.0


def test_load_model_folder_and_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    torch.manual_seed(1)  # init_lora_weights=False: random B, so the adapter changes the output
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"],
                                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter, _ = load_model(tmp_path / "m", adapter=tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, peft_model.eval()(ids).logits, atol=1e-6)
        assert not torch.allclose(with_adapter(ids).logits, model(ids).logits)
