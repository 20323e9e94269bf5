"""Calibration data: reading files, cutting token windows, the default set, generating text from the model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from slimquant import SlimquantError
from slimquant.data import (
    DEFAULT_CALIB_FILE,
    calibration_data,
    calibration_stream,
    calibration_windows,
    default_calibration_texts,
    generate_calibration_texts,
    read_calib_file,
    start_tokens,
)

# Two texts of 60 corpus words (one token each) in a fixed random order: no 16-token slice repeats,
# so a window's position in the stream is unambiguous.
_WORDS = "the quick brown fox jumps over lazy dog a small model can still be quantized and saved to disk".split()
_g = torch.Generator().manual_seed(0)
TEXTS = [" ".join(_WORDS[i] for i in torch.randint(0, len(_WORDS), (60,), generator=_g).tolist()) for _ in range(2)]


def _is_slice(window: torch.Tensor, stream: torch.Tensor) -> bool:
    body = window.tolist()
    s = stream.tolist()
    return any(s[i : i + len(body)] == body for i in range(len(s) - len(body) + 1))


# ---- read_calib_file -------------------------------------------------------------------------


def test_jsonl_objects_and_bare_strings(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(
        json.dumps({"text": "first doc", "id": 1}) + "\n\n" + json.dumps("second doc") + "\n"
        + json.dumps({"text": "   "}) + "\n",  # fmt: skip
        encoding="utf-8",
    )
    assert read_calib_file(p) == ["first doc", "second doc"]  # blank line and blank text dropped


def test_jsonl_custom_field_and_json_array(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"inputs_pretokenized": "q1"}) + "\n", encoding="utf-8")
    assert read_calib_file(p, field="inputs_pretokenized") == ["q1"]
    a = tmp_path / "c.json"
    a.write_text(json.dumps([{"text": "a"}, "b"], indent=2), encoding="utf-8")
    assert read_calib_file(a) == ["a", "b"]


def test_plain_text_splits_at_blank_lines(tmp_path):
    p = tmp_path / "play.txt"
    p.write_bytes(b"\xef\xbb\xbfACT I\r\nScene one.\r\n\r\nTo be, or not.\n  \n\n\nExeunt.\n")
    assert read_calib_file(p) == ["ACT I\nScene one.", "To be, or not.", "Exeunt."]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("e.txt", b"", r"e\.txt holds no text"),
        ("e.jsonl", b"\n  \n", r"e\.jsonl holds no text"),
        ("b.txt", b"ok\n\xff\xfe bad\n", r"b\.txt line 2: not UTF-8"),
        ("j.jsonl", b'{"text": "a"}\n{"text": \n', r"j\.jsonl line 2: invalid JSON"),
        ("k.jsonl", b'"a"\n"b"\n{"body": "c"}\n', r"k\.jsonl line 3: no field 'text' \(keys: 'body'\)"),
        ("t.jsonl", b'{"text": 3}\n', r"t\.jsonl line 1: field 'text' is int"),
        ("l.jsonl", b'["a"]\n', r"l\.jsonl line 1: expected a JSON object"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(SlimquantError, match=match):
        read_calib_file(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SlimquantError, match=r"nope\.jsonl not found"):
        read_calib_file(tmp_path / "nope.jsonl")
    with pytest.raises(SlimquantError, match="is a directory"):
        read_calib_file(tmp_path)


# ---- windows ----------------------------------------------------------------------------------


def test_stream_joins_texts_with_eos(tokenizer):
    stream = calibration_stream(tokenizer, ["the quick", "lazy dog"])
    ids = tokenizer(["the quick", "lazy dog"], add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.int64
    assert stream.tolist() == ids[0] + [tokenizer.eos_token_id] + ids[1]


def test_windows_non_overlapping_contiguous_deterministic(tokenizer):
    stream = calibration_stream(tokenizer, TEXTS)  # 60 + 1 + 60 = 121 tokens
    assert stream.numel() == 121 and start_tokens(tokenizer) == []
    w = calibration_windows(tokenizer, TEXTS, num_windows=4, seq_len=16, seed=0)
    assert w.shape == (4, 16) and w.dtype == torch.int64
    assert torch.equal(w, calibration_windows(tokenizer, TEXTS, 4, 16, seed=0))
    # Recover each start: windows lie in their own stride of 121 // 4 = 30 tokens, so never overlap.
    starts = []
    for i, row in enumerate(w):
        s = next(s for s in range(i * 30, i * 30 + 15) if torch.equal(stream[s : s + 16], row))
        starts.append(s)
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))
    others = {tuple(calibration_windows(tokenizer, TEXTS, 4, 16, seed=s).flatten().tolist()) for s in range(1, 6)}
    assert len(others | {tuple(w.flatten().tolist())}) > 1  # a different seed moves the windows


def test_windows_overlap_with_warning(tokenizer, caplog):
    stream = calibration_stream(tokenizer, TEXTS)
    with caplog.at_level(logging.WARNING, logger="slimquant.data.calibration"):
        w = calibration_windows(tokenizer, TEXTS, num_windows=10, seq_len=32)
    assert "windows overlap" in caplog.text and "121 tokens" in caplog.text
    assert w.shape == (10, 32)
    assert torch.equal(w[0], stream[:32]) and torch.equal(w[-1], stream[-32:])  # evenly spread, ends included
    assert all(_is_slice(row, stream) for row in w)


def test_too_short_and_bad_arguments(tokenizer):
    with pytest.raises(SlimquantError, match="has 3 tokens, fewer than one window of 16"):
        calibration_windows(tokenizer, ["the quick fox"], num_windows=1, seq_len=16)
    with pytest.raises(SlimquantError, match="seq_len >= 2"):
        calibration_windows(tokenizer, TEXTS, num_windows=0, seq_len=16)
    with pytest.raises(SlimquantError, match="list of strings"):
        calibration_windows(tokenizer, "the quick fox", num_windows=1, seq_len=2)


def test_windows_start_with_bos_when_tokenizer_adds_it(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.convert_tokens_to_ids("[PAD]")  # any special token stands in for BOS here
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="[PAD] $A", special_tokens=[("[PAD]", bos)])
    assert start_tokens(tokenizer) == [bos]
    stream = calibration_stream(tokenizer, TEXTS)
    assert bos not in stream.tolist()
    w = calibration_windows(tokenizer, TEXTS, num_windows=3, seq_len=16, seed=3)
    assert w.shape == (3, 16) and (w[:, 0] == bos).all()
    assert all(_is_slice(row[1:], stream) for row in w)


# ---- generation -------------------------------------------------------------------------------


def test_generate_deterministic_and_leaves_global_rng(llama, tokenizer):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = generate_calibration_texts(llama, tokenizer, num_texts=3, max_new_tokens=12, seed=5, show_progress=False)
    assert torch.equal(before, torch.random.get_rng_state())
    b = generate_calibration_texts(llama, tokenizer, num_texts=3, max_new_tokens=12, seed=5, show_progress=False)
    c = generate_calibration_texts(llama, tokenizer, num_texts=3, max_new_tokens=12, seed=6, show_progress=False)
    assert len(a) == 3 and all(isinstance(t, str) and t for t in a)
    assert a == b and a != c
    # EOS is suppressed: every text keeps (nearly) all of its new tokens after re-tokenizing.
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= 8 for t in a)


def test_generate_batches_prompts(llama, tokenizer):
    texts = generate_calibration_texts(
        llama, tokenizer, num_texts=5, max_new_tokens=4, prompts=["the quick", "lazy dog"], batch_size=2,
        show_progress=False,
    )  # fmt: skip
    assert len(texts) == 5
    assert [t.startswith("the quick") for t in texts] == [True, False, True, False, True]
    assert all(t.startswith("lazy dog") for t in texts[1::2])


def test_generate_left_padding_changes_nothing(tokenizer, monkeypatch):
    """Prompts of different lengths share a batch, left-padded and masked: with top-p so small that sampling is
    greedy, every text equals the one generated alone (no padding), so the padding is masked and the positions
    start at each prompt's first token. A control with the padding attended gives other texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimquant.data import calibration as calibration_module

    torch.manual_seed(0)  # larger weights than the fixtures' so that the context, not only the last token, decides
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=False,
                      initializer_range=0.3)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    monkeypatch.setattr(calibration_module, "_TOP_P", 1e-9)
    prompts = ["the quick brown fox jumps over", "lazy", "a small model"]

    def gen(prompts: list[str], batch_size: int) -> list[str]:
        return generate_calibration_texts(model, tokenizer, num_texts=len(prompts), max_new_tokens=8, prompts=prompts,
                                          batch_size=batch_size, show_progress=False)  # fmt: skip

    together = gen(prompts, 3)
    alone = [gen([p], 1)[0] for p in prompts]
    assert together == alone
    assert [t.startswith(p) for t, p in zip(together, prompts)] == [True, True, True]
    real = model.generate

    def unmasked(**kwargs):
        kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", unmasked)
    assert gen(prompts, 3) != alone


def test_calibration_data_generates_only_when_asked(llama, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="slimquant.data.calibration"):
        w = calibration_data(llama, tokenizer, num_windows=2, seq_len=8, seed=1, show_progress=False, generate=True)
    assert w.shape == (2, 8) and w.dtype == torch.int64
    assert "generated from the model itself" in caplog.text
    assert "overlap" not in caplog.text  # enough tokens were generated
    again = calibration_data(llama, tokenizer, num_windows=2, seq_len=8, seed=1, show_progress=False, generate=True)
    assert torch.equal(w, again)
    with pytest.raises(SlimquantError, match="cannot be combined"):
        calibration_data(llama, tokenizer, calib_texts=TEXTS, generate=True)
    with pytest.raises(SlimquantError, match="needs the model"):
        calibration_data(None, tokenizer, generate=True)


def test_the_default_set_ships_with_the_package_and_is_used_without_text(tokenizer, caplog):
    texts = default_calibration_texts()
    assert DEFAULT_CALIB_FILE.is_file() and DEFAULT_CALIB_FILE.suffix == ".jsonl"
    # what the docstring promises: ~260 KB of varied documents (prose, dialogue, code, other languages)
    assert len(texts) >= 100 and 150_000 < sum(map(len, texts)) < 400_000
    assert any("def " in t for t in texts) and any("SELECT" in t for t in texts) and any("User:" in t for t in texts)
    assert not any("Romeo" in t or "Juliet" in t for t in texts)  # no benchmark evaluation text in it
    with caplog.at_level(logging.INFO, logger="slimquant.data.calibration"):
        w = calibration_data(None, tokenizer, num_windows=3, seq_len=16)  # no model needed: nothing is generated
    assert "default set" in caplog.text and "generated" not in caplog.text
    assert torch.equal(w, calibration_windows(tokenizer, texts, 3, 16))
    assert torch.equal(calibration_data(None, tokenizer, calib_file="", num_windows=3, seq_len=16), w)  # "" = no file


def test_calibration_data_file_plus_texts(llama, tokenizer, tmp_path, caplog):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": TEXTS[0]}) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="slimquant.data.calibration"):
        w = calibration_data(llama, tokenizer, calib_file=p, calib_texts=[TEXTS[1], " "], num_windows=2, seq_len=16)
        assert torch.equal(w, calibration_windows(tokenizer, TEXTS, 2, 16))  # file first, then texts
        w = calibration_data(llama, tokenizer, calib_file="", calib_texts=TEXTS, num_windows=2, seq_len=16)
        assert torch.equal(w, calibration_windows(tokenizer, TEXTS, 2, 16))  # "" means no file
    assert "generated" not in caplog.text
    with pytest.raises(SlimquantError, match="only blank"):
        calibration_data(llama, tokenizer, calib_texts=["", "  "], num_windows=1, seq_len=4)
    with pytest.raises(SlimquantError, match="without a tokenizer"):
        calibration_data(llama, None, calib_texts=TEXTS)
