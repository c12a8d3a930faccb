"""The Space's compute side: load a suite once, analyse prompts, decode, describe features.

A prompt is tokenised (BOS first), masked where the user typed the model's mask token and, if
asked, at random with a seeded `corrupt`; the suite's policy then picks the selected positions.
One forward that stops after the deepest hooked block feeds every layer's SAE.

Tensors in, plain records out (NamedTuples, lists, floats, strings): no pandas, Gradio, HTML or
markdown here. `views.py` draws these records; `app.py` wires them to Gradio.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor, nn

from hub_sae.activations import capture
from hub_sae.diffusion import Generation, Steer, generate, masked_log_likelihood, vocab_limit
from hub_sae.features import FEATURES_FILE, FeatureStats, load_features
from hub_sae.io import HubOptions, inside, local_path
from hub_sae.masking import Corruption, corrupt, select_positions
from hub_sae.models import BaseModel, load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import EncoderOutput, TopKSAE
from hub_sae.suite import SUITE_FILE, SuiteInfo, read_suite

LLADA_SUITE = "AwesomeInterpretability/llada-mask-topk-sae"
"""The published DLM-Scope suite, loaded when neither HUB_SAE_SUITE nor a local run is there."""
CHECKPOINTS = "checkpoints"
"""The trainer's folder for checkpoints under its output folder: not a suite."""
MAX_TOKENS = 256
CHARS_PER_TOKEN = 32
"""Prompts longer than MAX_TOKENS * CHARS_PER_TOKEN characters are refused before tokenising."""
CACHE_SIZE = 32
STEER_MAX = 1e4
"""The largest |steering value|: far above any SAE activation (tens to hundreds), far below
float32's overflow (1e39 is inf there, 1e300 added turns every logit into NaN)."""
SEED_MAX = 2**32 - 1


class InputError(ValueError):
    """A problem with what the user typed; the app shows the message."""


def whole_number(field: str, value: object, maximum: int) -> int:
    """`value` as an integer in [0, maximum], else an InputError naming `field`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and 0 <= number <= maximum):
        raise InputError(f"{field} must be a whole number between 0 and {maximum}; got {value!r}.")
    return int(number)


def default_suite(runs: Path | str = "runs") -> str:
    """HUB_SAE_SUITE, else the newest run under `runs/` with a suite.json, else the LLaDA suite.

    Hidden folders (a suite being written, `.NAME.tmp`, or replaced, `.NAME.old`) and the
    trainer's `checkpoints/` folder are never picked.
    """
    if os.environ.get("HUB_SAE_SUITE"):
        return os.environ["HUB_SAE_SUITE"]
    suites = sorted(
        (
            path
            for path in Path(runs).glob(f"*/{SUITE_FILE}")
            if not path.parent.name.startswith(".") and path.parent.name != CHECKPOINTS
        ),
        key=lambda p: p.stat().st_mtime,
    )
    return str(suites[-1].parent) if suites else LLADA_SUITE


def suite_info(source: str) -> SuiteInfo | None:
    """suite.json of a local folder or hub repo; None for layouts without one (dictionary_learning)."""
    folder = local_path(source)
    if folder is not None:
        return read_suite(folder) if (folder / SUITE_FILE).is_file() else None
    try:
        return read_suite(HubOptions().file(source, SUITE_FILE).parent)
    except EntryNotFoundError:  # a release without suite.json: the SAE configs say enough
        return None


def suite_features(source: str, info: SuiteInfo | None, sae: TopKSAE) -> FeatureStats | None:
    """The SAE's features.safetensors from a local suite or hub repo, or None when it has none."""
    if info is None:
        return None
    name = f"{info.folder(sae.layer, sae.k)}/{FEATURES_FILE}"
    folder = local_path(source)
    if folder is not None:
        path = inside(folder, name)
        return load_features(path) if path.is_file() else None
    try:
        return load_features(HubOptions().file(source, name))
    except EntryNotFoundError:  # the suite was published without feature statistics
        return None


def unembed(base: BaseModel) -> nn.Module | None:
    """The model's final norm + output head (residual -> logits), or None without an LM head."""
    if not base.has_lm_head:
        return None
    transformer = getattr(getattr(base.model, "model", None), "transformer", None)
    if transformer is not None and "ln_f" in transformer:  # native LLaDA
        return nn.Sequential(transformer.ln_f, transformer.ff_out)
    for name in ("cls", "lm_head"):  # BERT-style and RoBERTa-style masked-LM heads
        if hasattr(base.model, name):
            return getattr(base.model, name)
    return base.model.get_output_embeddings()


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt and the positions the suite's policy selects."""

    input_ids: Tensor
    """[T] what the model reads: the mask token at every masked position."""
    clean_ids: Tensor
    """[T] the tokens as typed (random masking undone)."""
    is_masked: Tensor
    """[T] bool."""
    selected: Tensor
    """[T] bool: the positions the policy selects (never position 0)."""
    tokens: list[str]
    """Display text of each position, its leading whitespace included."""


class FeatureRow(NamedTuple):
    """An active feature at one position: its activation and its training firing rate."""

    feature: int
    activation: float
    frequency: float | None
    """Fraction of training positions it fires on; None without feature statistics."""


class Context(NamedTuple):
    """A top-activating training context of a feature, split around its centre token."""

    activation: float
    left: str
    centre: str
    right: str
    seen_as: str
    """What the model read at the centre when that differs from the token (a mask), else ""."""


class LensToken(NamedTuple):
    """A token a feature's decoder direction promotes, with its logit."""

    token: str
    logit: float


class DecodeRun(NamedTuple):
    """A decode of a prompt's masked positions, plain and steered, with the model's own numbers."""

    prompt: Prompt
    plain: Generation
    steered: Generation
    steer: Steer
    decoded: Tensor
    """[T] bool: the positions the decode filled in."""
    activation: tuple[float, float]
    """Mean activation of the steered features over the decoded positions and steps (plain,
    steered), read after the intervention."""
    log_likelihood: tuple[float, float]
    """The model's masked-token log-likelihood per token of each result (plain, steered)."""


class Analysis(NamedTuple):
    """A prompt and every layer's SAE latents on it."""

    prompt: Prompt
    latents: dict[int, EncoderOutput]
    """layer -> top_acts, top_indices [T, k] on the CPU; zeros where the policy does not look."""


@dataclass
class Explorer:
    """A base model and its suite of SAEs (one per layer), loaded once and shared by all users."""

    base: BaseModel
    saes: dict[int, TopKSAE]
    policy: str
    features: dict[int, FeatureStats | None]
    title: str
    default_layer: int | None = None
    max_tokens: int = MAX_TOKENS
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        for sae in self.saes.values():
            sae.require_resid_post("The Space")
        self.analyse = lru_cache(maxsize=CACHE_SIZE)(self._analyse)
        self.decode = lru_cache(maxsize=CACHE_SIZE)(self._decode)
        self.head = unembed(self.base)
        if self.default_layer not in self.saes:
            self.default_layer = self.layers[len(self.layers) // 2]

    @classmethod
    def load(
        cls, source: str | None = None, device: str | None = None, base_model: str | None = None
    ) -> Explorer:
        """Load a suite (local folder or hub id; default `default_suite()`) and its base model
        (default: suite.json's base_model, else the SAE config's)."""
        source = str(source or default_suite())
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        info = suite_info(source)
        saes = {
            layer: sae.eval().requires_grad_(False)
            for layer, sae in TopKSAE.load_suite(source).items()
        }
        first = next(iter(saes.values()))
        base_model = base_model or (info and info.base_model) or first.base_model
        if not base_model:
            raise ValueError(f"{source} names no base model; pass one (--base-model)")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return cls(
            base=with_unmasking_head(load_base_model(base_model, dtype=dtype, device=device)),
            saes={layer: sae.to(device) for layer, sae in saes.items()},
            policy=info.policy if info else first.policy,
            features={layer: suite_features(source, info, sae) for layer, sae in saes.items()},
            title=Path(source).name if Path(source).is_dir() else source,
            default_layer=info.default_layer if info else None,
        )

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_TOKEN

    @property
    def mask_text(self) -> str:
        return self.base.tokenizer.convert_ids_to_tokens(self.base.mask_token_id)

    def token_text(self, token_id: int) -> str:
        """A single token as readable text (`<id>` for ids the tokenizer cannot write)."""
        token = self.base.tokenizer.convert_ids_to_tokens(int(token_id))
        return (
            f"<{int(token_id)}>"
            if token is None
            else self.base.tokenizer.convert_tokens_to_string([token])
        )

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids (BOS first) and the display text of each, leading whitespace included."""
        if not text.strip():
            raise InputError(f"Write a prompt first (type {self.mask_text} for masked positions).")
        if len(text) > self.max_chars:  # a 10 MB prompt took 9 s and 2 GB to tokenise
            raise InputError(
                f"The prompt is {len(text):,} characters long; this Space reads at most "
                f"{self.max_chars:,} characters ({self.max_tokens} tokens). Shorten it."
            )
        enc = self.base.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if not ids or ids[0] != self.base.bos_token_id:
            ids, offsets = [self.base.bos_token_id, *ids], [(0, 0), *offsets]
        if len(ids) > self.max_tokens:
            raise InputError(
                f"The prompt is {len(ids)} tokens long; this Space analyses at most "
                f"{self.max_tokens}. Shorten it."
            )
        tokens, end = [], 0
        for token_id, (start, stop) in zip(ids, offsets, strict=True):
            if stop > start:
                tokens.append(text[end:stop])
                end = stop
            else:  # special tokens added by the tokenizer
                special = self.token_text(token_id)
                tokens.append(f" {special}" if tokens else f"{special} ")
        return ids, tokens

    def prepare(self, text: str, ratio: float = 0.0, seed: int = 0) -> Prompt:
        """Tokenise, mask (typed mask tokens + each token with probability `ratio`), select."""
        if not 0.0 <= ratio <= 1.0:
            raise InputError(f"The mask ratio must lie in [0, 1]; got {ratio}.")
        ids, tokens = self.tokenize(text)
        clean = torch.tensor(ids)
        is_masked = clean == self.base.mask_token_id
        is_masked[0] = False
        if ratio > 0:
            generator = torch.Generator().manual_seed(int(seed))
            schedule = Corruption(t_min=ratio, t_max=ratio)
            batch = corrupt(
                clean[None], None, self.base.mask_token_id, self.policy, schedule, generator
            )
            random = batch.is_masked[0] & ~is_masked
            is_masked |= random
            tokens = [
                f"{t[: len(t) - len(t.lstrip())]}{self.mask_text}({t.strip()})" if r else t
                for t, r in zip(tokens, random.tolist(), strict=True)
            ]
        selected = select_positions(is_masked[None], None, self.policy)[0]
        masked_ids = clean.masked_fill(is_masked, self.base.mask_token_id)
        return Prompt(masked_ids, clean, is_masked, selected, tokens)

    @torch.no_grad()
    def _analyse(self, text: str, ratio: float = 0.0, seed: int = 0) -> Analysis:
        """Every layer's SAE latents at the selected positions, from one forward (cached)."""
        prompt = self.prepare(text, ratio, seed)
        if not prompt.selected.any():
            raise InputError(
                f"No position to analyse: the suite's policy is {self.policy!r}. Type "
                f"{self.mask_text} in the prompt or set a mask ratio above 0."
            )
        selected = prompt.selected
        with self.lock:  # hooks live on the shared model: one forward at a time
            acts = capture(self.base, prompt.input_ids[None], None, self.layers, selected[None])
        latents = {}
        for layer, sae in self.saes.items():
            enc = sae.encode(acts[layer])
            top_acts = torch.zeros(len(selected), sae.k)
            top_indices = torch.zeros(len(selected), sae.k, dtype=torch.long)
            top_acts[selected] = enc.top_acts.float().cpu()
            top_indices[selected] = enc.top_indices.cpu()
            latents[layer] = EncoderOutput(top_acts, top_indices)
        return Analysis(prompt, latents)

    def check_layer(self, layer: int) -> int:
        if layer is None or int(layer) not in self.saes:
            raise InputError(f"No SAE for layer {layer}; this suite has layers {self.layers}.")
        return int(layer)

    def check_feature(self, layer: int, feature: object) -> int:
        return whole_number("Feature", feature, self.saes[self.check_layer(layer)].d_sae - 1)

    @staticmethod
    def check_seed(seed: object) -> int:
        return whole_number("Seed", 0 if seed is None else seed, SEED_MAX)

    def feature_acts(self, analysis: Analysis, layer: int, feature: int) -> Tensor:
        """[T] activation of `feature` at every position (0 where it is not among the top k)."""
        enc = analysis.latents[self.check_layer(layer)]
        return (enc.top_acts * (enc.top_indices == feature)).sum(-1)

    def strongest(self, analysis: Analysis, layer: int) -> Tensor:
        """[d_sae] largest activation of each feature over the selected positions."""
        enc = analysis.latents[self.check_layer(layer)]
        selected = analysis.prompt.selected
        out = torch.zeros(self.saes[layer].d_sae)
        return out.scatter_reduce(
            0, enc.top_indices[selected].flatten(), enc.top_acts[selected].flatten(), "amax"
        )

    def default_feature(self, analysis: Analysis, layer: int) -> int:
        """The feature with the largest activation on the selected positions of the prompt."""
        return int(self.strongest(analysis, layer).argmax())

    def peak_position(self, analysis: Analysis, layer: int, feature: int) -> int:
        """The selected position where `feature` is strongest (the first selected one if nowhere)."""
        acts = self.feature_acts(analysis, layer, feature)
        acts[~analysis.prompt.selected] = -1.0
        return int(acts.argmax())

    def feature_rows(self, layer: int, acts: Tensor, indices: Tensor) -> list[FeatureRow]:
        """The active (> 0) features among `indices`, in the given order, with their frequency."""
        stats = self.features.get(layer)
        return [
            FeatureRow(int(f), float(a), None if stats is None else float(stats.frequency[f]))
            for a, f in zip(acts, indices, strict=True)
            if a > 0
        ]

    def token_features(self, analysis: Analysis, layer: int, position: int) -> list[FeatureRow]:
        """The active features at one selected position, strongest first."""
        position = int(position)
        selected = analysis.prompt.selected.nonzero().flatten().tolist()
        if position not in selected:
            raise InputError(
                f"Token {position} is not analysed under the {self.policy!r} policy; "
                f"pick one of {selected}."
            )
        enc = analysis.latents[self.check_layer(layer)]
        acts, indices = enc.top_acts[position], enc.top_indices[position]
        order = acts.argsort(descending=True)
        return self.feature_rows(layer, acts[order], indices[order])

    def contexts(self, layer: int, feature: int) -> list[Context]:
        """The feature's top-activating contexts from the training corpus ([] without stats)."""
        stats = self.features.get(self.check_layer(layer))
        if stats is None:
            return []
        feature = self.check_feature(layer, feature)
        w, out = stats.window, []
        for value, token, ids in zip(
            stats.top_values[feature],
            stats.top_tokens[feature],
            stats.top_contexts[feature],
            strict=True,
        ):
            if token < 0 or value <= 0:
                continue
            left = self.base.tokenizer.decode([i for i in ids[:w].tolist() if i >= 0])
            right = self.base.tokenizer.decode([i for i in ids[w + 1 :].tolist() if i >= 0])
            seen = "" if int(ids[w]) == int(token) else self.token_text(ids[w])
            out.append(Context(float(value), left, self.token_text(token), right, seen))
        return out

    @torch.no_grad()
    def logit_lens(self, layer: int, feature: int, n: int = 10) -> list[LensToken]:
        """Tokens the feature's decoder direction promotes through the final norm + LM head,
        strongest first ([] without an LM head)."""
        if self.head is None:
            return []
        sae = self.saes[self.check_layer(layer)]
        direction = sae.W_dec[self.check_feature(layer, feature)]
        param = next(self.head.parameters())
        logits = self.head(direction.to(param.device, param.dtype)[None]).float()[0]
        logits = logits[: vocab_limit(self.base)]
        values, ids = logits.topk(min(n, len(logits)))
        return [LensToken(self.token_text(i), float(v)) for v, i in zip(values, ids, strict=True)]

    @torch.no_grad()
    def _decode(self, text: str, ratio: float, seed: int, steps: int, steer: Steer) -> DecodeRun:
        """Fill in the prompt's masks with LLaDA's sampler (greedy, low-confidence remasking),
        once plain and once with `steer`; every step's top features of its layer are recorded.
        Cached: clicking a cell of the timeline reads the same run again."""
        if self.head is None:
            raise InputError(f"Decoding needs an LM head; {self.base.name} has none.")
        prompt = self.prepare(text, ratio, seed)
        if not prompt.is_masked.any():
            raise InputError(
                f"Nothing to decode: type {self.mask_text} or set a mask ratio above 0."
            )
        if not 1 <= int(steps) <= self.max_tokens:
            raise InputError(f"Steps must lie between 1 and {self.max_tokens}; got {steps}.")
        if not abs(steer.value) <= STEER_MAX:
            raise InputError(
                f"The steering value must lie between -{STEER_MAX:,.0f} and {STEER_MAX:,.0f} "
                f"(SAE activations are far smaller); got {steer.value:g}."
            )
        layer = self.check_layer(steer.layer)
        for feature in steer.features:
            self.check_feature(layer, feature)
        saes = {layer: self.saes[layer]}
        ids = prompt.input_ids[None]
        decoded = prompt.is_masked
        with self.lock:  # every forward on the shared model, hooked or not
            plain = generate(self.base, ids, int(steps), 0, saes=saes, watch=steer.features)
            steered = generate(self.base, ids, int(steps), 0, saes=saes, steering=[steer])
            numbers = [
                (
                    float(run.timeline.layers[layer].watched[:, 0, decoded].mean()),
                    masked_log_likelihood(self.base, run.tokens[0], decoded),
                )
                for run in (plain, steered)
            ]
        activation, log_likelihood = zip(*numbers, strict=True)
        return DecodeRun(prompt, plain, steered, steer, decoded, activation, log_likelihood)

    def cell_features(self, generation: Generation, step: int, position: int) -> list[FeatureRow]:
        """The top features of one position at one step of a decode."""
        (layer,) = generation.timeline.layers
        trace = generation.timeline.layers[layer]
        if not (0 <= step < len(trace.top_acts) and 0 <= position < trace.top_acts.shape[2]):
            raise InputError(f"No timeline cell at step {step}, position {position}.")
        acts, indices = trace.top_acts[step, 0, position], trace.top_indices[step, 0, position]
        return self.feature_rows(layer, acts, indices)
