"""The evaluation protocol's data side: texts, one tokenization, windows."""

import numpy as np
import pytest

from edgellm.data import read_text, resolve_text, token_windows
from edgellm.errors import UserError


def test_windows_are_non_overlapping_and_drop_the_short_tail():
    ids = np.arange(10, dtype=np.int32)
    windows = token_windows(ids, 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_text_shorter_than_one_window_is_refused():
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows(np.arange(3), 4)


def test_builtin_text_resolves_to_shared_data():
    path = resolve_text("wikitext-2-raw-test")
    text, sha = read_text(path)
    assert sha == "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
    assert text.startswith(" = Robert Boulter = ")


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"  \n", "is empty"),
                                              (b"\xff\xfe bad", "not UTF-8")])
def test_bad_texts_are_refused(tmp_path, content, message):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_text(path)


def test_missing_text_names_the_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_text(str(tmp_path / "nope.txt"))


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    ids = np.arange(10, 30, dtype=np.int32)
    windows = token_windows(ids, 5, bos=2)
    assert len(windows) == 5 and all(len(w) == 5 and w[0] == 2 for w in windows)
    # every text token is a target exactly once, in order: BOS only ever conditions
    assert np.concatenate([w[1:] for w in windows]).tolist() == ids.tolist()
    assert [w.tolist() for w in token_windows(ids, 5)] == [ids[i:i + 5].tolist() for i in range(0, 20, 5)]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_a_prefix_tokenizes_to_the_same_ids_as_the_whole_text(tiny_llama, which):
    from transformers import AutoTokenizer

    from edgellm.data import tokenize
    from edgellm.models import load_tokenizer, resolve_source

    tokenizer = (AutoTokenizer.from_pretrained(tiny_llama) if which == "tiny"
                 else load_tokenizer(resolve_source("smollm2-135m", False)))
    text = resolve_text("wikitext-2-raw-test").read_text(encoding="utf-8")
    whole = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    for max_tokens in (1, 300, 4096, 16384, len(whole) - 100, len(whole) + 10):
        ids = tokenize(tokenizer, text, max_tokens)
        assert np.array_equal(ids, whole[:max_tokens]), max_tokens
