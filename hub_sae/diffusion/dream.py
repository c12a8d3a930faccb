"""Dream's decoding, as its official `diffusion_generate` (`_sample`), watched and steered through SAEs.

    x = input_ids + max_new_tokens mask tokens; timesteps = linspace(1, eps, steps + 1)
    for each step i, with t, s = timesteps[i], timesteps[i + 1]:
        logits of x, row j scoring token j (shifted families: the logits at j - 1, `BaseModel.align`)
        sample_tokens at every masked position: logits / temperature (> 0), top_p, top_k, softmax;
            x0 drawn from the probabilities (temperature > 0) or their argmax; confidence = p(x0)
        origin: commit each masked position with probability 1 - s / t (all at the last step)
        maskgit_plus / topk_margin / entropy: confidence p(x0), top1 - top2 or sum p log p;
            commit the n = int(masks / B * (1 - s / t)) most confident (all at the last step),
            or n drawn without replacement from softmax(confidence / alg_temp) when alg_temp > 0

Random numbers come from `generator` in the reference's order: per step, origin draws the uniform
numbers then the tokens; the other algs draw the tokens (temperature > 0), then the positions
(alg_temp > 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hub_sae.diffusion.checks import check_number, check_prompt, check_whole
from hub_sae.diffusion.steer import Steer
from hub_sae.diffusion.timeline import Generation, Recording, token_logits
from hub_sae.models import BaseModel, vocab_limit
from hub_sae.sae import TopKSAE

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(probs, confidence, x0) of logits [n, V] as the reference's `sample_tokens`: removed ids
    (top_p, top_k) get the dtype's minimum; x0 is one multinomial draw per row at temperature > 0
    (as `torch.distributions.Categorical`), else the argmax; confidence = probs[x0]."""
    if temperature > 0:
        logits = logits / temperature
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        remove = ordered.softmax(dim=-1).cumsum(dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first id past top_p too
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), low)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    probs = torch.softmax(logits, dim=-1)
    if not torch.isfinite(probs).all():  # the reference falls back to argmax without a word
        raise ValueError(
            f"sampling probabilities are not finite (NaN or inf) at temperature {temperature}: "
            f"the model's logits are NaN or overflow; check its weights and dtype, or raise the "
            f"temperature."
        )
    if temperature > 0:
        normalized = probs / probs.sum(dim=-1, keepdim=True)
        x0 = torch.multinomial(normalized, 1, replacement=True, generator=generator)[:, 0]
        return probs, probs.gather(-1, x0[:, None])[:, 0], x0
    confidence, x0 = probs.max(dim=-1)
    return probs, confidence, x0


def _check(max_new_tokens, steps, alg, alg_temp, temperature, top_p, top_k, eps) -> tuple[int, int]:
    """(max_new_tokens, steps) after refusing every setting the sampler cannot run."""
    if alg not in ALGS:
        raise ValueError(f"alg {alg!r}: choose one of {', '.join(ALGS)}.")
    finite = "a finite number >= 0"
    check_number("temperature", temperature, finite, lambda t: 0 <= t < math.inf)
    if alg_temp is not None:
        check_number("alg_temp", alg_temp, f"None or {finite}", lambda t: 0 <= t < math.inf)
    if top_p is not None:
        check_number("top_p", top_p, "None or in (0, 1]", lambda p: 0 < p <= 1)
    if top_k is not None:
        check_whole("top_k", top_k, 1)
    check_number("eps", eps, "in (0, 1) (Dream uses 1e-3)", lambda e: 0 < e < 1)
    return check_whole("max_new_tokens", max_new_tokens, 0), check_whole("steps", steps, 1)


def _pick(
    confidence: Tensor, wanted: Tensor, alg_temp: float | None, generator: torch.Generator | None
) -> Tensor:
    """[B, T] bool: per row the `wanted[b]` most confident positions, or as many drawn from
    softmax(confidence / alg_temp). One batched call as the reference's when every row wants as
    many; else one call per row."""
    transfer = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    if bool((wanted == wanted[0]).all()):
        rows = [(slice(None), int(wanted[0]))]
    else:
        rows = [(j, int(n)) for j, n in enumerate(wanted)]
    for row, n in rows:
        if n > 0:
            scores = confidence[row]
            if alg_temp:
                probs = F.softmax(scores / alg_temp, dim=-1)
                index = torch.multinomial(probs, n, generator=generator)
            else:
                index = scores.topk(n).indices
            transfer[row].scatter_(-1, index, True)
    return transfer


@torch.no_grad()
def diffusion_generate(
    base: BaseModel,
    input_ids: Tensor,
    max_new_tokens: int,
    steps: int,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    saes: dict[int, TopKSAE] | None = None,
    steering: Sequence[Steer] = (),
    top: int = 5,
    watch: Sequence[int] = (),
) -> Generation:
    """Decode `input_ids` [B, P] plus `max_new_tokens` masks with Dream's sampler, on a model of any
    family; every mask token of x, the prompt's own included, is decoded.

    The parameters keep the names and meaning of Dream's `diffusion_generate`; `saes`, `steering`,
    `top` and `watch` record and steer as in `generate`. Deliberate differences from the reference:
    - x0 never is the mask token nor an id the tokenizer cannot write (as `generate`);
    - non-finite sampling probabilities are an error (the reference's bare try/except falls back
      to argmax on any sampling error without a word);
    - the reference commits n = int(masks / B * (1 - s / t)) per row: with rows of unequal mask
      counts (masks in a prompt) its top-k can pick unmasked positions, re-masking them, and
      its last step can leave masks. Here a row commits at most its own masks and the last step
      all of them (one draw per row when the rows' counts differ);
    - max_new_tokens=0 infills the prompt's masks (the reference needs one new token at least);
    - logits and confidences are float32 at least (the reference keeps the model's dtype).
    """
    max_new_tokens, steps = _check(
        max_new_tokens, steps, alg, alg_temp, temperature, top_p, top_k, eps
    )
    check_prompt(base, input_ids, max_new_tokens, attention_mask, "input_ids")
    mask_id, device = base.mask_token_id, base.device
    x = F.pad(input_ids.to(device), (0, max_new_tokens), value=mask_id)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask.to(device), (0, max_new_tokens), value=1)
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    vocab = vocab_limit(base)
    with Recording(base, x, steps, saes, steering, top, watch) as recording:
        for i in range(steps):
            mask = recording.begin(x, i)
            logits = token_logits(base, base.run(x, attention_mask), vocab)
            mask_logits = logits[mask]
            t, s = timesteps[i], timesteps[i + 1]
            last = i == steps - 1
            confidence = torch.full(x.shape, float("-inf"), device=device)
            if alg == "origin":
                p_transfer = 1 if last else 1 - s / t
                draws = torch.rand(len(mask_logits), generator=generator, device=device)
                transfer = torch.zeros_like(mask)
                transfer[mask] = draws < p_transfer
                _, x0_p, x0 = sample_tokens(
                    mask_logits[draws < p_transfer], temperature, top_p, top_k, generator
                )
                x[transfer], confidence[transfer] = x0, x0_p
            else:
                probs, x0_p, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, generator)
                if alg == "topk_margin":
                    top2 = probs.topk(2, dim=-1).values
                    x0_p = top2[:, 0] - top2[:, 1]
                elif alg == "entropy":
                    x0_p = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
                confidence[mask] = x0_p
                counts = mask.sum(dim=1)
                if not last:  # the reference's batch-averaged count, at most each row's masks
                    n = int(mask.sum() / mask.shape[0] * (1 - s / t))
                    counts = counts.clamp(max=n)
                transfer = _pick(confidence, counts, alg_temp, generator)
                proposal = x.clone()
                proposal[mask] = x0
                x[transfer] = proposal[transfer]
            recording.commit(transfer, confidence)
    return Generation(x.cpu(), recording.timeline())
