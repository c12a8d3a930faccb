"""The run's settings: one dataclass whose field help is the CLI help, parsed by HfArgumentParser.

`parse_args` reads `--config YAML` (default: the embedded MiniLM run), then every field given on the
command line overrides it: `--layers 1 3 --lr 3e-4 --ks 32`. Values are checked before anything
is loaded or written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser

from hub_sae.activations import check_layers
from hub_sae.data import DataConfig, token_batches
from hub_sae.masking import Corruption, check_policy, check_selects
from hub_sae.models import BaseModel

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "minilm-mask.yaml"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DISTRIBUTE = ("modules", "replicate")
DTYPES = ("float32", "bfloat16", "float16")
SAE_AUTOCAST = ("no", "bfloat16")
CHECKPOINTS, LOGS = "checkpoints", "logs"
RESERVED_NAMES = (CHECKPOINTS, LOGS)
"""Folders the trainer itself keeps in OUTPUT_DIR (its temp folders and locks start with '.')."""


@dataclass
class TrainConfig:
    name: str = field(
        default="minilm-mask",
        metadata={
            "help": "run name (letters, digits, . _ -; not checkpoints or logs): the suite goes "
            "to OUTPUT_DIR/NAME/"
        },
    )
    model: str = field(
        default="minilm",
        metadata={"help": "'minilm' (embedded), a LLaDA checkpoint, or any HF model"},
    )
    dtype: str = field(
        default="float32", metadata={"help": "base-model dtype: float32, bfloat16 or float16"}
    )
    layers: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5],
        metadata={"help": "blocks whose resid_post is hooked, e.g. --layers 1 3"},
    )
    policy: str = field(
        default="mask",
        metadata={
            "help": "positions kept: mask, unmask, all or clean (autoregressive models: clean only)"
        },
    )
    schedule: str = field(
        default="dlm_scope",
        metadata={"help": "corruption: dlm_scope (p ~ U[t_min, t_max] per batch) or llada"},
    )
    t_min: float = 0.05
    t_max: float = 0.50
    corpus: str = field(
        default="pydoc",
        metadata={"help": "'pydoc' (embedded), a .txt/.jsonl file or folder, or an HF dataset"},
    )
    text_field: str = "text"
    ctx_len: int = 128
    llm_batch_size: int = 8
    expansion_factor: int = field(
        default=8, metadata={"help": "d_sae = expansion_factor * d_model (unless d_sae is set)"}
    )
    d_sae: int | None = None
    ks: list[int] = field(
        default_factory=lambda: [32], metadata={"help": "one SAE per k per layer, e.g. --ks 32 64"}
    )
    total_tokens: int = field(
        default=300_000, metadata={"help": "activations each SAE trains on (all processes)"}
    )
    sae_batch_size: int = field(
        default=1024, metadata={"help": "activations per SAE step on each process"}
    )
    buffer_tokens: int = field(
        default=16_384, metadata={"help": "shuffle buffer size, in activations per process"}
    )
    reuse_activations: int = field(
        default=1,
        metadata={
            "help": "times each harvested activation is used: >1 keeps them in memory and replays "
            "them reshuffled; for small corpora"
        },
    )
    distribute: str | None = field(
        default=None,
        metadata={
            "help": "modules: each process trains its own share of the SAEs on everyone's "
            "activations; replicate: every process holds every SAE (DDP). Default: modules "
            "with more than one process"
        },
    )
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    decay_fraction: float = field(
        default=0.2, metadata={"help": "linear decay to 0 over this last share of steps"}
    )
    grad_clip: float = 1.0
    sae_autocast: str = field(
        default="no",
        metadata={
            "help": "no or bfloat16: run the SAE step's GEMMs under torch.autocast in bfloat16; "
            "weights, gradients, Adam and the losses stay float32 (the SAE-side option: "
            "accelerate's --mixed_precision is refused)"
        },
    )
    auxk_alpha: float = 1 / 32
    k_aux: int | None = field(
        default=None, metadata={"help": "AuxK latents (default d_model // 2)"}
    )
    dead_tokens: int = field(
        default=50_000, metadata={"help": "a latent not firing for this many tokens is dead"}
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "steps between checkpoints (0: none)"}
    )
    eval_tokens: int = field(
        default=65_536, metadata={"help": "held-out activations for the final metrics"}
    )
    eval_corpus: str | None = field(
        default=None, metadata={"help": "held-out corpus (default: corpus)"}
    )
    eval_split: str = field(
        default="heldout",
        metadata={
            "help": "its split: 'heldout' for pydoc and local files, e.g. 'test' for HF datasets"
        },
    )
    feature_tokens: int = field(
        default=32_768,
        metadata={
            "help": "training activations scanned for the feature statistics (features.safetensors; 0: skip)"
        },
    )
    output_dir: str = "runs"
    seed: int = 0
    log_every: int = 10
    log_with: list[str] = field(
        default_factory=list, metadata={"help": "accelerate trackers: tensorboard, wandb"}
    )

    def __post_init__(self) -> None:
        """Types and ranges of every field (YAML and Python callers skip argparse's checks)."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if not RUN_NAME.fullmatch(self.name):
            raise ValueError(
                f"--name {self.name!r}: a run name is letters, digits, '.', '_' and '-', starting "
                "with a letter or digit (no '/'); e.g. --name minilm-mask"
            )
        if self.name.lower() in RESERVED_NAMES:
            raise ValueError(
                f"--name {self.name!r} is reserved: the trainer keeps OUTPUT_DIR/{self.name.lower()}/ "
                f"for every run ({', '.join(RESERVED_NAMES)} are taken); pick another, e.g. "
                f"--name {self.name}-run"
            )
        positive = ("total_tokens", "sae_batch_size", "buffer_tokens", "ctx_len", "llm_batch_size")
        for name in (
            *positive,
            "eval_tokens",
            "reuse_activations",
            "log_every",
            "expansion_factor",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1; got {getattr(self, name)}.")
        if self.total_tokens < self.sae_batch_size:
            raise ValueError(
                f"--total_tokens {self.total_tokens} is less than one SAE batch "
                f"(--sae_batch_size {self.sae_batch_size}); raise total_tokens."
            )
        if self.dead_tokens < self.sae_batch_size:
            raise ValueError(
                f"--dead_tokens {self.dead_tokens} is less than one SAE batch (--sae_batch_size "
                f"{self.sae_batch_size}): every latent missing a single step would count as dead; "
                "raise it (e.g. --dead_tokens 50000)."
            )
        if self.buffer_tokens < 2 * self.sae_batch_size:
            raise ValueError(
                f"--buffer_tokens ({self.buffer_tokens}) must be >= 2 * --sae_batch_size "
                f"({self.sae_batch_size})."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}.")
        if self.sae_autocast not in SAE_AUTOCAST:
            raise ValueError(f"--sae_autocast must be no or bfloat16; got {self.sae_autocast!r}.")
        if self.distribute not in (None, *DISTRIBUTE):
            raise ValueError(f"--distribute must be modules or replicate; got {self.distribute!r}.")
        if not self.layers or not self.ks:
            raise ValueError("--layers and --ks each need at least one value, e.g. --ks 32.")
        for name in ("layers", "ks"):
            values = getattr(self, name)
            if len(set(values)) < len(values):
                raise ValueError(f"--{name} repeats a value: {values}; give each one once.")
        counts = (
            "warmup_steps",
            "checkpoint_every",
            "feature_tokens",
        )
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be 0 or more; got {getattr(self, name)}.")
        for name in ("lr", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(
                    f"--{name} must be a positive finite number; got {getattr(self, name)}."
                )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must lie in [0, 1); got {getattr(self, name)}.")
        if not 0 <= self.auxk_alpha < math.inf:
            raise ValueError(
                f"--auxk_alpha must be 0 or a positive finite number; got {self.auxk_alpha}."
            )
        for name in ("k_aux", "d_sae"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"--{name} must be at least 1 (or unset); got {getattr(self, name)}."
                )
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"--decay_fraction must lie in [0, 1]; got {self.decay_fraction}.")
        check_selects(self.policy, self.corruption)  # also checks the policy and the schedule

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        data = read_yaml(path)
        data.update(overrides)
        return cls(**data)

    def check(self, base: BaseModel) -> None:
        """What needs the base model; stops with a clear message before anything is written."""
        check_policy(self.policy, base.family)  # the family's policies (post_init: the rest)
        check_layers(base, self.layers)
        d_sae = self.latents(base.d_model)
        if any(not 0 < k < d_sae for k in self.ks):
            raise ValueError(f"every k must satisfy 0 < k < d_sae={d_sae}; got ks={self.ks}.")
        if self.ctx_len > base.max_length:
            raise ValueError(
                f"ctx_len {self.ctx_len} exceeds {self.model}'s maximum of {base.max_length} tokens."
            )
        for split in ("train", "heldout"):  # a missing corpus or a split short of one batch
            data = self.data(split)
            batches = token_batches(data, base.tokenizer, base.bos_token_id, base.eos_token_id)
            if next(batches, None) is None:
                option = "--corpus" if split == "train" else "--eval_corpus"
                raise ValueError(
                    f"the {data.split!r} split of {data.corpus!r} holds fewer than one LLM batch "
                    f"({self.llm_batch_size} x {self.ctx_len} tokens); give {option} more text, "
                    "or lower --llm_batch_size or --ctx_len."
                )

    def latents(self, d_model: int) -> int:
        return self.d_sae or self.expansion_factor * d_model

    def mode(self, processes: int) -> str:
        """The distribute mode of a run on `processes` processes (one process: no difference)."""
        return self.distribute or ("modules" if processes > 1 else "replicate")

    def data(self, split: str = "train", seed: int | None = None) -> DataConfig:
        """The training text, or with split="heldout" the evaluation text."""
        heldout = split == "heldout"
        return DataConfig(
            corpus=(self.eval_corpus or self.corpus) if heldout else self.corpus,
            split=self.eval_split if heldout else split,
            text_field=self.text_field,
            ctx_len=self.ctx_len,
            batch_size=self.llm_batch_size,
            seed=self.seed if seed is None else seed,
        )

    @property
    def corruption(self) -> Corruption:
        return Corruption(self.schedule, self.t_min, self.t_max)


@dataclass
class LaunchOptions:
    """What the command line adds to a TrainConfig."""

    config: str = field(default=str(DEFAULT_CONFIG), metadata={"help": "YAML file of the fields"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue from the newest checkpoint of this run; optimizer, schedule, loss, "
            "logging and evaluation settings may change, a change of what shapes the SAEs, the "
            "step count or the data is refused"
        },
    )
    plan: bool = field(
        default=False,
        metadata={"help": "print the memory and communication plan and exit (loads nothing)"},
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "processes to plan for (default: this launch's)"}
    )
    json: bool = field(default=False, metadata={"help": "with --plan: print one JSON object"})


def read_yaml(path: str | Path) -> dict:
    """A config file's fields; unknown keys are an error naming the valid ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; see training/configs/.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"--config {path} is not a YAML text file ({str(error).splitlines()[0]}); give a "
            "YAML mapping of TrainConfig fields, e.g. --config training/configs/minilm-mask.yaml."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}"
        )
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; valid keys: {names}")
    return data


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, LaunchOptions]:
    """The command line: `--config` is read first, every other flag overrides its value."""
    parser = HfArgumentParser((TrainConfig, LaunchOptions), description=__doc__)
    options, _ = HfArgumentParser(LaunchOptions, add_help=False).parse_known_args(argv)
    parser.set_defaults(**read_yaml(options.config))
    try:
        cfg, launch = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(str(error))
    return cfg, launch


def _coerce(name: str, value, kind):
    """`value` as the field's type; YAML 1.1 reads `3e-4` as a string and `layers: 3` as an int."""
    text = str(kind)
    if value is None and "None" in text:
        return None
    if text.startswith("list["):
        item = int if "int" in text else str
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(name, v, item) for v in values]
    target = int if kind is int or text.startswith("int") else float if "float" in text else None
    if target is None:
        return str(value) if kind is str or text.startswith("str") else value
    if isinstance(value, bool) or (target is int and isinstance(value, float)):
        raise ValueError(f"--{name} must be an {target.__name__}; got {value!r}.")
    try:
        return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be a number ({target.__name__}); got {value!r}.") from None
