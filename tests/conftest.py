"""Shared fixtures: the real assets in ../shared/assets or $QLORA_ASSETS (skipped cleanly when
absent) and tiny random Llama checkpoints written to disk the way Hugging Face writes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Child processes (the CLI runs) use as many threads as this one: tests compare their numbers
# bitwise with in-process runs, and GEMMs round differently with another thread count (seen
# on a 16-core GPU machine, where the children took 16 threads).
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

# QLORA_ASSETS points elsewhere when the checkout does not sit next to shared/.
ASSETS = Path(os.environ.get("QLORA_ASSETS")
              or Path(__file__).resolve().parents[1].parent / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run tests marked slow (minutes each; CI skips them)")


# Asked once, before anything hides the GPU: it also sets up CUDA's device list in this
# process, which CUDA_VISIBLE_DEVICES (set below for child processes) no longer changes.
HAS_CUDA = torch.cuda.is_available()
VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="session", autouse=True)
def cpu_only():
    """The suite holds CPU numbers against CPU references (what CI runs), so on a machine with
    a GPU every test, fixture and child process sees none; tests/test_cuda.py shows it to its
    own tests again (`gpu_visible`). Session scope: set up before any other fixture."""
    if not HAS_CUDA:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its device in process-wide state: rebuilt around each module, so a
    module on the GPU and one on the CPU do not inherit each other's."""
    if HAS_CUDA:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    yield
    if HAS_CUDA:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def gpu_visible():
    """Undo `cpu_only` for one module (tests/test_cuda.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: HAS_CUDA)
        if VISIBLE is None:
            mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            mp.setenv("CUDA_VISIBLE_DEVICES", VISIBLE)
        yield


def python_path() -> str:
    """PYTHONPATH for a child process: the repo first, then whatever this one was given."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with `bash dev.sh test --slow` (or pytest --slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def asset(rel: str) -> Path:
    """Path of a real asset, or skip the test with the reason."""
    path = ASSETS / rel
    if not path.exists():
        pytest.skip(f"real asset missing: {path} (see ../shared/assets/README.md)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second intra-op thread only adds contention on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stories() -> Path:
    return asset("models/stories260K")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_tiny_model(out: Path, *, shards: int = 1, seed: int = 0, dtype=torch.float32, **cfg) -> Path:
    """Save a random tiny Llama with `save_pretrained` (sharded when shards > 1)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**cfg), dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    kw = {"max_shard_size": f"{size // shards // 1024 + 1}KB"} if shards > 1 else {}
    model.save_pretrained(out, **kw)
    return out


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "tiny")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real run: LoRA r 8 on every linear of stories260K, trained 8 steps by the real trainer
    on Alpaca rows (checkpoints at steps 4 and 8, then the final adapter). Its adapter moves the
    logits the way a trained one does, not the way random factors do."""
    import json
    from qlora.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from qlora.train import train
    base = asset("models/stories260K")
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "alpaca.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[:64]))
    recipe = Recipe(model=ModelConfig(name_or_path=str(base)), lora=LoraConfig(r=8, alpha=16, dropout=0.05),
                    data=DataConfig(path=str(data), max_seq_len=64),
                    train=TrainConfig(output_dir=str(tmp / "run"), max_steps=8, batch_size=4, grad_accum=1,
                                      lr=1e-3, optimizer="adamw_torch", warmup_ratio=0.0, save_steps=4,
                                      logging_steps=4, seed=3))
    train(recipe)
    return tmp / "run"
