"""The model side of evaluation: fused NLLs equal float64 log-softmax on the model's logits,
batched greedy answers equal one-at-a-time argmax decoding, training's tokenisation."""

from __future__ import annotations

import pytest
import torch
from eval_oracle import greedy_oracle, oracle_nll
from hf_helpers import hf_word_tokenizer, lora, random_pairs, tiny_llama
from oracle import generator, rel_err

from unlearn_kernels.data.formats import tokenize_pairs
from unlearn_kernels.eval.scoring import (
    Prompting,
    greedy_continuations,
    mean_nll,
    prompt_tokens,
    response_nll,
    verbatim_prefixes,
)


@pytest.mark.parametrize("adapter", [False, True])
def test_response_nll_equals_float64_log_softmax(adapter):
    gen, seed = generator()
    # dropout on and train mode: scoring must switch it off and restore the flag
    model = tiny_llama(seed % 1000, attention_dropout=0.3)
    if adapter:
        model = lora(model)
    data = random_pairs(gen, 7, min_len=3, max_len=13)  # odd lengths, right padding
    got = response_nll(model, data, batch_size=3)
    assert model.training
    want = oracle_nll(model, data)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.float64 and g.shape == w.shape, (seed, i)
        assert rel_err(g, w) < 1e-5, (seed, i, rel_err(g, w))
    assert mean_nll(got) == pytest.approx([float(w.mean()) for w in want], rel=1e-5)


def test_response_nll_does_not_depend_on_batching():
    gen, seed = generator()
    model = tiny_llama(seed % 1000)
    data = random_pairs(gen, 9)
    one = response_nll(model, data, batch_size=1)
    many = response_nll(model, data, batch_size=4)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(one, many, strict=True)), seed
    with pytest.raises(ValueError, match="batch_size"):
        response_nll(model, data, batch_size=0)


def test_greedy_continuations_batched_with_left_padding_equal_one_at_a_time():
    gen, seed = generator()
    tokenizer = hf_word_tokenizer()
    model = tiny_llama(seed % 1000, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()
    # bias the head towards EOS for some hidden states so some answers stop early
    with torch.no_grad():
        model.lm_head.weight[2] *= 6.0
    prompts = [torch.randint(4, 97, (int(n),), generator=gen) for n in (3, 7, 4, 9, 5)]
    got = greedy_continuations(
        model, tokenizer, prompts, eos_token_id=2, max_new_tokens=6, batch_size=3
    )
    want = [
        tokenizer.decode(greedy_oracle(model, p, 6, 2), skip_special_tokens=True) for p in prompts
    ]
    assert got == want, seed
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_continuations(model, tokenizer, prompts, eos_token_id=2, max_new_tokens=0)


def test_prompting_tokenises_as_training_and_splits_verbatim_prefixes():
    tokenizer = hf_word_tokenizer()
    model = tiny_llama(0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    pairs = [("w1 w2", "w3 w4 w5 w6 w7"), ("w8", "w9")]
    data = Prompting.of(model, tokenizer).tokenize(tokenizer, pairs)
    same = tokenize_pairs(pairs, tokenizer, bos_token_id=1, eos_token_id=2)
    assert torch.equal(data.input_ids, same.input_ids)
    assert torch.equal(data.prompt_lengths, same.prompt_lengths)
    bare = Prompting.of(model, tokenizer, add_bos=False, add_eos=False).tokenize(tokenizer, pairs)
    assert bare.attention_mask.sum().item() == same.attention_mask.sum().item() - 4
    assert [p.tolist() for p in prompt_tokens(data)] == [[1, 5, 6], [1, 12]]
    prefixes, rests = verbatim_prefixes(data, eos_token_id=2)
    # answer w3..w7 (ids 7..11): half = 2 -> prefix bos w1 w2 w3 w4, rest w5 w6 w7
    assert [p.tolist() for p in prefixes] == [[1, 5, 6, 7, 8], [1, 12]]
    assert rests == [[9, 10, 11], [13]]
    with pytest.raises(ValueError, match="chat template"):
        Prompting.of(model, tokenizer, chat_template=True).tokenize(tokenizer, pairs)


def test_prompting_renders_the_chat_template_and_refuses_missing_specials():
    tokenizer = hf_word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}w90 {{ m['content'] }} w91{% endfor %}"
    model = tiny_llama(0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    data = Prompting.of(model, tokenizer, chat_template=True).tokenize(tokenizer, [("w1", "w2")])
    # the template supplies any BOS: none is added; EOS still ends the answer
    assert data.input_ids[0].tolist() == [94, 5, 95, 6, 2]
    assert data.prompt_lengths.tolist() == [3]
    bare = hf_word_tokenizer()
    bare.bos_token = None
    nobos = tiny_llama(0, bos_token_id=None, eos_token_id=2)
    with pytest.raises(ValueError, match="add_bos"):
        Prompting.of(nobos, bare)
    assert Prompting.of(nobos, bare, add_bos=False).bos_token_id is None
