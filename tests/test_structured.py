"""Structured pruning and distillation on a tiny 4-layer llama: depth drops the layers that
change the hidden states least, width removes the least important FFN channels and KV head
groups into a smaller dense model, distillation lowers the student's KL to its teacher and
resumes an interrupted run exactly; bad options are one line, exit 2."""

import json

import pytest
import torch
from conftest import build_tiny_llama, load_tensors, run_cli, shared_text

from edgellm.compress import Context, apply_step
from edgellm.models import load_folder_model
from edgellm.recipe import CalibrationSpec

CALIBRATION = CalibrationSpec(text=str(shared_text("wikitext-2-valid.txt")), samples=4, seqlen=64)
CAL = ["--calibration", CALIBRATION.text, "--samples", "4", "--seqlen", "64"]
IDS = torch.arange(3, 60)[None]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("four") / "four-layers", layers=4)


@pytest.fixture(scope="module")
def deep_llama(four_layers, tmp_path_factory):
    """Four layers; layers 1 and 2 barely change the hidden states (their output
    projections are scaled down), so depth pruning has a right answer."""
    import shutil

    folder = tmp_path_factory.mktemp("deep") / "deep-llama"
    shutil.copytree(four_layers, folder)
    model = load_folder_model(folder)
    with torch.no_grad():
        for index in (1, 2):
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
    model.save_pretrained(folder)
    return folder


def run_step(step, source, tmp_path, teacher=None, resume=None):
    dest = tmp_path / f"{step['method']}-out"
    dest.mkdir(parents=True)
    apply_step(step, source, dest, Context(calibration=CALIBRATION, teacher=teacher, resume=resume))
    return dest


@pytest.mark.parametrize("select", ["block", "layers"])
def test_depth_drops_the_layers_that_change_least_and_keeps_the_rest_exactly(deep_llama, tmp_path,
                                                                             select):
    pruned = run_step({"method": "depth", "drop": 0.5, "select": select}, deep_llama, tmp_path)
    record = json.loads((pruned / "depth.json").read_text())
    assert record["dropped"] == [1, 2] and record["kept"] == [0, 3]
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    original, ours = load_tensors(deep_llama), load_tensors(pruned)
    for new, old in enumerate(record["kept"]):
        for name, tensor in ours.items():
            if name.startswith(f"model.layers.{new}."):
                assert torch.equal(tensor, original[name.replace(f".{new}.", f".{old}.", 1)])
    model = load_folder_model(pruned)
    assert model.model.layers[1].self_attn.layer_idx == 1  # the KV cache's index follows
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)  # runs with a cache
    assert out.shape[1] == IDS.shape[1] + 4


def test_width_removes_the_weakest_channels_and_groups_into_a_smaller_model(deep_llama, tmp_path):
    marked = tmp_path / "marked"
    model = load_folder_model(deep_llama)
    with torch.no_grad():  # channels 0..31 and KV group 1 (query heads 2, 3) write almost nothing
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :32] *= 1e-4
            layer.self_attn.o_proj.weight[:, 32:] *= 1e-4
    model.save_pretrained(marked)
    for path in deep_llama.glob("tokenizer*"):
        (marked / path.name).write_bytes(path.read_bytes())
    pruned = run_step({"method": "width", "ffn": 0.25, "heads": 0.5}, marked, tmp_path)
    config = json.loads((pruned / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (96, 2, 1, 16)
    original, ours = load_tensors(marked), load_tensors(pruned)
    down = ours["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down, original["model.layers.0.mlp.down_proj.weight"][:, 32:])
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, original["model.layers.0.self_attn.q_proj.weight"][:32])
    k = ours["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k, original["model.layers.0.self_attn.k_proj.weight"][:16])
    smaller = load_folder_model(pruned)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    # removing what wrote almost nothing leaves the function almost unchanged
    with torch.no_grad():
        before, after = model(IDS).logits, smaller(IDS).logits
    assert (before - after).abs().max() < 0.05 * before.abs().max()


def kl_to_teacher(student_dir, teacher_dir):
    from transformers import AutoTokenizer

    student, teacher = load_folder_model(student_dir), load_folder_model(teacher_dir)
    text = shared_text().read_text()[:4000]  # the evaluation text: not what it trained on
    ids = AutoTokenizer.from_pretrained(teacher_dir)(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        log_s = torch.log_softmax(student(ids).logits, -1)
        log_t = torch.log_softmax(teacher(ids).logits, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def test_distillation_brings_a_depth_pruned_student_closer_to_its_teacher(four_layers, tmp_path):
    pruned = run_step({"method": "depth", "drop": 0.5}, four_layers, tmp_path)
    step = {"method": "distill", "tokens": 16384, "batch": 4, "seqlen": 64, "lr": 1e-3,
            "hidden_weight": 1.0}
    distilled = run_step(step, pruned, tmp_path, teacher=four_layers)
    before, after = kl_to_teacher(pruned, four_layers), kl_to_teacher(distilled, four_layers)
    assert after < 0.8 * before, (before, after)
    assert (distilled / "depth.json").is_file()  # the layer map travels on


def test_interrupted_distillation_resumes_to_the_uninterrupted_result(four_layers, tmp_path,
                                                                      monkeypatch):
    import edgellm.compress.distill as distill

    pruned = run_step({"method": "depth", "drop": 0.25}, four_layers, tmp_path)
    step = {"method": "distill", "tokens": 6 * 4 * 64, "batch": 4, "seqlen": 64, "lr": 1e-3,
            "checkpoint_every": 2}
    clean = run_step(step, pruned, tmp_path / "clean", teacher=four_layers)
    resume = tmp_path / "resume"
    real_loss, calls = distill.distill_loss, []

    def failing_loss(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(distill, "distill_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        run_step(step, pruned, tmp_path / "first", teacher=four_layers, resume=resume)
    assert json.loads((resume / "latest.json").read_text())["step"] == 2
    monkeypatch.setattr(distill, "distill_loss", real_loss)
    resumed = run_step(step, pruned, tmp_path / "second", teacher=four_layers, resume=resume)
    assert not resume.exists()  # removed once the step is done
    resumed_tensors = load_tensors(resumed)
    for name, tensor in load_tensors(clean).items():
        assert torch.allclose(resumed_tensors[name], tensor, atol=1e-6), name


@pytest.mark.parametrize("method, settings, message", [
    ("depth", ["drop=0.9"], "removes all"),
    ("depth", ["drop=0.05"], "rounds to none"),
    ("depth", ["drop=1.5"], "drop"),
    ("width", ["ffn=0"], "ffn > 0 or heads > 0"),
    ("width", ["heads=0.9"], "removes all"),
    ("distill", ["tokens=64"], "student different from its teacher"),
    ("distill", ["tokens=64", 'teacher="/nonexistent/model"'], "not an HF model folder"),
])
def test_bad_structured_options_are_one_line_exit_2(deep_llama, tmp_path, method, settings, message):
    args = [f"--set={s}" for s in settings]
    result = run_cli("compress", deep_llama, "--method", method, *args, *CAL, "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_student_with_another_vocabulary_is_one_line_exit_2(deep_llama, tmp_path):
    config = json.loads((deep_llama / "config.json").read_text())
    config["vocab_size"] += 10
    student = tmp_path / "student.json"
    student.write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_cli("compress", deep_llama, "--method", "distill", "--set=tokens=64",
                     f"--set=student=\"{tmp_path / 'config.json'}\"", *CAL, "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocab_size" in lines[0] and "tokenizer" in lines[0], lines


def test_pruned_models_export_to_gguf_and_onnx_and_score_there_as_in_torch(four_layers, tmp_path):
    """The recipe chain: width- and depth-pruned (then distilled) models are plain models that
    llama.cpp and ONNX Runtime run, with torch's perplexity; Wanda's zeros are counted."""
    from conftest import write_tiny_recipe

    width = '[{ method = "width", ffn = 0.25, heads = 0.5 }]'
    depth = '[{ method = "depth", drop = 0.5 }, { method = "distill", tokens = 1024, seqlen = 64 }]'
    variants = "".join(f"""
[[variant]]
name = "{name}"
compress = {chain}
export = {{ format = "{fmt}", weights = "{weights}" }}
""" for name, chain, fmt, weights in [
        ("width-torch", width, "torch", "f32"), ("width-gguf", width, "gguf", "f16"),
        ("width-onnx", width, "onnx", "f32"), ("depth-torch", depth, "torch", "f32"),
        ("depth-gguf", depth, "gguf", "f16"), ("depth-onnx", depth, "onnx", "f32"),
        ("wanda-gguf", '[{ method = "wanda", sparsity = 0.5 }]', "gguf", "f16")])
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", four_layers, variants)
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    reference = rows["reference"]
    for kind in ("width", "depth"):
        torch_row = rows[f"{kind}-torch"]
        assert torch_row["parameters"] < reference["parameters"]
        assert torch_row["size_bytes"] < reference["size_bytes"]
        for fmt in ("gguf", "onnx"):
            assert abs(rows[f"{kind}-{fmt}"]["ppl"] / torch_row["ppl"] - 1) < 0.005, (kind, fmt)
    assert rows["depth-gguf"]["steps"] == ["depth", "distill"]
    assert 0.49 < rows["wanda-gguf"]["sparsity"] < 0.52
    assert rows["wanda-gguf"]["parameters"] == reference["parameters"]
    assert reference["sparsity"] < 0.01
    assert "stored densely" in (out / "report.md").read_text()


def test_distillation_under_torchrun_with_two_processes_equals_one_process(four_layers, tmp_path):
    """accelerate's DDP path on CPU (gloo): two processes of batch 2 see the same windows as
    one process of batch 4, and process 0 alone writes the result."""
    import subprocess
    import sys

    pruned = run_step({"method": "depth", "drop": 0.5}, four_layers, tmp_path)
    settings = ["--set=tokens=1024", "--set=seqlen=64", f'--set=teacher="{four_layers}"']
    one = run_cli("compress", pruned, "--method", "distill", *settings, "--set=batch=4", *CAL,
                  "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "edgellm.cli", "compress", str(pruned), "--method", "distill",
                          *settings, "--set=batch=2", *CAL, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1
    name = f"{pruned.name}-distill"
    assert not list((tmp_path / "two" / "_work").glob("rank-*"))
    single, double = load_tensors(tmp_path / "one" / name), load_tensors(tmp_path / "two" / name)
    start = load_tensors(pruned)
    assert set(single) == set(double)
    # Adam's first steps move every weight by about ±lr, so float-order noise in the
    # all-reduced gradients shows; the two runs still took (nearly) the same steps
    for key, tensor in single.items():
        moved = (tensor - start[key]).norm()
        assert (double[key] - tensor).norm() < 0.1 * moved, key
