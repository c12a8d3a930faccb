"""Feature statistics v2 against a brute-force scan that keeps every activation, on the embedded
default with the trained suite's SAEs; v1 files; bad files; the `hub-sae features` command."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from hub_sae.activations import capture
from hub_sae.cli import main
from hub_sae.data import DataConfig, token_batches
from hub_sae.features import (
    FEATURES_FILE,
    HIST_EDGES,
    POOL,
    collect_features,
    load_features,
    save_features,
    unembed,
)
from hub_sae.masking import Corruption, corrupt
from hub_sae.models import load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import TopKSAE
from hub_sae.suite import layer_folders

TOKENS, WINDOW, BANDS, SLOTS = 300, 3, 3, 4
DATA = DataConfig(split="train", ctx_len=64, batch_size=4)
CORRUPTION = Corruption()


@pytest.fixture(scope="module")
def base():
    return load_base_model("minilm")


@pytest.fixture(scope="module")
def saes(trained_suite):
    return {
        key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(trained_suite).items()
    }


@pytest.fixture(scope="module")
def stats(base, saes):
    return collect_features(
        base, saes, "mask", CORRUPTION, DATA, TOKENS, WINDOW, BANDS, SLOTS, progress=False
    )


def window_of(values: list, pos: int, fill) -> list:
    return [
        values[j] if 0 <= j < len(values) else fill for j in range(pos - WINDOW, pos + WINDOW + 1)
    ]


@pytest.fixture(scope="module")
def brute(base, saes):
    """Every scanned row: dense activations per SAE, policy/masked flags, t, clean and masked
    windows; rows in (batch, position) order up to the TOKENS-th masked position."""
    generator = torch.Generator().manual_seed(0)
    rows = {"policy": [], "masked": [], "t": [], "ids": [], "flags": []}
    dense = {key: [] for key in saes}
    seen = 0
    for input_ids, attention_mask in token_batches(
        DATA, base.tokenizer, base.bos_token_id, base.eos_token_id
    ):
        batch = corrupt(
            input_ids, attention_mask, base.mask_token_id, "mask", CORRUPTION, generator
        )
        layers = sorted({s.layer for s in saes.values()})
        hidden = capture(base, batch.input_ids, attention_mask, layers)
        picked = []
        for b in range(len(input_ids)):
            real = int(attention_mask[b].sum())
            clean = input_ids[b, :real].tolist()
            masked = batch.is_masked[b, :real].tolist()
            for pos in range(1, real):
                if seen < TOKENS:
                    picked.append((b, pos))
                    rows["policy"].append(masked[pos])
                    rows["masked"].append(masked[pos])
                    rows["t"].append(float(batch.p[b]))
                    rows["ids"].append(window_of(clean, pos, -1))
                    rows["flags"].append(window_of(masked, pos, False))
                    seen += masked[pos]
        index = torch.tensor(picked)
        for key, sae in saes.items():
            enc = sae.encode(hidden[sae.layer][index[:, 0], index[:, 1]])
            zeros = torch.zeros(len(index), sae.d_sae)
            dense[key].append(zeros.scatter(1, enc.top_indices, enc.top_acts))
        if seen == TOKENS:
            break
    out = {name: torch.tensor(values) for name, values in rows.items()}
    return out, {key: torch.cat(parts) for key, parts in dense.items()}


def bin_of(value: float) -> int:
    return int((HIST_EDGES[1:-1] <= value).sum())


def test_counts_match_brute_force(stats, brute):
    rows, dense = brute
    policy, masked, t = rows["policy"], rows["masked"], rows["t"]
    edges = [0.05, 0.14, 0.23, 0.32, 0.41, 0.5, 0.95]
    t_bin = torch.tensor([sum(e <= x for e in edges[1:-1]) for x in t.tolist()])
    for key, acts in dense.items():
        s = stats[key]
        fired = acts > 0
        assert s.version == 2 and s.tokens == TOKENS == int(policy.sum())
        assert (s.positions_masked, s.positions_unmasked) == (
            int(masked.sum()),
            int((~masked).sum()),
        )
        torch.testing.assert_close(s.frequency, fired[policy].float().mean(0))
        torch.testing.assert_close(s.frequency_masked, fired[masked].float().mean(0))
        torch.testing.assert_close(s.frequency_unmasked, fired[~masked].float().mean(0))
        on = acts[policy]
        mean = on.sum(0) / (on > 0).sum(0).clamp(min=1)
        torch.testing.assert_close(s.mean_activation, mean)
        assert torch.equal(s.t_edges, torch.tensor(edges))
        for i in range(len(edges) - 1):
            in_bin = policy & (t_bin == i)
            assert int(s.positions_by_t[i]) == int(in_bin.sum())
            expected = fired[in_bin].float().mean(0) if in_bin.any() else torch.zeros(len(mean))
            torch.testing.assert_close(s.frequency_by_t[:, i], expected)
        histogram = torch.zeros_like(s.histogram)
        for r, f in (on > 0).nonzero().tolist():
            histogram[f, bin_of(float(on[r, f]))] += 1
        assert torch.equal(s.histogram, histogram) and torch.equal(s.hist_edges, HIST_EDGES)


def test_examples_are_clean_windows_with_the_masks_marked(stats, brute):
    rows, dense = brute
    for key, acts in dense.items():
        s = stats[key]
        on = acts[rows["policy"]]
        ids, flags, t = (
            rows["ids"][rows["policy"]],
            rows["flags"][rows["policy"]],
            rows["t"][rows["policy"]],
        )
        top = on.sort(0, descending=True).values[:SLOTS].T
        torch.testing.assert_close(s.example_values[:, 0], top)
        checked = 0
        for f, band, slot in (s.example_values > 0).nonzero().tolist()[::7]:
            match = (on[:, f] == s.example_values[f, band, slot]).nonzero().flatten()
            assert any(
                ids[r].tolist() == s.example_ids[f, band, slot].tolist()
                and flags[r].tolist() == s.example_masked[f, band, slot].tolist()
                and float(t[r]) == float(s.example_t[f, band, slot])
                for r in match
            ), (key, f, band, slot)
            assert s.example_masked[f, band, slot, WINDOW]  # the mask policy: a masked position
            checked += 1
        assert checked > 20
        unused = s.example_values == 0
        assert (s.example_ids[unused] == -1).all() and not s.example_masked[unused].any()


def test_quantile_bands_hold_their_quantile_range(stats, brute):
    rows, dense = brute
    for key, acts in dense.items():
        s = stats[key]
        on = acts[rows["policy"]]
        for f in range(on.shape[1]):
            values = on[:, f][on[:, f] > 0].sort().values
            n = len(values)
            shown = set(s.example_values[f, 0][s.example_values[f, 0] > 0].tolist())
            for band in range(1, BANDS + 1):
                low, high = n * (BANDS - band) // BANDS, n * (BANDS - band + 1) // BANDS
                got = s.example_values[f, band]
                if high <= low:
                    assert (got == 0).all()
                    continue
                pools = range(bin_of(values[low]) // POOL, bin_of(values[high - 1]) // POOL + 1)
                # an example shown as a top one or in a higher band is not shown again: the
                # reservoir of S per bin then offers fewer, at most one fewer per shown one
                pooled = [v for v in values.tolist() if bin_of(v) // POOL in pools]
                candidates = [v for v in pooled if v not in shown]
                most = min(SLOTS, len(candidates))
                least = min(SLOTS, len(pooled)) - (len(pooled) - len(candidates))
                used = got[got > 0]
                assert least <= len(used) <= most, (key, f, band)
                assert not shown & set(used.tolist()), (key, f, band)
                shown |= set(used.tolist())
                assert all(bin_of(v) // POOL in pools for v in used.tolist())
                assert (used.diff() <= 0).all()


def test_logit_effects_are_the_decoder_rows_through_the_head(stats, base, saes):
    head = unembed(with_unmasking_head(base))
    vocab = max(base.tokenizer.get_vocab().values()) + 1
    for key, sae in saes.items():
        s = stats[key]
        with torch.no_grad():
            logits = (head(sae.W_dec[:5]) - head(torch.zeros(1, sae.d_in)))[:, :vocab]
        top, bottom = logits.topk(10), (-logits).topk(10)
        assert torch.equal(s.logit_top_ids[:5], top.indices)
        torch.testing.assert_close(s.logit_top_values[:5], top.values)
        assert torch.equal(s.logit_bottom_ids[:5], bottom.indices)
        torch.testing.assert_close(s.logit_bottom_values[:5], -bottom.values)


def test_save_and_load_keep_every_field(stats, tmp_path):
    s = next(iter(stats.values()))
    save_features(tmp_path / FEATURES_FILE, s, {"base_model": "minilm"})
    loaded = load_features(tmp_path / FEATURES_FILE)
    for name, value in vars(s).items():
        other = getattr(loaded, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (
            name
        )


def test_version_1_files_load_with_the_v2_fields_none(tmp_path):
    """The layout save_features wrote before version 2 (commit 97e9921)."""
    contexts = torch.arange(2 * 3 * 5).view(2, 3, 5)
    tensors = {
        "frequency": torch.tensor([0.5, 0.0]),
        "top_values": torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        "top_tokens": torch.tensor([[7, 8, -1], [-1, -1, -1]]),
        "top_contexts": contexts,
    }
    save_file(
        tensors, tmp_path / "v1.safetensors", {"tokens": "40", "window": "2", "policy": "mask"}
    )
    s = load_features(tmp_path / "v1.safetensors")
    assert (s.version, s.tokens, s.window, s.bands, s.policy) == (1, 40, 2, 0, "mask")
    assert torch.equal(s.top_values, tensors["top_values"]) and torch.equal(
        s.frequency, tensors["frequency"]
    )
    assert torch.equal(s.top_tokens, tensors["top_tokens"])
    assert torch.equal(s.top_contexts[..., [0, 1, 3, 4]], contexts[..., [0, 1, 3, 4]])
    v2_only = (
        "histogram",
        "frequency_by_t",
        "frequency_masked",
        "example_masked",
        "example_t",
        "logit_top_ids",
    )
    assert all(getattr(s, name) is None for name in v2_only)


def test_bad_files_are_named(stats, tmp_path):
    path = tmp_path / FEATURES_FILE
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"{path} is not a valid .*`hub-sae features SUITE`"):
        load_features(path)
    s = next(iter(stats.values()))
    save_features(path, s)
    tensors = {name: getattr(s, name) for name in ("frequency", "histogram")}
    save_file(tensors, path, {"version": "2", "window": "3"})
    with pytest.raises(ValueError, match=r"version 2 needs the tensors \['mean_activation'"):
        load_features(path)
    save_file({"frequency": s.frequency}, path, {"version": "3", "window": "3"})
    with pytest.raises(ValueError, match="version '3'.*upgrade hub-sae"):
        load_features(path)
    with pytest.raises(FileNotFoundError, match="hub-sae features SUITE"):
        load_features(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"window must be a whole number in 0\.\.32"):
        collect_features(None, {}, "mask", CORRUPTION, DATA, 10, window=33)


def test_a_short_window_loads_as_a_shape_error(stats, tmp_path):
    path = tmp_path / FEATURES_FILE
    save_features(path, next(iter(stats.values())))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    save_file(tensors, path, {**meta, "window": "2"})
    with pytest.raises(ValueError, match=r"shapes example_ids .* \(expected"):
        load_features(path)
    save_file(tensors, path, {**meta, "tokens": "-1"})
    with pytest.raises(ValueError, match="metadata 'tokens' is -1, not a count"):
        load_features(path)


def test_features_command_rewrites_a_suite_in_place(trained_suite, tmp_path, capsys):
    suite = tmp_path / "suite"
    shutil.copytree(trained_suite, suite)
    assert main(["features", str(suite), "--max-tokens", "64", "--device", "cpu"]) == 0
    assert "64 positions scanned" in capsys.readouterr().out
    for folder in layer_folders(suite).values():
        s = load_features(folder / FEATURES_FILE)
        assert s.version == 2 and s.tokens == 64
        assert torch.equal(s.histogram.sum(1), (s.frequency * 64).round().long())
    assert main(["features", "someone/suite"]) == 1
    assert "give a new folder for a copy of it with --out DIR" in capsys.readouterr().err
