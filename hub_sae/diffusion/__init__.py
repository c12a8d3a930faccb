"""Decoding a diffusion LM while watching and steering its SAE features.

Two samplers, each as its official reference and both on a model of any family (the logits' shift
comes from `BaseModel.align`): `generate` is LLaDA's (`llada.py`), `diffusion_generate` Dream's
(`dream.py`). Both return a `Generation`: the tokens and a `Timeline` of which positions were masked
at each step, when each was committed, and the top SAE features of every position at every step.
`Steer`s clamp features, add to them, or add a multiple of the position's largest SAE activation
(DLM-Scope's steering) over a window of the steps.
"""

from hub_sae.diffusion.dream import ALGS, diffusion_generate, sample_tokens
from hub_sae.diffusion.llada import (
    LLADA_EOT,
    REMASKING,
    add_gumbel_noise,
    eos_eot_ids,
    generate,
    num_transfer_tokens,
)
from hub_sae.diffusion.steer import STEER_MODES, Steer, feature_acts, steer_residual
from hub_sae.diffusion.timeline import (
    FeatureOnset,
    Generation,
    LayerTrace,
    Timeline,
    feature_onsets,
    masked_log_likelihood,
    timeline_records,
    token_logits,
)
from hub_sae.models import vocab_limit

__all__ = [
    "ALGS",
    "LLADA_EOT",
    "REMASKING",
    "STEER_MODES",
    "FeatureOnset",
    "Generation",
    "LayerTrace",
    "Steer",
    "Timeline",
    "add_gumbel_noise",
    "diffusion_generate",
    "eos_eot_ids",
    "feature_acts",
    "feature_onsets",
    "generate",
    "masked_log_likelihood",
    "num_transfer_tokens",
    "sample_tokens",
    "steer_residual",
    "timeline_records",
    "token_logits",
    "vocab_limit",
]
