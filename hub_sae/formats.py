"""Find and read SAEs in every published layout, from a local folder or a hub repo.

Layouts (each a folder holding one SAE):
- hub-sae:              config.json (TopKSAE kwargs) + model.safetensors; a suite adds suite.json
                        and one `layer_{L}/` folder per layer.
- dictionary_learning:  config.json ({"trainer": {...}, "buffer": {...}}) + ae.pt (DLM-Scope release:
                        saes_{policy}_{model}_top_k/resid_post_layer_{L}/trainer_{i}/).
- sparsify:             cfg.json + sae.safetensors, in a folder named after the hookpoint (`layers.16`).
- SAELens:              cfg.json + sae_weights.safetensors.

Every folder is found by its small JSON file first; only the chosen SAE's weights are downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hub_sae.io import HubOptions, inside, local_path
from hub_sae.sae import TopKSAE
from hub_sae.suite import SUITE_FILE, read_suite

WEIGHTS = {
    "hub_sae": "model.safetensors",
    "dictionary_learning": "ae.pt",
    "sparsify": "sae.safetensors",
    "saelens": "sae_weights.safetensors",
}
METADATA_PATTERNS = ["suite.json", "*config.json", "*cfg.json"]


class SAELoadError(ValueError):
    """An SAE could not be found or read; the message says which file and what was expected."""


@dataclass(frozen=True)
class SAEFolder:
    """One SAE found on disk: its layout, folder, layer and k, and its parsed JSON config."""

    kind: str
    folder: Path
    layer: int | None
    k: int | None
    config: dict


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAELoadError(f"Could not read {path}: {e}. Re-download or re-save this file.") from e


def _layer_from_name(name: str) -> int | None:
    match = re.search(r"(\d+)$", name) or re.search(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _classify(path: Path) -> SAEFolder | None:
    """The SAE described by a config.json / cfg.json, or None for unrelated JSON files."""
    cfg = _read_json(path)
    folder = path.parent
    if path.name == "config.json" and "d_sae" in cfg and "k" in cfg:
        return SAEFolder("hub_sae", folder, cfg.get("layer"), cfg["k"], cfg)
    if path.name == "config.json" and isinstance(cfg.get("trainer"), dict):
        trainer = cfg["trainer"]
        layer = trainer.get("layer", _layer_from_name(folder.parent.name))
        return SAEFolder("dictionary_learning", folder, layer, trainer.get("k"), cfg)
    if path.name == "cfg.json" and ("hook_name" in cfg or "architecture" in cfg):
        layer = cfg.get("hook_layer", _layer_from_name(cfg.get("hook_name", "")))
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        return SAEFolder("saelens", folder, layer, k, cfg)
    if path.name == "cfg.json" and ("num_latents" in cfg or "expansion_factor" in cfg):
        return SAEFolder("sparsify", folder, _layer_from_name(folder.name), cfg.get("k"), cfg)
    return None


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


def select(found: list[SAEFolder], root: Path, layer: int | None, k: int | None) -> SAEFolder:
    """Pick the SAE of `layer` and `k` (defaults: the suite's, else the only layer, smallest k)."""
    if not found:
        raise SAELoadError(
            f"No SAE found in {root}: expected suite.json + layer_{{L}}/config.json, config.json + "
            "model.safetensors, dictionary_learning trainer_*/config.json + ae.pt, or cfg.json + "
            "sae.safetensors / sae_weights.safetensors."
        )
    layers = sorted({f.layer for f in found if f.layer is not None})
    default_layer, default_k = _suite_defaults(root)
    if layer is None:
        layer = default_layer
    if layer is None and len({f.layer for f in found}) > 1:
        raise SAELoadError(f"{root} holds SAEs for layers {layers}; pass layer=... to pick one.")
    if layer is not None:
        found = [f for f in found if f.layer == layer or (f.layer is None and len(layers) == 0)]
        if not found:
            raise SAELoadError(f"No SAE for layer {layer} in {root}; available layers: {layers}.")
    ks = sorted({f.k for f in found if f.k is not None})
    if k is None and default_k in ks:
        k = default_k
    if k is not None:
        found = [f for f in found if f.k == k]
        if not found:
            raise SAELoadError(f"No SAE with k={k} for layer {layer} in {root}; available k: {ks}.")
    elif ks:
        found = [f for f in found if f.k == ks[0]]
    if len(found) > 1:
        folders = [str(f.folder.relative_to(root)) for f in found]
        raise SAELoadError(
            f"Several SAEs match layer={layer}, k={k} in {root}: {folders}; pass subfolder=..."
        )
    return found[0]


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


def load_sae(
    repo_id_or_path: str | Path,
    layer: int | None = None,
    k: int | None = None,
    *,
    subfolder: str | None = None,
    hub: HubOptions | None = None,
) -> TopKSAE:
    """Find the SAE of `layer` / `k` in a folder or hub repo (any layout) and read it."""
    root, snapshot = _metadata_root(repo_id_or_path, subfolder, hub)
    chosen = select(scan(root), root, layer, k)
    weights = chosen.folder / WEIGHTS[chosen.kind]
    if snapshot is not None:
        rel = weights.relative_to(snapshot).as_posix()
        weights = (hub or HubOptions()).file(str(repo_id_or_path), rel)
    if not weights.is_file():
        raise SAELoadError(f"Missing weights file {weights} (expected beside {chosen.folder}/).")
    return READERS[chosen.kind](chosen, weights)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise SAELoadError(
            f"Could not read {path}: {e}. The file is corrupt or not safetensors."
        ) from e


def _check(path: Path, tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with the expected shape, or an error naming file and tensor."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SAELoadError(f"{path} is missing {missing}; it has {sorted(tensors)}.")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                "(from the config next to it: d_in / d_sae mismatch?)."
            )


def _build(cfg: dict, state: dict[str, Tensor], path: Path) -> TopKSAE:
    sae = TopKSAE(**cfg)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    _check(path, state, expected)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise SAELoadError(
            f"{path} has unexpected tensors {unexpected}; expected {sorted(expected)}."
        )
    sae.load_state_dict({name: t.to(torch.float32) for name, t in state.items()}, strict=True)
    return sae.eval()


def read_hub_sae(found: SAEFolder, weights: Path) -> TopKSAE:
    keys = ("d_in", "d_sae", "k", "layer", "hookpoint", "base_model", "policy")
    return _build(
        {key: found.config[key] for key in keys if key in found.config},
        _load_safetensors(weights),
        weights,
    )


def read_dictionary_learning(found: SAEFolder, weights: Path) -> TopKSAE:
    trainer, buffer = found.config["trainer"], found.config.get("buffer", {})
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-tensor pickles
        raise SAELoadError(
            f"Could not read {weights} with torch.load(weights_only=True): {e}"
        ) from e
    d_in, d_sae, k = trainer["activation_dim"], trainer["dict_size"], trainer["k"]
    _check(
        weights,
        state,
        {
            "encoder.weight": (d_sae, d_in),
            "encoder.bias": (d_sae,),
            "decoder.weight": (d_in, d_sae),
            "b_dec": (d_in,),
        },
    )
    if "k" in state and int(state["k"]) != k:
        raise SAELoadError(f"{weights} stores k={int(state['k'])} but its config.json says k={k}.")
    cfg = dict(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        layer=found.layer,
        base_model=trainer.get("lm_name"),
        policy=buffer.get("dlm_mask_policy", "mask"),
    )
    converted = {
        "encoder.weight": state["encoder.weight"],
        "encoder.bias": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T.contiguous(),
        "b_dec": state["b_dec"],
    }
    return _build(cfg, converted, weights)


def read_sparsify(found: SAEFolder, weights: Path) -> TopKSAE:
    cfg = found.config
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise SAELoadError(
                f"{found.folder / 'cfg.json'} has {flag}=true; only plain TopK SAEs are supported."
            )
    state = _load_safetensors(weights)
    if "encoder.weight" not in state:
        raise SAELoadError(f"{weights} is missing ['encoder.weight']; it has {sorted(state)}.")
    d_sae, d_in = state["encoder.weight"].shape
    if cfg.get("d_in", d_in) != d_in:
        raise SAELoadError(
            f"{weights}: encoder.weight has d_in={d_in}, cfg.json says d_in={cfg['d_in']}."
        )
    expected_latents = cfg.get("num_latents") or cfg.get("expansion_factor", 0) * d_in
    if expected_latents and expected_latents != d_sae:
        raise SAELoadError(
            f"{weights}: encoder.weight has {d_sae} latents, cfg.json says {expected_latents}."
        )
    return _build(dict(d_in=d_in, d_sae=d_sae, k=cfg["k"], layer=found.layer), state, weights)


def read_saelens(found: SAEFolder, weights: Path) -> TopKSAE:
    cfg = found.config
    arch = cfg.get("architecture", cfg.get("activation_fn", cfg.get("activation_fn_str")))
    if arch != "topk" or found.k is None:
        raise SAELoadError(
            f"{found.folder / 'cfg.json'}: architecture {arch!r} is not a TopK SAE with k."
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAELoadError(
            f"{found.folder / 'cfg.json'}: normalize_activations={cfg['normalize_activations']!r} "
            "is not supported; fold the normalisation into the weights first."
        )
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    state = _load_safetensors(weights)
    _check(
        weights,
        state,
        {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
    )
    b_enc = state["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        # W_enc x + b_enc == W_enc (x - b_dec) + (b_enc + b_dec W_enc)
        b_enc = b_enc + state["b_dec"] @ state["W_enc"]
    converted = {
        "encoder.weight": state["W_enc"].T.contiguous(),
        "encoder.bias": b_enc,
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    cfg = dict(
        d_in=d_in, d_sae=d_sae, k=found.k, layer=found.layer, base_model=cfg.get("model_name")
    )
    return _build(cfg, converted, weights)


READERS = {
    "hub_sae": read_hub_sae,
    "dictionary_learning": read_dictionary_learning,
    "sparsify": read_sparsify,
    "saelens": read_saelens,
}
