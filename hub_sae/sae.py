"""The TopK sparse autoencoder (Gao et al. 2024) and its Hub integration.

    z     = TopK(ReLU(W_enc (x - b_dec) + b_enc))
    x_hat = z W_dec + b_dec                          (rows of W_dec have unit norm)

Only the k active latents of each token are ever touched after the encoder GEMM: decoding is an
`embedding_bag` over them, and the weight gradients are `embedding_bag`s too, over the (token,
latent) pairs sorted by latent, so no dense (tokens x d_sae) tensor is built in decode or in any
backward pass. AuxK works the same way, except over at most 2 d_in dead latents, where a dense
[tokens, n_dead] block and GEMMs are cheaper than gathering d_in / 2 rows per token.

Under `torch.autocast` the forward's GEMMs run in the autocast dtype (bfloat16) and every output
is cast back to the weights' dtype, so the losses and the backward (run outside autocast, as
torch advises) stay float32.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

REPO_URL = "https://github.com/AwesomeInterpretability/hub-sae"
PAPER_URL = "https://openreview.net/forum?id=yO5buOEUag"


class EncoderOutput(NamedTuple):
    """The k active latents of each token."""

    top_acts: Tensor
    """[N, k] activations of the active latents (>= 0)."""
    top_indices: Tensor
    """[N, k] indices of the active latents."""


class ForwardOutput(NamedTuple):
    """What `TopKSAE.forward` computes for one batch."""

    reconstruction: Tensor
    """[N, d_in] the decoded input."""
    latents: EncoderOutput
    """The active latents the reconstruction was decoded from."""
    fvu: Tensor
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch."""
    auxk_loss: Tensor | None
    """AuxK loss of the dead latents (only when `dead_mask` is given), normalised like `fvu`."""


def _tokens(indices: Tensor, first: int = 0) -> Tensor:
    """The token (row) of each entry of `indices` [N, K], flattened; tokens count from `first`."""
    n, k = indices.shape
    return torch.arange(first, first + n, device=indices.device).repeat_interleave(k)


WEIGHT_GRAD_PATHS = ("embedding_bag", "index_add")
"""The two kernels `_scatter_rows` can use (docs/design-notes.md)."""
weight_grad_path: dict[str, str] = {"cpu": "embedding_bag", "cuda": "embedding_bag"}
"""The `_scatter_rows` kernel per device type (`benchmarks/train_step.py --weight-grad`)."""
INDEX_ADD_CHUNK = 1 << 16
"""Pairs per `index_add_` call: bounds its [chunk, d] temporary."""


def _scatter_rows(
    latents: Tensor, tokens: Tensor, weights: Tensor, rows: Tensor, n_rows: int
) -> Tensor:
    """[n_rows, d]: for each (flat) pair p, weights[p] * rows[tokens[p]] summed into row latents[p].

    Either an `embedding_bag` whose bags are the latents and whose table is `rows` (each output row
    written once; the fast path on CPU) or chunked `index_add_`s of weighted [chunk, d] row blocks
    (atomic adds, no sort). Neither builds a [pairs, d] or [N, n_rows] tensor.
    """
    path = weight_grad_path.get(rows.device.type, "embedding_bag")
    if path == "index_add":
        out = rows.new_zeros(n_rows, rows.shape[1])
        for start in range(0, len(latents), INDEX_ADD_CHUNK):
            part = slice(start, start + INDEX_ADD_CHUNK)
            out.index_add_(0, latents[part], rows[tokens[part]] * weights[part, None])
        return out
    if path != "embedding_bag":
        raise ValueError(f"weight_grad_path must be one of {WEIGHT_GRAD_PATHS}; got {path!r}.")
    # A stable sort of int32 keys: the fastest on CPU (docs/design-notes.md).
    order = latents.int().argsort(stable=True)
    counts = torch.bincount(latents, minlength=n_rows)
    return F.embedding_bag(
        tokens[order],
        rows,
        counts.cumsum(0) - counts,
        per_sample_weights=weights[order],
        mode="sum",
    )


def _gather_dot(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """[N, K]: rows[n] . table[indices[n, j]], i.e. embedding_bag's per-sample-weight gradient."""
    n, k = indices.shape
    if k == 0:
        return rows.new_zeros(n, 0)
    offsets = torch.arange(0, n * k, k, device=indices.device)
    dtype = rows.dtype
    if rows.is_cuda and dtype in (torch.bfloat16, torch.float16):  # no CUDA kernel for these
        rows, table = rows.float(), table.float()
    return (
        torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows.contiguous(), table, indices.flatten(), offsets, _tokens(indices), 0
        )
        .view(n, k)
        .to(dtype)
    )


def _decode(weight: Tensor, acts: Tensor, indices: Tensor) -> Tensor:
    """sum_j acts[n, j] weight[indices[n, j]]; for 1-D `indices`, acts is a block over those."""
    if indices.dim() == 1:
        return acts @ weight.index_select(0, indices)
    if indices.shape[1] == 0:
        return acts.new_zeros(len(acts), weight.shape[1])
    return F.embedding_bag(indices, weight, per_sample_weights=acts, mode="sum")


def _aux_select(
    pre_acts: Tensor, dead: Tensor | None, k_aux: int, block: bool
) -> tuple[Tensor, Tensor]:
    """AuxK's (values, indices): the k_aux largest pre-activations among the `dead` latents.

    As [N, k_aux] values and latent indices, or with `block` as a dense [N, n_dead] block over the
    1-D `dead` (zero where not selected). No dead latents: empty [N, 0] values and indices.
    """
    if dead is None or k_aux == 0:
        empty = pre_acts.new_zeros(len(pre_acts), 0)
        return empty, empty.long()
    pre_dead = pre_acts[:, dead]
    values, local = pre_dead.topk(k_aux, dim=-1, sorted=False)
    if block:
        return pre_dead * torch.zeros_like(pre_dead).scatter_(1, local, 1.0), dead
    return values, dead[local]


class _TopKEncoder(torch.autograd.Function):
    """ReLU of the top k of (x - b_dec) W^T + b, plus AuxK's selection (`_aux_select`); the
    backward only touches the selected latents (and the dead block) and makes one gradient per
    parameter for both selections."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        b_dec: Tensor,
        weight: Tensor,
        bias: Tensor,
        k: int,
        dead: Tensor | None = None,
        k_aux: int = 0,
        block: bool = False,
    ):
        """(top-k activations, their indices, AuxK's values, AuxK's indices)."""
        sae_in = x - b_dec
        pre_acts = F.linear(sae_in, weight, bias)  # under autocast: a bfloat16 GEMM
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
        aux_values, aux_indices = _aux_select(pre_acts, dead, k_aux, block)
        # Back to the weights' dtype: the decoder, the losses and this backward stay float32.
        values, aux_values = values.to(weight.dtype), aux_values.to(weight.dtype)
        ctx.save_for_backward(sae_in, weight, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        ctx.set_materialize_grads(False)  # a missing gradient stays None, not a dense zero
        # AuxK keeps the raw pre-activations: a ReLU would cut the gradient that revives a dead
        # latent, whose pre-activations are negative (docs/design-notes.md).
        return values.relu(), indices, aux_values, aux_indices

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_acts, _grad_indices, grad_aux, _grad_aux_indices
    ):
        """Gradients of x, b_dec, weight and bias, touching only the selected latents' rows."""
        sae_in, weight, indices, values, aux_indices, aux_values = ctx.saved_tensors
        need_x, need_b_dec, need_weight, need_bias = ctx.needs_input_grad[:4]
        n_rows = weight.shape[0]
        # ReLU; a missing gradient is a zero one
        grad = grad_acts * (values > 0) if grad_acts is not None else torch.zeros_like(values)
        grad_aux = grad_aux if grad_aux is not None else torch.zeros_like(aux_values)
        block = aux_indices.dim() == 1
        if block:  # dense block: only the selected (non-zero) entries count
            grad_aux = grad_aux * (aux_values != 0)
        else:  # one sparse selection: the top k and AuxK's side by side
            indices, grad = torch.cat([indices, aux_indices], 1), torch.cat([grad, grad_aux], 1)
        grad_x = grad_b_dec = grad_weight = grad_bias = None
        if need_weight:
            grad_weight = _scatter_rows(
                indices.flatten(), _tokens(indices), grad.flatten(), sae_in, n_rows
            )
            if block:
                grad_weight.index_add_(0, aux_indices, grad_aux.T @ sae_in)
        if need_bias or need_b_dec:
            grad_bias = grad.new_zeros(n_rows).index_add_(0, indices.flatten(), grad.flatten())
            if block:
                grad_bias.index_add_(0, aux_indices, grad_aux.sum(0))
        if need_x:
            grad_x = _decode(weight, grad, indices)
            if block:
                grad_x += _decode(weight, grad_aux, aux_indices)
        if need_b_dec:
            # -sum_n grad_x[n] = -grad_bias W: one [d_sae] x [d_sae, d] product, not N * K rows.
            grad_b_dec = -(grad_x.sum(0) if grad_x is not None else grad_bias @ weight)
        if not need_bias:
            grad_bias = None
        return grad_x, grad_b_dec, grad_weight, grad_bias, None, None, None, None


class _Decode(torch.autograd.Function):
    """`_decode` of the top k and of AuxK's selection, with one sparse gradient for the weight."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, acts: Tensor, indices: Tensor, aux_acts: Tensor, aux_indices: Tensor
    ):  # type: ignore[override]
        """(decoded top k, decoded AuxK selection), both without b_dec."""
        ctx.save_for_backward(weight, acts, indices, aux_acts, aux_indices)
        ctx.set_materialize_grads(False)
        decoded = _decode(weight, acts, indices)
        aux_decoded = _decode(weight, aux_acts, aux_indices)
        return decoded.to(weight.dtype), aux_decoded.to(weight.dtype)  # a GEMM may autocast

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_aux: Tensor | None):  # type: ignore[override]
        """Gradients of weight, acts and aux_acts; the weight's is one sum over selected rows."""
        weight, acts, indices, aux_acts, aux_indices = ctx.saved_tensors
        grad = grad.contiguous() if grad is not None else acts.new_zeros(len(acts), weight.shape[1])
        grad_aux = grad_aux if grad_aux is not None else torch.zeros_like(grad)
        block = aux_indices.dim() == 1
        grad_weight = grad_acts = grad_aux_acts = None
        if ctx.needs_input_grad[1]:
            grad_acts = _gather_dot(indices, weight, grad)
        if ctx.needs_input_grad[3]:
            grad_aux_acts = (
                grad_aux @ weight.index_select(0, aux_indices).T
                if block
                else _gather_dot(aux_indices, weight, grad_aux)
            )
        if ctx.needs_input_grad[0] and block:
            grad_weight = _scatter_rows(
                indices.flatten(), _tokens(indices), acts.flatten(), grad, weight.shape[0]
            )
            grad_weight.index_add_(0, aux_indices, aux_acts.T @ grad_aux)
        elif ctx.needs_input_grad[0]:  # rows of `grad` for the top k, of `grad_aux` for AuxK
            grad_weight = _scatter_rows(
                torch.cat([indices.flatten(), aux_indices.flatten()]),
                torch.cat([_tokens(indices), _tokens(aux_indices, len(grad))]),
                torch.cat([acts.flatten(), aux_acts.flatten()]),
                torch.cat([grad, grad_aux.contiguous()]),
                weight.shape[0],
            )
        return grad_weight, grad_acts, None, grad_aux_acts, None


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
        # The encoder starts as the transpose of the unit-norm decoder (Gao et al.): far fewer
        # latents die than from nn.Linear's start (docs/design-notes.md). `match_scale` rescales it.
        self.encoder.weight.data.copy_(self.W_dec.data)

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.b_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters; inputs are cast to it."""
        return self.b_dec.dtype

    def require_resid_post(self, use: str) -> TopKSAE:
        """This SAE if it reads a block's output (`resid_post` of a known layer), else a ValueError
        naming its hookpoint, `use` and the fix. Call it wherever an SAE meets the residual stream."""
        if self.hookpoint == "resid_post" and self.layer is not None:
            return self
        block = "no block (its layer is unset)" if self.layer is None else f"block {self.layer}"
        raise ValueError(
            f"{use} applies SAEs to the residual stream after a block (resid_post), but this SAE "
            f"reads {self.hookpoint!r} of {block}: its latents would be read from and written to "
            "the wrong activations. Use an SAE trained on a block's output: hookpoint 'resid_post' "
            "with its layer set (sparsify `layers.N`, SAELens `blocks.N.hook_resid_post` or "
            "`blocks.N+1.hook_resid_pre`)."
        )

    def _check_width(self, x: Tensor) -> None:
        """A ValueError naming d_in unless `x`'s last dimension is d_in."""
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            width = x.shape[-1] if x.dim() else "a scalar"
            raise ValueError(
                f"expected last dim d_in={self.d_in}, got {width} (input shape {tuple(x.shape)}); "
                f"pass the {self.hookpoint} activations of the model this SAE was trained on "
                f"({self.base_model or 'see its config'})."
            )

    def encode(self, x: Tensor) -> EncoderOutput:
        """The k active latents of each row of `x` ([..., d_in])."""
        self._check_width(x)
        top_acts, top_indices, _, _ = _TopKEncoder.apply(
            x.reshape(-1, self.d_in).to(self.dtype),
            self.b_dec,
            self.encoder.weight,
            self.encoder.bias,
            self.k,
        )
        shape = (*x.shape[:-1], self.k)
        return EncoderOutput(top_acts.reshape(shape), top_indices.reshape(shape))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sum of the active decoder rows (an `embedding_bag`, never a dense product) plus b_dec."""
        acts = top_acts.reshape(-1, top_acts.shape[-1]).to(self.dtype)
        indices = top_indices.reshape(-1, top_indices.shape[-1])
        none = indices[:, :0]
        flat, _ = _Decode.apply(self.W_dec, acts, indices, acts[:, :0], none)
        return (flat + self.b_dec).reshape(*top_acts.shape[:-1], self.d_in)

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None
    ) -> ForwardOutput:
        """Encode, decode and score a batch `x` [N, d_in]; AuxK over the `dead_mask` latents."""
        self._check_width(x)
        if x.dim() != 2:
            raise ValueError(
                f"forward takes [N, d_in={self.d_in}], got shape {tuple(x.shape)}; flatten the "
                f"tokens first: x.reshape(-1, {self.d_in})."
            )
        x = x.to(self.dtype)
        dead = None if dead_mask is None else dead_mask.nonzero().squeeze(-1)
        if dead is not None:
            k_aux = min(k_aux or self.d_in // 2, dead.numel())
        # Few dead latents (at most 2 d_in) are mostly selected: a dense block over them beats
        # gathering k_aux rows per token (see `_aux_select`).
        block = dead is not None and dead.numel() <= 2 * self.d_in
        top_acts, top_indices, aux_acts, aux_indices = _TopKEncoder.apply(
            x, self.b_dec, self.encoder.weight, self.encoder.bias, self.k, dead, k_aux or 0, block
        )
        # AuxK's latents predict the residual, which has no b_dec in it: decode them without it.
        decoded, residual_hat = _Decode.apply(
            self.W_dec, top_acts, top_indices, aux_acts, aux_indices
        )
        x_hat = decoded + self.b_dec
        residual = x - x_hat
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance

        auxk_loss = None
        if dead is not None:
            auxk_loss = x.new_zeros(())
            if k_aux > 0:
                # Normalised by the residual's own variance (Gao et al.): measured against the
                # total variance the term fades as FVU drops and dead latents stay dead.
                e = residual.detach()
                auxk_loss = (residual_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        return ForwardOutput(x_hat, EncoderOutput(top_acts, top_indices), fvu, auxk_loss)

    @torch.no_grad()
    def match_scale(self, x: Tensor) -> float:
        """Scale the encoder so that the reconstruction of `x` [N, d_in] is as far from b_dec as x.

        Call it once before training (encoder bias still 0, b_dec set): with unit-norm encoder rows
        the k largest activations can overshoot the input and the first steps diverge
        (docs/design-notes.md). Returns the factor applied.
        """
        x = x.to(self.dtype)
        reach = (self(x).reconstruction - self.b_dec).norm()
        factor = ((x - self.b_dec).norm() / reach.clamp_min(torch.finfo(self.dtype).eps)).item()
        self.encoder.weight.mul_(factor)
        self.encoder.bias.mul_(factor)
        return factor

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale each row of W_dec to unit norm."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(
            torch.finfo(self.dtype).eps
        )

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of W_dec's gradient that would change the (unit) row norms."""
        if self.W_dec.grad is None:
            return
        # In place, without a [d_sae, d_in] temporary: at large d_in a fresh one costs more (page
        # faults) than the arithmetic (docs/design-notes.md).
        parallel = torch.einsum("ij,ij->i", self.W_dec.grad, self.W_dec.data)
        self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec.data, value=-1.0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x / scale take raw x (biases scale; W_dec stays unit-norm)."""
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
        model.safetensors), DLM-Scope / dictionary_learning
        (saes_*/resid_post_layer_{L}/trainer_*/ae.pt), sparsify (cfg.json + sae.safetensors) and
        SAELens (cfg.json + sae_weights.safetensors). `layer` picks a layer (default: the suite's
        default layer); `k` picks among SAEs of one layer trained with different k (default: the
        suite's default k, else the smallest). Remote repos download only the chosen folder.
        """
        from hub_sae.formats import load_sae
        from hub_sae.io import HubOptions

        hub = HubOptions(revision, cache_dir, token, local_files_only)
        loaded = load_sae(repo_id_or_path, layer, k, subfolder=subfolder, hub=hub)
        with torch.device("meta"):  # shapes were checked: no need to allocate and initialise twice
            sae = cls(**loaded.kwargs)
        sae.load_state_dict(loaded.state, strict=True, assign=True)
        return sae.eval().to(device)

    @classmethod
    def load_suite(
        cls, repo_id_or_path: str | Path, k: int | None = None, **kwargs
    ) -> dict[int, TopKSAE]:
        """All layers of a suite (or of a DLM-Scope release) as {layer: TopKSAE}.

        `k` picks the SAEs of one k (default: the suite's default k, else the smallest); `kwargs`
        are those of `from_pretrained`.
        """
        from hub_sae.formats import available_layers
        from hub_sae.io import HubOptions

        hub = HubOptions(**{f.name: kwargs[f.name] for f in fields(HubOptions) if f.name in kwargs})
        layers = available_layers(repo_id_or_path, subfolder=kwargs.get("subfolder"), k=k, hub=hub)
        return {
            layer: cls.from_pretrained(repo_id_or_path, layer=layer, k=k, **kwargs)
            for layer in layers
        }
