"""Write our SAEs in SAELens 6 and sparsify 1.3 layouts, so that those libraries load them as is.

    saelens:  <hook_name>/cfg.json + sae_weights.safetensors   (SAE.load_from_disk)
    sparsify: layers.{L}/cfg.json + sae.safetensors, and the run's config.json naming the model
              (SparseCoder.load_from_disk / load_many)
    delphi:   layers.{L}/{start}_{end}.safetensors + config.json, the latent activations of a
              suite on text (delphi's LatentDataset; written by hub_sae.delphi)

A suite exports as one folder per layer, inside one `k_{k}/` folder per k when it has several.
The whole output is written beside `out` and renamed into place once complete, under the lock of
`out` (`hub_sae.io.folder_lock`): a second export to the same folder stops at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from hub_sae.io import inside, new_folder, write_folder
from hub_sae.sae import TopKSAE
from hub_sae.suite import SUITE_FILE, layer_folders

if TYPE_CHECKING:
    from hub_sae.delphi import DelphiExport

FORMATS = ("saelens", "sparsify", "delphi")
"""The layouts `export` writes."""
# SAELens reads a config without metadata.sae_lens_version as pre-6.0 and drops its metadata.
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_hook_name(sae: TopKSAE) -> str:
    """The SAE's hook in TransformerLens' naming (blocks.{L}.hook_resid_post)."""
    if sae.hookpoint == "resid_post" and sae.layer is not None:
        return f"blocks.{sae.layer}.hook_resid_post"
    return sae.hookpoint


def sparsify_hookpoint(sae: TopKSAE) -> str:
    """The SAE's hookpoint in sparsify's naming (layers.{L}, the block's output)."""
    if sae.hookpoint == "resid_post" and sae.layer is not None:
        return f"layers.{sae.layer}"
    return sae.hookpoint


def _folder_name(sae: TopKSAE, fmt: str) -> str:
    """The SAE's folder in the `fmt` layout: its hook name there."""
    return saelens_hook_name(sae) if fmt == "saelens" else sparsify_hookpoint(sae)


def write_saelens(sae: TopKSAE, folder: Path) -> None:
    """cfg.json + sae_weights.safetensors as SAELens 6's TopKSAE.save_model writes them."""
    folder.mkdir(parents=True)
    save_file(
        {
            "W_enc": sae.encoder.weight.detach().T.float().contiguous(),
            "b_enc": sae.encoder.bias.detach().float().contiguous(),
            "W_dec": sae.W_dec.detach().float().contiguous(),
            "b_dec": sae.b_dec.detach().float().contiguous(),
        },
        folder / "sae_weights.safetensors",
    )
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": sae.base_model,
            "hook_name": saelens_hook_name(sae),
            "policy": sae.policy,
        },
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_sparsify(sae: TopKSAE, folder: Path) -> None:
    """cfg.json + sae.safetensors as sparsify 1.3's SparseCoder.save_to_disk writes them."""
    folder.mkdir(parents=True)
    save_file(
        {name: t.detach().float().contiguous() for name, t in sae.state_dict().items()},
        folder / "sae.safetensors",
    )
    cfg = {
        "activation": "topk",
        "expansion_factor": max(sae.d_sae // sae.d_in, 1),
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg) + "\n")


def _write_sparsify_run(saes: list[TopKSAE], run: Path) -> None:
    """The run's config.json (sparsify's TrainConfig fields that say what was trained)."""
    hookpoints = [sparsify_hookpoint(sae) for sae in saes]
    config = {"model": saes[0].base_model, "hookpoints": hookpoints, "sae": {"k": saes[0].k}}
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")


WRITERS: dict[str, Callable[[TopKSAE, Path], None]] = {
    "saelens": write_saelens,
    "sparsify": write_sparsify,
}


def _load(
    repo_id_or_path: str | Path, layer: int | None, k: int | None
) -> dict[tuple[int, int], TopKSAE]:
    """{(layer, k): SAE}: every SAE of a local suite, else the one SAE `repo_id_or_path` names."""
    path = Path(repo_id_or_path).expanduser()
    if (path / SUITE_FILE).is_file() and layer is None and k is None:
        saes = {key: TopKSAE.from_pretrained(folder) for key, folder in layer_folders(path).items()}
    else:
        sae = TopKSAE.from_pretrained(repo_id_or_path, layer=layer, k=k)
        saes = {(sae.layer, sae.k): sae}
    return dict(sorted(saes.items(), key=lambda item: (item[0][1], item[0][0] or 0)))


def export(
    repo_id_or_path: str | Path,
    fmt: str,
    out: str | Path,
    layer: int | None = None,
    k: int | None = None,
    delphi: DelphiExport | None = None,
) -> list[Path]:
    """Write the SAE(s) of a suite, an SAE folder or a hub repo to `out` in the layout `fmt`.

    A suite exports whole unless `layer` or `k` picks one SAE. Returns the SAE folders written.
    `delphi` sets the text of the delphi cache, which only a local suite exports.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if fmt == "delphi":
        from hub_sae.delphi import export_delphi

        return export_delphi(repo_id_or_path, out, layer, k, delphi)
    with new_folder(out) as target:
        saes = _load(repo_id_or_path, layer, k)
        several_k = len({sae_k for _, sae_k in saes}) > 1
        written: list[Path] = []

        def fill(tmp: Path) -> None:
            runs: dict[Path, list[TopKSAE]] = {}
            for (_, sae_k), sae in saes.items():
                run = tmp / f"k_{sae_k}" if several_k else tmp
                runs.setdefault(run, []).append(sae)
                folder = inside(run, _folder_name(sae, fmt))  # the hookpoint comes from a file
                WRITERS[fmt](sae, folder)
                written.append(Path(out) / folder.relative_to(tmp))
            if fmt == "sparsify":
                for run, group in runs.items():
                    _write_sparsify_run(group, run)

        write_folder(target, fill)
    return written
