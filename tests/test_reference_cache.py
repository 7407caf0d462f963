"""Reference cache: round trip against a direct reference forward, PEFT adapters disabled,
fingerprint and integrity failures, and streamed building/reading within a memory budget."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from hf_helpers import (
    VOCAB,
    WORDS,
    hf_word_tokenizer,
    lora,
    qlora_model,
    random_pairs,
    tiny_llama,
    word_tokenizer,
)
from oracle import generator, rel_err

import unlearn_kernels as uk
from unlearn_kernels import cli
from unlearn_kernels.cli import main
from unlearn_kernels.data import TokenizedPairs, load_pairs, load_tokenizer, save_pairs
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


def direct_reference(
    model: torch.nn.Module, data: TokenizedPairs, temperature: float, topk: int = SETTINGS.topk
) -> dict:
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
    top, index = (logits / temperature).log_softmax(-1).topk(topk, dim=1)
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
    # the checks are skipped only when asked: ReferenceCache(path) alone names what is missing
    with pytest.raises(ValueError, match=r"^model: .*model=None .*ReferenceCache.open"):
        ReferenceCache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"^data: .*data=None"):
        ReferenceCache(tmp_path / "c", model=model)
    assert len(ReferenceCache(tmp_path / "c", model=model, data=None)) == len(data)


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
    """A bare tokenizer.json has no BOS/EOS of its own: the model config's are used."""
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
        "--eos-id",
        "none",
        "--topk",
        "5",
        "--temperature",
        "2",
        "--shard-mib",
        "0.002",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_examples"] == 6 and summary["shards"] > 1
    assert (summary["bos_token_id"], summary["eos_token_id"]) == (model.config.bos_token_id, None)
    assert summary["seconds"] >= summary["build_seconds"] > 0
    tokenizer = word_tokenizer()
    data = load_pairs(tmp_path / "d.jsonl", tokenizer, bos_token_id=model.config.bos_token_id)
    cache = ReferenceCache(
        tmp_path / "c", model=model, data=data, tokenizer=tokenizer, settings=SETTINGS
    )
    check_against(cache, direct_reference(model, data, 2.0), seed)
    assert main(argv) == 2  # exists already
    assert "--out" in (err := capsys.readouterr().err) and "--overwrite" in err


def local_llama(tmp_path, seed: int):
    """A tiny Llama saved with a Hugging Face tokenizer in one directory. The config's BOS/EOS
    (3, 3) differ from the tokenizer's ([BOS] 1, [EOS] 2), so defaults show their source."""
    model = tiny_llama(seed, bos_token_id=3, eos_token_id=3)
    with torch.no_grad():  # logits of order 5, not the random init's 0.1: a peaked reference
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(tmp_path / "llama")
    hf_word_tokenizer().save_pretrained(tmp_path / "llama")
    pairs = [("w1 w2", "w3 w4"), ("w5", "w6 w7 w8"), ("w9 w10 w11", "w12")] * 2
    write_jsonl(tmp_path / "d.jsonl", pairs)
    return model, tmp_path / "llama", tmp_path / "d.jsonl"


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def test_cli_default_flags_match_a_retokenised_dataset(tmp_path, capsys):
    """Default flags: the tokenizer comes from --model, with its own BOS/EOS; the cache opens
    for the data set tokenised again that way, and holds the model's reference."""
    _, seed = generator()
    model, model_dir, jsonl = local_llama(tmp_path, seed)
    argv = ["cache", "--model", str(model_dir), "--data", str(jsonl), "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["bos_token_id"], summary["eos_token_id"]) == (1, 2)
    for tokenizer in (load_tokenizer(model_dir), load_tokenizer(model_dir / "tokenizer.json")):
        data = load_pairs(jsonl, load_tokenizer(model_dir), bos_token_id=1, eos_token_id=2)
        cache = uk.ReferenceCache(
            tmp_path / "c", model=model, data=data, tokenizer=tokenizer, settings=CacheSettings()
        )
    assert (
        data.input_ids[0, 0] == 1 and data.input_ids[0, int(data.attention_mask[0].sum()) - 1] == 2
    )
    check = cache.batch(range(len(cache)))
    expected = direct_reference(model, data, 1.0, topk=32)
    assert torch.equal(check.label, expected["label"]), seed
    assert rel_err(check.hidden, expected["hidden"]) < TOL, seed


@pytest.mark.parametrize("placement", [["--device", "cpu"], ["--device-map", "cpu"]])
def test_cli_topk_with_full_vocabulary_equals_exact_kl(tmp_path, capsys, placement):
    """k = V from the cache, straight into fused_linear_kl_topk as padded [B, T, k] tensors,
    gives the exact KL against the cached hidden states (every reduction)."""
    _, seed = generator()
    reference, model_dir, jsonl = local_llama(tmp_path, seed)
    out = tmp_path / "c"
    argv = ["cache", "--model", str(model_dir), "--data", str(jsonl), "--out", str(out)]
    assert main([*argv, "--topk", str(VOCAB), *placement]) == 0
    capsys.readouterr()
    tokenizer = load_tokenizer(model_dir)
    data = load_pairs(jsonl, tokenizer, bos_token_id=1, eos_token_id=2)
    cache = uk.ReferenceCache(tmp_path / "c", model=reference, data=data, tokenizer=tokenizer)
    student = tiny_llama(seed + 1)  # another model: a KL of order 1
    picked = [4, 1, 2]
    batch, sub = cache.batch(picked), data.select(picked)
    labels = sub.labels()
    hidden = final_hidden_states(student, sub.input_ids, sub.attention_mask)
    weight = reference.lm_head.weight.detach()
    padded = {
        name: batch.to_padded(name, labels)
        for name in ("hidden", "topk_index", "topk_logprob", "tail_logprob")
    }
    assert bool((padded["topk_index"][labels == -100] == 0).all())  # padding rows: zeros
    for reduction in ("mean", "sum", "none"):
        exact = uk.fused_linear_kl(
            hidden, weight, padded["hidden"], labels=labels, reduction=reduction
        )
        topk = uk.fused_linear_kl_topk(
            hidden,
            weight,
            padded["topk_index"],
            padded["topk_logprob"],
            padded["tail_logprob"],
            labels=labels,
            reduction=reduction,
        )
        assert float(exact.abs().max()) > 0.1
        assert rel_err(topk, exact) < 1e-5, (reduction, seed)
        g_exact = torch.autograd.grad(exact.sum(), hidden, retain_graph=True)[0]
        g_topk = torch.autograd.grad(topk.sum(), hidden, retain_graph=True)[0]
        assert rel_err(g_topk, g_exact) < 1e-5, (reduction, seed)


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),
    (["--topk", "-1"], "--topk"),
    (["--topk", str(VOCAB + 1)], "--topk"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--shard-mib", "0"], "--shard-mib"),
    (["--shard-mib", "1e-9"], "--shard-mib"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--max-length", "1"], "--max-length"),
    (["--bos-id", "-2"], "--bos-id"),
    (["--eos-id", "x"], "--eos-id"),
    (["--device", "nonsense"], "--device"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:0"], "--device"),
    (["--device", "cpu", "--device-map", "auto"], "--device-map"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "--tokenizer"),
    (["--hidden-dtype", "int8"], "--hidden-dtype"),
]


@pytest.mark.parametrize(("extra", "flag"), BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_cli_checks_every_flag_before_loading(tmp_path, capsys, monkeypatch, extra, flag):
    """A bad flag is an exit status 2 naming the flag, before any model or tokenizer is loaded,
    and leaves no directory behind."""
    if flag == "--device" and extra[1] == "cuda:0" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, model_dir, jsonl = local_llama(tmp_path, 0)

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before every flag was checked")

    monkeypatch.setattr(cli, "_load_model", refuse)
    monkeypatch.setattr("unlearn_kernels.data.formats.load_tokenizer", refuse)
    out = tmp_path / "deep" / "c"
    argv = ["cache", "--model", str(model_dir), "--data", str(jsonl), "--out", str(out)]
    assert run_cli([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert flag in err, err
    assert "=" not in err.split("error:")[-1].split(flag)[0], err  # no Python argument names
    assert not (tmp_path / "deep").exists()


def test_cli_checks_shard_size_against_the_data_before_loading(tmp_path, capsys, monkeypatch):
    """A shard smaller than the largest example is refused before the model loads, naming
    --shard-mib, and leaves no directory; one just large enough builds."""
    _, model_dir, jsonl = local_llama(tmp_path, 0)
    real = cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "deep" / "c"
    argv = ["cache", "--model", str(model_dir), "--data", str(jsonl), "--out", str(out)]
    assert run_cli([*argv, "--shard-mib", "0.0001"]) == 2
    assert "--shard-mib 0.0001" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()
    monkeypatch.setattr(cli, "_load_model", real)
    settings = CacheSettings(topk=4)
    tokenizer = load_tokenizer(model_dir)
    data = load_pairs(jsonl, tokenizer, bos_token_id=1, eos_token_id=2)
    rows = int((data.labels() != -100).sum(1).max())
    exact = rc.example_record_bytes(rows, tiny_llama(0).config.hidden_size, settings)
    assert main([*argv, "--topk", "4", "--shard-mib", str(exact / 2**20)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert max(s["tensor_bytes"] for s in manifest["shards"]) == exact  # the largest, alone


def test_cli_checks_paths_before_loading(tmp_path, capsys, monkeypatch):
    _, model_dir, jsonl = local_llama(tmp_path, 0)
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    base = {"--model": str(model_dir), "--data": str(jsonl), "--out": str(tmp_path / "c")}
    for override, flag in [
        ({"--model": str(tmp_path)}, "--model"),
        ({"--data": str(tmp_path / "none.jsonl")}, "--data"),
        ({"--data": str(tmp_path / "d.txt")}, "--data"),
        ({"--out": str(tmp_path / "file")}, "--out"),
        ({"--model": str(tmp_path / "bare")}, "--tokenizer"),  # .jsonl and no tokenizer
    ]:
        argv = ["cache", *[x for kv in {**base, **override}.items() for x in kv]]
        assert run_cli(argv) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_progress_bars_and_honest_build_time(tmp_path, capsys, monkeypatch):
    """``progress`` shows the weight hash and the reference pass; ``build_seconds`` covers the
    whole build, fingerprinting included."""
    gen, _ = generator()
    model, data = tiny_llama(0), random_pairs(gen, 5)
    real = rc.model_fingerprint

    def slow_fingerprint(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(rc, "model_fingerprint", slow_fingerprint)
    manifest = build_reference_cache(model, data, tmp_path / "c", SETTINGS, progress=True)
    err = capsys.readouterr().err
    assert "hashing weights" in err and "reference pass" in err and "5/5" in err
    assert manifest["build_seconds"] >= 0.3
    build_reference_cache(model, data, tmp_path / "q", SETTINGS)
    assert capsys.readouterr().err == ""


def test_bad_arguments_leave_no_directory(tmp_path):
    gen, _ = generator()
    model, data = tiny_llama(0), random_pairs(gen, 2)
    for kwargs in (
        {"batch_size": 0},
        {"chunk_size": 0},
        {"max_shard_bytes": 0},
        {"max_shard_bytes": 100},  # below one example's record
        {"settings": CacheSettings(topk=VOCAB + 1)},
        {"settings": {"topk": 3}},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            build_reference_cache(model, data, tmp_path / "x" / "c", **kwargs)
        assert not (tmp_path / "x").exists()


def test_qlora_reference_cache_keeps_training_possible(tmp_path):
    gen, seed = generator()
    model = qlora_model(tmp_path, seed)
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
