"""Memory and communication per process, from the config and the base model's shape alone.

`plan(cfg, processes)` loads no weights and downloads nothing: the base model's size comes from its
config.json (local folder, the Hugging Face cache, or the embedded MiniLM), built on the meta
device, or from the known shapes of GSAI-ML/LLaDA-8B-Base and Dream-org/Dream-v0-Base-7B. The
trainer checks it against the device's free memory before it loads the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hub_sae.models import DEFAULT_MODEL, _read_config, family_of_config
from hub_sae.training.config import DISTRIBUTE, TrainConfig
from hub_sae.training.saes import placement, sae_numel

QWEN2_5_7B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
"""The shape keys of Qwen/Qwen2.5-7B's config.json (DLM-Scope's autoregressive baseline)."""
KNOWN = {
    "GSAI-ML/LLaDA-8B-Base": {"model_type": "llada"},
    "Dream-org/Dream-v0-Base-7B": {"model_type": "Dream"},
    "Qwen/Qwen2.5-7B": QWEN2_5_7B,
}
"""config.json of the models planned without it at hand (LLaDA and Dream: the defaults of hub_sae's
LLaDAConfig / DreamConfig, which are theirs)."""
FLOAT = 4
ADAM_STEP = 4
"""torch's Adam keeps a float32 step counter per parameter tensor."""
SAE_TENSORS = 4


class ModelShape(NamedTuple):
    params: int
    d_model: int
    n_layers: int
    d_ff: int
    """The MLP's hidden width."""


class ModePlan(NamedTuple):
    """Bytes on the busiest process of one distribute mode."""

    saes_per_process: int
    base_model: int
    base_forward: int
    sae_weights: int
    gradients: int
    adam_state: int
    dead_counters: int
    shuffle_buffer: int
    kept_activations: int
    step_temporaries: int
    per_process_bytes: int
    comm_bytes_per_step: int
    tokens_per_sae_per_step: int


def _config_json(name: str) -> Path | None:
    if name == DEFAULT_MODEL:
        from hub_sae.models.hf import default_model_path

        return Path(default_model_path()) / "config.json"
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser() / "config.json"
    if name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        return Path(cached) if isinstance(cached, str) else None
    return None


def _hf_model(config, folder: Path) -> torch.nn.Module:
    """The module `load_hf` ends up with: the masked-LM model, or its encoder when the checkpoint's
    weights (their names, read from the safetensors header only) hold no head."""
    try:
        model = AutoModelForMaskedLM.from_config(config)
    except ValueError:  # no masked-LM class for this architecture
        return AutoModel.from_config(config)
    weights = folder / "model.safetensors"
    if weights.is_file():
        prefix = model.base_model_prefix + "."
        head = {name for name, _ in model.named_parameters() if not name.startswith(prefix)}
        with safe_open(weights, "pt") as f:
            if head.isdisjoint(f.keys()):
                return model.base_model
    return model


def model_shape(name: str) -> ModelShape:
    """Parameters, width and depth of `name`, counted on the meta device (no weights)."""
    path = _config_json(name)
    if path is None and name not in KNOWN:
        raise FileNotFoundError(
            f"cannot plan for {name}: its config.json is neither local nor in the Hugging Face "
            f"cache; fetch it first (`hf download {name} config.json`) or pass a local folder."
        )
    config = _read_config(path) if path else KNOWN[name]
    kind = family_of_config(config, str(path or name))
    with torch.device("meta"):
        if kind == "llada":
            from hub_sae.models.llada import LLaDAConfig, LLaDAModelLM

            llada = LLaDAConfig.from_dict(config)
            model, d_model, n_layers = LLaDAModelLM(llada), llada.d_model, llada.n_layers
            d_ff = llada.mlp_hidden_size
        elif kind == "dream":
            from hub_sae.models.dream import DreamConfig, DreamModel

            dream = DreamConfig.from_dict(config)
            model, d_model = DreamModel(dream), dream.hidden_size
            n_layers, d_ff = dream.num_hidden_layers, dream.intermediate_size
        else:
            if path is None:
                hf = AutoConfig.for_model(**config)
            else:
                hf = AutoConfig.from_pretrained(path.parent, trust_remote_code=False)
            ar = kind == "ar"  # load_hf's causal LM, with its head
            model = AutoModelForCausalLM.from_config(hf) if ar else _hf_model(hf, path.parent)
            d_model, n_layers = hf.hidden_size, hf.num_hidden_layers
            d_ff = getattr(hf, "intermediate_size", None) or 4 * d_model
    return ModelShape(sum(p.numel() for p in model.parameters()), d_model, n_layers, d_ff)


def base_forward(cfg: TrainConfig, shape: ModelShape) -> int:
    """Peak bytes of one harvest: the forward of an LLM batch, which stops after the deepest hooked
    block (no logits), and the activations it keeps.

    One block's temporaries (embeddings, residual, norms, q/k/v and their copies: ~12 x d; the
    MLP's hidden layer and its activation: 2 x d_ff), the [B, 1, T, T] attention mask an HF model's
    SDPA builds (SDPA keeps no T x T scores), and each hooked block's selected rows (at most the
    policy's share of the positions) in the model's dtype, then stacked in float32. Checked against
    the peak RSS of a real harvest in tests/test_train.py.
    """
    tokens = cfg.llm_batch_size * cfg.ctx_len
    width = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    share = {"mask": cfg.t_max, "unmask": 1 - cfg.t_min}.get(cfg.policy, 1)
    block = tokens * (12 * shape.d_model + 2 * shape.d_ff) * width
    mask = cfg.llm_batch_size * cfg.ctx_len**2 * width
    kept = int(share * tokens) * len(cfg.layers) * shape.d_model * (width + FLOAT)
    return block + mask + kept


def plan_mode(cfg: TrainConfig, shape: ModelShape, processes: int, mode: str) -> ModePlan:
    d, d_sae, n_layers = shape.d_model, cfg.latents(shape.d_model), len(cfg.layers)
    n_saes = n_layers * len(cfg.ks)
    numel = sae_numel(d, d_sae)
    sharded = mode == "modules" and processes > 1
    owner = list(placement(cfg, d, processes, mode).values())
    owned = max(owner.count(r) for r in range(processes))
    batch, act = cfg.sae_batch_size, n_layers * d * FLOAT
    weights = owned * numel * FLOAT
    rows_in_step = processes * batch if sharded else batch
    # the step: its (shared) batch, one SAE's dense pre-activations, and per SAE the inputs and
    # reconstructions autograd keeps until the backward; replicate adds DDP's gradient buckets
    temporaries = rows_in_step * act + batch * d_sae * FLOAT + owned * 3 * rows_in_step * d * FLOAT
    if mode == "replicate" and processes > 1:
        temporaries += weights
    keep = 0
    if cfg.reuse_activations > 1:
        steps = cfg.total_tokens // (batch * processes)
        keep = -(-(steps + 1) * batch // cfg.reuse_activations) * act
    parts = dict(
        base_model=shape.params * torch.finfo(getattr(torch, cfg.dtype)).bits // 8,
        base_forward=base_forward(cfg, shape),
        sae_weights=weights,
        gradients=weights,
        adam_state=2 * weights + owned * SAE_TENSORS * ADAM_STEP,
        dead_counters=owned * d_sae * 8,
        shuffle_buffer=2 * cfg.buffer_tokens * act,  # the buffer and its shuffled copy at a fill
        kept_activations=keep,
        step_temporaries=temporaries,
    )
    ring = 2 * (processes - 1) / processes  # bytes a ring all-reduce moves per byte reduced
    if processes == 1:
        comm = 0
    elif sharded:  # all_gather of every process's activations
        comm = (processes - 1) * batch * act
    else:  # all-reduce of the gradients and of the fired-latent masks
        comm = int(ring * (weights + n_saes * d_sae * FLOAT))
    return ModePlan(
        saes_per_process=owned,
        **parts,
        per_process_bytes=sum(parts.values()),
        comm_bytes_per_step=comm,
        tokens_per_sae_per_step=processes * batch,
    )


def plan(cfg: TrainConfig, processes: int, shape: ModelShape | None = None) -> dict:
    """{"processes": N, "model": ..., "modes": {"replicate": {...}, "modules": {...}}}."""
    shape = shape or model_shape(cfg.model)
    return {
        "processes": processes,
        "model": cfg.model,
        "saes": len(cfg.layers) * len(cfg.ks),
        "modes": {  # modules needs an SAE per process
            mode: plan_mode(cfg, shape, processes, mode)._asdict()
            for mode in reversed(DISTRIBUTE)
            if mode == "replicate" or processes <= len(cfg.layers) * len(cfg.ks)
        },
    }


def format_plan(result: dict) -> str:
    """The plan as a Markdown table in GB (10^9 bytes)."""
    modes = result["modes"]
    head = (
        f"{result['model']}, {result['saes']} SAEs, {result['processes']} process(es), per process"
    )
    rows = [head, "", "| | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for key in next(iter(modes.values())):
        values = [m[key] for m in modes.values()]
        if key.endswith("_bytes") or key not in ("saes_per_process", "tokens_per_sae_per_step"):
            cells = [f"{v / 1e9:.2f} GB" for v in values]
        else:
            cells = [f"{v:,}" for v in values]
        rows.append(f"| {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(
    cfg: TrainConfig, processes: int, local_processes: int, device: torch.device
) -> dict:
    """The plan; raises MemoryError naming the fix when this launch would not fit on `device`."""
    shape = model_shape(cfg.model)
    result = plan(cfg, processes, shape)
    mode = cfg.mode(processes)
    sharing = 1 if device.type == "cuda" else local_processes  # CPU processes share one RAM
    # plan() leaves modules out when processes outnumber SAEs: plan_mode then names the problem
    need = plan_mode(cfg, shape, processes, mode).per_process_bytes * sharing
    free = free_memory(device)
    if need <= free:
        return result
    fixes = []
    if mode == "replicate" and processes > 1:
        fixes.append("--distribute modules")
    for more in range(processes + 1, len(cfg.layers) * len(cfg.ks) + 1):
        if plan_mode(cfg, shape, more, "modules").per_process_bytes * sharing <= free:
            fixes.append(f"more processes (modules fits from {more})")
            break
    fixes += [
        f"fewer --ks (now {cfg.ks})",
        f"a smaller --buffer_tokens (now {cfg.buffer_tokens})",
        f"a smaller --llm_batch_size (now {cfg.llm_batch_size})",
    ]
    raise MemoryError(
        f"the plan for {cfg.name} ({mode}, {processes} process(es)) needs "
        f"{need / 1e9:.1f} GB on {device} but {free / 1e9:.1f} GB are free. Try: "
        + "; ".join(fixes)
        + f". See `python training/train.py --config ... --plan --num_processes {processes}`."
    )
