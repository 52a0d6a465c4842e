"""Recipe schema, loading, overrides, path resolution and round-tripping (qlora.config)."""

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from qlora.config import (
    SECTIONS,
    DataConfig,
    LoraConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    describe_fields,
    field_docs,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_resolved,
)
from qlora.errors import QloraError

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = """\
model:
  name_or_path: owner/base-model
data:
  path: data/train.jsonl
train:
  output_dir: runs/test
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path, overrides=()) -> str:
    with pytest.raises(QloraError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- shipped recipes


def test_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {
        "guanaco-7b", "guanaco-13b", "guanaco-33b", "guanaco-65b",
        "alpaca-llama2-7b", "llama31-8b-chat", "mistral-7b-chat", "demo",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path, monkeypatch, tmp_path):
    # Run from an empty directory: loading must not require the model or data to exist.
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert os.path.isabs(recipe.train.output_dir)
    header = path.read_text().splitlines()[:6]
    assert any(f"qlora train recipes/{path.name}" in line for line in header), "header lacks the command"
    assert any("Model:" in line for line in path.read_text().splitlines() if line.startswith("#"))
    assert any("Data:" in line for line in path.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize(
    "size, base, dropout, lr",
    [
        ("7b", "huggyllama/llama-7b", 0.1, 2e-4),
        ("13b", "huggyllama/llama-13b", 0.1, 2e-4),
        ("33b", "huggyllama/llama-30b", 0.05, 1e-4),
        ("65b", "huggyllama/llama-65b", 0.05, 1e-4),
    ],
)
def test_guanaco_recipes_match_the_paper(size, base, dropout, lr):
    r = load_recipe(REPO / "recipes" / f"guanaco-{size}.yaml")
    assert r.model.name_or_path == base  # hub id kept as given
    assert (r.model.quantization, r.model.double_quant, r.model.compute_dtype) == ("nf4", True, "bfloat16")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.targets) == (64, 16, dropout, "all-linear")
    assert r.data.path == "timdettmers/openassistant-guanaco"
    assert (r.data.format, r.data.max_seq_len, r.data.group_by_length) == ("guanaco", 512, True)
    t = r.train
    assert t.lr == lr and t.max_steps == 1875 and r.effective_batch_size == 16
    assert (t.optimizer, t.schedule, t.warmup_ratio, t.max_grad_norm) == ("paged_adamw_32bit", "constant", 0.03, 0.3)
    assert (t.eval_steps, t.save_steps) == (187, 250)


def test_demo_recipe_points_at_shared_assets(monkeypatch):
    monkeypatch.chdir(REPO)
    r = load_recipe("recipes/demo.yaml")
    assert r.model.name_or_path == os.path.abspath(REPO / "../shared/assets/models/stories260K")
    assert r.data.path == os.path.abspath(REPO / "../shared/assets/data/alpaca_5000.json")
    assert r.train.output_dir == str(REPO / "runs/demo")
    assert (r.lora.r, r.lora.alpha, r.data.max_seq_len, r.data.eval_ratio) == (8, 16, 256, 0.02)
    t = r.train
    assert (t.max_steps, t.batch_size, t.grad_accum, t.lr, t.optimizer) == (60, 4, 1, 1e-3, "adamw_torch")
    assert (t.eval_steps, t.save_steps) == (20, 30)


# --------------------------------------------------------------------------- defaults and types


def test_minimal_recipe_gets_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.model.tokenizer == "owner/base-model"
    assert r.lora == LoraConfig()
    assert (r.data.format, r.data.max_seq_len, r.data.split, r.data.eval_ratio) == ("auto", 512, "train", 0.0)
    assert (r.train.max_steps, r.train.grad_accum, r.train.sample_prompts) == (-1, 16, [])


def test_int_accepted_for_float_fields_and_exponent_floats_parse(tmp_path):
    path = write(tmp_path, MINIMAL + "  lr: 2e-4\n  epochs: 3\nlora:\n  alpha: 32\n")
    r = load_recipe(path)
    assert r.train.lr == 2e-4 and isinstance(r.train.lr, float)
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)
    assert r.lora.alpha == 32.0 and isinstance(r.lora.alpha, float)


def test_targets_accept_a_list(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "lora:\n  targets: [q_proj, v_proj]\n"))
    assert r.lora.targets == ["q_proj", "v_proj"]


def test_dataclasses_validate_when_built_in_code():
    with pytest.raises(QloraError, match=r"^lora\.r: must be >= 1, got 0$"):
        LoraConfig(r=0)
    with pytest.raises(QloraError, match=r"^data\.packing: expected bool, got int 1$"):
        DataConfig(path="x", packing=1)
    recipe = Recipe(ModelConfig("m"), LoraConfig(), DataConfig("d"), TrainConfig("o"))
    assert recipe.model.tokenizer == "m" and recipe.source is None


# --------------------------------------------------------------------------- bad recipes

BAD_RECIPES = [
    # (name, text appended to MINIMAL or a whole file, expected fragments)
    ("unknown key", MINIMAL + "lora:\n  rank: 8\n", ["unknown key 'lora.rank'", "did you mean 'lora.r'?"]),
    ("key in wrong section", MINIMAL + "  max_seq_len: 1024\n",
     ["unknown key 'train.max_seq_len'", "did you mean 'data.max_seq_len'?"]),
    ("unknown section", MINIMAL + "trian:\n  lr: 1.0e-4\n", ["unknown section 'trian'", "did you mean 'train'?"]),
    ("key at top level", MINIMAL + "lr: 1.0e-4\n", ["unknown section 'lr'", "did you mean 'train.lr'?"]),
    ("string for int", MINIMAL + "lora:\n  r: sixty-four\n", ["lora.r", "expected int", "str 'sixty-four'"]),
    ("string for float", MINIMAL + "  lr: fast\n", ["train.lr", "expected float", "str 'fast'"]),
    ("quoted number", MINIMAL + "  lr: '1.0e-4'\n", ["train.lr", "expected float", "str"]),
    ("bool for int", MINIMAL + "  batch_size: true\n", ["train.batch_size", "expected int", "bool"]),
    ("float for int", MINIMAL + "  max_steps: 10.5\n", ["train.max_steps", "expected int", "float 10.5"]),
    ("bad choice", MINIMAL.replace("owner/base-model", "m\n  quantization: int4"),
     ["model.quantization", "must be one of", "'int4'"]),
    ("bad list item", MINIMAL + "lora:\n  targets: [q_proj, 3]\n", ["lora.targets[1]", "expected str", "int 3"]),
    ("string for targets", MINIMAL + "lora:\n  targets: q_proj\n", ["lora.targets", "'all-linear'", "str 'q_proj'"]),
    ("r = 0", MINIMAL + "lora:\n  r: 0\n", ["lora.r: must be >= 1, got 0"]),
    ("alpha = 0", MINIMAL + "lora:\n  alpha: 0\n", ["lora.alpha: must be > 0"]),
    ("dropout = 1", MINIMAL + "lora:\n  dropout: 1\n", ["lora.dropout: must be in [0, 1)"]),
    ("lr < 0", MINIMAL + "  lr: -1.0e-4\n", ["train.lr: must be > 0, got -0.0001"]),
    ("batch 0", MINIMAL + "  batch_size: 0\n", ["train.batch_size: must be >= 1, got 0"]),
    ("grad_accum 0", MINIMAL + "  grad_accum: 0\n", ["train.grad_accum: must be >= 1"]),
    ("max_steps 0", MINIMAL + "  max_steps: 0\n", ["train.max_steps: must be >= 1, or -1"]),
    ("max_steps -2", MINIMAL + "  max_steps: -2\n", ["train.max_steps"]),
    ("epochs 0", MINIMAL + "  epochs: 0\n", ["train.epochs: must be > 0"]),
    ("warmup 1", MINIMAL + "  warmup_ratio: 1.0\n", ["train.warmup_ratio: must be in [0, 1)"]),
    ("negative clip", MINIMAL + "  max_grad_norm: -1\n", ["train.max_grad_norm: must be >= 0"]),
    ("save limit 0", MINIMAL + "  save_total_limit: 0\n", ["train.save_total_limit: must be >= 1"]),
    ("negative matmul memory", MINIMAL + "  keep_matmuls_gb: -1\n", ["train.keep_matmuls_gb: must be >= 0"]),
    ("short seq", MINIMAL.replace("data/train.jsonl", "d\n  max_seq_len: 4"), ["data.max_seq_len: must be >= 8"]),
    ("eval ratio 1", MINIMAL.replace("data/train.jsonl", "d\n  eval_ratio: 1"), ["data.eval_ratio: must be in [0, 1)"]),
    ("eval path and ratio", MINIMAL.replace("data/train.jsonl", "d\n  eval_path: e.jsonl\n  eval_ratio: 0.1"),
     ["data.eval_ratio", "not both"]),
    ("infinite float", MINIMAL + "  lr: .inf\n", ["train.lr: must be a finite number"]),
    ("empty string", MINIMAL.replace("owner/base-model", "''"), ["model.name_or_path: must be a non-empty string"]),
    ("missing required key", MINIMAL.replace("  output_dir: runs/test\n", "  lr: 1.0e-4\n"),
     ["missing required key 'train.output_dir'"]),
    ("missing section", "model:\n  name_or_path: m\ndata:\n  path: d\n", ["missing required key 'train.output_dir'"]),
    ("section not a mapping", MINIMAL + "lora: 64\n", ["lora: expected a mapping", "int"]),
    ("duplicate key", MINIMAL + "  lr: 1.0e-4\n  lr: 2.0e-4\n", ["duplicate key 'lr'", "line 8"]),
    ("YAML syntax error", "model:\n  name_or_path: [unclosed\n", ["YAML syntax error", "line"]),
    ("tab indentation", "model:\n\tname_or_path: m\n", ["YAML syntax error"]),
    ("top level is a list", "- model\n- data\n", ["top level must be a mapping", "list"]),
    ("empty file", "# nothing here\n", ["recipe is empty"]),
]


@pytest.mark.parametrize("name, text, fragments", BAD_RECIPES, ids=[case[0] for case in BAD_RECIPES])
def test_bad_recipe_names_file_and_key(tmp_path, name, text, fragments):
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert load_error(missing) == f"{missing}: recipe file not found"
    assert load_error(tmp_path).startswith(f"{tmp_path}: is a directory")


# --------------------------------------------------------------------------- overrides


def test_overrides_apply_before_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, MINIMAL)
    r = load_recipe(
        path,
        [
            "train.lr=1e-4",
            "lora.r=8",
            "lora.targets=[q_proj, v_proj]",
            "data.format=alpaca",
            "train.sample_prompts=['Hello', 'a=b']",
            " model.tokenizer = other/tok",
            "train.output_dir=elsewhere",
        ],
    )
    assert r.train.lr == 1e-4 and r.lora.r == 8 and r.lora.targets == ["q_proj", "v_proj"]
    assert r.data.format == "alpaca"
    assert r.train.sample_prompts == ["Hello", "a=b"]
    assert r.model.tokenizer == "other/tok" and r.model.name_or_path == "owner/base-model"
    assert r.train.output_dir == str(tmp_path / "elsewhere")


def test_override_supplies_missing_required_key(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  output_dir: runs/test\n", "  lr: 1.0e-4\n"))
    assert load_recipe(path, ["train.output_dir=/tmp/out"]).train.output_dir == "/tmp/out"


BAD_OVERRIDES = [
    ("lr=1", ["bad --set 'lr=1'", "section.key=value"]),
    ("train.lr", ["bad --set 'train.lr'", "section.key=value"]),
    ("train.lr.x=1", ["bad --set 'train.lr.x=1'"]),
    ("lora.rank=8", ["unknown key 'lora.rank' in --set 'lora.rank=8'", "did you mean 'lora.r'?"]),
    ("trian.lr=1", ["unknown section 'trian' in --set 'trian.lr=1'", "did you mean 'train'?"]),
    ("train.lr=[1,", ["bad --set 'train.lr=[1,'", "not valid YAML"]),
    ("train.lr=fast", ["train.lr", "expected float", "str 'fast'"]),
    ("lora.r=0", ["lora.r: must be >= 1, got 0"]),
]


@pytest.mark.parametrize("override, fragments", BAD_OVERRIDES, ids=[case[0] for case in BAD_OVERRIDES])
def test_bad_override_names_itself(tmp_path, override, fragments):
    path = write(tmp_path, MINIMAL)
    message = load_error(path, [override])
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------- paths


def test_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    text = """\
    model:
      name_or_path: local/model
      tokenizer: ~/tok
    data:
      path: owner/dataset
      eval_path: ./eval.jsonl
    train:
      output_dir: runs/x
    """
    r = load_recipe(write(tmp_path, text))
    assert r.model.name_or_path == str(tmp_path / "local" / "model")  # exists locally
    assert r.model.tokenizer == os.path.expanduser("~/tok")
    assert r.data.path == "owner/dataset"  # hub id, no such local path
    assert r.data.eval_path == str(tmp_path / "eval.jsonl")
    assert r.train.output_dir == str(tmp_path / "runs" / "x")  # never a hub id


def test_missing_local_files_are_not_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.data.path == str(tmp_path / "data" / "train.jsonl")  # file suffix: a path, not a hub id


# --------------------------------------------------------------------------- round trip and docs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_resolved_recipe_round_trips(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, ["train.sample_prompts=['Q: 2+2?\\nA:']"])
    out = tmp_path / "resolved" / "recipe.yaml"
    save_resolved(recipe, out)
    written = yaml.safe_load(out.read_text())
    assert set(written) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert list(written[name]) == [f.name for f in dataclasses.fields(cls)]  # every key spelled out
    monkeypatch.chdir(REPO)  # a different directory: resolved paths must not move
    again = load_recipe(out)
    assert again == recipe
    assert again.source == str(out)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_recipe_from_dict_prefixes_source():
    with pytest.raises(QloraError, match=r"^here\.yaml: missing required key 'model\.name_or_path'$"):
        recipe_from_dict({"data": {"path": "d"}, "train": {"output_dir": "o"}}, source="here.yaml")


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_describe_fields_lists_every_key():
    text = describe_fields()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} (" in text
    assert "model.name_or_path (str; required)" in text
    assert "lora.r (int; default 64)" in text
    assert "train.optimizer ('paged_adamw_32bit' | 'paged_adamw_8bit' | 'adamw_8bit' | 'adamw_torch'; default paged_adamw_32bit)" in text
    assert "Rank of each adapter" in text


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("lora", "rank", "lora.r"),
        ("lora", "lora_alpha", "lora.alpha"),
        ("train", "learning_rate", "train.lr"),
        ("train", "optimiser", "train.optimizer"),
        ("train", "warmup", "train.warmup_ratio"),
        ("data", "lr", "train.lr"),
    ],
)
def test_unknown_key_suggestions(tmp_path, section, key, suggestion):
    message = load_error(write(tmp_path, MINIMAL), [f"{section}.{key}=1"])
    assert f"(did you mean '{suggestion}'?)" in message, message


def test_unrelated_unknown_key_gets_no_wild_guess(tmp_path):
    message = load_error(write(tmp_path, MINIMAL), ["train.zzz=1"])
    assert message.endswith("unknown key 'train.zzz' in --set 'train.zzz=1'"), message
