"""Tokens/s of one TopK SAE training step: hub-sae vs eai-sparsify vs SAELens, same data, CPU.

Every library trains its own TopK SAE (same d_in, d_sae, k, batch, Adam, learning rate, b_dec
initialised to the mean of the first batch; hub-sae also matches its encoder to that batch's scale,
as its trainer does) on the SAME cached activations: round r gives batch r
to each library in turn, so drift in machine load hits them alike. One step is

    forward + AuxK  ->  backward  ->  decoder-gradient projection  ->  Adam step  ->  decoder renorm

as each library's own trainer does it: sparsify and hub-sae project the decoder gradient and keep
unit-norm decoder rows; SAELens's TopK training SAE does neither (it divides by the decoder norms
in the forward instead, `rescale_acts_by_decoder_norm`). AuxK (alpha 1/32, k_aux = d_in / 2) runs
every step over a fixed mask of "dead" latents (a random DEAD_SHARE of them, the same mask for all),
so each step pays what a step with dead latents costs. Gradient clipping is left out for all.

The floor is one dense encoder GEMM of the batch (x @ W_enc.T), timed in the same rounds. Each
time is the median over the timed rounds (the first WARMUP rounds train but are not timed); FVU is
measured on held-out activations after all rounds, i.e. after the same number of tokens.

Data: synthetic activations of realistic shape (a sparse sum of unit atoms with Zipf frequencies
and log-normal magnitudes, a shared offset and 5 % Gaussian noise), plus real MiniLM layer-3
activations under the mask policy (the embedded model and corpus). The references are the optional
`bench` extra (`pip install -e '.[bench]'`); a missing one is reported and skipped.

    python benchmarks/train_step.py            # all cases
    python benchmarks/train_step.py --small    # d_in 384 only
    python benchmarks/train_step.py --small --only-hub --autocast   # fp32 vs bf16 autocast
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --synthetic   # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch
import torch.nn.functional as F
from torch import Tensor

from hub_sae.sae import WEIGHT_GRAD_PATHS, TopKSAE, weight_grad_path

BATCH = 1024
LR = 1e-3
AUXK_ALPHA = 1 / 32
DEAD_SHARE = 0.1
EVAL_TOKENS = 4096
THREADS = 2
RESULTS = Path(__file__).parent / "results" / "train_step.json"
TARGETS = {"vs_sparsify": 1.3, "vs_saelens": 3.0, "step_over_floor": 2.0}


@dataclass(frozen=True)
class Case:
    data: str
    """'synthetic' or 'minilm' (real layer-3 activations, mask policy)."""
    d_in: int
    expansion: int
    k: int
    rounds: int
    """Training steps each library takes; all but the first WARMUP are timed."""
    warmup: int = 2

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion


SMALL = [
    Case("synthetic", 384, 8, 32, 64),
    Case("synthetic", 384, 8, 160, 64),
    Case("synthetic", 384, 32, 32, 32),
    Case("synthetic", 384, 32, 160, 32),
    Case("minilm", 384, 8, 32, 64),
]
# d_in 4096: 8x latents only (32x needs ~17 GB of weights, gradients and Adam state per library,
# three libraries do not fit in 24 GB, and one GEMM floor alone takes ~15 s on two cores).
LARGE = [Case("synthetic", 4096, 8, 32, 6, 1), Case("synthetic", 4096, 8, 160, 6, 1)]
# On a GPU: 32x too, and enough steps that the warm-up (kernel selection, allocator) is not timed.
GPU_LARGE = [Case("synthetic", 4096, x, k, 24, 4) for x in (8, 32) for k in (32, 160)]


class Runner(NamedTuple):
    step: Callable[[Tensor], None]
    """One full training step on a batch."""
    reconstruct: Callable[[Tensor], Tensor]
    """The SAE's reconstruction of a batch (no grad)."""


def adam(params) -> torch.optim.Optimizer:
    """The same optimizer for every library: Adam with the fused CPU kernel (one pass per tensor)."""
    return torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), fused=True)


def hub_runner(
    case: Case, dead: Tensor, first: Tensor, weight_grad: str | None = None, autocast: bool = False
) -> Runner:
    """hub-sae's step; `weight_grad` picks its weight-gradient kernel (default: the device's),
    `autocast` runs the forward under bfloat16 autocast (the trainer's --sae_autocast bfloat16)."""
    sae = TopKSAE(case.d_in, case.d_sae, case.k).to(first.device, first.dtype)
    path = weight_grad or weight_grad_path[first.device.type]
    sae.b_dec.data.copy_(first.mean(0))
    sae.match_scale(first)
    optimizer = adam(sae.parameters())

    def step(x: Tensor) -> None:
        weight_grad_path[x.device.type] = path
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
        (out.fvu + AUXK_ALPHA * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return Runner(step, lambda x: sae(x).reconstruction)


def sparsify_runner(case: Case, dead: Tensor, first: Tensor) -> Runner:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(case.d_in, SparseCoderConfig(num_latents=case.d_sae, k=case.k))
    sae = sae.to(first.device, first.dtype)
    sae.b_dec.data.copy_(first.mean(0))
    optimizer = adam(sae.parameters())

    def step(x: Tensor) -> None:
        # sparsify.Trainer's order: renorm, forward, backward, project, step.
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        (out.fvu + AUXK_ALPHA * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(step, lambda x: sae(x).sae_out)


def saelens_runner(case: Case, dead: Tensor, first: Tensor) -> Runner:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(
        d_in=case.d_in, d_sae=case.d_sae, k=case.k, aux_loss_coefficient=AUXK_ALPHA
    )
    sae = TopKTrainingSAE(cfg).to(first.device, first.dtype)
    sae.b_dec.data.copy_(first.mean(0))
    optimizer = adam(sae.parameters())

    def step(x: Tensor) -> None:
        # sae_lens.SAETrainer._train_step without its bookkeeping and gradient clipping.
        step_input = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
        sae.training_forward_pass(step_input).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(step, lambda x: sae.decode(sae.encode(x)))


REFERENCES: dict[str, Callable[[Case, Tensor, Tensor], Runner]] = {
    "sparsify": sparsify_runner,
    "saelens": saelens_runner,
}
PACKAGES = {"sparsify": "eai-sparsify", "saelens": "sae-lens"}


def missing_references() -> dict[str, str]:
    """{name: why} for each reference that cannot be imported."""
    missing = {}
    for name, module in (("sparsify", "sparsify"), ("saelens", "sae_lens")):
        try:
            __import__(module)
        except Exception as error:  # an ImportError, or a broken install
            missing[name] = (
                f"{PACKAGES[name]} not importable ({error!r}); pip install -e '.[bench]'"
            )
    return missing


def synthetic(case: Case, n_tokens: int, seed: int) -> Tensor:
    """[n_tokens, d_in]: 48 of d_sae unit atoms per token (Zipf frequencies, log-normal
    magnitudes) plus a shared offset and Gaussian noise at 5 % of the signal's variance."""
    generator = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(case.d_sae, case.d_in, generator=generator), dim=1)
    offset = 2 * torch.randn(case.d_in, generator=generator) / case.d_in**0.5
    freq = 1 / torch.arange(10, case.d_sae + 10, dtype=torch.float) ** 0.8
    generator.manual_seed(seed)
    out = torch.empty(n_tokens, case.d_in)
    for start in range(0, n_tokens, BATCH):
        n = min(BATCH, n_tokens - start)
        idx = torch.multinomial(freq.expand(n, -1), 48, generator=generator)
        mags = torch.exp(0.5 * torch.randn(n, 48, generator=generator))
        signal = F.embedding_bag(idx, atoms, per_sample_weights=mags, mode="sum")
        noise = torch.randn(n, case.d_in, generator=generator)
        out[start : start + n] = signal + offset + 0.05**0.5 * signal.std() * noise
    return out


def minilm(n_tokens: int, split: str) -> Tensor:
    """[n_tokens, 384] MiniLM layer-3 resid_post at masked positions (mask policy), pydoc text."""
    from hub_sae.activations import harvest_text
    from hub_sae.data import DataConfig
    from hub_sae.masking import Corruption
    from hub_sae.models.hf import load_hf

    base = load_hf("minilm")
    data = DataConfig(split=split)
    harvests = harvest_text(base, data, [3], "mask", Corruption(), n_tokens, passes=None)
    return torch.cat([h.acts[3] for *_, h in harvests]).float()


def activations(case: Case) -> tuple[Tensor, Tensor]:
    """(train [rounds * BATCH, d_in], held-out [EVAL_TOKENS, d_in]), scaled to mean ||x||^2 = d_in."""
    n = case.rounds * BATCH
    if case.data == "minilm":
        train, heldout = minilm(n, "train"), minilm(EVAL_TOKENS, "heldout")
    else:
        train, heldout = synthetic(case, n, seed=1), synthetic(case, EVAL_TOKENS, seed=2)
    scale = (train[:BATCH].pow(2).sum(-1).mean() / case.d_in).sqrt()
    return train / scale, heldout / scale


@torch.no_grad()
def fvu(reconstruct: Callable[[Tensor], Tensor], x: Tensor) -> float:
    residual = sum(
        (x[i : i + BATCH].float() - reconstruct(x[i : i + BATCH]).float()).pow(2).sum()
        for i in range(0, len(x), BATCH)
    )
    return float(residual / (x.float() - x.float().mean(0)).pow(2).sum())


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_case(
    case: Case,
    skip: dict[str, str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    weight_grads: tuple[str, ...] = (),
    autocast: bool = False,
) -> dict[str, object]:
    """Train every available library for case.rounds steps in alternation; times and FVUs.

    Each of `weight_grads` adds a hub-sae runner `hub_sae_<path>` with that weight-gradient kernel;
    `autocast` adds `hub_sae_autocast_bf16`, hub-sae's step under bfloat16 autocast.
    """
    train, heldout = (t.to(device, dtype) for t in activations(case))
    batches = train.split(BATCH)
    dead = torch.rand(case.d_sae, generator=torch.Generator().manual_seed(3)) < DEAD_SHARE
    dead = dead.to(device)
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    variants = {f"hub_sae_{p}": functools.partial(hub_runner, weight_grad=p) for p in weight_grads}
    if autocast:
        variants["hub_sae_autocast_bf16"] = functools.partial(hub_runner, autocast=True)
    for name, make in {"hub_sae": hub_runner, **variants, **REFERENCES}.items():
        if name in skip:
            continue
        torch.manual_seed(0)
        try:
            runners[name] = make(case, dead, batches[0])
        except Exception:
            if name == "hub_sae":
                raise
            errors[name] = traceback.format_exc(limit=1).strip().splitlines()[-1]
    weight = (torch.randn(case.d_sae, case.d_in) / case.d_in**0.5).to(device, dtype)

    times: dict[str, list[float]] = {name: [] for name in [*runners, "floor"]}
    on = torch.device(device)
    for r, x in enumerate(batches):
        for name, runner in runners.items():
            start = clock(on)
            runner.step(x)
            elapsed = clock(on) - start
            if r >= case.warmup:
                times[name].append(elapsed)
        start = clock(on)
        F.linear(x, weight)
        if r >= case.warmup:
            times["floor"].append(clock(on) - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    libraries = {
        name: {
            "step_ms": 1e3 * med[name],
            "tokens_per_s": BATCH / med[name],
            "fvu": fvu(runner.reconstruct, heldout),
            "step_over_floor": med[name] / med["floor"],
        }
        for name, runner in runners.items()
    }
    ratios = {f"vs_{name}": med[name] / med["hub_sae"] for name in runners if name != "hub_sae"}
    return {
        **asdict(case),
        "d_sae": case.d_sae,
        "tokens": len(batches) * BATCH,
        "timed_rounds": len(times["floor"]),
        "floor_ms": 1e3 * med["floor"],
        "libraries": libraries,
        "speedup": ratios,
        "failed": errors,
    }


def table(results: list[dict]) -> str:
    """Markdown: tokens/s (held-out FVU) of each library, the floor, and hub-sae's ratios."""
    names = {"hub_sae": "hub-sae", "sparsify": "sparsify", "saelens": "SAELens"}
    variants = {n for r in results for n in r["libraries"] if n.startswith("hub_sae_")}
    names.update({n: n.replace("hub_sae_", "hub-sae ") for n in sorted(variants)})
    head = "| data | d_in | d_sae | k | threads | tokens | floor ms |"
    head += "".join(f" {label} tok/s (FVU) |" for label in names.values())
    head += " hub step / floor | vs sparsify | vs SAELens |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        libs, speed = r["libraries"], r["speedup"]
        cells = [r["data"], r["d_in"], r["d_sae"], r["k"], r.get("threads", "-"), r["tokens"]]
        cells.append(f"{r['floor_ms']:.1f}")
        for name in names:
            lib = libs.get(name)
            cells.append(f"{lib['tokens_per_s']:.0f} ({lib['fvu']:.3f})" if lib else "-")
        cells.append(f"{libs['hub_sae']['step_over_floor']:.2f}")
        cells += [
            f"{speed[f'vs_{n}']:.2f}x" if f"vs_{n}" in speed else "-"
            for n in ("sparsify", "saelens")
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def case_key(result: dict) -> tuple:
    return result["data"], result["d_in"], result["d_sae"], result["k"]


def write(results: list[dict], skip: dict[str, str], path: Path = RESULTS) -> None:
    """`path` with these results, keeping earlier ones of cases not run now (e.g. after --small)."""
    if path.exists():
        new = {case_key(r) for r in results}
        kept = [r for r in json.loads(path.read_text())["results"] if case_key(r) not in new]
        results = sorted(
            kept + results, key=lambda r: (r["d_in"], r["data"] == "minilm", r["d_sae"], r["k"])
        )
    versions = {"torch": torch.__version__}
    for name, package in PACKAGES.items():
        if name not in skip:
            versions[name] = version(package)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "batch": BATCH,
        "lr": LR,
        "optimizer": "torch.optim.Adam(fused=True)",
        "auxk_alpha": AUXK_ALPHA,
        "dead_share": DEAD_SHARE,
        "eval_tokens": EVAL_TOKENS,
        "versions": versions,
        "skipped": skip,
        "targets": TARGETS,
        "results": results,
    }
    tmp = path.with_suffix(".tmp")  # a run killed mid-write leaves the old results whole
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="d_in 384 cases only")
    parser.add_argument("--only-hub", action="store_true", help="run hub-sae alone")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (results to train_step_cuda.json)"
    )
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16: weights and data")
    parser.add_argument("--synthetic", action="store_true", help="skip the MiniLM case")
    parser.add_argument(
        "--weight-grad",
        action="append",
        default=[],
        choices=WEIGHT_GRAD_PATHS,
        help="also time hub-sae with this weight-gradient kernel (repeatable)",
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="also time hub-sae with its forward under bfloat16 autocast (fp32 weights)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gpu = args.device != "cpu"
    path = RESULTS.with_name("train_step_cuda.json") if gpu else RESULTS
    device_name = torch.cuda.get_device_name(args.device) if gpu else "cpu"
    print(f"device: {device_name}")
    skip = missing_references()
    for name, why in skip.items():
        print(f"reference {name} skipped: {why}")
    if args.only_hub:
        skip.update({name: "--only-hub" for name in REFERENCES})
    results = []
    cases = SMALL if args.small else SMALL + (GPU_LARGE if gpu else LARGE)
    for case in [c for c in cases if not (args.synthetic and c.data == "minilm")]:
        print(f"{case} ...", flush=True)
        load = os.getloadavg()[0]
        if load > 0.5:
            print(
                f"warning: load average {load:.1f} before the run; busy cores stall every "
                "multi-threaded op, so these timings will be slow and noisy"
            )
        result = bench_case(case, skip, args.device, dtype, tuple(args.weight_grad), args.autocast)
        result.update(
            threads=args.threads,
            load_avg_1min=[load, os.getloadavg()[0]],
            device=device_name,
            dtype=args.dtype,
        )
        results.append(result)
        print(table(results[-1:]), flush=True)
        write(
            results, skip, path
        )  # after every case, so a long run that dies keeps what it measured
    print(
        f"\nTopK SAE train step, batch {BATCH}, fused Adam lr {LR}, {args.threads} CPU threads, "
        f"{args.device} {args.dtype}, torch {torch.__version__}"
    )
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
