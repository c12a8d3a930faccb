"""The TopK sparse autoencoder (Gao et al. 2024) and its Hub integration.

    z     = TopK(ReLU(W_enc (x - b_dec) + b_enc))
    x_hat = z W_dec + b_dec                          (rows of W_dec have unit norm)

Only the k active latents of each token are ever touched after the encoder GEMM: decoding is an
`embedding_bag` over them, and the encoder's backward scatters its gradient through the same
k indices, so no dense (tokens x d_sae) tensor is built in decode or in any backward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

REPO_URL = "https://github.com/AwesomeInterpretability/hub-sae"
PAPER_URL = "https://openreview.net/forum?id=yO5buOEUag"


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[N, k] activations of the active latents (>= 0)."""
    top_indices: Tensor
    """[N, k] indices of the active latents."""


class ForwardOutput(NamedTuple):
    reconstruction: Tensor
    """[N, d_in] the decoded input."""
    latents: EncoderOutput
    fvu: Tensor
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch."""
    auxk_loss: Tensor | None
    """AuxK loss of the dead latents (only when `dead_mask` is given), normalised like `fvu`."""


def _scatter_rows_grad(indices: Tensor, weights: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """sum over (n, j) of weights[n, j] * rows[n] into row indices[n, j] of an [n_rows, d] tensor.

    This is exactly the weight gradient of `embedding_bag`, so that kernel does the scatter
    without materialising an [N, k, d] or [N, n_rows] tensor.
    """
    with torch.enable_grad():
        table = torch.zeros(n_rows, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        table.requires_grad_(True)
        bag = F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
        (grad,) = torch.autograd.grad(bag, table, rows)
    return grad


class _TopKEncoder(torch.autograd.Function):
    """ReLU + top-k of x W^T + b whose backward only touches the selected latents."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):  # type: ignore[override]
        pre_acts = F.relu(F.linear(x, weight, bias))
        top_acts, top_indices = pre_acts.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, weight, top_indices)
        ctx.mark_non_differentiable(top_indices, pre_acts)
        ctx.set_materialize_grads(False)  # else autograd builds a dense zero grad for pre_acts
        return top_acts, top_indices, pre_acts

    @staticmethod
    def backward(ctx, grad_acts: Tensor, _grad_indices, _grad_pre):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if grad_acts is None:
            return grad_x, grad_weight, grad_bias, None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad_acts, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = _scatter_rows_grad(indices, grad_acts, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad_acts.dtype, device=grad_acts.device)
            grad_bias.index_add_(0, indices.flatten(), grad_acts.flatten())
        return grad_x, grad_weight, grad_bias, None


class _SelectedEncoder(torch.autograd.Function):
    """Gradient of given pre-activation entries (used by AuxK) without a dense backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, pre_acts: Tensor, indices: Tensor):  # type: ignore[override]
        ctx.save_for_backward(x, weight, indices)
        return pre_acts.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad_acts: Tensor):  # type: ignore[override]
        return _TopKEncoder.backward(ctx, grad_acts, None, None)[:3] + (None, None)


class TopKSAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hub-sae",
    tags=["sparse-autoencoder", "interpretability", "diffusion-language-model", "topk-sae"],
    repo_url=REPO_URL,
    paper_url=PAPER_URL,
    license="apache-2.0",
):
    """A TopK sparse autoencoder over the `hookpoint` activations of `layer` of `base_model`."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        layer: int | None = None,
        hookpoint: str = "resid_post",
        base_model: str | None = None,
        policy: str = "mask",
    ):
        super().__init__()
        if not 0 < k < d_sae:
            raise ValueError(f"k must satisfy 0 < k < d_sae; got k={k}, d_sae={d_sae}.")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.layer, self.hookpoint, self.base_model, self.policy = (
            layer,
            hookpoint,
            base_model,
            policy,
        )
        self.encoder = nn.Linear(d_in, d_sae)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.set_decoder_norm_to_unit_norm()

    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.b_dec.dtype

    def _pre_and_top(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sae_in = x.to(self.dtype) - self.b_dec
        top_acts, top_indices, pre_acts = _TopKEncoder.apply(
            sae_in, self.encoder.weight, self.encoder.bias, self.k
        )
        return top_acts, top_indices, pre_acts

    def encode(self, x: Tensor) -> EncoderOutput:
        """The k active latents of each row of `x` ([..., d_in])."""
        top_acts, top_indices, _ = self._pre_and_top(x.reshape(-1, self.d_in))
        shape = (*x.shape[:-1], self.k)
        return EncoderOutput(top_acts.reshape(shape), top_indices.reshape(shape))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sum of the active decoder rows (an `embedding_bag`, never a dense product) plus b_dec."""
        flat = F.embedding_bag(
            top_indices.reshape(-1, top_indices.shape[-1]),
            self.W_dec,
            per_sample_weights=top_acts.reshape(-1, top_acts.shape[-1]).to(self.dtype),
            mode="sum",
        )
        return (flat + self.b_dec).reshape(*top_acts.shape[:-1], self.d_in)

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None
    ) -> ForwardOutput:
        """Encode, decode and score a batch `x` [N, d_in]; AuxK loss over `dead_mask` [d_sae] latents."""
        x = x.to(self.dtype)
        sae_in = x - self.b_dec
        top_acts, top_indices, pre_acts = _TopKEncoder.apply(
            sae_in, self.encoder.weight, self.encoder.bias, self.k
        )
        x_hat = self.decode(top_acts, top_indices)
        residual = x - x_hat
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance

        auxk_loss = None
        if dead_mask is not None:
            dead = dead_mask.nonzero().squeeze(-1)
            k_aux = min(k_aux or self.d_in // 2, dead.numel())
            auxk_loss = x.new_zeros(())
            if k_aux > 0:
                _, local = pre_acts[:, dead].topk(k_aux, dim=-1, sorted=False)
                aux_indices = dead[local]
                aux_acts = _SelectedEncoder.apply(
                    sae_in, self.encoder.weight, self.encoder.bias, pre_acts, aux_indices
                )
                # The aux latents predict the residual, which has no b_dec in it: decode without it.
                residual_hat = F.embedding_bag(
                    aux_indices, self.W_dec, per_sample_weights=aux_acts, mode="sum"
                )
                auxk_loss = (residual_hat - residual.detach()).pow(2).sum() / total_variance
        return ForwardOutput(x_hat, EncoderOutput(top_acts, top_indices), fvu, auxk_loss)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(
            torch.finfo(self.dtype).eps
        )

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of W_dec's gradient that would change the (unit) row norms."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x / scale take raw x: latents and biases scale, W_dec stays unit-norm."""
        self.encoder.bias.mul_(scale)
        self.b_dec.mul_(scale)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        repo_id_or_path: str | Path,
        layer: int | None = None,
        k: int | None = None,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        device: str | torch.device = "cpu",
    ) -> TopKSAE:
        """Load one SAE from a hub repo or a local folder in any supported layout.

        Layouts: our suite (suite.json + layer_{L}/), a single SAE folder (config.json +
        model.safetensors), DLM-Scope / dictionary_learning (saes_*/resid_post_layer_{L}/trainer_*/ae.pt),
        sparsify (cfg.json + sae.safetensors) and SAELens (cfg.json + sae_weights.safetensors).
        `layer` picks a layer (default: the suite's default layer); `k` picks among SAEs of one layer
        trained with different k (default: the smallest). Remote repos download only the chosen folder.
        """
        from hub_sae.formats import load_sae

        return load_sae(
            repo_id_or_path,
            layer=layer,
            k=k,
            revision=revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        ).to(device)

    @classmethod
    def load_suite(cls, repo_id_or_path: str | Path, **kwargs) -> dict[int, TopKSAE]:
        """All layers of a suite (or of a DLM-Scope release) as {layer: TopKSAE}."""
        from hub_sae.formats import available_layers

        layers = available_layers(
            repo_id_or_path, **{k: v for k, v in kwargs.items() if k != "device"}
        )
        return {
            layer: cls.from_pretrained(repo_id_or_path, layer=layer, **kwargs) for layer in layers
        }
