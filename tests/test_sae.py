import ast
import graphlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hub_sae.sae
from hub_sae import TopKSAE
from hub_sae.sae import WEIGHT_GRAD_PATHS, weight_grad_path


def reference(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 8):
    """The TopK SAE written out densely: z = TopK(ReLU(W_enc (x - b_dec) + b_enc)), x_hat = z W_dec + b_dec."""
    pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    acts, idx = pre.topk(sae.k)
    z = torch.zeros_like(pre).scatter(1, idx, acts)
    x_hat = z @ sae.W_dec + sae.b_dec
    total = (x - x.mean(0)).pow(2).sum()
    loss = (x - x_hat).pow(2).sum() / total
    if dead is not None:
        d = dead.nonzero().squeeze(-1)
        raw = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias  # AuxK: no ReLU
        aux_acts, aux_idx = raw[:, d].topk(k_aux)
        z_aux = torch.zeros_like(pre).scatter(1, d[aux_idx], aux_acts)
        e = (x - x_hat).detach()
        loss = loss + (z_aux @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return z, x_hat, loss


@pytest.fixture
def sae() -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d_in=32, d_sae=128, k=6, layer=3, base_model="minilm")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.1)
    return sae


def test_encode_decode_match_dense_math(sae):
    x = torch.randn(50, 32)
    z, x_hat, _ = reference(sae, x)
    acts, idx = sae.encode(x)
    dense = torch.zeros(50, 128).scatter(1, idx, acts)
    torch.testing.assert_close(dense, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts, idx), x_hat, atol=1e-5, rtol=1e-5)
    out = sae(x)
    torch.testing.assert_close(out.reconstruction, x_hat, atol=1e-5, rtol=1e-5)
    assert out.auxk_loss is None
    assert torch.isclose(out.fvu, (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_encode_keeps_leading_dims(sae):
    x = torch.randn(2, 5, 32)
    acts, idx = sae.encode(x)
    assert acts.shape == idx.shape == (2, 5, 6)
    torch.testing.assert_close(
        sae.decode(acts, idx), sae(x.reshape(10, 32)).reconstruction.reshape(2, 5, 32)
    )


@pytest.mark.parametrize("path", WEIGHT_GRAD_PATHS)
@pytest.mark.parametrize("n_dead", [40, 100])  # <= 2 d_in: a dense block over the dead; else sparse
def test_gradients_match_dense_reference_including_auxk(sae, n_dead, path, monkeypatch):
    monkeypatch.setitem(weight_grad_path, "cpu", path)
    monkeypatch.setattr(hub_sae.sae, "INDEX_ADD_CHUNK", 7)  # several chunks, one of them partial
    x = torch.randn(40, 32, requires_grad=True)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    out = sae(x, dead_mask=dead, k_aux=8)
    (out.fvu + out.auxk_loss).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    grad_x = x.grad.clone()
    sae.zero_grad()
    x.grad = None
    reference(sae, x, dead)[2].backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-4)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces, and its (op name, dtype)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.dtypes.append((func.overloadpacket.__name__, t.dtype))
        return out


def test_no_dense_tokens_by_latents_tensor_in_decode_or_backward():
    n, d_sae = 64, 1000
    sae = TopKSAE(d_in=16, d_sae=d_sae, k=4)
    x = torch.randn(n, 16, requires_grad=True)
    acts, idx = sae.encode(x)
    with ShapeRecorder() as rec:
        x_hat = sae.decode(acts, idx)
    assert x_hat.shape == (n, 16)
    assert not [s for s in rec.shapes if n * d_sae <= torch.Size(s).numel()]

    out = sae(x, dead_mask=torch.ones(d_sae, dtype=torch.bool), k_aux=8)
    with ShapeRecorder() as rec:
        (out.fvu + out.auxk_loss).backward()
    assert rec.shapes, "the recorder saw the backward ops"
    assert not [s for s in rec.shapes if n * d_sae <= torch.Size(s).numel()]
    assert sae.encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_dead", [40, 100])
def test_bf16_autocast_runs_the_encoder_gemm_in_bf16_and_keeps_fp32_gradients(sae, n_dead):
    x = torch.randn(40, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    grads, indices = {}, {}
    for autocast in (False, True):
        sae.zero_grad()
        with ShapeRecorder() as rec, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead, k_aux=8)
        assert out.fvu.dtype == out.auxk_loss.dtype == out.reconstruction.dtype == torch.float32
        gemms = {dtype for op, dtype in rec.dtypes if op in ("addmm", "mm")}
        assert gemms == {torch.bfloat16 if autocast else torch.float32}
        (out.fvu + out.auxk_loss).backward()
        grads[autocast] = {n: p.grad.clone() for n, p in sae.named_parameters()}
        indices[autocast] = out.latents.top_indices.sort(1).values
    assert (indices[True] == indices[False]).all(1).float().mean() > 0.9
    for name, fp32 in grads[False].items():
        bf16 = grads[True][name]
        assert bf16.dtype == torch.float32
        # bf16 keeps 8 significant bits, and near-ties in the top k (or AuxK's k) may swap: a
        # few latents' rows differ, so the gradients agree to a few percent, not to rounding.
        assert (bf16 - fp32).norm() < 0.1 * fp32.norm(), name


def test_decoder_rows_unit_norm_and_parallel_gradient_removed(sae):
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    sae(torch.randn(20, 32)).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-6


def test_fold_input_scale_gives_raw_input_sae(sae):
    scale = 7.5
    x = torch.randn(30, 32) * scale
    scaled = sae(x / scale).reconstruction * scale
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae(x).reconstruction, scaled, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))


def test_encoder_starts_as_the_unit_norm_decoder_transpose():
    sae = TopKSAE(d_in=16, d_sae=64, k=4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.encoder.weight, sae.W_dec)
    # equal at the start, trained apart
    assert sae.encoder.weight.data_ptr() != sae.W_dec.data_ptr()


@pytest.mark.parametrize("k", [4, 48])
def test_match_scale_starts_the_reconstruction_at_the_inputs_distance_from_b_dec(k):
    torch.manual_seed(0)
    sae = TopKSAE(d_in=16, d_sae=64, k=k)
    x = 3 * torch.randn(256, 16) + 1
    sae.b_dec.data.copy_(x.mean(0))
    with torch.no_grad():
        before = (sae(x).reconstruction - sae.b_dec).norm().item()
        factor = sae.match_scale(x)
        after = (sae(x).reconstruction - sae.b_dec).norm().item()
        assert after == pytest.approx((x - sae.b_dec).norm().item(), rel=1e-4)
    assert factor == pytest.approx(after / before, rel=1e-4)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must satisfy 0 < k < d_sae"):
        TopKSAE(d_in=8, d_sae=16, k=16)


def test_unknown_weight_grad_path_is_named(sae, monkeypatch):
    monkeypatch.setitem(weight_grad_path, "cpu", "dense")
    with pytest.raises(ValueError, match="weight_grad_path must be one of"):
        sae(torch.randn(8, 32)).fvu.backward()


def _imports(path: Path, package: str) -> set[str]:
    """The hub_sae modules a file imports anywhere (function-level too), except under
    TYPE_CHECKING and except a package's own submodules (its re-exports and lazy dispatch)."""
    modules = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hub_sae"):
            modules |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.startswith("hub_sae")}
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in modules if m != package and not m.startswith(f"{package}.")}


def test_hub_sae_imports_form_no_circle():
    """No module needs, even lazily, a module that needs it back (issue 20: sae -> formats ->
    suite -> features -> sae); graphlib names the circle if there is one."""
    root = Path(hub_sae.sae.__file__).parent
    files = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {
        name: {m for m in _imports(path, name) if m in files} - {name}
        for name, path in files.items()
    }
    assert "hub_sae.formats" in graph["hub_sae.sae"]  # the scan sees lazy imports
    list(graphlib.TopologicalSorter(graph).static_order())  # a CycleError names the circle


@pytest.mark.parametrize("shape", [(7, 31), (7, 64), (2, 3, 33), (31,)])
def test_input_of_the_wrong_width_names_d_in(sae, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"expected last dim d_in=32, got {shape[-1]}"):
        sae.encode(x)
    with pytest.raises(ValueError, match=rf"expected last dim d_in=32, got {shape[-1]}"):
        sae(x)


def test_forward_takes_one_row_per_token(sae):
    with pytest.raises(ValueError, match=r"forward takes \[N, d_in=32\].*reshape\(-1, 32\)"):
        sae(torch.randn(2, 5, 32))


@pytest.mark.parametrize(
    "layer, hookpoint, problem",
    [
        (3, "layers.3.mlp", "reads 'layers.3.mlp' of block 3"),
        (0, "blocks.0.hook_resid_pre", "reads 'blocks.0.hook_resid_pre' of block 0"),
        (None, "resid_post", "reads 'resid_post' of no block (its layer is unset)"),
    ],
)
def test_require_resid_post_names_hookpoint_use_and_fix(layer, hookpoint, problem):
    assert TopKSAE(8, 32, 4, layer=2).require_resid_post("Steer").layer == 2
    sae = TopKSAE(8, 32, 4, layer=layer, hookpoint=hookpoint)
    with pytest.raises(ValueError, match=r"Steer applies SAEs to the residual stream") as error:
        sae.require_resid_post("Steer")
    assert problem in str(error.value)
    assert "Use an SAE trained on a block's output" in str(error.value)
