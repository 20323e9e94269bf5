"""Every example of the README runs, from an empty directory: the command-line block, the Python block, and the
QAT and structured-pruning blocks (on a user's own small CNN, with what their comments promise checked).

The fast tier swaps the embedded models for tiny random ones of the same kinds (and ``/models/llama`` for a
tiny Hugging Face directory); ``pytest -m slow`` runs the examples with the real embedded models.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimquant.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(after: str, lang: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, f"no {lang} block after {after!r} in README.md"
    return m.group(1)


def cli_examples() -> list[str]:
    """The ``slimquant ...`` commands of the README's command-line section (continuations joined, comments cut)."""
    joined = _block("## Command line", "sh").replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("slimquant "):
            out.append(line)
    return out


def python_example() -> str:
    return _block("## Python", "python")


def _inputs(directory: Path, corpus: list[str]) -> None:
    """The files the examples read, in the current directory."""
    import json

    lines = [corpus[i % len(corpus)] for i in range(1200)]
    (directory / "play.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "calib.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "sentences.txt").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    (directory / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    # the commands are run from the repository root: its shipped examples are there
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples", directory / "examples",
                    ignore=shutil.ignore_patterns("tasks", "__pycache__"))  # fmt: skip


def _substitute(text: str, models: dict[str, str]) -> str:
    """One pass, longest name first (``/models/llama-hf`` before ``/models/llama``; replacements are not re-read)."""
    pattern = "|".join(re.escape(k) for k in sorted(models, key=len, reverse=True))
    return re.sub(pattern, lambda m: models[m.group(0)], text)


GGUF_STAND_IN = "<gguf stand-in>"


@pytest.fixture
def tiny_models(make_llama_dir, bert_dir, tmp_path) -> dict[str, str]:
    from conftest import make_bpe_tokenizer, make_llama, save_hf

    llama = make_llama_dir("models/llama")
    bpe = make_bpe_tokenizer()  # GGUF exports write a byte-level BPE tokenizer: the GGUF examples use this stand-in
    gguf_llama = save_hf(make_llama(len(bpe)), bpe, tmp_path / "models" / "llama-bpe")
    return {"smollm2-135m": str(llama), "/models/llama-hf": str(llama), "/models/llama": str(llama),
            "minilm-l6": str(bert_dir), GGUF_STAND_IN: str(gguf_llama)}  # fmt: skip


def _run_cli_examples(capsys, models: dict[str, str]) -> None:
    examples = cli_examples()
    assert len(examples) >= 10
    for cmd in examples:
        use = {**models, "smollm2-135m": models[GGUF_STAND_IN]} if "gguf" in cmd and GGUF_STAND_IN in models else models
        argv = shlex.split(_substitute(cmd, {k: v for k, v in use.items() if k != GGUF_STAND_IN}))[1:]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 0, f"README example failed: {cmd}\n{err[-3000:]}"


def _run_python_example(models: dict[str, str]) -> None:
    code = _substitute(python_example(), {k: v for k, v in models.items() if k != GGUF_STAND_IN})
    exec(compile(code, "README.md (Python)", "exec"), {"__name__": "__readme__"})  # noqa: S102 - our own README
    assert Path("out/mynet/slimquant_manifest.json").is_file()
    assert Path("out/llama-w4/quant_model_weight_w4a16.safetensors").is_file()
    assert Path("out/smollm2-w4a16-hf2/model.safetensors").is_file()  # from_pretrained -> save_pretrained


def test_readme_cli_examples_run_from_an_empty_directory(capsys, tiny_models, tmp_path, monkeypatch, eval_text):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    _inputs(work, eval_text.strip().splitlines())
    _run_cli_examples(capsys, tiny_models)
    assert {"smollm2-w4a16", "llama-w8a16", "smollm2-w8a8", "minilm-w8a16"} <= {p.name for p in (work / "out").iterdir()}


def test_readme_python_example_runs_from_an_empty_directory(tiny_models, tmp_path, monkeypatch, eval_text):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    _inputs(work, eval_text.strip().splitlines())
    _run_python_example(tiny_models)


@pytest.mark.slow
def test_readme_examples_with_the_real_models(capsys, tmp_path, monkeypatch, eval_text, make_llama_dir):
    """As written (the embedded smollm2-135m and minilm-l6); only ``/models/llama`` is a tiny stand-in."""
    llama = str(make_llama_dir("models/llama"))
    models = {"/models/llama-hf": llama, "/models/llama": llama}
    for name, run in (("cli", lambda: _run_cli_examples(capsys, models)), ("py", lambda: _run_python_example(models))):
        work = tmp_path / name
        work.mkdir()
        monkeypatch.chdir(work)
        _inputs(work, eval_text.strip().splitlines())
        run()


# -- the QAT and structured-pruning blocks, with a user's own CNN and data ------------------------------------


class _UserCNN(nn.Module):
    """Someone's small CNN (not one of ours): conv-BN-ReLU twice, pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(64, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _user_namespace() -> dict:
    from conftest import make_llama

    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    return {"__name__": "__readme__", "CNN": _UserCNN, "cnn": _UserCNN().train(), "loader": loader,
            "x": loader[0][0], "llm": make_llama(64).eval(),
            "calib_windows": torch.randint(0, 64, (4, 16), generator=g)}  # fmt: skip


def test_readme_qat_example_runs_and_its_comment_holds(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The QAT block on a user's CNN; then, as its last comment says, ``sq.load(..., model=CNN())`` gives the
    converted model's outputs."""
    import slimquant as sq

    monkeypatch.chdir(tmp_path)
    ns = _user_namespace()
    exec(compile(_block("### Quantization-aware training", "python"), "README.md (QAT)", "exec"), ns)  # noqa: S102
    model = ns["result"].model.eval()
    loaded = sq.load("out/cnn-w4a4", model=_UserCNN()).model.eval()
    x = ns["loader"][1][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_readme_pruning_example_runs_and_its_comments_hold(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The structured-pruning block on a user's CNN and a tiny Llama; the saved pruned CNN loads back through
    ``sq.load_pruned`` with the same outputs, and the LLM's MLPs lost a quarter of their channels."""
    import slimquant as sq

    monkeypatch.chdir(tmp_path)
    ns = _user_namespace()
    exec(compile(_block("### Structured pruning", "python"), "README.md (pruning)", "exec"), ns)  # noqa: S102
    pruned = ns["pruned"].model.eval()
    x = ns["loader"][0][0]
    loaded = sq.load_pruned("out/cnn-pruned", _UserCNN(), example=x[:2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc.in_features) == (4, 8, 32)  # halves
    assert ns["llm"].config.intermediate_size == 96  # 128 - a quarter
