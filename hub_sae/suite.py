"""The published suite layout and its schema `SuiteInfo`: written once by the trainer, read by all.

suite.json                      SuiteInfo: {version, base_model, policy, hookpoint, d_in, d_sae,
                                layers, ks, default_layer, default_k, corruption, training}
layer_{L}/config.json           TopKSAE kwargs            (one k per layer)
layer_{L}/model.safetensors
layer_{L}/metrics.json
layer_{L}/features.safetensors  optional
layer_{L}/k_{k}/...             the same, when a layer has several k
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from hub_sae.data import DataConfig
from hub_sae.features import FEATURES_FILE, FeatureStats, save_features
from hub_sae.io import inside, is_int, read_json_object, write_folder, write_json
from hub_sae.masking import POLICIES, Corruption

if TYPE_CHECKING:  # sae.py loads through formats.py, which reads suites: no import back
    from hub_sae.sae import TopKSAE

SUITE_FILE = "suite.json"
SUITE_VERSION = 1
"""Bumped when suite.json changes incompatibly; readers refuse newer versions."""
LAYER_FILES = ("config.json", "model.safetensors", "metrics.json")
EVAL_TOKENS = 16_384
"""Held-out activations per SAE when the run recorded none."""
DTYPES = ("float32", "bfloat16", "float16")


class SuiteError(ValueError):
    """A suite.json that cannot be read; the message names the file and the fix."""


def _int_list(name: str, value: object, minimum: int) -> list[int]:
    """`value` as a sorted list of distinct integers >= `minimum`; a ValueError naming `name`."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{name}` must be a non-empty list of integers, not {value!r}")
    bad = [v for v in value if not is_int(v) or v < minimum]
    if bad:
        raise ValueError(f"`{name}` holds {bad!r}; every entry must be an integer >= {minimum}")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` lists an entry twice: {value}")
    return sorted(value)


def _check_training(training: dict) -> None:
    """The run settings `hub-sae eval` reuses, when present, have usable types and values."""
    kinds = {
        "corpus": str,
        "eval_corpus": (str, type(None)),
        "eval_split": str,
        "text_field": str,
    }
    for key, kind in kinds.items():
        if key in training and not isinstance(training[key], kind):
            raise ValueError(f"`training.{key}` must be text, not {training[key]!r}")
    for key, minimum in (("ctx_len", 2), ("llm_batch_size", 1), ("eval_tokens", 1)):
        if key in training and not (is_int(training[key]) and training[key] >= minimum):
            raise ValueError(
                f"`training.{key}` must be an integer >= {minimum}, not {training[key]!r}"
            )
    if training.get("dtype", DTYPES[0]) not in DTYPES:
        raise ValueError(
            f"`training.dtype` must be one of {', '.join(DTYPES)}, not {training['dtype']!r}"
        )


@dataclass
class SuiteInfo:
    """What every SAE of a suite shares (suite.json); validated on construction.

    `default_layer` defaults to the middle layer, `default_k` to the smallest k.
    """

    base_model: str
    """Short name, hub id or folder of the base model."""
    policy: str
    """Which positions the SAEs were trained on: mask, unmask, all or clean."""
    layers: list[int]
    """Block indices with an SAE, sorted."""
    ks: list[int]
    """The k of the SAEs every layer has, sorted."""
    d_in: int
    """Width of the activations (the base model's hidden size)."""
    d_sae: int
    """Latents per SAE."""
    hookpoint: str = "resid_post"
    """Where in each block the activations are read."""
    corruption: Corruption = field(default_factory=Corruption)
    """How the training text was masked."""
    default_layer: int | None = None
    """The layer loaders pick when none is asked for."""
    default_k: int | None = None
    """The k loaders pick when none is asked for."""
    training: dict = field(default_factory=dict)
    """The run's TrainConfig and totals (steps, tokens, ...), as written by the trainer."""
    version: int = SUITE_VERSION
    """Schema version of suite.json (SUITE_VERSION when written)."""

    def __post_init__(self) -> None:
        if not is_int(self.version) or self.version > SUITE_VERSION:
            raise ValueError(
                f"suite version {self.version!r} is newer than this hub-sae reads "
                f"({SUITE_VERSION}); upgrade hub-sae: pip install -U hub-sae"
            )
        for name in ("base_model", "policy", "hookpoint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` must be text, not {getattr(self, name)!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"`policy` {self.policy!r} is not one of {', '.join(POLICIES)}")
        self.layers = _int_list("layers", self.layers, 0)
        self.ks = _int_list("ks", self.ks, 1)
        for name in ("d_in", "d_sae"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(
                    f"`{name}` must be a positive integer, not {getattr(self, name)!r}"
                )
        if self.default_layer is None:
            self.default_layer = self.layers[len(self.layers) // 2]
        if self.default_k is None:
            self.default_k = self.ks[0]
        if self.default_layer not in self.layers or not is_int(self.default_layer):
            raise ValueError(
                f"`default_layer` {self.default_layer!r} is not in `layers` {self.layers}"
            )
        if self.default_k not in self.ks or not is_int(self.default_k):
            raise ValueError(f"`default_k` {self.default_k!r} is not in `ks` {self.ks}")
        if not isinstance(self.corruption, Corruption):
            raise ValueError(f"`corruption` must be a Corruption, not {self.corruption!r}")
        if not isinstance(self.training, dict):
            raise ValueError(f"`training` must be an object, not {self.training!r}")
        _check_training(self.training)

    @classmethod
    def from_dict(cls, data: object, path: str | Path = SUITE_FILE) -> SuiteInfo:
        """Parse suite.json's content (unknown keys are ignored); a problem is a SuiteError naming
        `path`."""
        known = {f.name for f in fields(cls)}
        try:
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            required = [
                f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
            ]
            missing = [name for name in required if name not in data]
            if missing:
                raise ValueError(f"missing {', '.join(f'`{m}`' for m in missing)}")
            kwargs = {key: value for key, value in data.items() if key in known}
            if "corruption" in kwargs:
                corruption = kwargs["corruption"]
                if not isinstance(corruption, dict):
                    raise ValueError(f"`corruption` must be an object, not {corruption!r}")
                kwargs["corruption"] = Corruption(**corruption)
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise SuiteError(
                f"{path} is not a valid hub-sae suite.json: {e}. Fix the file or train the "
                "suite again."
            ) from None

    def to_dict(self) -> dict:
        """suite.json's content."""
        return asdict(self)

    def folder(self, layer: int, k: int) -> str:
        """Folder of the SAE (layer, k) inside the suite."""
        return sae_folder(layer, k, self.ks)

    def heldout(
        self, corpus: str | None = None, split: str | None = None, seed: int = 0
    ) -> DataConfig:
        """The held-out text the trainer measured the suite on; `corpus` / `split` replace it."""
        training, defaults = self.training, DataConfig()
        return DataConfig(
            corpus=corpus or training.get("eval_corpus") or training.get("corpus", defaults.corpus),
            split=split or training.get("eval_split", "heldout"),
            text_field=training.get("text_field", defaults.text_field),
            ctx_len=training.get("ctx_len", defaults.ctx_len),
            batch_size=training.get("llm_batch_size", defaults.batch_size),
            seed=seed,
        )

    @property
    def eval_tokens(self) -> int:
        """Held-out activations per SAE the trainer measured."""
        return self.training.get("eval_tokens", EVAL_TOKENS)

    @property
    def dtype(self) -> str:
        """The base model's dtype during training."""
        return self.training.get("dtype", DTYPES[0])


def sae_folder(layer: int, k: int, ks: list[int]) -> str:
    """Folder of the SAE (layer, k) inside a suite whose layers have SAEs for `ks`."""
    return f"layer_{layer}" if len(ks) == 1 else f"layer_{layer}/k_{k}"


def read_suite(root: str | Path) -> SuiteInfo:
    """The SuiteInfo of the suite folder `root`; a clear error when it is missing or invalid."""
    path = Path(root) / SUITE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a hub-sae suite (train one first)."
        )
    fix = "restore it or train the suite again."
    data = read_json_object(inside(root, SUITE_FILE), fix, SuiteError)
    return SuiteInfo.from_dict(data, path)


def suite_info(source: str | Path) -> SuiteInfo | None:
    """suite.json of a local folder or hub repo; None for layouts without one (dictionary_learning)."""
    from huggingface_hub.errors import EntryNotFoundError

    from hub_sae.io import HubOptions, local_path

    folder = local_path(source)
    if folder is not None:
        return read_suite(folder) if (folder / SUITE_FILE).is_file() else None
    try:
        return read_suite(HubOptions().file(str(source), SUITE_FILE).parent)
    except EntryNotFoundError:  # a release without suite.json: the SAE configs say enough
        return None


def save_suite(
    out_dir: str | Path,
    saes: dict[tuple[int, int], TopKSAE],
    metrics: dict[tuple[int, int], dict],
    info: SuiteInfo,
    features: dict[tuple[int, int], FeatureStats] | None = None,
) -> Path:
    """Write a complete suite to `out_dir`, replacing any previous one only once it is complete."""
    expected = {(layer, k) for layer in info.layers for k in info.ks}
    if set(saes) != expected:
        raise ValueError(
            f"the SAEs {sorted(saes)} are not every (layer, k) of layers {info.layers} "
            f"x ks {info.ks}"
        )

    def fill(tmp: Path) -> None:
        for (layer, k), sae in saes.items():
            folder = tmp / info.folder(layer, k)
            folder.mkdir(parents=True)
            (folder / "README.md").write_text(f"Layer {layer}, k={k}: see the suite's README.md.\n")
            sae.save_pretrained(folder)
            write_json(folder / "metrics.json", metrics.get((layer, k), {}))
            if features and (layer, k) in features:
                meta = {"policy": info.policy, "base_model": info.base_model}
                save_features(folder / FEATURES_FILE, features[layer, k], meta)
        write_json(tmp / SUITE_FILE, info.to_dict())

    return write_folder(out_dir, fill)


def layer_folders(root: str | Path, info: SuiteInfo | None = None) -> dict[tuple[int, int], Path]:
    """{(layer, k): folder} of every SAE listed by a suite, each checked to lie inside `root`.

    Every entry of each folder is checked too, so no file read through the folder (a symlinked
    config.json or metrics.json) leads out of the suite.
    """
    info = info or read_suite(root)
    folders = {}
    for layer in info.layers:
        for k in info.ks:
            name = info.folder(layer, k)
            folder = folders[layer, k] = inside(root, name)
            if folder.is_dir():
                for entry in folder.iterdir():
                    inside(root, f"{name}/{entry.name}")
    return folders


def validate_suite(root: str | Path, require_card: bool = True) -> list[str]:
    """Everything missing from a suite, as readable problems (empty when complete)."""
    root = Path(root)
    try:
        folders = layer_folders(root)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = [
        f"{folder / name} is missing"
        for folder in folders.values()
        for name in LAYER_FILES
        if not (folder / name).is_file()
    ]
    if require_card and not (root / "README.md").is_file():
        problems.append(
            f"{root / 'README.md'} (the model card) is missing: run `hub-sae card {root}`"
        )
    return problems
