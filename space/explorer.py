"""The Space's compute side: load a suite once, analyse prompts, decode, describe features.

A prompt is tokenised (BOS first), masked where the user typed the model's mask token and, if
asked, at random with a seeded `corrupt`; the suite's policy then picks the selected positions.
One forward that stops after the deepest hooked block feeds every layer's SAE. An instruct model's
chat prompt (`chat_inputs`) is followed by masked answer positions for the decode. An
autoregressive model (family ar) has no mask token: it is explored on clean text only and never
decoded.

Tensors in, plain records out (NamedTuples, lists, floats, strings): no pandas, Gradio, HTML or
markdown here. `views.py` draws these records; `app.py` wires them to Gradio.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor

from hub_sae.activations import capture
from hub_sae.analysis.report import open_suite
from hub_sae.diffusion import (
    ALGS,
    REMASKING,
    Generation,
    Steer,
    diffusion_generate,
    generate,
    masked_log_likelihood,
    vocab_limit,
)
from hub_sae.diffusion.checks import check_number
from hub_sae.features import FEATURES_FILE, FeatureStats, load_features, unembed
from hub_sae.io import HubOptions, inside, local_path
from hub_sae.masking import Corruption, corrupt, select_positions
from hub_sae.models import BaseModel
from hub_sae.models.chat import chat_inputs
from hub_sae.sae import EncoderOutput, TopKSAE
from hub_sae.suite import SUITE_FILE, SuiteInfo
from hub_sae.training.config import RESERVED_NAMES

LLADA_SUITE = "AwesomeInterpretability/llada-mask-topk-sae"
"""The published DLM-Scope suite, loaded when neither HUB_SAE_SUITE nor a local run is there."""
MAX_TOKENS = 256
CHARS_PER_TOKEN = 32
"""Prompts longer than MAX_TOKENS * CHARS_PER_TOKEN characters are refused before tokenising."""
CACHE_SIZE = 32
STEER_MAX = 1e4
"""The largest |steering value|: far above any SAE activation (tens to hundreds), far below
float32's overflow (1e39 is inf there, 1e300 added turns every logit into NaN)."""
SEED_MAX = 2**32 - 1
SAMPLERS = {"llada": "LLaDA's generate", "dream": "Dream's diffusion_generate"}
"""The decoding samplers by name; both run on every family with a mask token."""
RARE = 0.01
"""Default features fire on less than this share of the training positions (1 %): a feature that
fires everywhere says nothing."""
SEARCH_ROWS = 20


class InputError(ValueError):
    """A problem with what the user typed; the app shows the message."""


def whole_number(field: str, value: object, maximum: int, minimum: int = 0) -> int:
    """`value` as an integer in [minimum, maximum], else an InputError naming `field`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and minimum <= number <= maximum):
        raise InputError(
            f"{field} must be a whole number between {minimum} and {maximum}; got {value!r}."
        )
    return int(number)


def finite(field: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float that passes `ok` (`check_number`), else an InputError naming `field`."""
    try:
        return check_number(field, value, rule, ok)
    except ValueError as e:
        raise InputError(str(e)) from None


def default_sampler(family: str) -> str:
    """Dream's sampler for Dream models, LLaDA's for the others."""
    return "dream" if family == "dream" else "llada"


@dataclass(frozen=True)
class Sampling:
    """A sampler and its options, checked (`Explorer.sampling`); hashable, so decodes are cached."""

    sampler: str = "llada"
    """A key of SAMPLERS."""
    steps: int = 8
    temperature: float = 0.0
    remasking: str = "low_confidence"
    """LLaDA's sampler: one of REMASKING."""
    alg: str = "entropy"
    """Dream's sampler: one of ALGS."""
    alg_temp: float | None = 0.0
    """None or 0: commit the most confident positions; > 0: draw them."""
    top_p: float | None = 1.0
    """None or 1: every token."""
    top_k: int | None = None
    """None: every token."""

    def describe(self) -> str:
        """The sampler and the options it uses, as one line."""
        options = [f"{self.steps} steps", f"temperature {self.temperature:g}"]
        if self.sampler == "llada":
            options.append(f"remasking {self.remasking}")
        else:
            options.append(f"alg {self.alg}, alg_temp {self.alg_temp or 0:g}")
            options.append(f"top_p {1 if self.top_p is None else self.top_p:g}")
            options.append(f"top_k {self.top_k or 'all'}")
        return f"{SAMPLERS[self.sampler]} ({', '.join(options)})"


def default_suite(runs: Path | str = "runs") -> str:
    """HUB_SAE_SUITE, else the newest run under `runs/` with a suite.json, else the LLaDA suite.

    Hidden folders (a suite being written or replaced) and the trainer's own folders
    (`checkpoints/`, `logs/`) are never picked.
    """
    if os.environ.get("HUB_SAE_SUITE"):
        return os.environ["HUB_SAE_SUITE"]
    suites = sorted(
        (
            path
            for path in Path(runs).glob(f"*/{SUITE_FILE}")
            if not path.parent.name.startswith(".")
            and path.parent.name.lower() not in RESERVED_NAMES
        ),
        key=lambda p: p.stat().st_mtime,
    )
    return str(suites[-1].parent) if suites else LLADA_SUITE


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


def example_tokens(stats: FeatureStats) -> tuple[Tensor, Tensor]:
    """[d_sae, n] the clean token at each stored example of each feature (every band) and its
    activation."""
    d_sae = len(stats.frequency)
    tokens = stats.example_ids[..., stats.window].long().reshape(d_sae, -1)
    return tokens, stats.example_values.reshape(d_sae, -1)


def band_name(band: int, bands: int) -> str:
    """Band 0: the top activations; band b: a random sample of quantile range
    [1 - b / bands, 1 - (b - 1) / bands] of the non-zero activations."""
    if band == 0:
        return "Top activations"
    low, high = 1 - band / bands, 1 - (band - 1) / bands
    return f"Quantiles {low:.2f}-{high:.2f} of its activations (a random sample)"


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


class Example(NamedTuple):
    """A training example of a feature: a window of clean text around the analysed position."""

    activation: float
    pieces: list[str]
    """Each window position's clean text, its leading whitespace included."""
    centre: int
    """The analysed position's index in `pieces`."""
    masked: list[bool]
    """Whether the model read the mask token at each window position."""
    t: float | None
    """The batch's masking ratio (None: not recorded, v1 statistics)."""


class Band(NamedTuple):
    """Examples of a feature from one activation band (the top, or a quantile range)."""

    name: str
    examples: list[Example]


class SearchHit(NamedTuple):
    """A feature found by a search: its strongest activation there and on how many positions."""

    feature: int
    activation: float
    count: int
    frequency: float | None


class LensToken(NamedTuple):
    """A token a feature's decoder direction promotes, with its logit."""

    token: str
    logit: float


class DecodeRun(NamedTuple):
    """A decode of a prompt's masked positions, plain and steered, with the model's own numbers."""

    prompt: Prompt
    sampling: Sampling
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
        cls,
        source: str | None = None,
        device: str | None = None,
        base_model: str | None = None,
        k: int | None = None,
    ) -> Explorer:
        """Load a suite (local folder or hub id; default `default_suite()`), its SAEs of one k
        (default: the suite's default k) and its base model (default: suite.json's base_model,
        else the SAE config's)."""
        source = str(source or default_suite())
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        suite = open_suite(source, k, device, base_model, use="The Space")
        return cls(
            base=suite.base,
            saes=suite.saes,
            policy=suite.info.policy if suite.info else next(iter(suite.saes.values())).policy,
            features={
                layer: suite_features(source, suite.info, sae) for layer, sae in suite.saes.items()
            },
            title=Path(source).name if Path(source).is_dir() else source,
            default_layer=suite.info.default_layer if suite.info else None,
        )

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    @property
    def k(self) -> int:
        """The k of the loaded SAEs (one k per Space)."""
        return self.saes[self.layers[0]].k

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_TOKEN

    @property
    def mask_text(self) -> str | None:
        """The base model's mask token as typed in a prompt; None for a model without one (ar)."""
        if self.base.mask_token_id is None:
            return None
        return self.base.tokenizer.convert_ids_to_tokens(self.base.mask_token_id)

    @property
    def decode_refusal(self) -> str | None:
        """Why this model cannot be decoded, or None when it can."""
        if self.base.mask_token_id is None:
            return (
                f"{self.base.name} is an autoregressive model (family {self.base.family}): it has "
                "no mask token to denoise, so there is nothing to decode. Explore its features "
                "on clean text instead."
            )
        if self.head is None:
            return f"Decoding needs an LM head; {self.base.name} has none."
        return None

    @property
    def chat(self) -> bool:
        """Whether the tokenizer has a chat template (an instruct model): the decode can answer."""
        return bool(getattr(self.base.tokenizer, "chat_template", None))

    @property
    def lens_position(self) -> str:
        """Where the logit lens's tokens are promoted: shifted families predict the next token."""
        if self.base.shifted:
            return (
                f"the NEXT position ({self.base.family} logits are shifted: the residual at "
                "position i predicts token i + 1)"
            )
        return "the same position (the residual at position i predicts token i)"

    def mask_hint(self) -> str:
        """What to type for masked positions, or why there are none."""
        if self.mask_text is None:
            return "clean text only: an autoregressive model has no mask token"
        return f"type {self.mask_text} for masked positions"

    def sampling(
        self,
        sampler: str | None = None,
        steps: object = Sampling.steps,
        temperature: object = Sampling.temperature,
        remasking: str = Sampling.remasking,
        alg: str = Sampling.alg,
        alg_temp: object = Sampling.alg_temp,
        top_p: object = Sampling.top_p,
        top_k: object = Sampling.top_k,
    ) -> Sampling:
        """Checked sampler options (sampler None: the family's default; alg_temp, top_p None: off;
        top_k None or 0: every token)."""
        sampler = sampler or default_sampler(self.base.family)
        for name, value, choices in (
            ("Sampler", sampler, tuple(SAMPLERS)),
            ("Remasking", remasking, REMASKING),
            ("alg", alg, ALGS),
        ):
            if value not in choices:
                raise InputError(f"{name} {value!r}: choose one of {', '.join(choices)}.")
        rule = "a finite number >= 0"
        return Sampling(
            sampler,
            whole_number("Steps", 1 if steps is None else steps, self.max_tokens, 1),
            finite("temperature", temperature or 0.0, rule, lambda t: 0 <= t < math.inf),
            remasking,
            alg,
            None
            if alg_temp is None
            else finite("alg_temp", alg_temp, rule, lambda t: 0 <= t < math.inf),
            None if top_p is None else finite("top_p", top_p, "in (0, 1]", lambda p: 0 < p <= 1),
            None if top_k is None else whole_number("top_k", top_k, vocab_limit(self.base)) or None,
        )

    def token_text(self, token_id: int) -> str:
        """A single token as readable text (`<id>` for ids the tokenizer cannot write)."""
        token = self.base.tokenizer.convert_ids_to_tokens(int(token_id))
        return (
            f"<{int(token_id)}>"
            if token is None
            else self.base.tokenizer.convert_tokens_to_string([token])
        )

    def check_chars(self, what: str, text: str) -> None:
        """Refuse `text` longer than `max_chars` before any tokenising (a 10 MB prompt took 9 s and
        2 GB to tokenise)."""
        if len(text) > self.max_chars:
            raise InputError(
                f"The {what} is {len(text):,} characters long; this Space reads at most "
                f"{self.max_chars:,} characters ({self.max_tokens} tokens). Shorten it."
            )

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids (BOS first) and the display text of each, leading whitespace included."""
        if not text.strip():
            raise InputError(f"Write a prompt first ({self.mask_hint()}).")
        self.check_chars("prompt", text)
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
        if ratio > 0 and self.mask_text is None:
            raise InputError(
                f"{self.base.name} is autoregressive (family {self.base.family}): it has no mask "
                "token, so its SAEs read clean text only. Set the mask ratio to 0."
            )
        ids, tokens = self.tokenize(text)
        clean, mask_id = torch.tensor(ids), self.base.mask_token_id
        is_masked = torch.zeros(len(ids), dtype=torch.bool) if mask_id is None else clean == mask_id
        is_masked[0] = False
        if ratio > 0:
            generator = torch.Generator().manual_seed(int(seed))
            schedule = Corruption(t_min=ratio, t_max=ratio)
            batch = corrupt(clean[None], None, mask_id, self.policy, schedule, generator)
            random = batch.is_masked[0] & ~is_masked
            is_masked |= random
            tokens = [
                f"{t[: len(t) - len(t.lstrip())]}{self.mask_text}({t.strip()})" if r else t
                for t, r in zip(tokens, random.tolist(), strict=True)
            ]
        selected = select_positions(is_masked[None], None, self.policy)[0]
        masked_ids = clean if self.mask_text is None else clean.masked_fill(is_masked, mask_id)
        return Prompt(masked_ids, clean, is_masked, selected, tokens)

    def chat_prompt(self, message: str, answer: int) -> Prompt:
        """An instruct model's chat prompt for `message` (`chat_inputs`) followed by `answer`
        masked positions for the decode to fill; shown as the prompt's own text."""
        if not self.chat:
            raise InputError(
                f"The tokenizer of {self.base.name} has no chat template, so it cannot answer a "
                "chat message: leave the chat box empty and decode the prompt's masks."
            )
        if not message.strip():
            raise InputError("Write a chat message first.")
        self.check_chars("chat message", message)
        prompt = chat_inputs(self.base, message)[0][0].cpu().tolist()
        limit = min(self.max_tokens, self.base.max_length)
        if len(prompt) >= limit:
            raise InputError(
                f"The chat prompt is {len(prompt)} tokens long; this Space decodes at most "
                f"{limit} with the answer. Shorten the message."
            )
        answer = whole_number("Answer tokens", answer, limit - len(prompt), 1)
        ids = torch.tensor([*prompt, *[self.base.mask_token_id] * answer])
        is_masked = torch.arange(len(ids)) >= len(prompt)
        selected = select_positions(is_masked[None], None, self.policy)[0]
        tokens = [self.token_text(i) for i in prompt] + [f" {self.mask_text}"] * answer
        return Prompt(ids, ids, is_masked, selected, tokens)

    @torch.no_grad()
    def _analyse(self, text: str, ratio: float = 0.0, seed: int = 0) -> Analysis:
        """Every layer's SAE latents at the selected positions, from one forward (cached)."""
        prompt = self.prepare(text, ratio, seed)
        if not prompt.selected.any():
            raise InputError(
                f"No position to analyse: the suite's policy is {self.policy!r}. Type "
                f"{self.mask_text} in the prompt or set a mask ratio above 0."
                if self.mask_text
                else "No position to analyse: write a prompt of two tokens or more."
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

    def stats(self, layer: int) -> FeatureStats | None:
        """The layer's feature statistics, None without."""
        return self.features.get(self.check_layer(layer))

    def rare(self, layer: int) -> Tensor | None:
        """[d_sae] bool: the features firing on less than RARE of the training positions (None
        without feature statistics)."""
        stats = self.stats(layer)
        return None if stats is None else stats.frequency < RARE

    def default_feature(self, layer: int) -> int:
        """The feature a page opens on: the most frequent one among those firing on less than
        RARE of the training positions (feature 0 without statistics or without such a one)."""
        rare, stats = self.rare(layer), self.stats(layer)
        if stats is None or not bool((rare & (stats.frequency > 0)).any()):
            return 0
        return int(stats.frequency.masked_fill(~rare, -1.0).argmax())

    def prompt_feature(self, analysis: Analysis, layer: int) -> int:
        """The feature with the largest activation on the selected positions of the prompt,
        among the rare ones (`rare`) when one of them is active there."""
        strongest, rare = self.strongest(analysis, layer), self.rare(layer)
        if rare is not None and bool((strongest[rare] > 0).any()):
            strongest = strongest.masked_fill(~rare, 0.0)
        return int(strongest.argmax())

    def open_link(self, params: dict[str, str]) -> tuple[int, int]:
        """(layer, feature) from a link's query parameters `layer`, `k` and `feature` (each
        optional: the default layer and `default_feature`); InputError naming a bad one."""
        layer = self.default_layer
        if params.get("layer") is not None:
            layer = whole_number("The link's layer", params["layer"], max(self.layers))
            self.check_layer(layer)
        if params.get("k") is not None:
            k = whole_number("The link's k", params["k"], self.saes[layer].d_sae, 1)
            if k != self.k:
                raise InputError(
                    f"The link asks for k = {k}; this Space serves the k = {self.k} SAEs of "
                    f"{self.title}. Remove k from the link or start the Space with --k {k}."
                )
        if params.get("feature") is None:
            return layer, self.default_feature(layer)
        return layer, whole_number(
            "The link's feature", params["feature"], self.saes[layer].d_sae - 1
        )

    def token_ids(self, text: str) -> list[int]:
        """The ids `text` is as a single token, with and without a leading space."""
        word = text.strip()
        if not word:
            raise InputError("Type a token to search for.")
        self.check_chars("token", word)
        encode = self.base.tokenizer
        ids = [encode(w, add_special_tokens=False)["input_ids"] for w in (word, f" {word}")]
        single = sorted({i[0] for i in ids if len(i) == 1})
        if not single:
            pieces = [self.token_text(i) for i in ids[0]]
            raise InputError(
                f"{word!r} is {len(pieces)} tokens for this tokenizer ({pieces}): search one of "
                "them, or search by text."
            )
        return single

    def search_token(self, layer: int, text: str) -> list[SearchHit]:
        """The features whose stored training examples are on the token `text`: largest
        activation on it first, then the most such examples; at most SEARCH_ROWS."""
        ids = torch.tensor(self.token_ids(text))
        stats = self.stats(layer)
        if stats is None:
            raise InputError(
                f"Layer {layer} has no feature statistics (features.safetensors) to search; "
                "search by text instead."
            )
        tokens, values = example_tokens(stats)
        on = torch.isin(tokens, ids) & (values > 0)
        return self.hits(layer, values.masked_fill(~on, 0.0).amax(1), on.sum(1))

    def search_text(self, analysis: Analysis, layer: int) -> list[SearchHit]:
        """The features active on the analysed positions of a prompt: largest activation first,
        then the most positions; at most SEARCH_ROWS."""
        enc = analysis.latents[self.check_layer(layer)]
        selected = analysis.prompt.selected
        strongest = self.strongest(analysis, layer)
        fired = enc.top_acts[selected] > 0
        counts = torch.bincount(enc.top_indices[selected][fired], minlength=len(strongest))
        return self.hits(layer, strongest, counts)

    def hits(self, layer: int, activation: Tensor, counts: Tensor) -> list[SearchHit]:
        """The SEARCH_ROWS features with count > 0, by activation then count, with frequency."""
        stats = self.features.get(layer)
        found = sorted(
            (-float(activation[f]), -int(counts[f]), int(f)) for f in counts.nonzero().flatten()
        )[:SEARCH_ROWS]
        return [
            SearchHit(f, -a, -c, None if stats is None else float(stats.frequency[f]))
            for a, c, f in found
        ]

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

    def pieces(self, ids: list[int]) -> list[str]:
        """The text of each token of `ids` as it reads in the decoded sequence (the whitespace
        before it included), by decoding ever longer prefixes."""
        out, before = [], ""
        for i in range(len(ids)):
            text = self.base.tokenizer.decode(ids[: i + 1])
            out.append(text[len(before) :] if text.startswith(before) else self.token_text(ids[i]))
            before = text
        return out

    def example(
        self, activation: float, ids: Tensor, centre: int, masked: Tensor, t: float | None
    ) -> Example:
        """An `Example` from a window of clean ids (-1 off the sequence's edge)."""
        kept = (ids >= 0).nonzero().flatten().tolist()
        pieces = self.pieces([int(ids[i]) for i in kept])
        return Example(activation, pieces, kept.index(centre), [bool(masked[i]) for i in kept], t)

    def examples(self, layer: int, feature: int) -> list[Band]:
        """The feature's training examples by activation band ([] without statistics); a
        version 1 file has only the top band, its ids the corrupted input."""
        stats = self.stats(layer)
        if stats is None:
            return []
        feature, w, mask = self.check_feature(layer, feature), stats.window, self.base.mask_token_id
        values, ids = stats.example_values[feature], stats.example_ids[feature].long()
        out = []
        for band in range(len(values)):
            found = []
            for slot in (values[band] > 0).nonzero().flatten().tolist():
                window = ids[band, slot]
                if stats.example_masked is not None:
                    masked = stats.example_masked[feature, band, slot]
                elif mask is None:
                    masked = torch.zeros_like(window, dtype=torch.bool)
                else:  # version 1: the mask token in the corrupted input
                    masked = window == mask
                t = None if stats.example_t is None else float(stats.example_t[feature, band, slot])
                found.append(self.example(float(values[band, slot]), window, w, masked, t))
            if found:
                out.append(Band(band_name(band, stats.bands), found))
        return out

    def histogram(self, layer: int, feature: int) -> tuple[list[float], list[int]] | None:
        """(bin edges, counts) of the feature's non-zero activations over `hist_bins`; None without
        version 2 statistics or activations."""
        stats = self.stats(layer)
        if stats is None or stats.histogram is None:
            return None
        counts = stats.histogram[self.check_feature(layer, feature)]
        if not counts.any():
            return None
        low, high = self.hist_bins
        return stats.hist_edges[low : high + 1].tolist(), counts[low:high].tolist()

    @cached_property
    def hist_bins(self) -> tuple[int, int]:
        """The histogram bins [low, high) from the lowest to the highest used by any feature of
        any layer: every histogram spans them, so the browser's chart keeps one axis."""
        used = [
            stats.histogram.sum(0).nonzero().flatten()
            for stats in self.features.values()
            if stats is not None and stats.histogram is not None
        ]
        used = [bins for bins in used if len(bins)]
        return int(min(b[0] for b in used)), int(max(b[-1] for b in used)) + 1

    def frequency_by_t(self, layer: int, feature: int) -> tuple[list[float], list[float]] | None:
        """(masking ratio bin edges, firing share in each bin); None without version 2 stats."""
        stats = self.stats(layer)
        if stats is None or stats.frequency_by_t is None:
            return None
        shares = stats.frequency_by_t[self.check_feature(layer, feature)]
        return stats.t_edges.tolist(), shares.tolist()

    def logit_effects(self, layer: int, feature: int, lowest: bool = False) -> list[LensToken]:
        """The stored logit effects (version 2 statistics), else the live `logit_lens`."""
        stats = self.stats(layer)
        if stats is None or stats.logit_top_ids is None:
            return self.logit_lens(layer, feature, lowest=lowest)
        side = "bottom" if lowest else "top"
        feature = self.check_feature(layer, feature)
        ids = getattr(stats, f"logit_{side}_ids")[feature].tolist()
        values = getattr(stats, f"logit_{side}_values")[feature].tolist()
        return [LensToken(self.token_text(i), float(v)) for i, v in zip(ids, values, strict=True)]

    @torch.no_grad()
    def logit_lens(
        self, layer: int, feature: int, n: int = 10, lowest: bool = False
    ) -> list[LensToken]:
        """Tokens the feature's decoder direction promotes (`lowest`: suppresses) through the final
        norm + LM head, strongest first ([] without an LM head); at the next position for shifted
        families (`lens_position`)."""
        if self.head is None:
            return []
        sae = self.saes[self.check_layer(layer)]
        direction = sae.W_dec[self.check_feature(layer, feature)]
        param = next(self.head.parameters())
        logits = self.head(direction.to(param.device, param.dtype)[None]).float()[0]
        logits = logits[: vocab_limit(self.base)]
        values, ids = logits.topk(min(n, len(logits)), largest=not lowest)
        return [LensToken(self.token_text(i), float(v)) for v, i in zip(values, ids, strict=True)]

    def decode_prompt(
        self, text: str, ratio: float, seed: int, chat: str = "", answer: int = 0
    ) -> Prompt:
        """What a decode fills in: the chat prompt and its answer when `chat` is given, else the
        typed prompt's masks."""
        if self.decode_refusal:
            raise InputError(self.decode_refusal)
        if chat and chat.strip():
            return self.chat_prompt(chat, answer)
        prompt = self.prepare(text, ratio, seed)
        if not prompt.is_masked.any():
            raise InputError(
                f"Nothing to decode: type {self.mask_text} or set a mask ratio above 0."
            )
        return prompt

    def sample(self, ids: Tensor, sampling: Sampling, seed: int, **record) -> Generation:
        """Fill in the masks of `ids` [1, T] with the chosen sampler; random numbers (temperature,
        random remasking, alg_temp) come from a generator seeded with `seed`."""
        generator = torch.Generator(self.base.device).manual_seed(seed)
        if sampling.sampler == "dream":
            return diffusion_generate(
                self.base,
                ids,
                0,
                sampling.steps,
                alg=sampling.alg,
                alg_temp=sampling.alg_temp,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                generator=generator,
                **record,
            )
        return generate(
            self.base,
            ids,
            sampling.steps,
            0,
            temperature=sampling.temperature,
            remasking=sampling.remasking,
            generator=generator,
            **record,
        )

    @torch.no_grad()
    def _decode(
        self,
        text: str,
        ratio: float,
        seed: int,
        sampling: Sampling,
        steer: Steer,
        chat: str = "",
        answer: int = 0,
    ) -> DecodeRun:
        """Fill in the prompt's masks (or the chat's answer) with `sampling`, once plain and once
        with `steer`; every step's top features of its layer are recorded. Cached: clicking a cell
        of the timeline reads the same run again."""
        prompt = self.decode_prompt(text, ratio, seed, chat, answer)
        if not abs(steer.value) <= STEER_MAX:
            raise InputError(
                f"The steering value must lie between -{STEER_MAX:,.0f} and {STEER_MAX:,.0f} "
                f"(SAE activations are far smaller); got {steer.value:g}."
            )
        layer = self.check_layer(steer.layer)
        saes = {layer: self.saes[layer]}
        try:
            steer.check(saes, len(prompt.input_ids), sampling.steps)
        except ValueError as e:
            raise InputError(str(e)) from None
        ids = prompt.input_ids[None]
        decoded = prompt.is_masked
        with self.lock:  # every forward on the shared model, hooked or not
            plain = self.sample(ids, sampling, seed, saes=saes, watch=steer.features)
            steered = self.sample(ids, sampling, seed, saes=saes, steering=[steer])
            numbers = [
                (
                    float(run.timeline.layers[layer].watched[:, 0, decoded].mean()),
                    masked_log_likelihood(self.base, run.tokens[0], decoded),
                )
                for run in (plain, steered)
            ]
        activation, log_likelihood = zip(*numbers, strict=True)
        return DecodeRun(
            prompt, sampling, plain, steered, steer, decoded, activation, log_likelihood
        )

    def cell_features(self, generation: Generation, step: int, position: int) -> list[FeatureRow]:
        """The top features of one position at one step of a decode."""
        (layer,) = generation.timeline.layers
        trace = generation.timeline.layers[layer]
        if not (0 <= step < len(trace.top_acts) and 0 <= position < trace.top_acts.shape[2]):
            raise InputError(f"No timeline cell at step {step}, position {position}.")
        acts, indices = trace.top_acts[step, 0, position], trace.top_indices[step, 0, position]
        return self.feature_rows(layer, acts, indices)
