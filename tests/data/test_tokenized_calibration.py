"""Pre-tokenised calibration files (msModelSlim's --input_ids_name / --attention_mask_name) and --tokenizer_args."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.data import apply_tokenizer_args, is_tokenized_file, read_tokenized_file
from slimquant.errors import SlimquantError


def _write(path, entries, array: bool = False):
    path.write_text(json.dumps(entries) if array else "\n".join(json.dumps(e) for e in entries))
    return path


def test_entries_rows_masks_and_limit(tmp_path) -> None:
    f = _write(tmp_path / "c.jsonl", [{"ids": [1, 2, 3], "m": [1, 1, 1]}, {"ids": [[4, 5], [6, 7]]}, {"ids": [8]}])
    assert is_tokenized_file(f, "ids") and not is_tokenized_file(f, "input_ids")
    items = read_tokenized_file(f, "ids", "m")
    assert [it["input_ids"].tolist() for it in items] == [[[1, 2, 3]], [[4, 5]], [[6, 7]], [[8]]]
    assert torch.equal(items[0]["attention_mask"], torch.ones(1, 3, dtype=torch.int64)) and "attention_mask" not in items[1]
    assert len(read_tokenized_file(f, "ids", "m", limit=2)) == 2
    arr = _write(tmp_path / "a.json", [{"input_ids": [1, 2]}], array=True)
    assert is_tokenized_file(arr) and read_tokenized_file(arr)[0]["input_ids"].shape == (1, 2)
    text = tmp_path / "t.txt"
    text.write_text("plain text")
    assert not is_tokenized_file(text)


@pytest.mark.parametrize("entry, words", [
    ({"ids": [1, 2], "m": [1]}, "one per token"),
    ({"ids": [1, 2], "m": [1, 2]}, "0 / 1"),
    ({"ids": [1, True]}, "integer token ids"),
    ({"ids": [1, -2]}, "integer token ids"),
    ({"ids": []}, "non-empty"),
    ({"ids": [1, 50]}, "outside the model's vocabulary (32)"),
    ({"tokens": [1]}, "no 'ids'"),
])  # fmt: skip
def test_bad_entries_name_the_file_line_and_key(tmp_path, entry, words) -> None:
    f = _write(tmp_path / "c.jsonl", [{"ids": [1]}, entry])
    with pytest.raises(SlimquantError, match="c.jsonl line 2") as e:
        read_tokenized_file(f, "ids", "m", vocab_size=32)
    assert words in str(e.value)


def test_tokenizer_args(tokenizer) -> None:
    apply_tokenizer_args(tokenizer, '{"padding_side": "left", "pad_token": "<|endoftext|>"}')
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    for bad, words in (("{not json", "not valid JSON"), ("[1]", "JSON object"), ('{"nope": 1}', "'nope'"),
                       ('{"padding_side": "middle"}', "refused")):  # fmt: skip
        with pytest.raises(SlimquantError, match="--tokenizer_args") as e:
            apply_tokenizer_args(tokenizer, bad)
        assert words in str(e.value)
