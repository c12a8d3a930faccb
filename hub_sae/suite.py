"""The published suite layout: suite.json + one folder per (layer, k), written atomically.

suite.json                      {base_model, policy, hookpoint, layers, ks, default_layer, ...}
layer_{L}/config.json           TopKSAE kwargs            (one k per layer)
layer_{L}/model.safetensors
layer_{L}/metrics.json
layer_{L}/features.safetensors  optional
layer_{L}/k_{k}/...             the same, when a layer has several k
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hub_sae.features import FEATURES_FILE, FeatureStats, save_features
from hub_sae.sae import TopKSAE

SUITE_FILE = "suite.json"
LAYER_FILES = ("config.json", "model.safetensors", "metrics.json")


def sae_folder(layer: int, k: int, ks: list[int]) -> str:
    """Folder of the SAE (layer, k) inside a suite whose layers have SAEs for `ks`."""
    return f"layer_{layer}" if len(ks) == 1 else f"layer_{layer}/k_{k}"


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temp file + rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_suite(root: str | Path) -> dict:
    path = Path(root) / SUITE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a hub-sae suite (train one first)."
        )
    return json.loads(path.read_text())


def save_suite(
    out_dir: str | Path,
    saes: dict[tuple[int, int], TopKSAE],
    metrics: dict[tuple[int, int], dict],
    info: dict,
    features: dict[tuple[int, int], FeatureStats] | None = None,
) -> Path:
    """Write a complete suite to `out_dir`, replacing any previous one only once it is complete."""
    out_dir = Path(out_dir)
    layers = sorted({layer for layer, _ in saes})
    ks = sorted({k for _, k in saes})
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for (layer, k), sae in saes.items():
        folder = tmp / sae_folder(layer, k, ks)
        folder.mkdir(parents=True)
        (folder / "README.md").write_text(f"Layer {layer}, k={k}: see the suite's README.md.\n")
        sae.save_pretrained(folder)
        write_json(folder / "metrics.json", metrics.get((layer, k), {}))
        if features and (layer, k) in features:
            meta = {"policy": str(info.get("policy")), "base_model": str(info.get("base_model"))}
            save_features(folder / FEATURES_FILE, features[layer, k], meta)
    suite = {
        **info,
        "layers": layers,
        "ks": ks,
        "default_layer": info.get("default_layer", layers[len(layers) // 2]),
        "default_k": info.get("default_k", ks[0]),
    }
    write_json(tmp / SUITE_FILE, suite)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def layer_folders(root: str | Path) -> dict[tuple[int, int], Path]:
    """{(layer, k): folder} of every SAE listed by a suite's suite.json."""
    root = Path(root)
    suite = read_suite(root)
    return {
        (layer, k): root / sae_folder(layer, k, suite["ks"])
        for layer in suite["layers"]
        for k in suite["ks"]
    }


def validate_suite(root: str | Path, require_card: bool = True) -> list[str]:
    """Everything missing from a suite, as readable problems (empty when complete)."""
    root = Path(root)
    try:
        folders = layer_folders(root)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        return [f"{root / SUITE_FILE}: {e}"]
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
