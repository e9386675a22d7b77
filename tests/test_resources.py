"""The resource guard: estimates of memory and disk, and the early refusal (or --force)."""

import sys

import pytest

from edgellm import resources
from edgellm.errors import UserError
from edgellm.resources import Need, bits_per_weight, check_room, count_parameters, export_need


def test_parameters_are_counted_from_headers(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    stored = sum(p.numel() for name, p in model.named_parameters())  # tied lm_head once
    assert count_parameters(sorted(tiny_llama.glob("*.safetensors"))) == stored


def test_smaller_weights_need_less_disk_and_steps_add_to_both():
    params = 100_000_000
    f16, q4 = export_need(params, "gguf", "f16", []), export_need(params, "gguf", "q4_0", [])
    int4 = export_need(params, "onnx", "int4", [])
    assert bits_per_weight("gguf", "q4_k_m") == 5.0 and bits_per_weight("onnx", "f32") == 32.0
    assert int4.disk < export_need(params, "onnx", "f32", []).disk
    assert q4.disk < f16.disk + params * 4  # q4 also keeps the f32 GGUF it starts from
    distilled = export_need(params, "gguf", "f16", ["depth", "distill"])
    assert distilled.memory > f16.memory and distilled.disk == f16.disk + 2 * params * 4


def test_check_room_refuses_with_the_numbers_or_goes_on_with_force(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(resources, "available_memory", lambda: 2 << 30)
    monkeypatch.setattr(resources, "free_disk", lambda folder: 1 << 30)
    needs = [Need(memory=3 << 30, disk=512 << 20, what="onnx f32"),
             Need(memory=1 << 30, disk=768 << 20, what="gguf q4_0")]
    with pytest.raises(UserError) as refused:
        check_room(needs, tmp_path / "out")
    message = str(refused.value)
    assert "onnx f32 needs about 3.0 GiB of memory and 2.0 GiB is available" in message
    assert "1.2 GiB of disk" in message and "--force" in message
    check_room(needs, tmp_path / "out", force=True)
    assert capsys.readouterr().err.startswith("warning: onnx f32 needs about 3.0 GiB")
    check_room(needs[1:], tmp_path / "out")  # fits: silent


@pytest.mark.parametrize("command", ["export", "compress", "run"])
def test_the_cli_refuses_before_writing_and_force_overrides(monkeypatch, tmp_path, tiny_llama,
                                                            capsys, command):
    from conftest import write_tiny_recipe

    from edgellm.cli import main

    monkeypatch.setattr(resources, "free_disk", lambda folder: 1000)  # 1 kB free
    out = tmp_path / "out"
    args = {"export": ["export", str(tiny_llama)],
            "compress": ["compress", str(tiny_llama), "--method", "magnitude"],
            "run": ["run", str(write_tiny_recipe(tmp_path / "r.toml", tiny_llama,
                                                 '[[variant]]\nname = "f16"\n'
                                                 'export = { format = "gguf", weights = "f16" }'))]}
    argv = ["edgellm", *args[command], "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as refused:
        main()
    err = capsys.readouterr().err
    assert refused.value.code == 2, err
    assert err.count("\n") == 1 and "of disk under" in err and "1000 B" not in err
    assert not out.exists()
    monkeypatch.setattr(sys, "argv", [*argv, "--force"])
    with pytest.raises(SystemExit) as forced:
        main()
    err = capsys.readouterr().err
    assert forced.value.code == 0, err
    assert "warning:" in err and "--force: going on" in err
