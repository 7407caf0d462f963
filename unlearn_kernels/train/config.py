"""The run config (docs/methods.md) as a typed schema: YAML in, validated before anything loads.

Every section rejects unknown keys; a wrong type, an out-of-range value or an inconsistent
combination is a ``ValueError`` naming the key path (``train.lr: ...``). The ``method:`` section
is the registered method's own parameter model, chosen by ``method.name``
(:data:`unlearn_kernels.methods.METHODS`). :func:`default_config_yaml` prints a complete,
commented config for one method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unlearn_kernels.methods import METHODS

MethodConfig = Annotated[
    Union[tuple(cls.Params for cls in METHODS.values())],  # noqa: UP007 (built at run time)
    Field(discriminator="name", description="the unlearning method and its own keys"),
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    forget: str = Field(description='JSONL of the forget set: one {"prompt", "response"} per line')
    retain: str | None = Field(None, description="JSONL of the retain (normal) set")
    max_length: int = Field(512, ge=2, description="cut examples to this many tokens")
    chat_template: bool = Field(False, description="render prompts with the tokenizer's template")
    add_bos: bool = Field(True, description="put the tokenizer's (or model's) BOS before prompts")
    add_eos: bool = Field(True, description="put the tokenizer's (or model's) EOS after responses")


class AdapterConfig(Section):
    kind: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora | qlora (nf4 base via bitsandbytes) | full fine-tuning"
    )
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="modules that get LoRA: all-linear (not lm_head) or names"
    )
    merge: bool = Field(False, description="also write the adapter merged into the base weights")


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per set per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step")
    lr: float = Field(1.0e-4, gt=0, description="learning rate (NGDiff with GeN: the initial one)")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = Field(
        "adamw", description="adamw | adamw8bit | paged_adamw8bit (the last two: bitsandbytes)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant | cosine (to 0 at the last step), after the warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the step's gradient norm")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="model dtype")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda if any)")
    seed: int = Field(0, description="seed of the LoRA init, the data order and dropout")
    shuffle: bool = Field(True, description="shuffle each pass over a set")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0: none)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the newest)")
    eval_every: int = Field(
        0, ge=0, description="steps between answer-probability probes (0: none)"
    )
    eval_examples: int = Field(
        32, ge=1, description="examples of each set the built-in probe scores"
    )
    loss: Literal["fused", "unfused"] = Field(
        "fused", description="fused ops, or the model's own logits and labels= loss (to compare)"
    )
    backend: Literal["torch", "cpu", "triton"] | None = Field(
        None, description="kernel backend (default: by device)"
    )
    chunk_size: int | None = Field(None, ge=1, description="rows of logits per chunk")


class ReferenceConfig(Section):
    kind: Literal["hidden", "topk"] = Field(
        "hidden", description="KL reference cache: hidden states (exact) | topk (compressed)"
    )
    topk: int = Field(32, ge=1, description="log-probs kept per token with kind: topk")
    hidden_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of cached hidden states"
    )
    path: str | None = Field(None, description="cache directory (default: output_dir/reference)")
    batch_size: int = Field(8, ge=1, description="examples per reference forward pass")
    full_weight_hash: bool = Field(
        True, description="fingerprint every weight byte (else a sample)"
    )


class RunConfig(Section):
    model: str = Field(description="Hugging Face model directory (local)")
    tokenizer: str | None = Field(None, description="tokenizer directory or file (default: model)")
    data: DataConfig
    method: MethodConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    reference: ReferenceConfig = ReferenceConfig()
    output_dir: str = Field(description="where metrics, checkpoints and the adapter go")

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        from unlearn_kernels.methods import get_method

        needs = get_method(self.method.name)(self.method).needs()
        if needs.retain and self.data.retain is None:
            raise ValueError(f"data.retain: method {self.method.name!r} needs a retain set")
        gen = getattr(self.method, "gen", False)
        if gen and (self.train.schedule != "constant" or self.train.warmup_steps):
            raise ValueError(
                "train.schedule: NGDiff's GeN sets the learning rate itself; use schedule: "
                "constant and warmup_steps: 0, or method.gen: false"
            )
        if self.adapter.merge and self.adapter.kind != "lora":
            raise ValueError(
                f"adapter.merge: only a LoRA adapter over unquantised weights can be merged "
                f"(kind is {self.adapter.kind!r})"
            )
        return self

    @property
    def reference_dir(self) -> Path:
        return Path(self.reference.path or Path(self.output_dir) / "reference")


def _key_path(loc: tuple[Any, ...], tree: dict[str, Any]) -> str:
    """``('method', 'ngdiff', 'eps')`` → ``method.eps``: the union's tag is not a key."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "method" and parts[1] in METHODS:
        del parts[1]
    return ".".join(parts)


def validate_config(tree: Any) -> RunConfig:
    """A :class:`RunConfig` from a parsed YAML tree; errors name every bad key."""
    if not isinstance(tree, dict):
        raise ValueError(f"config must be a mapping of keys, got {type(tree).__name__}")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            message = e["msg"].removeprefix("Value error, ")
            key = _key_path(e["loc"], tree)
            problems.append(f"{key}: {message}" if key else message)
        raise ValueError("config: " + "; ".join(problems)) from None


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``--set a.b=value``: ``value`` is parsed as YAML; missing sections are created."""
    key, sep, text = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set expects key.path=value, got {assignment!r}")
    *sections, leaf = key.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {assignment}: the value is not valid YAML ({err})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (``None``: start from nothing) and apply ``--set`` overrides."""
    tree: Any = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"--config {str(path)!r} cannot be read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"--config {path}: must hold a mapping of keys")
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate_config(tree)


def check_paths(config: RunConfig) -> None:
    """The files the config names exist (checked before anything loads)."""
    if not (Path(config.model) / "config.json").is_file():
        raise ValueError(f"model: {config.model!r} is not a local Hugging Face model directory")
    if config.tokenizer is not None and not Path(config.tokenizer).exists():
        raise ValueError(f"tokenizer: {config.tokenizer!r} does not exist")
    for key in ("forget", "retain"):
        path = getattr(config.data, key)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"data.{key}: {path!r} is not a file")


def config_yaml(config: RunConfig) -> str:
    """``config`` as YAML, every key written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


_PLACEHOLDERS = {
    "model": "path/to/local/causal-lm",
    "data.forget": "forget.jsonl",
    "data.retain": "retain.jsonl",
}


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def default_config_yaml(method: str) -> str:
    """A complete config for ``method`` with every default, each key commented."""
    from unlearn_kernels.methods import get_method

    params = get_method(method).Params
    lines = [f"# unlearn-kernels run config for method {method!r}: every key at its default."]
    lines += ["# Point model and data at real files, then: unlearn-kernels run --config FILE", ""]

    def emit(model: type[BaseModel], prefix: str, indent: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = params if key == "method" else field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                comment = "" if key == "method" else f"  # {field.description or ''}".rstrip()
                lines.append(f"{indent}{name}:{comment if comment.strip(' #') else ''}")
                emit(annotation, f"{key}.", indent + "  ")
                continue
            if key in _PLACEHOLDERS:
                value = _PLACEHOLDERS[key]
            elif key == "output_dir":
                value = f"runs/{method}"
            else:
                value = field.default
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{indent}{name}: {_yaml_scalar(value)}{comment}")

    emit(RunConfig, "", "")
    return "\n".join(lines) + "\n"
