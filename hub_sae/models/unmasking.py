"""MiniLM with a fitted unmasking head: a stand-in for a real diffusion LM on the embedded default.

all-MiniLM-L6-v2 ships without its masked-LM head, so hub-sae fits one on the masked positions of
the pydoc training split (LLaDA's corruption, t ~ U(0, 1)): a linear transform of the last hidden
state whose output is tied to MiniLM's word embeddings, plus a log-prior bias,

    logits = s (W h + c) E^T + w log prior

with (W, c) in closed form (ridge regression of h onto the clean token's embedding) and the
temperature s and prior weight w picked by training cross entropy. The fit costs one MiniLM
forward over `HeadFit.fit_tokens` tokens and is cached (`cache_dir()`); `with_unmasking_head`
adds the head to a loaded MiniLM when a metric, decoding or the logit lens first needs logits.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput

from hub_sae.data import DataConfig, token_batches
from hub_sae.io import write_atomic
from hub_sae.masking import Corruption, corrupt
from hub_sae.models import DEFAULT_MODEL, BaseModel

HEAD_NAME = "MiniLM with a fitted unmasking head (a stand-in for a real diffusion LM)"
HEAD_FILE = "minilm-unmasking-head-v1.safetensors"
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
PRIOR_WEIGHTS = (0.0, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class HeadFit:
    """How the head is fitted (stored in the cache's metadata: a change refits)."""

    fit_tokens: int = 16_384
    """Context tokens of the pydoc training split read (about half of them masked)."""
    heldout_tokens: int = 4_096
    """Context tokens of the held-out split for the reported accuracy."""
    ridge: float = 1e-3
    """Ridge penalty per training row."""
    seed: int = 0


class UnmaskingHead(nn.Module):
    """logits = dense(h) @ E^T + bias, E the word embeddings (shared with the encoder)."""

    FITTED = ("dense.weight", "dense.bias", "bias")

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        vocab, d = word_embeddings.weight.shape
        self.dense = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.decoder = word_embeddings

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.dense(h), self.decoder.weight, self.bias)

    def fitted_state(self) -> dict[str, Tensor]:
        state = self.state_dict()
        return {name: state[name].detach().contiguous() for name in self.FITTED}


class MiniLMForUnmasking(nn.Module):
    """The MiniLM encoder and its unmasking head: forward returns `MaskedLMOutput(logits=...)`."""

    def __init__(self, encoder: nn.Module, head: UnmaskingHead):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.config = encoder.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> MaskedLMOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return MaskedLMOutput(logits=self.head(hidden))

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def cache_dir() -> Path:
    """HUB_SAE_CACHE, else ~/.cache/hub-sae (XDG_CACHE_HOME respected)."""
    if os.environ.get("HUB_SAE_CACHE"):
        return Path(os.environ["HUB_SAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hub-sae"


def _masked_states(base: BaseModel, split: str, tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """(last hidden state, clean token) at the masked positions of `tokens` context tokens."""
    data = DataConfig(split=split, ctx_len=128, batch_size=8, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    states, targets, seen = [], [], 0
    for input_ids, attention_mask in token_batches(
        data, base.tokenizer, base.bos_token_id, base.eos_token_id
    ):
        batch = corrupt(
            input_ids, attention_mask, base.mask_token_id, "mask", Corruption("llada"), generator
        )
        hidden = base.model(
            input_ids=batch.input_ids.to(base.device), attention_mask=attention_mask.to(base.device)
        ).last_hidden_state
        # the states that predict the masked tokens, aligned like logits (`BaseModel.align`)
        masked = batch.is_masked.to(base.device)
        states.append(base.align(hidden)[masked].float().cpu())
        targets.append(input_ids[batch.is_masked])
        seen += input_ids.numel()
        if seen >= tokens:
            break
    return torch.cat(states), torch.cat(targets)


def accuracy(head: UnmaskingHead, states: Tensor, targets: Tensor) -> float:
    """Share of masked positions whose most likely token is the clean one."""
    with torch.no_grad():
        return float((head(states).argmax(-1) == targets).float().mean())


@torch.no_grad()
def fit_head(base: BaseModel, fit: HeadFit = HeadFit()) -> tuple[UnmaskingHead, dict[str, str]]:
    """Fit the head on the pydoc training split; metadata includes the held-out accuracy."""
    start = time.perf_counter()
    states, targets = _masked_states(base, "train", fit.fit_tokens, fit.seed)
    heldout = _masked_states(base, "heldout", fit.heldout_tokens, fit.seed + 1)
    # fitted on the CPU in float32 (states and targets are there), then tied to the model's own
    embeddings = base.model.get_input_embeddings().weight.detach().float().cpu()
    head = UnmaskingHead(nn.Embedding.from_pretrained(embeddings))
    x = torch.cat([states, torch.ones(len(states), 1)], dim=1)
    gram = x.T @ x + fit.ridge * len(x) * torch.eye(x.shape[1])
    solution = torch.linalg.solve(gram, x.T @ embeddings[targets])  # [d + 1, d]
    counts = torch.bincount(targets, minlength=len(embeddings)).float() + 0.1
    log_prior = counts.log() - counts.sum().log()
    seen = targets.unique()  # the softmax over tokens seen in training picks s and w
    scores = (x @ solution) @ embeddings[seen].T
    labels = torch.searchsorted(seen, targets)
    scale, weight = min(
        itertools.product(TEMPERATURES, PRIOR_WEIGHTS),
        key=lambda sw: float(F.cross_entropy(sw[0] * scores + sw[1] * log_prior[seen], labels)),
    )
    head.dense.weight.copy_(scale * solution[:-1].T)
    head.dense.bias.copy_(scale * solution[-1])
    head.bias.copy_(weight * log_prior)
    meta = {
        "name": HEAD_NAME,
        "heldout_accuracy": f"{accuracy(head, *heldout):.4f}",
        "heldout_masked": str(len(heldout[1])),
        "train_masked": str(len(targets)),
        "temperature": str(scale),
        "prior_weight": str(weight),
        "fit_seconds": f"{time.perf_counter() - start:.1f}",
        **{field: str(value) for field, value in dataclasses.asdict(fit).items()},
    }
    return tied_head(base, head.fitted_state()), meta


def tied_head(base: BaseModel, fitted: dict[str, Tensor]) -> UnmaskingHead:
    """A head with the `fitted` tensors whose decoder is `base`'s own word embeddings."""
    head = UnmaskingHead(base.model.get_input_embeddings())
    head.load_state_dict({**fitted, "decoder.weight": head.decoder.weight}, strict=True)
    return head.requires_grad_(False).eval()


def load_or_fit_head(base: BaseModel, fit: HeadFit = HeadFit()) -> tuple[UnmaskingHead, dict]:
    """The cached head (cache_dir() / HEAD_FILE) when its settings match `fit`, else a new fit,
    written atomically."""
    path = cache_dir() / HEAD_FILE
    wanted = {field: str(value) for field, value in dataclasses.asdict(fit).items()}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in wanted.items()):
            return tied_head(base, load_file(str(path))), meta
    head, meta = fit_head(base, fit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(head.fitted_state(), metadata=meta))
    return head, meta


def with_unmasking_head(base: BaseModel) -> BaseModel:
    """`base` itself when it has an LM head; the embedded default MiniLM with its fitted head
    (loaded from the cache or fitted once); any other head-less encoder unchanged."""
    if base.has_lm_head or base.name != DEFAULT_MODEL:
        return base
    head, _ = load_or_fit_head(base)
    param = next(base.model.parameters())
    model = MiniLMForUnmasking(base.model, head.to(param.device, param.dtype)).eval()
    return dataclasses.replace(base, name=base.name, model=model, has_lm_head=True)
