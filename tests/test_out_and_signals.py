"""SIGTERM and SIGHUP end a run as Ctrl-C does (exit 143 and 129, one line, no staging left,
no measuring child left running); the output folder's lock file is never followed; an empty
--out and an --out in the model's own folder are refused before any work."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import run_cli, write_tiny_recipe

from edgellm.artifacts import LOCK, _held_locks, lock_out_dir
from edgellm.errors import UserError

F16 = '[[variant]]\nname = "f16"\nexport = { format = "gguf", weights = "f16" }\n'


def _default_signals():
    # a test run started in the background or under nohup passes SIGINT/SIGHUP on ignored
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _start(recipe, out):
    return subprocess.Popen([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _measuring(out):
    """Live processes started for this output folder (their command lines name it)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(out) in a for a in cmdline):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_for_child(proc, out, limit=300.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        children = [c for c in _measuring(out)
                    if "edgellm.runtimes.measure" in " ".join(c.cmdline())]
        if children:
            return children
        time.sleep(0.05)
    return []


def _leftovers(out):
    return [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_or_sighup_mid_measure_ends_the_child_and_a_rerun_completes(tmp_path, tiny_llama,
                                                                             signum, code):
    recipe, out = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, F16), tmp_path / "out"
    proc = _start(recipe, out)
    children = _wait_for_child(proc, out)
    assert children, proc.communicate()[1]
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signum)  # to the run alone, as `kill PID` or a closed terminal does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"error: terminated by {signal.Signals(signum).name}"]
    # nothing it started is left: not the measuring child, nor anything that child started
    survivors = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [] and _measuring(out) == []
    assert _leftovers(out) == []
    assert not (out / "report.json").exists()
    rerun = run_cli("run", recipe, "--out", out)  # at once: no orphan holds or writes the folder
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "report.json").is_file() and _leftovers(out) == []


def _bad_lock(out, kind, tmp_path):
    out.mkdir()
    lock = out / LOCK
    if kind == "symlink":
        target = tmp_path / "precious.txt"
        target.write_text("keep me")
        lock.symlink_to(target)
        return lambda: target.read_text() == "keep me" and lock.is_symlink()
    if kind == "dangling symlink":
        target = tmp_path / "created-through-the-link"
        lock.symlink_to(target)
        return lambda: not target.exists() and not target.is_symlink() and lock.is_symlink()
    if kind == "folder":
        lock.mkdir()
        (lock / "inside").write_text("x")
        return lambda: lock.is_dir() and [p.name for p in lock.iterdir()] == ["inside"]
    os.mkfifo(lock)
    return lambda: lock.is_fifo()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "folder"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, tiny_llama,
                                                                          kind):
    out = tmp_path / "out"
    untouched = _bad_lock(out, kind, tmp_path)
    result = run_cli("export", tiny_llama, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: lock file {out / LOCK} is "), lines
    assert ("a symlink" if "symlink" in kind else "a folder") in lines[0]
    assert untouched()
    assert [p.name for p in out.iterdir()] == [LOCK]  # no _work, nothing else either


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "folder", "fifo"])
def test_lock_out_dir_refuses_a_bad_lock_file_in_process(tmp_path, kind):
    out = tmp_path / "out"
    untouched = _bad_lock(out, kind, tmp_path)
    with pytest.raises(UserError, match="is a"):
        lock_out_dir(out)
    assert untouched() and out.resolve() not in _held_locks


def test_a_symlink_swapped_in_after_the_check_is_still_not_followed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    untouched = _bad_lock(out, "symlink", tmp_path)
    real_lstat = os.lstat

    def lstat_sees_nothing(path, *args, **kwargs):  # as if the link appeared just after lstat
        if str(path).endswith(LOCK):
            raise FileNotFoundError(path)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat_sees_nothing)
    with pytest.raises(UserError, match="is a symlink"):
        lock_out_dir(out)
    assert untouched()


def test_a_hard_linked_lock_file_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = tmp_path / "other.txt"
    other.write_text("keep me")
    os.link(other, out / LOCK)
    with pytest.raises(UserError, match="hard link"):
        lock_out_dir(out)
    assert other.read_text() == "keep me"


def test_a_lock_file_left_by_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("999999999")  # no such pid: the OS lock died with its process
    try:
        lock_out_dir(out)
        assert (out / LOCK).read_text() == str(os.getpid())
    finally:
        held = _held_locks.pop(out.resolve(), None)
        if held:
            held.close()


COMMANDS = {"run": lambda tmp_path, model: ["run", write_tiny_recipe(tmp_path / "r.toml", model, F16)],
            "export": lambda tmp_path, model: ["export", model],
            "compress": lambda tmp_path, model: ["compress", model, "--method", "magnitude"]}


def _tree(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("command", "form"), [
    ("run", ["--out", ""]), ("run", ["--out="]), ("run", ["-o", " "]),
    ("export", ["--out", ""]), ("compress", ["--out", ""])])
def test_an_empty_out_is_refused_and_nothing_is_written(tmp_path, tiny_llama, command, form):
    args = COMMANDS[command](tmp_path, tiny_llama)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = _tree(tmp_path)
    result = run_cli(*args, *form, cwd=cwd)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out is empty"), lines
    assert _tree(tmp_path) == before and list(cwd.iterdir()) == []


@pytest.mark.parametrize(("command", "where"), [
    ("run", "."), ("run", "sub/dir"),
    ("export", "."), ("compress", "sub")])
def test_an_out_in_the_model_folder_is_refused_and_nothing_is_written(tmp_path, tiny_llama, command,
                                                                      where):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    args = COMMANDS[command](tmp_path, model)
    before = _tree(model)
    result = run_cli(*args, "--out", model / where)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model's folder" in lines[0], lines
    assert _tree(model) == before


def test_check_out_dir_refuses_the_model_folder(tmp_path, tiny_llama):
    from edgellm.models import ModelSource, resolve_source
    from edgellm.run_checks import check_out_dir

    source = resolve_source(str(tiny_llama))
    for out in (tiny_llama, tiny_llama / "reports", tiny_llama / "a" / "b"):
        with pytest.raises(UserError, match="model's folder"):
            check_out_dir(out, source)
    check_out_dir(tmp_path / "elsewhere", source)  # beside it is fine
    check_out_dir(tiny_llama.parent / "tiny-llama-out", source)  # a name that only starts alike
    with pytest.raises(UserError, match="--out is empty"):
        check_out_dir("", source)
    # a GGUF is one file, hashed alone: writing beside it (`export m.gguf --out .`) is fine
    gguf = ModelSource("gguf", str(tmp_path / "ggufs"), "m.gguf")
    check_out_dir(tmp_path / "ggufs", gguf)
    check_out_dir(tmp_path / "ggufs" / "out", gguf)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "ggufs").exists()


def test_an_interrupted_measure_ends_the_childs_whole_process_group(tmp_path, monkeypatch):
    """What the measuring child started goes with it: the group is killed, not just the child."""
    from edgellm.runtimes import protocol as evaluate

    fake = tmp_path / "fake-python"  # stands in for `python -m edgellm.runtimes.measure ...`
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {tmp_path / 'grandchild.pid'}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(evaluate.sys, "executable", str(fake))
    pid_file = tmp_path / "grandchild.pid"

    def interrupt(signum, frame):
        if not pid_file.is_file() or not pid_file.read_text().strip():
            return  # not started yet: the timer fires again
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.1)
    try:
        spec = evaluate.MeasureSpec(fmt="gguf", artifact="x", ids_path="y")
        with pytest.raises(KeyboardInterrupt):
            evaluate._run_phase(spec, "score", tmp_path / "work")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(grandchild) and time.monotonic() < deadline:
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    alive = psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
    assert not alive, "the measuring child's own child outlived the interrupt"
    assert list((tmp_path / "work").iterdir()) == []  # the spec file is removed too


def test_clear_leftovers_unlinks_a_symlinked_leftover_and_keeps_its_target(tmp_path):
    from edgellm.artifacts import clear_leftovers

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".f16.partial").symlink_to(elsewhere, target_is_directory=True)
    (out / ".report.json.tmp-1").symlink_to(elsewhere / "precious.txt")
    assert sorted(p.name for p in clear_leftovers(out)) == [".f16.partial", ".report.json.tmp-1"]
    assert list(out.iterdir()) == [] and (elsewhere / "precious.txt").read_text() == "keep me"
