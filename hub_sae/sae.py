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


def _by_latent(indices: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, slot) pairs of `indices` [N, K] grouped by latent, as `embedding_bag` input.

    Returns (order, tokens, offsets): `order` sorts the flattened pairs by latent, `tokens` [N * K]
    is the token of each sorted pair and `offsets` [n_rows] where each latent's pairs start.
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # on CPU the stable sort is the fast one
    counts = torch.bincount(flat, minlength=n_rows)
    tokens = order.div(indices.shape[-1], rounding_mode="floor")
    return order, tokens, counts.cumsum(0) - counts


def _scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d]: the sum over (n, j) of weights[n, j] * rows[n] into row indices[n, j].

    An `embedding_bag` whose bags are the latents and whose table is `rows`: each output row is
    written once, and no [N, K, d] or [N, n_rows] tensor is built.
    """
    order, tokens, offsets = _by_latent(indices, n_rows)
    return F.embedding_bag(
        tokens, rows, offsets, per_sample_weights=weights.flatten()[order], mode="sum"
    )


def _gather_dot(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """[N, K]: rows[n] . table[indices[n, j]], i.e. embedding_bag's per-sample-weight gradient."""
    n, k = indices.shape
    offsets = torch.arange(0, n * k, k, device=indices.device)
    offset2bag = torch.arange(n, device=indices.device).repeat_interleave(k)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.contiguous(), table, indices.flatten(), offsets, offset2bag, 0
    ).view(n, k)


class _TopKEncoder(torch.autograd.Function):
    """ReLU of the top k of (x - b_dec) W^T + b, whose backward only touches the selected latents."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor, k: int):  # type: ignore[override]
        sae_in = x - b_dec
        pre_acts = F.linear(sae_in, weight, bias)
        values, top_indices = pre_acts.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(sae_in, weight, top_indices, values)
        ctx.mark_non_differentiable(top_indices, pre_acts)
        ctx.set_materialize_grads(False)  # else autograd builds a dense zero grad for pre_acts
        return values.relu(), top_indices, pre_acts

    @staticmethod
    def backward(ctx, grad_acts: Tensor, _grad_indices, _grad_pre):  # type: ignore[override]
        return _encoder_backward(ctx, grad_acts) + (None,)


class _SelectedEncoder(torch.autograd.Function):
    """ReLU of given pre-activation entries (AuxK's latents), with the same sparse backward."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        b_dec: Tensor,
        weight: Tensor,
        bias: Tensor,
        pre_acts: Tensor,
        indices: Tensor,
    ):  # type: ignore[override]
        values = pre_acts.gather(-1, indices)
        ctx.save_for_backward(x - b_dec, weight, indices, values)
        return values.relu()

    @staticmethod
    def backward(ctx, grad_acts: Tensor):  # type: ignore[override]
        return _encoder_backward(ctx, grad_acts) + (None, None)


def _encoder_backward(ctx, grad_acts: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients of (x, b_dec, weight, bias) from those of the selected activations."""
    if grad_acts is None:
        return None, None, None, None
    sae_in, weight, indices, values = ctx.saved_tensors
    need_x, need_b_dec, need_weight, need_bias = ctx.needs_input_grad[:4]
    grad = grad_acts * (values > 0)  # ReLU
    grad_x = grad_b_dec = grad_weight = grad_bias = None
    if need_weight:
        grad_weight = _scatter_rows(indices, grad, sae_in, weight.shape[0])
    if need_bias or need_b_dec:
        grad_bias = grad.new_zeros(weight.shape[0]).index_add_(0, indices.flatten(), grad.flatten())
    if need_x:
        grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
    if need_b_dec:
        # -sum_n grad_x[n] = -grad_bias W: one [d_sae] x [d_sae, d] product instead of N * K rows.
        grad_b_dec = -(grad_x.sum(0) if grad_x is not None else grad_bias @ weight)
    return grad_x, grad_b_dec, grad_weight, grad_bias if need_bias else None


class _Decode(torch.autograd.Function):
    """sum_j acts[n, j] * weight[indices[n, j]] (an `embedding_bag`) with a sparse backward."""

    @staticmethod
    def forward(ctx, acts: Tensor, indices: Tensor, weight: Tensor):  # type: ignore[override]
        ctx.save_for_backward(acts, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        acts, indices, weight = ctx.saved_tensors
        grad_acts = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_acts = _gather_dot(indices, weight, grad)
        if ctx.needs_input_grad[2]:
            grad_weight = _scatter_rows(indices, acts, grad.contiguous(), weight.shape[0])
        return grad_acts, None, grad_weight


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
        """(top_acts, top_indices, pre_acts) of `x` [N, d_in]; pre_acts before the ReLU."""
        return _TopKEncoder.apply(
            x.to(self.dtype), self.b_dec, self.encoder.weight, self.encoder.bias, self.k
        )

    def encode(self, x: Tensor) -> EncoderOutput:
        """The k active latents of each row of `x` ([..., d_in])."""
        top_acts, top_indices, _ = self._pre_and_top(x.reshape(-1, self.d_in))
        shape = (*x.shape[:-1], self.k)
        return EncoderOutput(top_acts.reshape(shape), top_indices.reshape(shape))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sum of the active decoder rows (an `embedding_bag`, never a dense product) plus b_dec."""
        flat = _Decode.apply(
            top_acts.reshape(-1, top_acts.shape[-1]).to(self.dtype),
            top_indices.reshape(-1, top_indices.shape[-1]),
            self.W_dec,
        )
        return (flat + self.b_dec).reshape(*top_acts.shape[:-1], self.d_in)

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None
    ) -> ForwardOutput:
        """Encode, decode and score a batch `x` [N, d_in]; AuxK loss over `dead_mask` [d_sae] latents."""
        x = x.to(self.dtype)
        top_acts, top_indices, pre_acts = self._pre_and_top(x)
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
                residual_hat = self._aux_decode(x, pre_acts, dead, k_aux)
                # Normalised by the residual's own variance (Gao et al.): measured against the
                # total variance the term fades as FVU drops and dead latents stay dead.
                e = residual.detach()
                auxk_loss = (residual_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        return ForwardOutput(x_hat, EncoderOutput(top_acts, top_indices), fvu, auxk_loss)

    def _aux_decode(self, x: Tensor, pre_acts: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """The residual as the k_aux most active dead latents of each token decode it.

        No b_dec: the residual has none. When there are few dead latents (at most 2 d_in) most of
        the [N, n_dead] block is selected, and GEMMs over it beat gathering k_aux rows per token.
        """
        pre_dead = pre_acts[:, dead]
        _, local = pre_dead.topk(k_aux, dim=-1, sorted=False)
        weight, bias = self.encoder.weight, self.encoder.bias
        if dead.numel() > 2 * self.d_in:
            indices = dead[local]
            acts = _SelectedEncoder.apply(x, self.b_dec, weight, bias, pre_acts, indices)
            return _Decode.apply(acts, indices, self.W_dec)
        selected = torch.zeros_like(pre_dead).scatter_(1, local, 1.0)
        weight = weight.index_select(0, dead)
        # (x - b_dec) W^T + b = x W^T + (b - W b_dec): b_dec's gradient is then a matrix-vector
        # product rather than an [N, n_dead] x [n_dead, d_in] one.
        pre = F.linear(x, weight, bias.index_select(0, dead) - weight @ self.b_dec)
        return (pre.relu() * selected) @ self.W_dec.index_select(0, dead)

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
        # In place and without a [d_sae, d_in] temporary: at d_in 4096 each fresh one costs more
        # (page faults) than the arithmetic.
        parallel = torch.einsum("ij,ij->i", self.W_dec.grad, self.W_dec.data)
        self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec.data, value=-1.0)

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
