"""What every `hub-sae analyze` command shares: its inputs (a suite, a prompts file, the prompts'
token ids), the decode of a prompt by any sampler, and its output, a `Report` written as NAME.json,
NAME.png and NAME.md into a new folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from hub_sae.diffusion import ALGS, REMASKING, Generation, Steer, diffusion_generate, generate
from hub_sae.io import new_folder, write_folder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hub_sae.models import BaseModel
    from hub_sae.sae import TopKSAE
    from hub_sae.suite import SuiteInfo

SAMPLERS = (*(f"llada:{r}" for r in REMASKING), *(f"dream:{a}" for a in ALGS))
"""Every sampler and order, "family:order": LLaDA's `generate` per remasking, Dream's
`diffusion_generate` per alg (`decode` runs them; `analyze order` compares them all)."""

MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 100_000


@dataclass
class Report:
    """One analysis' result: `data` (JSON-able), a markdown `table` and a `figure`."""

    name: str
    """File stem: NAME.json, NAME.png, NAME.md."""
    data: dict
    table: str
    figure: Figure


def _finite_json(value: object) -> object:
    """`value` with non-finite floats as None (JSON has no NaN / inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def write_report(report: Report, out: str | Path) -> Path:
    """Write `report` into `out`, a new (or empty) folder, all files or none."""
    import matplotlib

    matplotlib.use("Agg")

    def fill(tmp: Path) -> None:
        data = json.dumps(_finite_json(report.data), indent=2, sort_keys=True, allow_nan=False)
        (tmp / f"{report.name}.json").write_text(data + "\n")
        (tmp / f"{report.name}.md").write_text(report.table.rstrip() + "\n")
        report.figure.savefig(tmp / f"{report.name}.png", dpi=120, bbox_inches="tight")

    with new_folder(out) as target:
        write_folder(target, fill)
    return Path(out)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-blank line of a text file, or the "prompt" (else "text")
    string of each line of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found; give a text file, one per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; give one prompt per line.") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not JSON ({e.msg}).") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number} needs a "prompt" (or "text") string.')
            line = text
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"{path}:{number} has {len(line):,} characters; prompts are at most "
                f"{MAX_PROMPT_CHARS:,}."
            )
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompt; write one per line.")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{path} holds {len(prompts)} prompts; give at most {MAX_PROMPTS}.")
    return prompts


class Suite(NamedTuple):
    """A suite's SAEs of one k ({layer: TopKSAE}) and its base model, ready to run."""

    info: SuiteInfo | None
    base: BaseModel
    saes: dict[int, TopKSAE]


def open_suite(
    source: str | Path,
    k: int | None = None,
    device: str = "cpu",
    base_model: str | None = None,
    use: str = "hub-sae analyze",
) -> Suite:
    """Load a suite (folder or hub repo id, read only) with its base model (default: suite.json's,
    else the SAE config's), in bfloat16 on CUDA, else float32; MiniLM gets its fitted unmasking
    head, so it can decode. `use` names the caller when an SAE does not read a block's output."""
    from hub_sae.models import load_base_model
    from hub_sae.models.unmasking import with_unmasking_head
    from hub_sae.sae import TopKSAE
    from hub_sae.suite import suite_info

    saes = {
        layer: sae.requires_grad_(False).require_resid_post(use)
        for layer, sae in TopKSAE.load_suite(source, k=k, device=device).items()
    }
    info = suite_info(source)
    first = next(iter(saes.values()))
    name = base_model or (info.base_model if info else None) or first.base_model
    if not name:
        raise ValueError(f"{source} names no base model; pass one with --base-model.")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    base = with_unmasking_head(load_base_model(name, dtype=dtype, device=device))
    return Suite(info, base, saes)


def prompt_ids(base: BaseModel, text: str) -> Tensor:
    """[1, P] token ids of `text` starting with BOS, as the training contexts start."""
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids if ids[:1] == [base.bos_token_id] else [base.bos_token_id, *ids]])


def decode(
    base: BaseModel,
    sampler: str,
    ids: Tensor,
    gen_length: int,
    steps: int,
    block_length: int,
    saes: dict[int, TopKSAE],
    top: int,
    seed: int,
    attention_mask: Tensor | None = None,
    steering: Sequence[Steer] = (),
) -> Generation:
    """`gen_length` new tokens after `ids` [B, P] by one of SAMPLERS at temperature 0 (the random
    orders drawn from a generator seeded with `seed`), recording `top` features of `saes`;
    `attention_mask` [B, P] marks left padding with 0; `steering` steers at every step."""
    name, order = sampler.split(":")
    generator = torch.Generator(base.device).manual_seed(seed)
    record = dict(
        saes=saes,
        top=top,
        steering=list(steering),
        generator=generator,
        attention_mask=attention_mask,
    )
    if name == "llada":
        return generate(base, ids, steps, gen_length, block_length, remasking=order, **record)
    return diffusion_generate(base, ids, gen_length, steps, alg=order, **record)
