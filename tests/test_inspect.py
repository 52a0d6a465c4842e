"""`qlora inspect` (qlora/inspect_adapter.py, qlora/rank_analysis.py): singular values of ΔW through the r×r core, effective rank, ‖ΔW‖/‖W‖ and
the LoRA paper's subspace similarity φ.

References: numpy's SVD of the full scaling·B@A in float64, a loop straight from the paper's
definition of φ, PEFT's own `get_delta_weight`, the 4-bit base exactly as `load_model` builds
it, and safetensors' loader for the original weights.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

import qlora.inspect_adapter as inspect_mod
import qlora.rank_analysis as rank_mod
from qlora import quant
from qlora.adapter import save_adapter
from qlora.cli import main
from qlora.errors import QloraError
from qlora.inspect_adapter import inspect_adapters
from qlora.rank_analysis import (delta_singular_values, effective_rank, frobenius_norm,
                                 right_singular_vectors, subspace_similarity, threshold_rank)
from qlora.config import LoraConfig
from qlora.lora import add_lora, lora_layers
from qlora.model import load_model

from conftest import write_tiny_model


def make_adapter(base, out, *, r=8, alpha=16, seed=0, targets="all-linear", std=0.05):
    """A trained-looking adapter on `base`: Kaiming A as initialised, random non-zero B."""
    model = load_model(base, quantization="none", device="cpu")
    add_lora(model, LoraConfig(r=r, alpha=alpha, dropout=0.0, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.rand(layer.lora_A.weight.shape, generator=g) - 0.5)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    save_adapter(model, out, base_model=str(base))
    return out


def factors(path):
    """{module: (A, B)} straight from the safetensors file."""
    state = load_file(str(path / "adapter_model.safetensors"))
    mods = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in state}
    return {m: (state[f"base_model.model.{m}.lora_A.weight"], state[f"base_model.model.{m}.lora_B.weight"])
            for m in mods}


def fro(m: torch.Tensor) -> float:
    """Plain float64 Frobenius norm of a whole matrix (the references build ΔW and W in full)."""
    return torch.linalg.matrix_norm(m.double()).item()


def numpy_sv(A, B, scaling):
    return np.linalg.svd(scaling * (B.double().numpy() @ A.double().numpy()), compute_uv=False)


def numpy_phi(A1, A2, rows=None, cols=None):
    """φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j), one entry at a time (Hu et al. 2021,
    eq. 4), for i in `rows` and j in `cols` (default: all)."""
    U1 = np.linalg.svd(A1.double().numpy(), full_matrices=False)[2].T  # (in, r₁): right-singular vectors
    U2 = np.linalg.svd(A2.double().numpy(), full_matrices=False)[2].T
    rows = rows or range(1, A1.shape[0] + 1)
    cols = cols or range(1, A2.shape[0] + 1)
    return np.array([[np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j) for j in cols] for i in rows])


class LargestTensor(TorchFunctionMode):
    """Records the element count of the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("out_f,in_f,r", [(512, 384, 64), (16, 200, 32), (300, 24, 32), (96, 96, 8)])
def test_singular_values_match_numpy_svd_of_the_full_update(out_f, in_f, r):
    """bf16 factors as training saves them; out < r and in < r give min(r, out, in) values."""
    g = torch.Generator().manual_seed(out_f + in_f + r)
    A = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).bfloat16()
    B = (torch.randn(out_f, r, generator=g) * 0.01).bfloat16()
    got = delta_singular_values(A, B, 0.25).numpy()
    want = numpy_sv(A, B, 0.25)
    k = min(r, out_f, in_f)
    assert got.shape == (k,)
    np.testing.assert_allclose(got, want[:k], rtol=1e-10, atol=1e-12 * want[0])
    assert np.all(want[k:] <= 1e-12 * want[0])  # the full matrix has nothing beyond rank k
    np.testing.assert_allclose(delta_singular_values(A, B, -0.25).numpy(), got)  # |scaling|


def test_singular_values_at_7b_width_never_build_the_full_matrix():
    """out = in = 4096, r = 64 with a known spectrum hidden behind a random mixing of the
    factors (B = U·diag(s)·G, A = G⁻¹·Vᵀ): the result is exact and no tensor the computation
    creates has more elements than one factor (out×in would be 64x more)."""
    n, r = 4096, 64
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -3, r, dtype=torch.float64)  # a decaying spectrum, σ₁/σ₆₄ = 1000
    G = torch.randn(r, r, generator=g, dtype=torch.float64) + 4 * torch.eye(r, dtype=torch.float64)
    B, A = U @ torch.diag(s) @ G, torch.linalg.solve(G, V.T)
    with LargestTensor() as mode:
        got = delta_singular_values(A, B, 0.5)
    assert mode.largest <= n * r
    torch.testing.assert_close(got, 0.5 * s, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_singular_values_at_7b_width_match_numpy_svd():
    """The same at 4096x4096, r 64 against numpy's SVD of the full matrix (~1 min on 2 cores)."""
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(64, 4096, generator=g) / 64).bfloat16()
    B = (torch.randn(4096, 64, generator=g) * 0.01).bfloat16()
    want = numpy_sv(A, B, 16 / 64)
    np.testing.assert_allclose(delta_singular_values(A, B, 16 / 64).numpy(), want[:64],
                               rtol=1e-9, atol=1e-12 * want[0])


@pytest.mark.parametrize("r1,r2,in_f", [(8, 32, 256), (8, 64, 4096), (64, 16, 4096)])
def test_similarity_matches_the_papers_definition(r1, r2, in_f):
    """Random bf16 A factors, up to the paper's r 8 vs r 64 at a 7B width."""
    g = torch.Generator().manual_seed(r1 + r2 + in_f)
    A1, A2 = torch.randn(r1, in_f, generator=g).bfloat16(), torch.randn(r2, in_f, generator=g).bfloat16()
    # Make A2 share part of A1's span, so that φ is far from the random-subspace level.
    k = min(r1, r2) // 2
    A2[:k] += 3 * A1[:k]
    got = subspace_similarity(A1, A2)
    assert got.shape == (r1, r2)
    # Every entry at the small size; a spread of them at 4096 (the reference is one GEMM each).
    rows = None if in_f < 1000 else sorted({1, 2, 3, r1 // 2, r1 - 1, r1})
    cols = None if in_f < 1000 else sorted({1, 2, 5, r2 // 2, r2 - 1, r2})
    want = numpy_phi(A1, A2, rows, cols)
    got = got.numpy() if rows is None else got.numpy()[np.ix_([i - 1 for i in rows], [j - 1 for j in cols])]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert want.max() > 0.3  # the shared span shows (random subspaces would give ~r/in)


def test_similarity_known_properties():
    g = torch.Generator().manual_seed(0)
    in_f = 128
    A = torch.randn(16, in_f, generator=g, dtype=torch.float64)
    same = subspace_similarity(A, A)
    torch.testing.assert_close(same.diagonal(), torch.ones(16, dtype=torch.float64))  # φ(A, A, i, i) = 1
    # Orthogonal row spaces: A1 mixes coordinates 0..15, A2 coordinates 16..47.
    basis = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64)).Q.T
    A1 = torch.randn(16, 16, generator=g, dtype=torch.float64) @ basis[:16]
    A2 = torch.randn(32, 32, generator=g, dtype=torch.float64) @ basis[16:48]
    assert subspace_similarity(A1, A2).abs().max() < 1e-12
    # Symmetric: φ(A1, A2, i, j) = φ(A2, A1, j, i).
    A3 = torch.randn(32, in_f, generator=g, dtype=torch.float64)
    torch.testing.assert_close(subspace_similarity(A, A3), subspace_similarity(A3, A).T)
    # A span inside the other: every top-i subspace of A1 lies in the r₂-dimensional one.
    inside = torch.randn(8, 32, generator=g, dtype=torch.float64) @ A3
    phi = subspace_similarity(inside, A3)
    torch.testing.assert_close(phi[:, -1], torch.ones(8, dtype=torch.float64))
    assert phi.min() >= 0 and phi.max() <= 1 + 1e-12


def test_right_singular_vectors_of_rank_deficient_factors(monkeypatch):
    """An A with 4 independent rows of 8 takes the division-free route (explicit Q): the rows
    stay orthonormal, the top 4 span A's row space; both routes agree where both apply."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(8, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 300, generator=g, dtype=torch.float64)
    v = right_singular_vectors(low)
    torch.testing.assert_close(v @ v.T, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(low @ v[:4].T @ v[:4], low)
    torch.testing.assert_close(subspace_similarity(low, low).diagonal(), torch.ones(8, dtype=torch.float64))
    A = torch.randn(16, 300, generator=g).bfloat16()
    fast = right_singular_vectors(A)
    monkeypatch.setattr(rank_mod, "SVD_RTOL", 2.0)  # no spectrum passes: always the Q route
    slow = right_singular_vectors(A)
    torch.testing.assert_close((fast * slow).sum(1).abs(), torch.ones(16, dtype=torch.float64))  # ± sign


def test_effective_rank_on_constructed_spectra():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert effective_rank(t(3, 3, 3, 3, 0, 0)) == pytest.approx(4)  # k equal values -> k
    assert threshold_rank(t(3, 3, 3, 3, 0, 0)) == 4
    assert effective_rank(t(5, 0, 0)) == pytest.approx(1) and threshold_rank(t(5, 0, 0)) == 1
    assert effective_rank(t(0, 0)) == 0 and threshold_rank(t(0, 0)) == 0  # untrained: B = 0
    # One dominant direction and a small one: exp of the entropy of (1, 0.005)/1.005.
    p = np.array([1, 0.005]) / 1.005
    assert effective_rank(t(1, 0.005)) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert threshold_rank(t(1, 0.005)) == 1 and threshold_rank(t(1, 0.02)) == 2
    spread = effective_rank(t(*[2.0 ** -k for k in range(8)]))
    assert 1 < spread < 8


def test_frobenius_norm_at_7b_width_matches_float64():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = np.linalg.norm(w.double().numpy())
    assert frobenius_norm(w) == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- adapters and bases


def test_against_peft_delta_weights(tmp_path):
    """An adapter written by PEFT itself: module names and σ of PEFT's own ΔW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = write_tiny_model(tmp_path / "tiny")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    want = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g))
                module = name.removeprefix("base_model.model.")
                want[module] = np.linalg.svd(m.get_delta_weight("default").double().numpy(), compute_uv=False)
    model.save_pretrained(tmp_path / "peft")
    report = inspect_adapters(tmp_path / "peft")
    assert set(report.layers) == set(want) and len(want) == 4
    for module, sv in want.items():
        np.testing.assert_allclose(report.layers[module]["singular_values"], sv[:4], rtol=1e-5)


@pytest.mark.parametrize("base_weights", ["dequantized", "original"])
def test_relative_norm_on_a_real_base(stories, tmp_path, base_weights, monkeypatch):
    """‖ΔW‖_F/‖W‖_F with W the NF4 weight training saw (load_model's layer, dequantized) or
    the checkpoint's float32 weight; for both adapters, in one pass over the base."""
    adapter = make_adapter(stories, tmp_path / "a")
    other = make_adapter(stories, tmp_path / "b", r=4, seed=1)
    passes = []
    real = inspect_mod.weight_norms
    monkeypatch.setattr(inspect_mod, "weight_norms", lambda *a: passes.append(a) or real(*a))
    report = inspect_adapters(adapter, other, base=stories, base_weights=base_weights)
    assert len(passes) == 1
    if base_weights == "dequantized":
        model = load_model(stories, device="cpu")  # nf4, double quant, bf16: training's defaults
        weights = {n: quant.dequantize(m) for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)}
    else:
        weights = {k.removesuffix(".weight"): v for k, v in load_file(str(stories / "model.safetensors")).items()}
    assert len(report.layers) == 35
    for module, (A, B) in factors(adapter).items():
        delta = fro(2.0 * B.double() @ A.double())
        want = delta / fro(weights[module].double())
        assert report.layers[module]["relative_norm"] == pytest.approx(want, rel=1e-9), module
        assert report.layers[module]["delta_norm"] == pytest.approx(delta, rel=1e-9)
        A, B = factors(other)[module]
        want = fro(4.0 * B.double() @ A.double()) / fro(weights[module].double())
        assert report.layers[module]["other"]["relative_norm"] == pytest.approx(want, rel=1e-9), module
    assert report.base_weights == base_weights


def test_relative_norm_uses_the_runs_quantization(stories, tmp_path):
    """A run directory's recipe says fp4: W is the fp4 round trip for its adapter; a bare
    adapter folder next to it gets training's defaults (nf4, double quant, bf16)."""
    run = tmp_path / "run"
    make_adapter(stories, run / "adapter")
    bare = make_adapter(stories, tmp_path / "bare", seed=1)
    (run / "recipe.yaml").write_text(
        f"model:\n  name_or_path: {stories}\n  quantization: fp4\n  double_quant: false\n"
        f"  compute_dtype: float16\ndata:\n  path: data.jsonl\ntrain:\n  output_dir: {run}\n")
    module = "model.layers.1.mlp.up_proj"
    report = inspect_adapters(run, bare, base=stories, layers=[module], out=tmp_path / "o")
    assert list(report.layers) == [module]
    w = load_file(str(stories / "model.safetensors"))[module + ".weight"]
    for got, folder, seen in ((report.layers[module], run / "adapter", ("fp4", False, torch.float16)),
                              (report.layers[module]["other"], bare, ("nf4", True, torch.bfloat16))):
        A, B = factors(folder)[module]
        want = fro(2.0 * B.double() @ A.double()) / fro(quant.nf4_roundtrip(w, *seen).double())
        assert got["relative_norm"] == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- the command


def test_cli_json_and_heat_maps(stories, tmp_path, capsys):
    r8 = make_adapter(stories, tmp_path / "runs" / "r8" / "adapter", r=8)
    r16 = make_adapter(stories, tmp_path / "runs" / "r16" / "adapter", r=16, seed=1)
    assert main(["inspect", str(tmp_path / "runs" / "r8"), str(r16), "--json",
                 "--layers", "q_proj", "v_proj"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert list(got) == ["layers"]
    assert sorted(got["layers"]) == sorted(f"model.layers.{i}.self_attn.{p}"
                                           for i in range(5) for p in ("q_proj", "v_proj"))
    f8, f16 = factors(r8), factors(r16)
    for module, layer in got["layers"].items():
        A1, B1 = f8[module]
        np.testing.assert_allclose(layer["singular_values"], numpy_sv(A1, B1, 2.0)[:8], rtol=1e-9)
        np.testing.assert_allclose(layer["similarity"], numpy_phi(A1, f16[module][0]), rtol=1e-9, atol=1e-12)
        assert len(layer["similarity"]) == 8 and all(len(row) == 16 for row in layer["similarity"])
        A2, B2 = f16[module]
        np.testing.assert_allclose(layer["other"]["singular_values"], numpy_sv(A2, B2, 1.0)[:16], rtol=1e-9)
    out = tmp_path / "runs" / "inspect-r8-vs-r16"  # the default: beside the first adapter's run
    assert sorted(p.name for p in out.iterdir()) == [
        "similarity-q_proj.csv", "similarity-q_proj.png", "similarity-v_proj.csv", "similarity-v_proj.png"]
    assert str(out) in captured.err
    import matplotlib.image
    assert matplotlib.image.imread(out / "similarity-q_proj.png").ndim == 3
    table = np.loadtxt(out / "similarity-q_proj.csv", delimiter=",", skiprows=1)
    mean = np.mean([got["layers"][f"model.layers.{i}.self_attn.q_proj"]["similarity"] for i in range(5)], 0)
    np.testing.assert_array_equal(table[:, 0], np.arange(1, 9))
    np.testing.assert_allclose(table[:, 1:], mean, atol=1e-6)
    # The text report: the table at i, j = 1, 2, 4, 8(, 16) and where the full one is.
    assert main(["inspect", str(r8), str(r16), "--layers", "q_proj", "--out", str(tmp_path / "sim")]) == 0
    text = capsys.readouterr().out
    assert "mean of 5 layers" in text and str(tmp_path / "sim" / "similarity-q_proj.csv") in text
    assert "erank" in text and "‖ΔW‖/‖W‖" not in text


def test_cli_single_adapter_with_base(stories, tmp_path, capsys):
    adapter = make_adapter(stories, tmp_path / "a")
    assert main(["inspect", str(adapter), "--base", str(stories), "--base-weights", "original",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["layers"]
    assert len(got) == 35
    assert all("similarity" not in v and v["relative_norm"] > 0 for v in got.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # one adapter writes no files


def test_modules_in_one_adapter_only_are_skipped_and_named(stories, tmp_path, capsys):
    full = make_adapter(stories, tmp_path / "full")
    qv = make_adapter(stories, tmp_path / "qv", targets=["q_proj", "v_proj"], seed=2)
    assert main(["inspect", str(full), str(qv), "--json", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    layers = json.loads(captured.out)["layers"]
    with_phi = {m for m, v in layers.items() if "similarity" in v}
    assert len(layers) == 35 and with_phi == {m for m in layers if m.endswith(("q_proj", "v_proj"))}
    assert "model.layers.0.mlp.down_proj" in captured.err and "only one adapter" in captured.err
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.suffix == ".png") == [
        "similarity-q_proj.png", "similarity-v_proj.png"]  # no heat-map without both adapters


def test_bad_inputs_fail_with_one_line(stories, tmp_path, capsys):
    a = make_adapter(stories, tmp_path / "a")
    b = make_adapter(stories, tmp_path / "b", r=4, seed=1)
    other_base = write_tiny_model(tmp_path / "tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=5)
    c = make_adapter(other_base, tmp_path / "c")
    capsys.readouterr()

    def fails(*argv, match):
        assert main(["inspect", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert match in err, err

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, match=f"{empty}: not a run, checkpoint or adapter directory")
    fails(tmp_path / "nope", match=f"{tmp_path / 'nope'}: no such folder")
    run = tmp_path / "run"
    (run / "checkpoint-000005").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model:\n  name_or_path: x\n")
    (run / "checkpoint-000005" / "trainer_state.json").write_text("{}")
    fails(run, match="no final adapter")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    fails(broken, match=f"{broken}: missing adapter_model.safetensors")
    (broken / "adapter_config.json").write_text("{not json")
    fails(broken, match=f"{broken / 'adapter_config.json'}: invalid JSON")
    fails(a, "--layers", "qkv_proj", match="--layers qkv_proj: matches no adapted module")
    fails(a, "--out", tmp_path / "o", match="nothing to write with one adapter")
    fails(a, "--base-weights", "original", match="--base-weights needs --base")
    # A base of another shape, and an adapter for another base.
    fails(a, "--base", other_base, match="(another base model?)")  # named before any weight is read
    fails(a, c, match=f"{c}: model.layers.0.mlp.down_proj has 64 inputs, {a} has 172")
    # An existing output is never replaced silently, nor an adapter by --force.
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(a, b, "--out", out, match=f"{out}: output folder exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    fails(a, b, "--out", a, "--force", match="would replace the adapter")
    assert (a / "adapter_model.safetensors").is_file()
    assert main(["inspect", str(a), str(b), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "similarity-q_proj.png").is_file()
    # Factor shapes that cannot be a LoRA pair.
    state = load_file(str(a / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = state[key][:3]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    save_file(state, str(bad / "adapter_model.safetensors"))
    fails(bad, match="model.layers.0.self_attn.q_proj has factors A (3, 64)")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--base", "--base-weights", "--layers", "--json", "--out", "--force", "ADAPTER", "OTHER", "1% of"):
        assert text in out, text


def test_layers_are_listed_in_numeric_order():
    assert inspect_mod.module_order(["model.layers.10.mlp.up_proj", "model.layers.2.self_attn.q_proj",
                                     "model.layers.2.mlp.up_proj"]) == [
        "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.10.mlp.up_proj"]
