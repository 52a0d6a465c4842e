"""`qlora plan`: each memory term against a direct measurement of what qlora allocates, the
bundled recipes' plans, and `qlora train` refusing a recipe that cannot fit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qlora import cpu_matmul, quant
from qlora.cli import main
from qlora.config import load_recipe, recipe_from_dict
from qlora.errors import QloraError
from qlora.config import LoraConfig
from qlora.lora import add_lora
from qlora.loss import lm_loss_sum
from qlora.checkpointing import enable_gradient_checkpointing, matmul_layers_within
from qlora.model import decoder_layers, load_model
from qlora.model_shapes import read_shape
from qlora.optim import build_optimizer
from qlora.plan import STEP_TERMS, parse_device, plan_recipe, to_json
from qlora.plan_terms import (Workload, kept_layers, layer_terms, loss_bytes,
                              lora_tensors, matmul_temporaries, optimizer_step_bytes, persistent_terms,
                              quantized_linear_bytes)

from conftest import STORIES, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def recipe(path, *, r=8, dropout=0.05, seq=64, batch=1, optimizer="adamw_torch", lora_dtype="bfloat16",
           targets="all-linear", keep=0.0, quantization="nf4", double_quant=True, checkpointing=True,
           offload="none", resident="auto", fuse=True):
    return recipe_from_dict({
        "model": {"name_or_path": str(path), "quantization": quantization, "double_quant": double_quant,
                  "offload": offload, "resident_layers": resident},
        "lora": {"r": r, "alpha": 2 * r, "dropout": dropout, "dtype": lora_dtype, "targets": targets,
                 "fuse_shared_inputs": fuse},
        "data": {"path": "unused.jsonl", "max_seq_len": seq},
        "train": {"output_dir": "unused", "batch_size": batch, "optimizer": optimizer,
                  "keep_matmuls_gb": keep, "gradient_checkpointing": checkpointing}})


def terms_of(rec, device="cpu"):
    return persistent_terms(read_shape(rec.model.name_or_path), Workload.from_recipe(rec), device)


def storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory) -> Path:
    """Grouped-query attention (4 heads, 2 kv), untied head, FFN 2.75x."""
    return write_tiny_model(tmp_path_factory.mktemp("plan") / "gqa", hidden_size=128, intermediate_size=352,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=300)


# ----------------------------------------------------------------------------- shapes and weights

def test_shape_from_config_is_the_loaded_models_shape(gqa_model, tmp_path):
    shape = read_shape(str(gqa_model))
    model = load_model(gqa_model)
    layer = decoder_layers(model)[0]
    loaded = {n.rsplit(".", 1)[-1]: (m.out_features, m.in_features)
              for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert shape.linears() == loaded
    assert (shape.layers, shape.vocab, shape.hidden, shape.tied_embeddings) == (3, 300, 128, False)
    tied = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    assert read_shape(str(tied)).tied_embeddings
    with pytest.raises(QloraError, match="model_type 'gpt2'"):
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
        read_shape(str(tmp_path / "gpt2"))
    with pytest.raises(QloraError, match="hidden_size"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
        read_shape(str(tmp_path / "bad"))


@pytest.mark.parametrize("quantization,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("none", True)])
def test_frozen_weight_terms_are_the_bytes_loaded(gqa_model, quantization, double_quant):
    model = load_model(gqa_model, quantization=quantization, double_quant=double_quant)
    terms = terms_of(recipe(gqa_model, quantization=quantization, double_quant=double_quant))
    linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    tensors = []
    for m in linears:
        tensors.append(m.weight.data)
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    assert storages_bytes(tensors) == terms["weights_4bit"]
    assert model.get_input_embeddings().weight.nbytes == terms["embeddings"]
    assert model.get_output_embeddings().weight.nbytes == terms["lm_head"]
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert storages_bytes(norms) == terms["norms"]


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_linear_bytes_at_7b_width(double_quant):
    """A Llama-2-7B MLP weight (11008 x 4096), quantized the way loading does it."""
    w = torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, qs = quant.quantize_4bit(w, "nf4", double_quant)
    tensors = [packed, qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if double_quant else [])
    assert storages_bytes(tensors) == quantized_linear_bytes(11008, 4096, double_quant)


@pytest.mark.parametrize("home", ["cpu", "disk"])
def test_offload_terms_are_the_streamers_bytes(gqa_model, tmp_path, home):
    """model.offload with 1 of 3 layers resident, after a training step: the 4-bit tensors
    still on the device, the two payload buffers the streamer keeps, and its home."""
    rec = recipe(gqa_model, offload=home, resident=1)
    plan = plan_recipe(rec, "cpu:64GB")
    model = load_model(gqa_model, offload=home, offload_dir=tmp_path, resident_layers=1)
    streamer = model.qlora_streamer
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05))
    enable_gradient_checkpointing(model)
    model.train()
    x = torch.randint(0, 300, (1, 64))
    s, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
    (s / n).backward()
    streamer.release()  # between steps: nothing attached, the ring's buffers in its free list
    assert plan.resident_layers == 1 == 3 - len(streamer.streamed)
    tensors = []
    for m in model.modules():
        if isinstance(m, quant.QuantLinear):
            qs = m.weight.quant_state
            tensors += [m.weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    assert storages_bytes(tensors) == plan.terms["weights_4bit"]
    assert storages_bytes(streamer.free) == plan.terms["offload_ring"] == 2 * streamer.size
    # the home: host buffers, or the layer file (every slot of this model is 64-byte aligned)
    home_bytes = (sum(b.nbytes for b in streamer.home.buffers.values()) if home == "cpu"
                  else os.path.getsize(streamer.home.path))
    assert home_bytes == plan.offloaded_bytes == 2 * streamer.size
    assert plan.terms["weights_offloaded"] == (home_bytes if home == "cpu" else 0)  # a CPU run's RAM
    cuda = plan_recipe(rec, "cuda:64GB")
    assert cuda.terms["weights_offloaded"] == 0 and cuda.offloaded_bytes == plan.offloaded_bytes
    streamer.close()


def test_auto_resident_layers_are_the_loaders(gqa_model, monkeypatch):
    """resident_layers 'auto': the plan on a device of X bytes keeps as many layers as the
    loader does when X less the runtime is free."""
    from qlora import offload
    from qlora.plan_terms import CPU_IMPORTS, layer_payload
    rec = recipe(gqa_model, offload="cpu")
    shape, w = read_shape(str(gqa_model)), Workload.from_recipe(rec)
    other = (2 * 300 * 128 + 128) * 2  # embeddings, head and final norm in bf16
    for want in (0, 2, 3):
        size = int(CPU_IMPORTS + other + offload.RESERVE_MIN + (want + 0.5) * layer_payload(shape, w))
        monkeypatch.setattr(offload, "_host_available", lambda: size - CPU_IMPORTS)
        monkeypatch.setattr(offload, "_host_total", lambda: size)
        model = load_model(gqa_model, offload="cpu", device="cpu")
        streamer = getattr(model, "qlora_streamer", None)
        loaded = 3 - (len(streamer.streamed) if streamer else 0)
        assert plan_recipe(rec, f"cpu:{size / 2**20}MB").resident_layers == loaded == want
        if streamer:
            streamer.close()


# ----------------------------------------------------------------------------- LoRA and optimizer

@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch"])
def test_lora_gradient_and_optimizer_state_terms_after_a_step(gqa_model, optimizer):
    # r 32 at width 128/352: A of q is 4096 elements (8-bit state), B of k is 2048 (fp32 state)
    rec = recipe(gqa_model, r=32, optimizer=optimizer)
    model = load_model(gqa_model)
    add_lora(model, LoraConfig(r=32, alpha=64, dropout=0.05, dtype="bfloat16"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, optimizer, 1e-3, 0.0)
    x = torch.randint(0, 300, (1, 32))
    s, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
    (s / n).backward()
    terms = terms_of(rec)
    w = Workload.from_recipe(rec)
    shape = read_shape(str(gqa_model))
    assert storages_bytes(params) == terms["lora_factors"]
    assert storages_bytes([p.grad for p in params]) == shape.layers * layer_terms(shape, w, "cpu")["lora_grads_layer"]
    opt.step()
    # bitsandbytes' quantization maps (qmap1/qmap2) are two tables shared by every tensor
    state = [t for st in opt.state.values() for k, t in st.items()
             if isinstance(t, torch.Tensor) and not k.startswith("qmap")]
    assert storages_bytes(state) == terms["optimizer_state"]
    assert terms["optimizer_state_paged"] == 0  # paged optimizers page nothing on CPU
    cuda = terms_of(rec, "cuda")
    assert cuda["optimizer_state"] + cuda["optimizer_state_paged"] == terms["optimizer_state"]
    assert cuda["optimizer_state_paged"] == 0  # no factor reaches bitsandbytes' 1e5-element paging size


def test_paged_state_is_the_factors_of_1e5_elements_and_more():
    """bitsandbytes pages only state tensors of >= 1e5 elements (get_state_buffer)."""
    terms = terms_of(recipe("huggyllama/llama-7b", r=64, optimizer="paged_adamw_32bit"), "cuda")
    assert terms["optimizer_state"] == 0  # every r-64 factor of 7B has >= 64 x 4096 elements
    assert terms["optimizer_state_paged"] == 4 * terms["lora_factors"]  # 2 fp32 moments per bf16 weight
    terms = terms_of(recipe("huggyllama/llama-7b", r=16, optimizer="paged_adamw_32bit"), "cuda")
    # r 16: 16 x 4096 = 65,536 elements stay unpaged (A and B of q/k/v/o, A of gate/up, B of
    # down); the 16 x 11008 = 176,128 ones are paged (B of gate/up, A of down)
    assert terms["optimizer_state"] == 32 * 11 * 65536 * 8
    assert terms["optimizer_state_paged"] == 32 * 3 * 176128 * 8


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("dropout,batch,lora_dtype,targets", [
    (0.0, 1, "bfloat16", "all-linear"), (0.1, 1, "bfloat16", "all-linear"),
    (0.1, 2, "bfloat16", "all-linear"),  # padded batch: a mask, K/V repeated to every head
    (0.0, 2, "float32", "all-linear"), (0.1, 1, "float32", ["q_proj", "v_proj", "down_proj"]),
    (0.0, 1, "bfloat16", ["k_proj", "o_proj", "up_proj"])])
@pytest.mark.parametrize("fuse", [True, False], ids=["shared-inputs", "separate"])
def test_one_layers_saved_activations_are_what_autograd_saves(gqa_model, dropout, batch, lora_dtype, targets,
                                                             fuse):
    """What a decoder layer saves for backward (= what the checkpoint's recompute rebuilds),
    counted by saved-tensor hooks: layer_saved + attention_layer, to the byte. Layer 1: the
    first layer's input needs no gradient, so its first norm saves nothing."""
    rec = recipe(gqa_model, dropout=dropout, batch=batch, lora_dtype=lora_dtype, targets=targets, fuse=fuse)
    model = load_model(gqa_model)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout, targets=targets, dtype=lora_dtype,
                               fuse_shared_inputs=fuse))
    model.train()
    x = torch.randint(0, 300, (batch, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[-1, -10:] = 0  # with batch 2, the second row is padded
    layer = decoder_layers(model)[1]
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, inputs, saved = [False], set(), {}

    def enter(module, args, kwargs):
        inside[0] = True
        for t in (*args, *kwargs.values(), *kwargs.get("position_embeddings", ())):
            if isinstance(t, torch.Tensor):
                inputs.add(t.untyped_storage().data_ptr())

    def pack(t):
        st = t.untyped_storage()
        if inside[0] and st.data_ptr() not in frozen:
            saved[st.data_ptr()] = st.nbytes()
        return t

    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, attention_mask=mask if batch > 1 else None)
    measured = sum(n for ptr, n in saved.items() if ptr not in inputs)
    s = layer_terms(read_shape(str(gqa_model)), Workload.from_recipe(rec), "cpu")
    assert measured == s["layer_saved"] + s["attention_layer"]


def test_checkpoint_inputs_and_kept_matmul_outputs(gqa_model):
    tokens = 64
    per_layer_gb = layer_terms(read_shape(str(gqa_model)), Workload.from_recipe(recipe(gqa_model)),
                               "cpu")["kept_matmuls_layer"] / 1e9
    budget = 2.5 * per_layer_gb  # buys 2 of 3 layers
    rec = recipe(gqa_model, keep=budget, seq=tokens)
    w = Workload.from_recipe(rec)
    shape = read_shape(str(gqa_model))
    s = layer_terms(shape, w, "cpu")
    model = load_model(gqa_model)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05))
    kept = matmul_layers_within(model, budget, tokens)
    assert kept == kept_layers(shape, w, "cpu") == 2
    enable_gradient_checkpointing(model, keep_matmul_layers=kept)
    model.train()
    inputs = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].nbytes))
    x = torch.randint(0, 300, (1, tokens))
    lm_loss_sum(model, {"input_ids": x, "labels": x})
    assert inputs == [s["checkpoint_input"]] * shape.layers
    held = [t for m in model.modules() if isinstance(m, quant.QuantLinear) for t in m.kept]
    held += [t for layer in decoder_layers(model) for pair in layer.qlora_kept_attention or ()
             for t in pair]  # attention's output and log-sum-exp (qlora.attention)
    assert storages_bytes(held) == kept * s["kept_matmuls_layer"]


def _live_peak(fn) -> int:
    """Peak of bytes allocated minus freed while `fn` runs, from the profiler's CPU memory events
    (every allocation, including the kernels' own scratch buffers)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def vocab_32k_model(tmp_path_factory) -> Path:
    """Llama-2's vocabulary (the loss chunk at full size) on a narrow 2-layer body."""
    return write_tiny_model(tmp_path_factory.mktemp("plan") / "v32k", dtype=torch.bfloat16, hidden_size=512,
                            intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                            num_hidden_layers=2, vocab_size=32000)


@pytest.mark.parametrize("dropout,keep_layers,batch", [(0.05, 0, 1), (0.0, 2, 1), (0.1, 0, 2)])
def test_a_training_steps_peak_against_the_profiler(vocab_32k_model, dropout, keep_layers, batch):
    """The step's transient terms at the predicted peak against the profiler's live peak of a
    real step (after one step, so the optimizer state exists). The kernels' own scratch
    (oneDNN packs bf16 operands differently per CPU) is why this is not exact."""
    path, seq = vocab_32k_model, 256
    per_layer = seq * batch * (4 * 512 + 2 * 1376 + 512) * 2
    rec = recipe(path, r=16, dropout=dropout, seq=seq, batch=batch, optimizer="paged_adamw_8bit",
                 keep=keep_layers * per_layer / 1e9 * 1.01)
    plan = plan_recipe(rec, "cpu:64GB")
    predicted = sum(plan.terms[t] for t in STEP_TERMS if t in plan.terms)
    torch.manual_seed(0)
    model = load_model(path)
    add_lora(model, LoraConfig(r=16, alpha=32, dropout=dropout))
    enable_gradient_checkpointing(model, keep_matmul_layers=plan.kept_layers)
    model.train()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "paged_adamw_8bit", 1e-4, 0.0)
    x = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_in = {"input_ids": x, "labels": x.clone()}
    if batch > 1:
        batch_in["attention_mask"] = torch.ones_like(x)
        batch_in["attention_mask"][1, -50:] = 0
        batch_in["labels"][1, -50:] = -100

    def step():
        s, n = lm_loss_sum(model, batch_in)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured = _live_peak(step)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured, plan.peak_phase)


def test_cpu_matmul_temporaries_bound_the_input_gradients_scratch():
    """The input gradient of a 7B MLP weight on CPU: its scratch (beyond the gradient it
    returns) is at least our own column tiles and at most the term, which also allows for the
    GEMM's packed copies of its operands."""
    n, k, tokens = 11008, 4096, 512
    packed, qs = quant.quantize_4bit(torch.randn(n, k).to(torch.bfloat16), "nf4", True)
    weight = quant.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=64, quant_type="nf4",
                              bnb_quantized=True)
    grad = torch.randn(tokens, n).to(torch.bfloat16)
    scratch = _live_peak(lambda: cpu_matmul._cpu_input_grad(grad, weight, k)) - tokens * k * 2
    rec = recipe("huggyllama/llama-7b", seq=tokens)
    t = cpu_matmul._tile_height(quant.BLOCKSIZE, n)  # columns per tile on this CPU
    ours = n * t * 2 + n * t // 2 + n * t // 64 * 4 + n * k // 64 * 4  # tile, its codes and scales, absmax
    assert ours <= scratch <= matmul_temporaries(read_shape("huggyllama/llama-7b"), Workload.from_recipe(rec), "cpu")


@pytest.mark.parametrize("model", ["huggyllama/llama-7b", "huggyllama/llama-65b"])
@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_optimizer_step_term_bounds_one_layers_step(optimizer, model):
    """One CPU step over one decoder layer's LoRA factors (r 16) at 7B's and 65B's widths:
    its temporaries are within the plan's term. The 8-bit step (qlora.cpu_adam) packs small
    factors into full chunks and slices 65B's MLP B (22016 x 16, above a chunk), so its term
    is a full chunk's, more than the largest factor's fp32 copies at both widths."""
    import warnings
    warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
    shape = read_shape(model)
    w = Workload.from_recipe(recipe(model, r=16, optimizer=optimizer))
    one_layer = lora_tensors(shape, w)[: 2 * len(w.targets)]  # A and B of every adapted linear
    params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in one_layer]
    opt = build_optimizer(params, optimizer, 1e-4, 0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the state exists from here on
    measured = _live_peak(opt.step)
    term = optimizer_step_bytes(shape, w, "cpu")
    assert measured <= term
    if optimizer.endswith("8bit"):  # a chunk's 28 bytes an element: the old largest-factor term fell short
        assert measured > 0.9 * term


def test_loss_term_is_one_chunk_of_logits_in_fp32_and_bf16(tmp_path):
    rec = recipe("meta-llama/Llama-3.1-8B-Instruct", seq=2048)
    shape, w = read_shape("meta-llama/Llama-3.1-8B-Instruct"), Workload.from_recipe(rec)
    chunk = 256 * 128256 * (4 + 2)
    assert chunk < loss_bytes(shape, w) < chunk + 2048 * 4096 * 12


# ----------------------------------------------------------------------------- recipes, CLI, train

def _bundled(path: Path):
    rec = load_recipe(path)
    if rec.model.name_or_path.startswith("/") and not Path(rec.model.name_or_path).exists():
        pytest.skip(f"{path.name}: its model {rec.model.name_or_path} is not here")
    return rec


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_bundled_recipe_has_a_plan(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the demo recipe's model path is relative to the checkout
    rec = _bundled(path)
    for size in ("24GB", "48GB"):
        plan = plan_recipe(rec, f"cuda:{size}")
        out = to_json(plan)
        assert out["device_bytes"] == int(size[:2]) * 2**30 and out["fits"] == (out["peak_bytes"] <= out["device_bytes"])
        assert sum(out["terms"].values()) == out["peak_bytes"] == max(out["phases"].values())
        assert out["terms"]["weights_4bit"] > 0 and out["terms"]["runtime"] == 2**29
        if not plan.fits:
            for change in plan.advice:
                assert change.peak_bytes <= plan.device_bytes
    assert main(["plan", str(path), "--device", "cuda:24GB"]) == 0
    assert "peak" in capsys.readouterr().out


def test_the_papers_65b_fits_48gb_and_the_7b_recipes_24gb():
    """QLoRA paper: 65B finetunes on one 48 GB GPU; the 7-8B recipes' headers say 24 GB."""
    assert plan_recipe(load_recipe(REPO / "recipes/guanaco-65b.yaml"), "cuda:48GB").fits
    assert not plan_recipe(load_recipe(REPO / "recipes/guanaco-65b.yaml"), "cuda:24GB").fits
    for name in ("guanaco-7b", "alpaca-llama2-7b", "llama31-8b-chat", "mistral-7b-chat", "guanaco-13b"):
        assert plan_recipe(load_recipe(REPO / f"recipes/{name}.yaml"), "cuda:24GB").fits, name


def test_plan_json_and_bad_devices_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0 and "--device" in capsys.readouterr().out
    recipe_path = str(REPO / "recipes/guanaco-7b.yaml")
    assert main(["plan", recipe_path, "--device", "cpu:16GB", "--json", "--set", "lora.r=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_bytes"] == 16 * 2**30 and isinstance(out["fits"], bool)
    assert out["workload"]["r"] == 16 and set(out["terms"]) >= {"weights_4bit", "runtime", "allocator"}
    for bad, message in (("tpu:8GB", "--device: expected cuda"), ("cuda:lots", "--device: cannot read the size"),
                         ("cuda", "no CUDA device here") if not torch.cuda.is_available() else ("cuda:1GB", "")):
        if not message:
            continue
        assert main(["plan", recipe_path, "--device", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert parse_device("cpu:512MB").bytes == 512 * 2**20 and parse_device("cuda:80GiB").bytes == 80 * 2**30
    assert parse_device("cpu").bytes > 0


def test_advice_fits_and_means_what_it_says(tmp_path):
    """Each suggested change, applied with its own --set arguments, plans to the peak it states."""
    path = REPO / "recipes/llama31-8b-chat.yaml"
    plan = plan_recipe(load_recipe(path), "cuda:8GB")
    assert not plan.fits and plan.advice
    assert any("train.batch_size=1" in c.overrides for c in plan.advice)
    for change in plan.advice:
        overrides = [a for a in change.overrides.split() if a != "--set"]
        again = plan_recipe(load_recipe(path, overrides), "cuda:8GB", advise=False)
        assert again.peak_bytes == change.peak_bytes <= again.device_bytes
    assert plan_recipe(load_recipe(path), "cuda:2GB").advice == []  # 16-bit embeddings and head: 1.96 GiB


def test_offload_is_advised_where_the_4bit_weights_alone_do_not_fit():
    """65B on 24 GB: 31 GiB of 4-bit weights; offloading the last layers is the change that
    fits, with as many layers resident as fit (one more does not). A CPU run offloads to disk."""
    path = REPO / "recipes/guanaco-65b.yaml"
    for device, home in (("cuda:24GB", "cpu"), ("cpu:20GB", "disk")):
        plan = plan_recipe(load_recipe(path), device)
        change = next(c for c in plan.advice if "model.offload" in c.overrides)
        assert change.settings["model.offload"] == home
        n = change.settings["model.resident_layers"]
        assert 0 < n < 80 and "compute per token" in change.cost
        fits = plan_recipe(load_recipe(path, [f"model.offload={home}", f"model.resident_layers={n}"]), device)
        more = plan_recipe(load_recipe(path, [f"model.offload={home}", f"model.resident_layers={n + 1}"]), device)
        assert fits.fits and not more.fits and fits.peak_bytes == change.peak_bytes
        assert fits.resident_layers == n and fits.terms["offload_ring"] > 0
        # the offloaded layers' weights leave the device; only their second-level constants stay
        assert plan.terms["weights_4bit"] - fits.terms["weights_4bit"] > 0.99 * fits.offloaded_bytes


def _huge_model(tmp_path) -> Path:
    """config.json of a ~400B Llama, and nothing else: the plan reads only the config."""
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 16384, "intermediate_size": 53248,
        "num_hidden_layers": 126, "num_attention_heads": 128, "torch_dtype": "bfloat16"}))
    return folder


def test_train_refuses_a_recipe_that_cannot_fit_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    run_dir = tmp_path / "run"
    recipe_path = tmp_path / "huge.yaml"
    recipe_path.write_text(json.dumps({"model": {"name_or_path": str(_huge_model(tmp_path))},
                                       "data": {"path": str(data)}, "train": {"output_dir": str(run_dir)}}))
    assert main(["train", str(recipe_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora: error: ") and "--force" in err[0]
    assert str(recipe_path) in err[0] and "GiB" in err[0] and "Traceback" not in err[0]
    assert not run_dir.exists()
    # --force skips the check: loading is what fails then (the folder has no tokenizer or weights)
    assert main(["train", str(recipe_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert "--force" not in err and "tokenizer" in err
    assert not run_dir.exists()


def test_readme_lists_the_current_plan_of_every_bundled_recipe(monkeypatch):
    """README's table of the bundled recipes and its sanity rows are what the plan says now."""
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text()
    listed = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("recipes/") and cells[0].endswith(".yaml") and len(cells) == 6:
            listed[cells[0]] = cells
    assert sorted(listed) == [f"recipes/{p.name}" for p in RECIPES]
    for name, cells in listed.items():
        rec = load_recipe(REPO / name)
        if not Path(rec.model.name_or_path).exists() and rec.model.name_or_path.startswith("/"):
            continue  # the demo's model is a local asset
        peak = plan_recipe(rec, "cuda:24GB").peak_bytes
        assert cells[3] == f"{peak / 2**30:.2f}", name
        for cell, size in ((cells[4], 24), (cells[5], 48)):
            assert (cell == "fits") == (peak <= size * 2**30), (name, size)
    llama = REPO / "recipes/llama31-8b-chat.yaml"
    sanity = [
        ("42.3 GiB", load_recipe(REPO / "recipes/guanaco-65b.yaml")),
        ("8.54 GiB", load_recipe(llama, ["lora.r=8", "lora.dropout=0", "train.optimizer=adamw_torch",
                                         "data.packing=true"])),
        ("6.52 GiB", load_recipe(llama, ["train.batch_size=1", "data.max_seq_len=512", "train.optimizer=adamw_8bit"])),
    ]
    for text, rec in sanity:
        peak = plan_recipe(rec, "cuda:48GB").peak_bytes / 2**30
        assert f"{peak:.{len(text.split()[0].split('.')[1])}f} GiB" == text and text in readme
    # 65B on 24 GB: the offload the plan advises, and what resident_layers auto would do
    words = " ".join(readme.split())
    guanaco = REPO / "recipes/guanaco-65b.yaml"
    change = next(c for c in plan_recipe(load_recipe(guanaco), "cuda:24GB").advice if "model.offload" in c.overrides)
    assert f"`{change.overrides}` (peak {change.peak_bytes / 2**30:.2f} GiB" in words
    auto = plan_recipe(load_recipe(guanaco, ["model.offload=cpu"]), "cuda:24GB")
    assert f"keeps {auto.resident_layers} layers there, which does not fit ({auto.peak_bytes / 2**30:.2f} GiB)" in words
