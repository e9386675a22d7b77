"""Atomic writes, manifests and content hashes: what makes reruns safe."""

import json

import pytest

from edgellm.artifacts import (
    STAGING_MARKER,
    atomic_path,
    clear_leftovers,
    fresh_staging_dir,
    publish_dir,
    read_manifest,
    sha256_files,
    trusted,
    write_json_atomic,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_publish_then_trust_and_detect_tampering(tmp_path):
    final = tmp_path / "variant"
    staging = fresh_staging_dir(final)
    (staging / "model.gguf").write_bytes(b"x" * 100)
    publish_dir(staging, final, "key-1", {"name": "variant"})
    assert not staging.exists()
    assert trusted(final, "key-1")
    assert not trusted(final, "key-2")
    recorded = read_manifest(final)["files"]["model.gguf"]
    assert recorded["size"] == 100 and len(recorded["sha256"]) == 64
    (final / "model.gguf").write_bytes(b"y" * 100)  # same size, other bytes: bit rot or a user
    assert not trusted(final, "key-1")
    (final / "model.gguf").write_bytes(b"x" * 50)  # truncated by a crash or a user
    assert not trusted(final, "key-1")
    (final / "model.gguf").write_bytes(b"x" * 100)
    assert trusted(final, "key-1")


def test_a_manifest_without_hashes_is_not_trusted(tmp_path):
    final = tmp_path / "variant"
    final.mkdir()
    (final / "model.gguf").write_bytes(b"x" * 100)
    (final / "manifest.json").write_text('{"key": "k", "files": {"model.gguf": 100}}')
    assert not trusted(final, "k")  # an older edgellm's manifest: rebuilt, not trusted


def test_clear_leftovers_removes_staging_and_temp_files_only(tmp_path):
    for staging in (tmp_path / ".f16.partial", tmp_path / "_work" / "steps" / ".gptq-abc.partial"):
        (staging / "sub").mkdir(parents=True)
        (staging / STAGING_MARKER).write_text("1")
    (tmp_path / ".report.json.tmp-4242").write_text("{")
    (tmp_path / "_work" / ".eval-ids-1.npy.tmp-77").write_bytes(b"x")
    keep = [tmp_path / "f16" / "model.gguf", tmp_path / "_work" / "steps" / "distill-1.resume" / "a",
            tmp_path / ".edgellm.lock", tmp_path / "report.json",
            tmp_path / ".mine.partial" / "a",  # no marker: not edgellm's
            tmp_path / "notes" / ".draft.tmp-1",  # a folder of the user's, not edgellm's
            tmp_path / ".report.json.tmp-x"]  # not temp_name's pattern
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = clear_leftovers(tmp_path)
    assert len(removed) == 4
    assert all(path.exists() for path in keep)


def test_clear_leftovers_leaves_a_nested_runs_folder_alone(tmp_path):
    """--out at a folder that holds another run's output folder: that run's staging and
    temporary files are its own (it may be writing them now)."""
    inner = tmp_path / "_work" / "other-run"  # even inside edgellm's work folder
    staging = inner / ".f16.partial"
    staging.mkdir(parents=True)
    (staging / STAGING_MARKER).write_text("1")
    (inner / ".edgellm.lock").write_text("1")
    (inner / ".report.json.tmp-9").write_text("{")
    assert clear_leftovers(tmp_path) == []
    assert staging.is_dir() and (inner / ".report.json.tmp-9").is_file()


def test_unpublished_staging_is_never_trusted(tmp_path):
    final = tmp_path / "variant"
    staging = fresh_staging_dir(final)
    (staging / "model.gguf").write_bytes(b"partial")
    assert not trusted(final, "key")
    fresh_staging_dir(final)  # a rerun clears what the killed run left
    assert [p.name for p in staging.iterdir()] == [STAGING_MARKER]


def test_a_folder_in_the_way_of_staging_that_edgellm_did_not_make_is_kept(tmp_path):
    from edgellm.errors import UserError

    theirs = tmp_path / ".variant.partial"
    theirs.mkdir()
    (theirs / "data").write_text("theirs")
    with pytest.raises(UserError, match="did not make it"):
        fresh_staging_dir(tmp_path / "variant")
    assert (theirs / "data").read_text() == "theirs"


def test_content_hash_changes_with_content(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"one")
    first = sha256_files([a])
    a.write_bytes(b"two")
    assert sha256_files([a]) != first


def test_a_publish_killed_while_hashing_leaves_a_folder_the_next_run_clears(tmp_path, monkeypatch):
    """SIGKILL runs no handler: whatever moment publish_dir dies at, the staging folder still
    carries the marker (so a rerun removes it), and the published folder does not list it."""
    import edgellm.artifacts as artifacts

    final = tmp_path / "variant"
    staging = fresh_staging_dir(final)
    (staging / "model.gguf").write_bytes(b"weights")
    seen = []
    real_hash = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file",
                        lambda p: seen.append((staging / STAGING_MARKER).is_file()) or real_hash(p))
    publish_dir(staging, final, "key", {})
    assert seen and all(seen)
    assert trusted(final, "key") and not (final / STAGING_MARKER).exists()
    assert STAGING_MARKER not in json.loads((final / "manifest.json").read_text())["files"]
