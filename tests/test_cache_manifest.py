"""A reference cache that cannot be fooled: a cache rebuilt under an open reader, every
manifest field hand-edited, structural edits, and a tokenizer fingerprint that depends only on
what decides token ids."""

from __future__ import annotations

import copy
import json
from dataclasses import fields

import pytest
import torch
from hf_helpers import WORDS, hf_word_tokenizer, random_pairs, tiny_llama, word_tokenizer
from oracle import generator

import unlearn_kernels as uk
from unlearn_kernels.data import load_tokenizer
from unlearn_kernels.data.formats import tokenizer_sha256
from unlearn_kernels.train.reference_cache import (
    CacheSettings,
    ReferenceCache,
    build_reference_cache,
)

pytestmark = pytest.mark.hf
SETTINGS = CacheSettings(topk=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A three-shard cache with every fingerprint recorded, and the manifest it wrote."""
    gen, _ = generator()
    path = tmp_path_factory.mktemp("cache") / "c"
    model, data = tiny_llama(0), random_pairs(gen, 12)
    manifest = build_reference_cache(
        model,
        data,
        path,
        SETTINGS,
        tokenizer=word_tokenizer(),
        max_shard_bytes=3000,
        full_weight_hash=False,
    )
    assert len(manifest["shards"]) >= 3 and manifest["fingerprint"]["tokenizer"] is not None
    return path, json.loads((path / "manifest.json").read_text())


def with_manifest(path, tmp_path, manifest) -> object:
    """A copy of the cache at ``path`` whose manifest is ``manifest`` (any JSON value)."""
    copy_dir = tmp_path / "edited"
    copy_dir.mkdir(parents=True)
    for file in path.iterdir():
        if file.name != "manifest.json":
            (copy_dir / file.name).write_bytes(file.read_bytes())
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    return copy_dir


def read_everything(path) -> None:
    cache = ReferenceCache(path, model=None, data=None)
    for _ in cache.iter_batches(batch_size=2):
        pass


def leaves(value, prefix=""):
    """``(dotted path, value)`` of every leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{prefix}.{i}")
    else:
        yield prefix, value


def set_leaf(manifest, dotted, value):
    edited = copy.deepcopy(manifest)
    *parents, last = dotted.split(".")
    node = edited
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return edited


def other_value(dotted: str, value):
    """A different value of the same type (one a careless edit would produce)."""
    special = {
        "format": "unlearn-kernels/other",
        "settings.hidden_dtype": "bfloat16",
        "fingerprint.model.weights_hash": "full",
        "fingerprint.data.source_sha256": "ab" * 32,
    }
    if dotted in special:
        return special[dotted]
    if dotted.endswith(".file"):
        return "shard-00009.safetensors"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.0
    if isinstance(value, str):
        return ("1" if value[0] != "1" else "2") + value[1:]
    raise AssertionError(f"no edit for {dotted}={value!r}")


#: Fields that only describe the build: checked for type and range, read by nothing.
INFORMATIONAL = ("max_shard_bytes", "peak_buffered_bytes", "build_seconds")


def test_every_manifest_field_edit_is_refused_naming_the_field(built, tmp_path):
    path, manifest = built
    paths = [p for p, _ in leaves(manifest)]
    assert "fingerprint.tokenizer" in paths and "shards.2.sha256" in paths
    for i, (dotted, value) in enumerate(leaves(manifest)):
        edited = set_leaf(manifest, dotted, other_value(dotted, value))
        target = with_manifest(path, tmp_path / str(i), edited)
        if dotted in INFORMATIONAL:
            read_everything(target)  # a valid edit changes nothing that is read
            invalid = set_leaf(manifest, dotted, -1)
            target = with_manifest(path, tmp_path / f"{i}-invalid", invalid)
        with pytest.raises(ValueError, match=rf"field {dotted.replace('.', '[.]')}\b"):
            read_everything(target)


def test_structural_edits_are_value_errors_naming_the_field(built, tmp_path):
    path, manifest = built
    cases = [
        ([manifest], "top level"),
        ({k: v for k, v in manifest.items() if k != "hidden_size"}, "field hidden_size"),
        (set_leaf(manifest, "settings", {**manifest["settings"], "extra": 1}), "settings.extra"),
        ({**manifest, "unknown": 1}, "field unknown"),
        (set_leaf(manifest, "settings.topk", "4"), "field settings.topk"),
        (set_leaf(manifest, "settings.topk", True), "field settings.topk"),
        (set_leaf(manifest, "n_examples", 5), "field n_examples"),
        (set_leaf(manifest, "fingerprint.tokenizer", None), "field fingerprint.tokenizer"),
        (set_leaf(manifest, "fingerprint", None), "field fingerprint"),
        (set_leaf(manifest, "shards", manifest["shards"][::-1]), "field shards.0.file"),
        (set_leaf(manifest, "shards", manifest["shards"][:-1]), "field shards"),
        (set_leaf(manifest, "shards", []), "field shards"),
        (set_leaf(manifest, "shards.0", "shard-00000.safetensors"), "field shards.0"),
        (set_leaf(manifest, "shards.0.file", "/etc/passwd"), "field shards.0.file"),
        (set_leaf(manifest, "shards.1.file", "../c/shard-00001.safetensors"), "shards.1.file"),
        (set_leaf(manifest, "version", 1), "field version"),
    ]
    for i, (edited, word) in enumerate(cases):
        target = with_manifest(path, tmp_path / str(i), edited)
        with pytest.raises(ValueError, match=word):
            read_everything(target)
    target = with_manifest(path, tmp_path / "text", manifest)
    (target / "manifest.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ReferenceCache(target, model=None, data=None)


def test_settings_record_mirrors_cache_settings():
    from unlearn_kernels.train.cache_manifest import Manifest, SettingsRecord

    assert list(SettingsRecord.model_fields) == [f.name for f in fields(CacheSettings)]
    assert set(Manifest.model_fields) >= {"settings", "fingerprint", "shards", "build_id"}


@pytest.mark.parametrize("same_model", [False, True])
def test_cache_rebuilt_under_an_open_reader_is_refused(tmp_path, same_model):
    """A reader that has verified and read shards must not serve the rows of a cache rebuilt
    at its path (even one rebuilt from the same inputs: a new build)."""
    gen, _ = generator()
    data = random_pairs(gen, 6)
    model = tiny_llama(1)
    build_reference_cache(model, data, tmp_path, SETTINGS, max_shard_bytes=4 * 1024)
    reader = ReferenceCache(tmp_path, model=model, data=data)
    before = reader.batch(range(6))  # every shard verified, every row offset read
    other = model if same_model else tiny_llama(2)
    build_reference_cache(other, data, tmp_path, SETTINGS, max_shard_bytes=4 * 1024, overwrite=True)
    for read in (lambda: reader.batch([0]), lambda: next(reader.iter_batches(batch_size=6))):
        with pytest.raises(ValueError, match="rebuilt since it was opened"):
            read()
    fresh = uk.ReferenceCache.open(tmp_path).batch(range(6))
    assert torch.equal(fresh.label, before.label)
    assert same_model == torch.equal(fresh.hidden, before.hidden)


def test_tokenizer_fingerprint_depends_only_on_token_ids(tmp_path):
    """The same tokenizer from its ``tokenizer.json`` and from its HF directory, and after a
    truncating/padding call, has one fingerprint; vocabulary, added tokens and normaliser
    changes give another."""
    hf = hf_word_tokenizer()
    hf.save_pretrained(tmp_path / "hf")
    from_dir = load_tokenizer(tmp_path / "hf")
    from_file = load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    reference = tokenizer_sha256(from_file)
    assert tokenizer_sha256(from_dir) == reference
    from_dir(["w1 w2 w3", "w4"], truncation=True, max_length=2, padding="max_length")
    from_file.enable_truncation(3)
    from_file.enable_padding(pad_id=0, pad_token="[PAD]", length=8)
    from tokenizers import decoders, processors

    from_file.decoder = decoders.WordPiece()
    from_file.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    assert tokenizer_sha256(from_dir) == reference
    assert tokenizer_sha256(from_file) == reference
    # what does change token ids changes the fingerprint
    from tokenizers import normalizers

    changed = load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    changed.normalizer = normalizers.Lowercase()
    added = load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    added.add_tokens(["w1w2"])
    renumbered = hf_word_tokenizer([*WORDS[:10], "w99", *WORDS[10:]])
    for other in (changed, added, renumbered):
        assert tokenizer_sha256(other) != reference


def test_cache_opens_with_the_other_tokenizer_loader(tmp_path):
    """A cache built with the HF directory's tokenizer opens with its tokenizer.json (and
    after a padding call), and is refused for a tokenizer that maps text otherwise."""
    gen, _ = generator()
    model, data = tiny_llama(3), random_pairs(gen, 3)
    hf = hf_word_tokenizer()
    hf.save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    build_reference_cache(model, data, tmp_path / "c", SETTINGS, tokenizer=tokenizer)
    tokenizer(["w5 w6"], padding="max_length", max_length=4, truncation=True)
    for tok in (tokenizer, load_tokenizer(tmp_path / "tok" / "tokenizer.json")):
        ReferenceCache(tmp_path / "c", model=None, data=data, tokenizer=tok)
    with pytest.raises(ValueError, match="mismatched: tokenizer"):
        ReferenceCache(tmp_path / "c", model=None, data=data, tokenizer=word_tokenizer())
