"""Calibration data for language models: read texts, cut token windows, or sample texts from the model.

The one entry point is :func:`calibration_data`; it returns ``[num_windows, seq_len]`` int64 token ids. Given
no text, it uses slimquant's default calibration set (:data:`DEFAULT_CALIB_FILE`, shipped with the package, as
msModelSlim ships its default ``calib_file``); sampling texts from the model itself is the opt-in alternative.
Files are read as JSON lines or UTF-8 text and never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.errors import SlimquantError

log = logging.getLogger(__name__)

# slimquant's default calibration set: general-purpose English text written for this package (Apache-2.0, like
# the code) in four registers: expository prose on many subjects; assistant-style questions and answers, how-to
# guides, letters and worked problems; code and structured text (Python, JS, SQL, C, shell, JSON, YAML,
# Markdown); stories, dialogue, reviews, reports, and a few paragraphs in French, Spanish, German, Italian and
# Portuguese. No evaluation text of the benchmarks is in it.
DEFAULT_CALIB_FILE = Path(__file__).with_name("default_calibration.jsonl")

# Generic openings in several registers (prose, news, science, fiction, code, dialogue) so that
# self-generated calibration text is not all of one kind.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of",
    "In a recent study,",
    "Once upon a time",
    "def main():",
    "The most important thing to know about",
    "Here is a recipe for",
    "Dear colleagues,",
    "The results show that",
)

# Fixed sampling settings: generated calibration data must depend only on the model and the seed.
_TOP_P = 0.95
_TEMPERATURE = 1.0


def read_calib_file(path: str | os.PathLike[str], field: str = "text") -> list[str]:
    """The calibration texts in ``path``.

    * ``.jsonl`` / ``.json``: one JSON value per line, either an object whose ``field`` is a string
      or a bare JSON string; blank lines are skipped. A ``.json`` file holding one JSON array of such
      values (e.g. pretty-printed) is accepted too.
    * any other file: UTF-8 text split into documents at blank lines (a book becomes its paragraphs).

    Blank texts are dropped. Raises :class:`SlimquantError` naming the file (and line) when the file is
    missing or unreadable, not UTF-8, holds no text, or a JSON line is invalid or lacks ``field``.
    """
    p = Path(path)
    if not p.is_file():
        raise SlimquantError(f"calibration file {p} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SlimquantError(f"cannot read calibration file {p}: {e.strerror or e}") from None
    try:
        content = raw.decode("utf-8-sig")  # tolerate a BOM (files saved by Windows editors)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SlimquantError(f"calibration file {p} line {line}: not UTF-8 (byte {e.start})") from None
    content = content.replace("\r\n", "\n")

    if p.suffix.lower() in (".jsonl", ".json"):
        texts = _json_texts(p, content, field)
    else:
        texts = [d.strip() for d in re.split(r"\n[ \t\f\v]*\n", content)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SlimquantError(f"calibration file {p} holds no text")
    return texts


def _json_texts(p: Path, content: str, field: str) -> list[str]:
    return [_json_text(p, where, item, field) for where, item in _json_entries(p, content)]


def _json_text(p: Path, where: str, item: Any, field: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        value = item.get(field)
        if isinstance(value, str):
            return value
        if field not in item:
            keys = ", ".join(map(repr, item)) or "none"
            raise SlimquantError(f"calibration file {p} {where}: no field {field!r} (keys: {keys})")
        raise SlimquantError(f"calibration file {p} {where}: field {field!r} is {type(value).__name__}, not a string")
    raise SlimquantError(
        f"calibration file {p} {where}: expected a JSON object with field {field!r} or a JSON string, "
        f"got {type(item).__name__}"
    )


def _json_entries(p: Path, content: str) -> list[tuple[str, Any]]:
    """``(where, value)`` of every entry of a .jsonl file (one per line) or a .json array / per-line file."""
    if p.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as e:
            raise SlimquantError(f"calibration file {p} line {e.lineno}: invalid JSON ({e.msg})") from None
        return [(f"item {i}", item) for i, item in enumerate(items)]
    out = []
    for lineno, line in enumerate(content.split("\n"), start=1):
        if line.strip():
            try:
                out.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SlimquantError(f"calibration file {p} line {lineno}: invalid JSON ({e.msg})") from None
    return out


def is_tokenized_file(path: str | os.PathLike[str], input_ids_name: str = "input_ids") -> bool:
    """Whether ``path`` is a .jsonl / .json calibration file whose first entry is an object holding
    ``input_ids_name`` (entries already tokenised, as msModelSlim's ``--input_ids_name`` reads them)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json") or not p.is_file():
        return False
    try:
        entries = _json_entries(p, p.read_text(encoding="utf-8-sig").replace("\r\n", "\n"))
    except (SlimquantError, UnicodeDecodeError, OSError):
        return False
    return bool(entries) and isinstance(entries[0][1], dict) and input_ids_name in entries[0][1]


def read_tokenized_file(path: str | os.PathLike[str], input_ids_name: str = "input_ids",
                        attention_mask_name: str = "attention_mask", vocab_size: int | None = None,
                        limit: int | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Calibration items from a .jsonl / .json file whose entries are already tokenised: each an object holding
    a list of token ids under ``input_ids_name`` (or a list of such lists: one item per row) and optionally the
    matching 0 / 1 list under ``attention_mask_name``. Returns model inputs ``{"input_ids": [1, L] int64,
    "attention_mask": [1, L] int64}`` (the mask only where the file has one), at most ``limit`` of them. Errors
    name the file, the entry and the key (a missing key, ids that are not integers in ``[0, vocab_size)``, a mask
    of another length or with values other than 0 / 1)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise SlimquantError(f"calibration file {p}: pre-tokenised calibration data must be a .jsonl or .json file")
    if not p.is_file():
        raise SlimquantError(f"calibration file {p} not found")
    try:
        content = p.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError) as e:
        raise SlimquantError(f"cannot read calibration file {p}: {e}") from None
    items: list[dict[str, torch.Tensor]] = []
    for where, entry in _json_entries(p, content):
        if not isinstance(entry, dict) or input_ids_name not in entry:
            keys = ", ".join(map(repr, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise SlimquantError(f"calibration file {p} {where}: no {input_ids_name!r} (keys: {keys}); set "
                                 "--input_ids_name to the key holding the token ids")  # fmt: skip
        ids = entry[input_ids_name]
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        mask = entry.get(attention_mask_name)
        masks = (mask if mask and isinstance(mask[0], list) else [mask]) if mask is not None else [None] * len(rows)
        if len(masks) != len(rows):
            raise SlimquantError(f"calibration file {p} {where}: {attention_mask_name!r} has {len(masks)} rows, "
                                 f"{input_ids_name!r} {len(rows)}")  # fmt: skip
        for row, m in zip(rows, masks):
            if not row or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in row):
                raise SlimquantError(f"calibration file {p} {where}: {input_ids_name!r} must be a non-empty list of "
                                     "non-negative integer token ids")  # fmt: skip
            if vocab_size is not None and max(row) >= vocab_size:
                raise SlimquantError(f"calibration file {p} {where}: token id {max(row)} in {input_ids_name!r} is "
                                     f"outside the model's vocabulary ({vocab_size})")  # fmt: skip
            item = {"input_ids": torch.tensor([row], dtype=torch.int64)}
            if m is not None:
                if len(m) != len(row) or any(v not in (0, 1) or isinstance(v, bool) for v in m):
                    raise SlimquantError(f"calibration file {p} {where}: {attention_mask_name!r} must be 0 / 1 "
                                         f"values, one per token ({len(row)})")  # fmt: skip
                item["attention_mask"] = torch.tensor([m], dtype=torch.int64)
            items.append(item)
            if limit is not None and len(items) >= limit:
                return items
    if not items:
        raise SlimquantError(f"calibration file {p} holds no entries")
    return items


def apply_tokenizer_args(tokenizer: Any, args: str | dict[str, Any]) -> Any:
    """Set msModelSlim's ``--tokenizer_args`` (a JSON object, e.g. ``{"padding_side": "left", "pad_token":
    "<unk>"}``) on ``tokenizer``: each key must be one of its attributes (an unknown key is an error naming it).
    Returns the tokenizer."""
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError as e:
            raise SlimquantError(f"--tokenizer_args is not valid JSON ({e.msg}): {args!r}") from None
    if not isinstance(args, dict):
        raise SlimquantError(f"--tokenizer_args must be a JSON object of tokenizer settings, got {args!r}")
    for key, value in args.items():
        if not hasattr(tokenizer, key):
            raise SlimquantError(f"--tokenizer_args: the tokenizer ({type(tokenizer).__name__}) has no setting "
                                 f"{key!r} (e.g. padding_side, pad_token, truncation_side, model_max_length)")  # fmt: skip
        if key in ("padding_side", "truncation_side") and value not in ("left", "right"):
            raise SlimquantError(f"--tokenizer_args: {key}={value!r} is refused (left or right)")
        try:
            setattr(tokenizer, key, value)
        except (ValueError, TypeError, AttributeError) as e:
            raise SlimquantError(f"--tokenizer_args: {key}={value!r} is refused by the tokenizer ({e})") from None
    return tokenizer


def default_calibration_texts() -> list[str]:
    """The texts of slimquant's default calibration set (:data:`DEFAULT_CALIB_FILE`): about 260 KB of
    general-purpose text (about 60k tokens with a Llama-style tokenizer), one document per JSON line."""
    return read_calib_file(DEFAULT_CALIB_FILE)


def start_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (``[BOS]`` for Llama, ``[CLS]`` for
    BERT, ``[]`` for GPT-2/Qwen-style tokenizers); found by encoding a probe with and without them."""
    probe = "calibration"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return with_special[:i]
    return []


def calibration_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` tokenized without special tokens and joined by a separator: ``[N]`` int64.

    The separator is the tokenizer's EOS token, else the tokens of ``"\\n"`` (possibly none).
    """
    if isinstance(texts, str):
        raise SlimquantError("texts must be a list of strings, got one string")
    if not texts:
        raise SlimquantError("no calibration texts")
    if tokenizer.eos_token_id is not None:
        sep = [int(tokenizer.eos_token_id)]
    else:
        sep = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if i:
            stream.extend(sep)
        stream.extend(ids)
    return torch.tensor(stream, dtype=torch.int64)


def calibration_windows(
    tokenizer: Any, texts: Sequence[str], num_windows: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``num_windows`` windows of ``seq_len`` tokens cut from :func:`calibration_stream` of ``texts``.

    Each window is the tokenizer's :func:`start_tokens` (BOS, when the tokenizer adds one by default,
    because that is how the model sees every real input) followed by a contiguous slice of the stream of
    ``body = seq_len - len(start_tokens)`` tokens.

    With at least ``num_windows * body`` stream tokens, the stream is cut into ``num_windows`` equal
    strides and each window starts at a random offset inside its own stride, drawn from
    ``torch.Generator().manual_seed(seed)``: windows cover the whole stream, never overlap, and the same
    seed gives the same windows on any machine. With fewer tokens (but at least one window) a warning is
    logged and the windows start at evenly spaced offsets and overlap (``seed`` is then unused).

    Returns ``[num_windows, seq_len]`` int64. Raises :class:`SlimquantError` when the stream is shorter
    than one window.
    """
    if seq_len < 2 or num_windows < 1:
        raise SlimquantError(
            f"need seq_len >= 2 and num_windows >= 1, got seq_len={seq_len}, num_windows={num_windows}"
        )
    prefix = start_tokens(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise SlimquantError(f"seq_len={seq_len} leaves no room after the tokenizer's {len(prefix)} start tokens")
    stream = calibration_stream(tokenizer, texts)
    n = stream.numel()
    if n < body:
        extra = f" (after {len(prefix)} start token(s))" if prefix else ""
        raise SlimquantError(
            f"calibration text has {n} tokens, fewer than one window of {body}{extra}; seq_len={seq_len}"
        )
    if n >= num_windows * body:
        stride = n // num_windows
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, stride - body + 1, (num_windows,), generator=g)
        starts = torch.arange(num_windows) * stride + offsets
    else:
        log.warning(
            "calibration text has %d tokens, fewer than %d non-overlapping windows of %d: windows overlap",
            n, num_windows, body,
        )  # fmt: skip
        starts = torch.linspace(0, n - body, num_windows).round().long()
    windows = stream[starts.unsqueeze(1) + torch.arange(body)]
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.int64).expand(num_windows, -1), windows], dim=1)
    return windows


@torch.no_grad()
def generate_calibration_texts(
    model: nn.Module,
    tokenizer: Any,
    num_texts: int,
    max_new_tokens: int,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> list[str]:
    """``num_texts`` texts sampled from ``model`` itself (``calibration_data(..., generate=True)``).

    Text ``i`` continues prompt ``i % len(prompts)`` (:data:`DEFAULT_PROMPTS` by default) by exactly
    ``max_new_tokens`` sampled tokens (EOS is suppressed so every text is long enough), top-p
    ``0.95``, temperature ``1.0``. Texts are sampled ``batch_size`` at a time whatever their prompts (prompts
    of different lengths are left-padded and masked): a decoding step costs about the same for one sequence
    as for dozens on a CPU, so the wall time is about ``ceil(num_texts / batch_size) * max_new_tokens`` steps.
    Each returned text is the decoded prompt + continuation without special tokens.

    Sampling is seeded with ``seed`` inside ``torch.random.fork_rng``: the same seed (and ``batch_size``) gives
    the same texts, and the caller's global RNG state (CPU and CUDA) is left untouched. Memory: the KV cache of
    ``batch_size`` sequences of prompt + ``max_new_tokens`` tokens (lower ``batch_size`` for large models).
    """
    if num_texts < 1 or max_new_tokens < 1 or batch_size < 1:
        raise SlimquantError(
            f"need num_texts, max_new_tokens, batch_size >= 1, got {num_texts}, {max_new_tokens}, {batch_size}"
        )
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts:
        raise SlimquantError("prompts is empty")
    if not hasattr(model, "generate"):
        raise SlimquantError(f"{type(model).__name__} cannot generate text: pass calibration text instead")
    device = next(model.parameters()).device
    gen_cfg = getattr(model, "generation_config", None)
    # Tiny or base tokenizers may have no pad token; generate() needs one for its outputs and the left padding.
    candidates = (getattr(gen_cfg, "pad_token_id", None), tokenizer.pad_token_id, tokenizer.eos_token_id)
    pad = next((t for t in candidates if t is not None), None)
    if pad is None:
        pad = 0  # only ever under an attention mask of 0, and dropped before decoding
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])  # default special tokens: BOS as in real use
        if not ids:  # a prompt the tokenizer maps to nothing: start from BOS/EOS instead
            ids = [start if start is not None else pad]
        encoded.append(ids)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    texts: list[str] = []
    with torch.random.fork_rng(devices=cuda), tqdm(
        total=num_texts, desc="generating calibration text", unit="text", disable=not show_progress or num_texts <= 1
    ) as bar:
        torch.manual_seed(seed)
        for b0 in range(0, num_texts, batch_size):
            rows = [encoded[i % len(prompts)] for i in range(b0, min(b0 + batch_size, num_texts))]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.int64)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_p=_TOP_P,
                top_k=0,  # only top-p truncates (a model's generation_config may set top_k)
                temperature=_TEMPERATURE,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad,
            ).cpu()
            for j, r in enumerate(rows):  # drop the left padding, then decode prompt + continuation
                texts.append(tokenizer.decode(out[j, width - len(r) :], skip_special_tokens=True).strip())
            bar.update(len(rows))
    log.info(
        "calibration data generated from the model itself: %d texts, %d new tokens (seed %d)",
        num_texts, num_texts * max_new_tokens, seed,
    )  # fmt: skip
    return texts


def calibration_data(
    model: nn.Module | None,
    tokenizer: Any,
    calib_file: str | os.PathLike[str] | None = None,
    calib_texts: Sequence[str] | None = None,
    num_windows: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    field: str = "text",
    show_progress: bool = True,
    generate: bool = False,
) -> torch.Tensor:
    """Calibration token windows ``[num_windows, seq_len]`` int64 for ``model`` (defaults: 64 x 256, as
    ``slimquant quantize``).

    Texts come from ``calib_file`` (:func:`read_calib_file`, JSON field ``field``) followed by
    ``calib_texts``; both may be given and are concatenated. An empty ``calib_file`` string means no
    file (msModelSlim's ``--calib_file=``), and ``calib_texts`` None or ``[]`` means no texts. With
    neither, slimquant's default calibration set (:func:`default_calibration_texts`) is used, or, with
    ``generate=True``, ``num_windows`` texts of ``seq_len + max(16, seq_len // 8)`` new tokens are sampled
    from ``model`` (:func:`generate_calibration_texts`; minutes on a CPU), enough for non-overlapping
    windows. Windows are cut by :func:`calibration_windows` with ``seed``.
    """
    if tokenizer is None:
        raise SlimquantError("calibration data for a model without a tokenizer must be given as tensors, not text")
    texts: list[str] = []
    if calib_file is not None and str(calib_file) != "":
        texts += read_calib_file(calib_file, field=field)
    if calib_texts:
        if isinstance(calib_texts, str):
            raise SlimquantError("calib_texts must be a list of strings, got one string")
        given = [t for t in calib_texts if t.strip()]
        if not given:
            raise SlimquantError("calib_texts holds only blank texts")
        texts += given
    if texts and generate:
        raise SlimquantError("generate=True samples calibration text from the model; it cannot be combined with "
                             "calib_file / calib_texts")  # fmt: skip
    if generate:
        if model is None:
            raise SlimquantError("generate=True needs the model to sample calibration text from")
        new_tokens = seq_len + max(16, seq_len // 8)  # margin: decode + re-tokenize can lose a few tokens
        texts = generate_calibration_texts(
            model, tokenizer, num_windows, new_tokens, seed=seed, show_progress=show_progress
        )
    elif not texts:
        texts = default_calibration_texts()
        log.info("calibration: slimquant's default set (%d general-purpose texts: prose, dialogue, code; "
                 "give a calibration file of your own domain for the best accuracy there)", len(texts))  # fmt: skip
    return calibration_windows(tokenizer, texts, num_windows, seq_len, seed=seed)
