"""Find and read SAEs in every published layout, from a local folder or a hub repo.

Layouts (each a folder holding one SAE), read as each library's current save code writes them:
- hub-sae:              config.json (TopKSAE kwargs) + model.safetensors; a suite adds suite.json
                        and one `layer_{L}/` folder per layer.
- dictionary_learning:  config.json ({"trainer": {...}, "buffer": {...}}) + ae.pt, dict_class
                        AutoEncoderTopK (DLM-Scope release:
                        saes_{policy}_{model}_top_k/resid_post_layer_{L}/trainer_{i}/).
- sparsify 1.3:         `<hookpoint>/cfg.json` + sae.safetensors (`save_to_disk`), activation
                        "topk"; the run's config.json beside the hookpoint folders names the model.
- SAELens 6:            cfg.json + sae_weights.safetensors (`save_model`), architecture "topk";
                        model and hook names under cfg["metadata"] (older configs: at the top).
Everything that would change the math and is not folded in exactly (SAELens'
rescale_acts_by_decoder_norm and apply_b_dec_to_input=false are) is refused, naming the flag and
the file: SAELens architectures other than topk, normalize_activations, reshape_activations hook_z,
hook_head_index, finetuning scaling factors; sparsify groupmax, skip_connection, transcode;
dictionary_learning dict_class other than AutoEncoderTopK.

Every folder is found by its small JSON file first; only the chosen SAE's weights are downloaded,
and their names and shapes are checked in the safetensors header before anything is allocated.
Readers return an `SAEState` (checked settings and weights); `TopKSAE.from_pretrained` builds the
module, so this file never imports sae.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hub_sae.io import HubOptions, inside, is_int, local_path
from hub_sae.suite import SUITE_FILE, read_suite

WEIGHTS = {
    "hub_sae": "model.safetensors",
    "dictionary_learning": "ae.pt",
    "sparsify": "sae.safetensors",
    "saelens": "sae_weights.safetensors",
}
METADATA_PATTERNS = ["suite.json", "*config.json", "*cfg.json"]
# A layer index inside a hook or folder name: layers.16, layers.16.mlp, blocks.9.hook_resid_post,
# transformer.h.3, encoder.layer.2, resid_post_layer_16, layer_3.
LAYER_IN_NAME = re.compile(r"(?:^|[._])(?:layers|layer|blocks|h)[._](\d+)(?=$|[._])")
# The output of a whole block (the residual stream after it), in sparsify's and SAELens' naming.
BLOCK_OUTPUT = re.compile(r"(?:.*\.)?(?:layers|layer|blocks|h)\.\d+(?:\.hook_resid_post)?")
# SAELens' (TransformerLens') input of block N: the output of block N - 1 when N > 0.
BLOCK_INPUT = re.compile(r"(?:.*\.)?blocks\.(\d+)\.hook_resid_pre")


class SAELoadError(ValueError):
    """An SAE could not be found or read; the message says which file and what was expected."""


class SAEState(NamedTuple):
    """An SAE read from any layout and checked: what `TopKSAE.from_pretrained` builds."""

    kwargs: dict
    """TopKSAE keyword arguments (`sae_kwargs`)."""
    state: dict[str, Tensor]
    """TopKSAE's state dict, float32, finite, of the shapes `kwargs` implies."""


@dataclass(frozen=True)
class SAEFolder:
    """One SAE found on disk: its layout, folder, layer and k, and its parsed JSON config."""

    layout: str
    """A key of WEIGHTS and READERS: hub_sae, dictionary_learning, sparsify or saelens."""
    folder: Path
    layer: int | None
    k: int | None
    config: dict
    hookpoint: str = "resid_post"
    """Where the SAE reads (`hookpoint`): "resid_post" of `layer`, or the library's hook name."""


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or an SAELoadError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise SAELoadError(
            f"{path} is nested too deeply to read; it is no SAE config. Re-download or re-save it."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSON, or int digits
        raise SAELoadError(f"Could not read {path}: {e}. Re-download or re-save this file.") from e
    if not isinstance(data, dict):
        raise SAELoadError(
            f"{path} holds a JSON {type(data).__name__}, not an object of settings. "
            "Re-download or re-save this file."
        )
    return data


def layer_from_hookpoint(name: str) -> int | None:
    """The layer a hook or folder name points at (`layers.16.mlp` -> 16), or None."""
    match = LAYER_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def _hookpoint(name: str | None, layer: int | None) -> tuple[int | None, str]:
    """(layer, hookpoint) for a library's hook `name` at `layer`.

    A whole block's output is "resid_post" of that block and the input of block N > 0 is
    "resid_post" of block N - 1; anything else (an MLP's output, the embedding output) keeps its
    name and layer, and `TopKSAE.require_resid_post` refuses it where the residual stream is used.
    """
    block_input = BLOCK_INPUT.fullmatch(name or "")
    if block_input and int(block_input.group(1)) > 0:
        return int(block_input.group(1)) - 1, "resid_post"
    return layer, "resid_post" if not name or BLOCK_OUTPUT.fullmatch(name) else name


def sae_kwargs(raw: dict, path: Path) -> dict:
    """TopKSAE keyword arguments from `raw`, checked; or an SAELoadError naming `path`.

    The one validation of an SAE's configuration, run before anything is allocated.
    """
    problems = [
        f"{key} must be a positive integer, got {raw.get(key)!r}"
        for key in ("d_in", "d_sae", "k")
        if not (is_int(raw.get(key)) and raw[key] > 0)
    ]
    if not problems and not raw["k"] < raw["d_sae"]:
        problems.append(f"k={raw['k']} must be smaller than d_sae={raw['d_sae']}")
    layer = raw.get("layer")
    if layer is not None and not (is_int(layer) and layer >= 0):
        problems.append(f"layer must be a non-negative integer or null, got {layer!r}")
    for key in ("hookpoint", "base_model", "policy"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            problems.append(f"{key} must be a string, got {raw[key]!r}")
    if problems:
        raise SAELoadError(f"{path}: {'; '.join(problems)}. Fix these settings or re-save the SAE.")
    keys = ("d_in", "d_sae", "k", "layer", "hookpoint", "base_model", "policy")
    return {key: raw[key] for key in keys if raw.get(key) is not None}


def _flag(cfg: dict, key: str, default: bool, path: Path) -> bool:
    """A true/false setting; anything but a JSON boolean (the string "false" too) is refused."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise SAELoadError(
            f"{path}: {key} must be true or false (a JSON boolean), got {value!r}. Fix the file."
        )
    return value


def _object(cfg: dict, key: str, path: Path) -> dict:
    """The JSON object under `key` ({} when absent), or an SAELoadError naming file and key."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SAELoadError(f"{path}: {key} must be a JSON object, got {value!r}. Fix the file.")
    return value


def _refuse(path: Path, flag: str, value, why: str) -> SAELoadError:
    """The error for a setting in `path` that changes the math in a way hub-sae does not run."""
    return SAELoadError(
        f"{path}: {flag}={value!r} is not supported ({why}); hub-sae reads plain TopK SAEs only."
    )


def _classify(path: Path) -> SAEFolder | None:
    """The SAE described by a config.json / cfg.json, or None for unrelated JSON files."""
    cfg = _read_json(path)
    folder = path.parent
    if path.name == "config.json" and len({"d_in", "d_sae", "k"} & cfg.keys()) >= 2:
        kwargs = sae_kwargs(cfg, path)
        found = SAEFolder("hub_sae", folder, kwargs.get("layer"), kwargs["k"], cfg)
    elif path.name == "config.json" and isinstance(cfg.get("trainer"), dict):
        trainer = cfg["trainer"]
        layer = trainer.get("layer", layer_from_hookpoint(folder.parent.name))
        found = SAEFolder("dictionary_learning", folder, layer, trainer.get("k"), cfg)
    elif path.name == "cfg.json" and ({"hook_name", "architecture", "metadata"} & cfg.keys()):
        _object(cfg, "metadata", path)
        _object(cfg, "activation_fn_kwargs", path)
        hook_name = _saelens_field(cfg, "hook_name")
        if hook_name is not None and not isinstance(hook_name, str):
            raise SAELoadError(
                f"{path}: hook_name must be a string such as 'blocks.3.hook_resid_post', got "
                f"{hook_name!r}. Fix the file."
            )
        layer = cfg.get("hook_layer", layer_from_hookpoint(hook_name or ""))
        layer, hookpoint = _hookpoint(hook_name, layer)
        found = SAEFolder("saelens", folder, layer, _saelens_k(cfg), cfg, hookpoint)
    elif path.name == "cfg.json" and ("num_latents" in cfg or "expansion_factor" in cfg):
        layer, hookpoint = _hookpoint(folder.name, layer_from_hookpoint(folder.name))
        found = SAEFolder("sparsify", folder, layer, cfg.get("k"), cfg, hookpoint)
    else:
        return None
    for name, value in (("layer", found.layer), ("k", found.k)):
        if value is not None and not (is_int(value) and value >= 0):
            raise SAELoadError(
                f"{path}: {name} must be a non-negative integer, got {value!r}. Fix the file."
            )
    return found


def _saelens_field(cfg: dict, key: str):
    """A SAELens metadata field: under cfg["metadata"] (SAELens 6) or at the top (older)."""
    metadata = cfg.get("metadata")
    value = metadata.get(key) if isinstance(metadata, dict) else None
    return cfg.get(key) if value is None else value


def _saelens_k(cfg: dict):
    """k of a SAELens config: at the top (SAELens 6) or in activation_fn_kwargs (older)."""
    kwargs = cfg.get("activation_fn_kwargs")
    return cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)


def scan(root: Path) -> list[SAEFolder]:
    """Every SAE folder under `root` (including `root` itself)."""
    files = sorted([*root.rglob("config.json"), *root.rglob("cfg.json")])
    return [found for path in files if (found := _classify(path)) is not None]


def _metadata_root(
    repo_id_or_path: str | Path, subfolder: str | None, hub: HubOptions | None
) -> tuple[Path, Path | None]:
    """(folder holding the JSON metadata, the hub snapshot it lies in or None when local)."""
    hub = hub or HubOptions()
    try:
        local = local_path(repo_id_or_path)
    except FileNotFoundError as e:
        raise SAELoadError(f"No such folder: {e}") from None
    snapshot = hub.snapshot(str(repo_id_or_path), METADATA_PATTERNS) if local is None else None
    root = local or snapshot
    if not root.is_dir():
        raise SAELoadError(f"No such folder: {root}. Pass an existing folder or a hub repo id.")
    if subfolder:
        root = inside(root, subfolder)
        if not root.is_dir():
            raise SAELoadError(f"{repo_id_or_path} has no subfolder {subfolder!r}.")
    return root, snapshot


def _suite_defaults(root: Path) -> tuple[int | None, int | None]:
    """(default_layer, default_k) of a suite folder, (None, None) for other layouts."""
    if not (root / SUITE_FILE).is_file():
        return None, None
    info = read_suite(root)
    return info.default_layer, info.default_k


def select(candidates: list[SAEFolder], root: Path, layer: int | None, k: int | None) -> SAEFolder:
    """Pick the SAE of `layer` and `k` (defaults: the suite's, else the only layer, smallest k)."""
    if not candidates:
        raise SAELoadError(
            f"No SAE found in {root}: expected suite.json + layer_{{L}}/config.json, config.json + "
            "model.safetensors, dictionary_learning trainer_*/config.json + ae.pt, or cfg.json + "
            "sae.safetensors / sae_weights.safetensors."
        )
    layers = sorted({f.layer for f in candidates if f.layer is not None})
    default_layer, default_k = _suite_defaults(root)
    if layer is None:
        layer = default_layer
    if layer is None and len({f.layer for f in candidates}) > 1:
        raise SAELoadError(f"{root} holds SAEs for layers {layers}; pass layer=... to pick one.")
    if layer is not None:
        candidates = [
            f for f in candidates if f.layer == layer or (f.layer is None and len(layers) == 0)
        ]
        if not candidates:
            raise SAELoadError(f"No SAE for layer {layer} in {root}; available layers: {layers}.")
    ks = sorted({f.k for f in candidates if f.k is not None})
    if k is None and default_k in ks:
        k = default_k
    if k is not None:
        candidates = [f for f in candidates if f.k == k]
        if not candidates:
            raise SAELoadError(f"No SAE with k={k} for layer {layer} in {root}; available k: {ks}.")
    elif ks:
        candidates = [f for f in candidates if f.k == ks[0]]
    if len(candidates) > 1:
        folders = [str(f.folder.relative_to(root)) for f in candidates]
        raise SAELoadError(
            f"Several SAEs match layer={layer}, k={k} in {root}: {folders}; pass subfolder=..."
        )
    return candidates[0]


def available_layers(
    repo_id_or_path: str | Path,
    *,
    subfolder: str | None = None,
    k: int | None = None,
    hub: HubOptions | None = None,
) -> list[int]:
    """The layers with an SAE in a suite, release or folder."""
    root, _ = _metadata_root(repo_id_or_path, subfolder, hub)
    if (root / SUITE_FILE).is_file():
        return read_suite(root).layers
    return sorted({f.layer for f in scan(root) if f.layer is not None and (k is None or f.k == k)})


def available_saes(
    repo_id_or_path: str | Path,
    *,
    subfolder: str | None = None,
    hub: HubOptions | None = None,
) -> dict[int, list[int]]:
    """{layer: sorted ks} of the SAEs with a known layer and k in a suite, release or folder
    (read from their configs only)."""
    root, _ = _metadata_root(repo_id_or_path, subfolder, hub)
    keys: dict[int, set[int]] = {}
    for found in scan(root):
        if found.layer is not None and found.k is not None:
            keys.setdefault(found.layer, set()).add(found.k)
    return {layer: sorted(ks) for layer, ks in sorted(keys.items())}


def load_sae(
    repo_id_or_path: str | Path,
    layer: int | None = None,
    k: int | None = None,
    *,
    subfolder: str | None = None,
    hub: HubOptions | None = None,
) -> SAEState:
    """Find the SAE of `layer` / `k` in a folder or hub repo (any layout) and read it, checked."""
    root, snapshot = _metadata_root(repo_id_or_path, subfolder, hub)
    chosen = select(scan(root), root, layer, k)
    weights = chosen.folder / WEIGHTS[chosen.layout]
    if snapshot is not None:
        rel = weights.relative_to(snapshot).as_posix()
        weights = (hub or HubOptions()).file(str(repo_id_or_path), rel)
    if not weights.is_file():
        raise SAELoadError(f"Missing weights file {weights} (expected beside {chosen.folder}/).")
    return READERS[chosen.layout](chosen, weights)


def _shapes_in_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SAELoadError(
            f"Could not read {path}: {e}. The file is corrupt or not safetensors; re-download it."
        ) from e


def _check_shapes(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    optional: tuple[str, ...] = (),
) -> None:
    """Exactly the expected tensors with the expected shapes, or an error naming file and tensor."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise SAELoadError(f"{path} is missing {missing}; it has {sorted(shapes)}.")
    unexpected = sorted(set(shapes) - set(expected) - set(optional))
    if unexpected:
        raise SAELoadError(
            f"{path} has unexpected tensors {unexpected}; expected {sorted(expected)}."
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise SAELoadError(
                f"{path}: {name} has shape {shapes[name]}, expected {shape} "
                "(from the config next to it: d_in / d_sae mismatch?)."
            )


def _floats(path: Path, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` if every tensor is floating point; an integer or bool one is refused, not cast."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise SAELoadError(
                f"{path}: tensor {name} has dtype {tensor.dtype}; SAE weights are floats "
                "(float32, bfloat16, float16 or float64). The file is damaged or holds no SAE; "
                "re-download or re-save it."
            )
    return state


def _read_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The expected tensors of `path`, read once its header matched `expected`, all floats."""
    _check_shapes(path, _shapes_in_header(path), expected)
    try:
        with safe_open(path, framework="pt") as f:
            return _floats(path, {name: f.get_tensor(name) for name in expected})
    except (SafetensorError, OSError) as e:
        raise SAELoadError(f"Could not read {path}: {e}. Re-download it.") from e


def _shapes(kwargs: dict) -> dict[str, tuple[int, ...]]:
    """The TopKSAE state-dict shapes for these kwargs."""
    d_in, d_sae = kwargs["d_in"], kwargs["d_sae"]
    return {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }


def _build(kwargs: dict, state: dict[str, Tensor], path: Path) -> SAEState:
    """`state` as float32 TopKSAE weights, refusing non-finite ones (float64 beyond float32 too)."""
    state = {name: t.to(torch.float32).contiguous() for name, t in state.items()}
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise SAELoadError(
                f"{path}: tensor {name} holds NaN or Inf values (in float32); this SAE diverged or "
                "the file is damaged. Use another checkpoint or re-download it."
            )
    return SAEState(kwargs, state)


def read_hub_sae(found: SAEFolder, weights: Path) -> SAEState:
    """Our own layout: TopKSAE's config.json and state dict as saved."""
    kwargs = sae_kwargs(found.config, found.folder / "config.json")
    return _build(kwargs, _read_safetensors(weights, _shapes(kwargs)), weights)


def _dictionary_learning_policy(found: SAEFolder, lm_name: object, buffer: dict) -> str:
    """The buffer's dlm_mask_policy (default mask), but clean for an autoregressive base model:
    DLM-Scope's qwen repo (`saes__{model}_top_k`, no policy in the name) never masks its input."""
    from hub_sae.models import known_family

    run = found.folder.parent.parent.name
    if run.startswith("saes__") or (isinstance(lm_name, str) and known_family(lm_name) == "ar"):
        return "clean"
    return buffer.get("dlm_mask_policy", "mask")


def read_dictionary_learning(found: SAEFolder, weights: Path) -> SAEState:
    """dictionary_learning's AutoEncoderTopK (DLM-Scope's releases): its decoder transposed."""
    config_path = found.folder / "config.json"
    trainer, buffer = found.config["trainer"], _object(found.config, "buffer", config_path)
    flag = "dict_class" if "dict_class" in trainer else "trainer_class"
    if trainer.get(flag) not in (None, "AutoEncoderTopK", "TopKTrainer"):
        why = "BatchTopK and others encode with a threshold, not per-token top k"
        raise _refuse(config_path, flag, trainer[flag], why)
    kwargs = sae_kwargs(
        dict(
            d_in=trainer.get("activation_dim"),
            d_sae=trainer.get("dict_size"),
            k=trainer.get("k"),
            layer=found.layer,
            base_model=trainer.get("lm_name"),
            policy=_dictionary_learning_policy(found, trainer.get("lm_name"), buffer),
        ),
        config_path,
    )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-tensor pickles
        raise SAELoadError(
            f"Could not read {weights} with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise SAELoadError(f"{weights} is not a state dict of tensors; re-download it.")
    d_in, d_sae, k = kwargs["d_in"], kwargs["d_sae"], kwargs["k"]
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_in, d_sae),
        "b_dec": (d_in,),
    }
    # `threshold` only serves encode(use_threshold=True), which AutoEncoderTopK.forward never uses.
    _check_shapes(
        weights, {n: tuple(t.shape) for n, t in state.items()}, expected, ("k", "threshold")
    )
    if "k" in state and int(state["k"]) != k:
        raise SAELoadError(f"{weights} stores k={int(state['k'])} but its config.json says k={k}.")
    _floats(weights, {name: state[name] for name in expected})
    converted = {
        "encoder.weight": state["encoder.weight"],
        "encoder.bias": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["b_dec"],
    }
    return _build(kwargs, converted, weights)


def read_sparsify(found: SAEFolder, weights: Path) -> SAEState:
    """sparsify's SparseCoder: the same tensor names as ours; the model from the run's config."""
    cfg, config_path = found.config, found.folder / "cfg.json"
    if cfg.get("activation", "topk") != "topk":
        raise _refuse(config_path, "activation", cfg["activation"], "group-max latents")
    for flag in ("skip_connection", "transcode"):
        if _flag(cfg, flag, False, config_path):
            raise _refuse(config_path, flag, cfg[flag], "not an autoencoder of its input")
    d_in, factor = cfg.get("d_in"), cfg.get("expansion_factor", 32)
    if not cfg.get("num_latents") and not (is_int(factor) and factor > 0):
        raise SAELoadError(
            f"{config_path}: expansion_factor must be a positive integer (or num_latents set), "
            f"got {factor!r}. Fix the file."
        )
    d_sae = cfg.get("num_latents") or (factor * d_in if is_int(d_in) else None)
    run_config = found.folder.parent / "config.json"  # the run's TrainConfig, when there is one
    model = _read_json(run_config).get("model") if run_config.is_file() else None
    kwargs = sae_kwargs(
        dict(
            d_in=d_in,
            d_sae=d_sae,
            k=cfg.get("k"),
            layer=found.layer,
            hookpoint=found.hookpoint,
            base_model=model if isinstance(model, str) else None,
        ),
        config_path,
    )
    return _build(kwargs, _read_safetensors(weights, _shapes(kwargs)), weights)


def read_saelens(found: SAEFolder, weights: Path) -> SAEState:
    """SAELens' TopK SAE, with its input-bias and decoder-norm options folded in exactly."""
    cfg, config_path = found.config, found.folder / "cfg.json"
    arch = cfg.get("architecture")
    if arch is None:  # before SAELens 6: activation_fn(_str) "topk" with activation_fn_kwargs
        arch = cfg.get("activation_fn", cfg.get("activation_fn_str", "standard"))
    if arch != "topk":
        raise _refuse(config_path, "architecture", arch, "not a TopK SAE")
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise _refuse(config_path, "normalize_activations", normalize, "inputs are rescaled")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise _refuse(
            config_path, "reshape_activations", cfg["reshape_activations"], "per-head inputs"
        )
    for flag in ("hook_head_index", "finetuning_scaling_factor"):
        if _saelens_field(cfg, flag) not in (None, False):
            raise _refuse(config_path, flag, _saelens_field(cfg, flag), "not a plain TopK SAE")
    kwargs = sae_kwargs(
        dict(
            d_in=cfg.get("d_in"),
            d_sae=cfg.get("d_sae"),
            k=found.k,
            layer=found.layer,
            hookpoint=found.hookpoint,
            base_model=_saelens_field(cfg, "model_name"),
            policy=_saelens_field(cfg, "policy"),
        ),
        config_path,
    )
    d_in, d_sae = kwargs["d_in"], kwargs["d_sae"]
    w = _read_safetensors(
        weights,
        {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
    )
    w = {name: t.to(torch.float32) for name, t in w.items()}
    W_enc, b_enc, W_dec = w["W_enc"], w["b_enc"], w["W_dec"]
    if not _flag(cfg, "apply_b_dec_to_input", True, config_path):
        # W_enc x + b_enc == W_enc (x - b_dec) + (b_enc + b_dec W_enc)
        b_enc = b_enc + w["b_dec"] @ W_enc
    if _flag(cfg, "rescale_acts_by_decoder_norm", False, config_path):
        # SAELens scales the pre-activations by ||W_dec row|| and divides the latents by it before
        # decoding: the same as an encoder scaled by the norms and a unit-norm decoder.
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    converted = {
        "encoder.weight": W_enc.T,
        "encoder.bias": b_enc,
        "W_dec": W_dec,
        "b_dec": w["b_dec"],
    }
    return _build(kwargs, converted, weights)


READERS = {
    "hub_sae": read_hub_sae,
    "dictionary_learning": read_dictionary_learning,
    "sparsify": read_sparsify,
    "saelens": read_saelens,
}
