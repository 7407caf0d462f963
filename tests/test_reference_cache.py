"""Reference cache: round trip against a direct reference forward, PEFT adapters disabled,
fingerprint and integrity failures, and streamed building/reading within a memory budget."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hf_helpers import VOCAB, WORDS, lora, qlora_llama, random_pairs, tiny_llama, word_tokenizer
from oracle import generator, rel_err

from unlearn_kernels.cli import main
from unlearn_kernels.data import TokenizedPairs, load_pairs, save_pairs
from unlearn_kernels.hf import causal_lm_loss, final_hidden_states
from unlearn_kernels.train import reference_cache as rc
from unlearn_kernels.train.reference_cache import (
    CacheSettings,
    ReferenceCache,
    build_reference_cache,
    model_fingerprint,
)

pytestmark = pytest.mark.hf
TOL = 1e-5
SETTINGS = CacheSettings(topk=5, temperature=2.0)


def direct_reference(model: torch.nn.Module, data: TokenizedPairs, temperature: float) -> dict:
    """Per response row, straight from ``model``'s own forward and full logits, in float64."""
    labels = data.labels()
    valid = labels != -100
    with torch.no_grad():
        out = model(
            input_ids=data.input_ids,
            attention_mask=data.attention_mask,
            output_hidden_states=True,
        )
        hidden = model.get_decoder()(
            input_ids=data.input_ids, attention_mask=data.attention_mask
        ).last_hidden_state
    logits = out.logits[valid].double()
    logp = logits.log_softmax(-1)
    top, index = (logits / temperature).log_softmax(-1).topk(SETTINGS.topk, dim=1)
    return {
        "label": labels[valid],
        "hidden": hidden[valid],
        "hidden_padded": hidden,
        "label_logprob": logp.gather(1, labels[valid][:, None]).squeeze(1),
        "topk_index": index,
        "topk_logprob": top,
        "tail_logprob": torch.log1p(-top.exp().sum(1)),
        "rows_per_example": valid.sum(1),
    }


def check_against(cache: ReferenceCache, expected: dict, seed: int) -> None:
    batch = cache.batch(range(len(cache)))
    assert torch.equal(batch.row_offsets.diff(), expected["rows_per_example"])
    assert torch.equal(batch.label, expected["label"])
    assert torch.equal(batch.topk_index, expected["topk_index"]), seed
    for name in ("hidden", "label_logprob", "topk_logprob", "tail_logprob"):
        assert rel_err(getattr(batch, name), expected[name]) < TOL, (name, seed)


def test_round_trip_equals_direct_reference_forward(tmp_path):
    gen, seed = generator()
    model, data = tiny_llama(seed), random_pairs(gen, 7)
    manifest = build_reference_cache(model, data, tmp_path / "c", SETTINGS, batch_size=3)
    assert model.training  # modes restored
    assert manifest["n_rows"] == int((data.labels() != -100).sum())
    cache = ReferenceCache(tmp_path / "c", model=model, data=data, settings=SETTINGS)
    expected = direct_reference(model, data, SETTINGS.temperature)
    check_against(cache, expected, seed)

    # any order, any subset; padded layout and sequence log-likelihoods
    picked = cache.batch([4, 0, 5])
    sub = data.select([4, 0, 5])
    labels = sub.labels()
    padded = picked.to_padded("label_logprob", labels)
    assert padded.shape == labels.shape and torch.all(padded[labels == -100] == 0)
    assert torch.equal(padded[labels != -100], picked.label_logprob)
    assert rel_err(picked.sequence_logprob(), padded.sum(1)) < TOL
    assert picked.to_padded("hidden", labels).shape == (*labels.shape, 32)
    with pytest.raises(ValueError, match="labels differ"):
        picked.to_padded("hidden", torch.where(labels == -100, labels, (labels + 1) % VOCAB))
    fewer = labels.clone()
    fewer[0, int((labels[0] != -100).nonzero()[0])] = -100
    with pytest.raises(ValueError, match="number of response rows"):
        picked.to_padded("hidden", fewer)
    with pytest.raises(ValueError, match="name"):
        picked.to_padded("row_offsets", labels)


def test_half_precision_hidden_and_optional_fields(tmp_path):
    gen, seed = generator()
    model, data = tiny_llama(seed), random_pairs(gen, 4)
    settings = CacheSettings(topk=0, store_label_logprob=False, hidden_dtype=torch.bfloat16)
    build_reference_cache(model, data, tmp_path, settings)
    batch = ReferenceCache(tmp_path, model=model, data=data, settings=settings).batch([0, 1, 2, 3])
    expected = direct_reference(model, data, 1.0)["hidden"]
    assert batch.hidden.dtype == torch.bfloat16 and torch.equal(batch.hidden, expected.bfloat16())
    assert batch.topk_index is None and batch.label_logprob is None
    with pytest.raises(ValueError, match="label_logprob"):
        batch.sequence_logprob()


def test_peft_cache_equals_base_model_outputs(tmp_path):
    gen, seed = generator()
    base, data = tiny_llama(seed), random_pairs(gen, 5)
    expected = direct_reference(base, data, SETTINGS.temperature)
    build_reference_cache(base, data, tmp_path / "base", SETTINGS)
    model = lora(base)  # wraps ``base`` in place with random, output-changing adapters
    args = (model, data.input_ids, data.attention_mask)
    assert rel_err(final_hidden_states(*args), expected["hidden_padded"]) > 1e-2

    build_reference_cache(model, data, tmp_path / "peft", SETTINGS)
    check_against(ReferenceCache(tmp_path / "peft", model=model, data=data), expected, seed)
    assert model.training  # and the adapters are back on:
    assert rel_err(final_hidden_states(*args), expected["hidden_padded"]) > 1e-2
    # the base model's cache serves the PEFT model: same reference, same fingerprint,
    # whatever the adapter weights become during training
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    ReferenceCache(tmp_path / "base", model=model, data=data, settings=SETTINGS)
    assert model_fingerprint(model) == model_fingerprint(copy.deepcopy(model).get_base_model())


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in rows) + "\n")


def test_fingerprint_mismatches_are_clear_errors(tmp_path):
    _, seed = generator()
    model = tiny_llama(seed)
    tokenizer = word_tokenizer()
    write_jsonl(tmp_path / "a.jsonl", [("w1 w2 w3", "w4 w5"), ("w6", "w7 w8 w9")])
    write_jsonl(tmp_path / "b.jsonl", [("w1 w2 w3", "w4 w5"), ("w6", "w7 w8 w10")])
    data = load_pairs(tmp_path / "a.jsonl", tokenizer, bos_token_id=1, eos_token_id=2)
    build_reference_cache(
        model, data, tmp_path / "c", SETTINGS, tokenizer=tokenizer, full_weight_hash=False
    )

    def open_with(**overrides):
        kwargs = {"model": model, "data": data, "tokenizer": tokenizer, "settings": SETTINGS}
        return ReferenceCache(tmp_path / "c", **{**kwargs, **overrides})

    open_with()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    with pytest.raises(ValueError, match="model weights"):
        open_with(model=other)
    with pytest.raises(ValueError, match="model config"):
        open_with(model=tiny_llama(seed, rms_norm_eps=1e-3))
    with pytest.raises(ValueError, match="model structure"):
        open_with(model=tiny_llama(seed, num_hidden_layers=3))
    other_data = load_pairs(tmp_path / "b.jsonl", tokenizer, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="data tokens, data file"):
        open_with(data=other_data)
    with pytest.raises(ValueError, match="data tokens"):  # same file, tokenised differently
        open_with(data=load_pairs(tmp_path / "a.jsonl", tokenizer, bos_token_id=1))
    with pytest.raises(ValueError, match="tokenizer"):
        open_with(tokenizer=word_tokenizer([*WORDS[:10], "w99", *WORDS[10:]]))
    with pytest.raises(ValueError, match=r"setting topk \(6 vs cached 5\)"):
        open_with(settings=CacheSettings(topk=6, temperature=2.0))
    with pytest.raises(ValueError, match="setting temperature"):
        open_with(settings=CacheSettings(topk=5))


def test_incomplete_truncated_or_damaged_cache_is_refused(tmp_path, monkeypatch):
    gen, seed = generator()
    model, data = tiny_llama(seed), random_pairs(gen, 6)
    open_it = lambda path: ReferenceCache(path, model=None, data=None)  # noqa: E731

    def interrupted(path, payload):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # stopped after the shards, before the manifest
        patch.setattr(rc, "_write_json_atomically", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_reference_cache(model, data, tmp_path / "i", SETTINGS, max_shard_bytes=2560)
    assert list((tmp_path / "i").glob("shard-*.safetensors"))
    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        open_it(tmp_path / "i")

    manifest = build_reference_cache(model, data, tmp_path / "c", SETTINGS, max_shard_bytes=2560)
    assert len(manifest["shards"]) > 1
    with pytest.raises(ValueError, match="already holds"):
        build_reference_cache(model, data, tmp_path / "c", SETTINGS)
    shard = tmp_path / "c" / manifest["shards"][1]["file"]
    content = shard.read_bytes()
    shard.write_bytes(content[:-10])
    with pytest.raises(ValueError, match="truncated"):
        open_it(tmp_path / "c")
    shard.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    cache = open_it(tmp_path / "c")
    cache.batch([0])  # the first shard is intact
    with pytest.raises(ValueError, match="SHA-256"):
        cache.batch([manifest["shards"][1]["first_example"]])
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        open_it(tmp_path / "c")
    build_reference_cache(model, data, tmp_path / "c", SETTINGS, overwrite=True)
    open_it(tmp_path / "c").batch(range(6))


def test_cache_larger_than_budget_is_streamed(tmp_path):
    gen, seed = generator()
    model = tiny_llama(seed)
    ids = torch.randint(4, VOCAB, (40, 12), generator=gen)
    data = TokenizedPairs(ids, torch.ones_like(ids), torch.full((40,), 4))  # 8 rows each
    settings = CacheSettings(topk=4)
    budget = 8 * 1024
    manifest = build_reference_cache(
        model, data, tmp_path, settings, batch_size=7, max_shard_bytes=budget
    )
    # on disk a row is label 4 + hidden 128 + top-k 4·(4 + 4) + tail 4 + label log-prob 4 bytes
    example_bytes = 8 * 172 + 8
    per_shard = (budget - 8) // example_bytes
    assert len(manifest["shards"]) == math.ceil(40 / per_shard)
    assert sum(s["tensor_bytes"] for s in manifest["shards"]) > 4 * budget
    assert max(s["tensor_bytes"] for s in manifest["shards"]) <= budget
    assert manifest["peak_buffered_bytes"] <= budget

    cache = ReferenceCache(tmp_path, model=model, data=data, settings=settings)
    whole = cache.batch(range(40))
    read_budget = 5 * 1024  # a read row is label 8 + hidden 128 + top-k 4·(8 + 4) + 4 + 4
    per_batch = (read_budget - 8) // (16 + 8 * 192)
    batches = list(cache.iter_batches(max_bytes=read_budget))
    assert len(batches) == math.ceil(40 / per_batch)
    assert max(b.nbytes for b in batches) <= read_budget
    assert torch.equal(torch.cat([b.example_index for b in batches]), torch.arange(40))
    assert torch.equal(torch.cat([b.hidden for b in batches]), whole.hidden)
    assert torch.equal(torch.cat([b.topk_index for b in batches]), whole.topk_index)
    assert [len(b.example_index) for b in cache.iter_batches(batch_size=16)] == [16, 16, 8]
    with pytest.raises(ValueError, match="max_bytes"):
        next(cache.iter_batches(max_bytes=1000))
    with pytest.raises(ValueError, match="max_shard_bytes"):
        build_reference_cache(model, data, tmp_path, settings, max_shard_bytes=1000, overwrite=True)


def test_bad_arguments(tmp_path):
    gen, seed = generator()
    model, data = tiny_llama(seed), random_pairs(gen, 2)
    for kwargs, name in [
        ({"topk": -1}, "topk"),
        ({"hidden_dtype": "int8"}, "hidden_dtype"),
        ({"temperature": 0.0}, "temperature"),
        ({"topk": 0, "store_hidden": False, "store_label_logprob": False}, "store nothing"),
    ]:
        with pytest.raises(ValueError, match=name):
            CacheSettings(**kwargs)
    with pytest.raises(ValueError, match="topk"):
        build_reference_cache(model, data, tmp_path, CacheSettings(topk=VOCAB + 1))
    with pytest.raises(ValueError, match="data"):
        build_reference_cache(model, data.input_ids, tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        build_reference_cache(model, data, tmp_path, batch_size=0)
    build_reference_cache(model, data, tmp_path)
    cache = ReferenceCache(tmp_path, model=model, data=data)
    with pytest.raises(ValueError, match="indices"):
        cache.batch([2])


def test_jsonl_tokenisation_and_pretokenised_file(tmp_path):
    tokenizer = word_tokenizer()
    write_jsonl(tmp_path / "d.jsonl", [("w1 w2", "w3"), ("w4", "w5 w6 w7")])
    data = load_pairs(tmp_path / "d.jsonl", tokenizer, bos_token_id=1, eos_token_id=2)
    assert data.input_ids.tolist() == [[1, 5, 6, 7, 2, 0], [1, 8, 9, 10, 11, 2]]
    assert data.prompt_lengths.tolist() == [3, 2]
    assert data.labels().tolist()[0] == [-100, -100, 7, 2, -100, -100]
    save_pairs(data, tmp_path / "d.safetensors")
    again = load_pairs(tmp_path / "d.safetensors")
    assert again.content_sha256() == data.content_sha256()
    assert again.source_sha256 != data.source_sha256
    (tmp_path / "bad.jsonl").write_text('{"prompt": "w1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_pairs(tmp_path / "bad.jsonl", tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        load_pairs(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="no response token"):
        load_pairs(tmp_path / "d.jsonl", tokenizer, max_length=2)


def test_cli_builds_a_cache_from_jsonl(tmp_path, capsys):
    _, seed = generator()
    model = tiny_llama(seed)
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "d.jsonl", [("w1 w2", "w3 w4"), ("w5", "w6 w7 w8")] * 3)
    argv = [
        "cache",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--out",
        str(tmp_path / "c"),
        "--bos-id",
        "1",
        "--topk",
        "5",
        "--temperature",
        "2",
        "--shard-mib",
        "0.002",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_examples"] == 6 and summary["shards"] > 1
    tokenizer = word_tokenizer()
    data = load_pairs(tmp_path / "d.jsonl", tokenizer, bos_token_id=1)
    cache = ReferenceCache(
        tmp_path / "c", model=model, data=data, tokenizer=tokenizer, settings=SETTINGS
    )
    check_against(cache, direct_reference(model, data, 2.0), seed)
    assert main(argv) == 2  # exists already
    assert "already holds" in capsys.readouterr().err


def test_qlora_reference_cache_keeps_training_possible(tmp_path):
    gen, seed = generator()
    model = qlora_llama(tmp_path, seed)
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:  # as on a CPU with AVX512-BF16, where eval + no_grad repacks
        layer.support_avx512bf16_for_cpu = True
    data = random_pairs(gen, 4)
    with model.disable_adapter(), torch.no_grad():
        expected = direct_reference(model, data, SETTINGS.temperature)
    model.train()
    build_reference_cache(model, data, tmp_path / "c", SETTINGS)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    check_against(ReferenceCache(tmp_path / "c", model=model, data=data), expected, seed)
    assert model.training
    causal_lm_loss(model, data.input_ids, data.attention_mask, data.prompt_lengths).backward()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.grad is not None and p.grad.norm() > 0 for p in lora_params)
