"""LLaDA's decoding, exactly as its official `generate()`, watched and steered through SAEs.

    x = prompt + gen_length mask tokens, decoded in gen_length / block_length blocks, left to right
    for each of the steps / n_blocks steps of a block:
        logits of x (cfg_scale > 0: u + (cfg_scale + 1)(c - u), u from x with the prompt masked)
        x0 = argmax(logits, Gumbel noise in float64 when temperature > 0)
        confidence = softmax(logits)[x0] ("low_confidence") or uniform noise ("random");
            -inf after the current block and at positions already decoded
        commit the n_i most confident x0 (n_i as LLaDA's `get_num_transfer_tokens`)

Deliberate differences: x0 never is the mask token nor an id the tokenizer cannot write (the
reference can commit the mask token itself), and the prompt's own mask tokens are decoded with the
first block (the reference leaves them to compete for the blocks' commits, so some stay masked).
On a shifted family (Dream, autoregressive) position i scores token i with the logits at i - 1
(`BaseModel.align`).
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

REMASKING = ("low_confidence", "random")
LLADA_EOT = "<|eot_id|>"
"""LLaDA's end-of-turn token, banned from the confidences by `confidence_eos_eot_inf`."""


def num_transfer_tokens(block_masked: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to commit per step: masks // steps, plus one for the first masks % steps."""
    count = block_masked.sum(dim=1, keepdim=True)
    extra = torch.arange(steps, device=count.device)[None] < count % steps
    return count // steps + extra.long()


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None):
    """exp(logits) / (-log U)^temperature in float64, whose argmax samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def eos_eot_ids(base: BaseModel) -> list[int]:
    """The EOS id and, when the tokenizer has it, LLaDA's end-of-turn id."""
    eot = base.tokenizer.get_vocab().get(LLADA_EOT)
    return [base.eos_token_id] + ([eot] if eot is not None else [])


def _check(
    steps: int, gen_length: int, block_length: int, temperature: float, cfg_scale: float, remasking
) -> tuple[int, int]:
    """(blocks, steps per block) after refusing every number LLaDA's generate() cannot run."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking {remasking!r}: choose one of {', '.join(REMASKING)}.")
    check_whole("steps", steps, 1)
    check_whole("gen_length", gen_length, 0)
    check_number("temperature", temperature, "a finite number >= 0", lambda t: 0 <= t < math.inf)
    check_number("cfg_scale", cfg_scale, "a finite number >= 0", lambda c: 0 <= c < math.inf)
    if gen_length == 0:  # infilling: the prompt's own masks form the only block
        return 1, steps
    check_whole("block_length", block_length, 1)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length {gen_length} must be a multiple of block_length {block_length}."
        )
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(
            f"steps {steps} must be a positive multiple of the number of blocks {n_blocks} "
            f"(gen_length / block_length)."
        )
    return n_blocks, steps // n_blocks


@torch.no_grad()
def generate(
    base: BaseModel,
    prompt_ids: Tensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Tensor | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    saes: dict[int, TopKSAE] | None = None,
    steering: Sequence[Steer] = (),
    top: int = 5,
    watch: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode `prompt_ids` [B, P] with LLaDA's sampler, on a model of any family.

    The parameters keep the names and meaning of LLaDA's `generate()`; gen_length=0 infills the
    prompt's masks as one block, and with gen_length > 0 they are decoded with the first block
    (its steps commit them along with its own masks). `saes` (layer -> SAE) are watched: `top`
    features per position and step, plus the `watch` and steered features, go into the timeline.
    `steering` needs an SAE of its layer in `saes`. Random numbers (temperature, random
    remasking) come from `generator`. `logits_eos_inf` never predicts EOS;
    `confidence_eos_eot_inf` commits EOS / end-of-turn predictions last in their block (LLaDA,
    appendix B.4).
    """
    n_blocks, block_steps = _check(
        steps, gen_length, block_length, temperature, cfg_scale, remasking
    )
    check_prompt(base, prompt_ids, gen_length, attention_mask, "prompt_ids")
    mask_id, device = base.mask_token_id, base.device
    batch, prompt_len = prompt_ids.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids.to(device)
    if attention_mask is not None:
        ones = torch.ones(batch, gen_length, dtype=attention_mask.dtype)
        attention_mask = torch.cat([attention_mask.cpu(), ones], dim=-1).to(device)
    prompt_index = x != mask_id
    vocab = vocab_limit(base)
    with Recording(base, x, n_blocks * block_steps, saes, steering, top, watch) as recording:
        for block in range(n_blocks):
            # the first block also decodes the prompt's masks; gen_length 0: the whole sequence
            start = prompt_len + block * block_length if block else 0
            stop = prompt_len + (block + 1) * block_length if gen_length else x.shape[1]
            counts = num_transfer_tokens(x[:, start:stop] == mask_id, block_steps)
            for i in range(block_steps):
                mask_index = recording.begin(x, block * block_steps + i)
                logits = _logits(base, x, prompt_index, attention_mask, cfg_scale, vocab)
                if logits_eos_inf:
                    logits[..., base.eos_token_id] = float("-inf")
                x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
                if remasking == "low_confidence":
                    x0_p = F.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
                else:
                    x0_p = torch.rand(x0.shape, generator=generator, device=device)
                if confidence_eos_eot_inf:  # last in the block, yet before positions outside it
                    x0_p[torch.isin(x0, torch.tensor(eos_eot_ids(base), device=device))] = -1e9
                x0_p[:, stop:] = float("-inf")
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, x0_p, float("-inf"))
                transfer = torch.zeros_like(mask_index)
                for j in range(batch):
                    chosen = confidence[j].topk(int(counts[j, i])).indices
                    transfer[j, chosen] = True
                x[transfer] = x0[transfer]
                recording.commit(transfer, confidence)
    return Generation(x.cpu(), recording.timeline())


def _logits(
    base: BaseModel,
    x: Tensor,
    prompt_index: Tensor,
    attention_mask: Tensor | None,
    cfg_scale: float,
    vocab: int,
) -> Tensor:
    """Per-token logits of x (`token_logits`), guided when cfg_scale > 0."""
    if cfg_scale > 0:
        un_x = x.masked_fill(prompt_index, base.mask_token_id)
        mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        cond, uncond = base.run(torch.cat([x, un_x]), mask2).chunk(2)
        return token_logits(base, uncond + (cfg_scale + 1) * (cond - uncond), vocab)
    return token_logits(base, base.run(x, attention_mask), vocab)
