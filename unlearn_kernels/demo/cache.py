"""Where the demo keeps what it reuses: the world directory (TOFU files, run JSONL, tokenizer)
and the base models, each under ``cache_dir`` by a key of the settings that made it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_kernels.demo.base import BaseSettings, cached_model, model_key
from unlearn_kernels.demo.tokenizer import train_tokenizer, world_texts
from unlearn_kernels.demo.world import (
    RETAIN_OF,
    World,
    WorldSettings,
    generate_world,
    training_pairs,
    world_files,
    write_world,
)

TOKENIZER_DIR = "tokenizer"


@dataclass
class WorldDir:
    """A written world: its directory, the world itself and its tokenizer."""

    path: Path
    world: World
    tokenizer: Any

    def jsonl(self, split: str) -> Path:
        return self.path / f"{split}.jsonl"


def prepare_world(settings: WorldSettings, cache_dir: Path) -> WorldDir:
    """Generate the world, and write it with its tokenizer to ``cache_dir/world-<key>`` unless
    it is there already."""
    from transformers import AutoTokenizer

    world = generate_world(settings)
    path = Path(cache_dir) / f"world-{settings.key()}"
    if not (path / TOKENIZER_DIR / "tokenizer.json").is_file():
        files = world_files(world)
        tokenizer = train_tokenizer(world_texts(files))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_world(world, path, lambda tmp: tokenizer.save_pretrained(tmp / TOKENIZER_DIR))
        except ValueError:
            if not (path / TOKENIZER_DIR / "tokenizer.json").is_file():
                raise
    tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR), local_files_only=True)
    return WorldDir(path, world, tokenizer)


def base_model(
    world: WorldDir,
    which: str,
    settings: BaseSettings,
    cache_dir: Path,
    *,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """The cached (or newly trained) base model: ``which`` is ``"target"`` (every trained author)
    or a retain split (``"retain95"``: the retain-only model of forget05)."""
    if which != "target" and which not in RETAIN_OF.values():
        raise ValueError(f"which must be 'target' or one of {sorted(RETAIN_OF.values())}")
    pairs = training_pairs(world.world, None if which == "target" else which)
    key = model_key(pairs, world.tokenizer, settings)
    return cached_model(
        Path(cache_dir) / f"model-{which}-{key}",
        pairs,
        world.tokenizer,
        settings,
        desc=f"train {which} model",
        progress=progress,
    )
