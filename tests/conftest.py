"""Shared fixtures for the tiny-model end-to-end tier.

Every model here is random-initialised from a tiny config (seeded), saved into ``tmp_path`` with
safetensors, and comes with a tokenizer trained offline on a handful of sentences. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny models run fastest single-threaded; the test machine's cores are shared with other work.
torch.set_num_threads(1)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model can still be quantized and saved to disk",
    "weights are stored as integers with scales and offsets",
    "every layer keeps its bias in float while the matrix is packed",
    "the tokenizer was trained on these few sentences only",
    "round to nearest needs no calibration data at all",
]

# Text used for evaluation: lines of >= 4 words (encoder sentences) and enough tokens for
# two 16-token windows (causal LMs). Words outside the corpus map to [UNK].
EVAL_TEXT = "\n".join(CORPUS * 3) + "\n"


def make_tokenizer():
    """A WordLevel tokenizer trained on :data:`CORPUS`, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer trained on :data:`CORPUS` (GGUF exports need one), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>")


def make_llama(vocab_size: int, seed: int = 0, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def make_bert(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Conv2d layers (one grouped) whose flattened weights have k = 27, 36, 32."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    ).eval()


def save_hf(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llama(tokenizer):
    """A tiny float Llama causal LM (tied embeddings), vocab = tokenizer size."""
    return make_llama(len(tokenizer))


@pytest.fixture
def llama_dir(tmp_path, tokenizer) -> Path:
    """A Hugging Face directory (config.json + model.safetensors + tokenizer) of the tiny Llama."""
    return save_hf(make_llama(len(tokenizer)), tokenizer, tmp_path / "llama")


@pytest.fixture
def bert(tokenizer):
    return make_bert(len(tokenizer))


@pytest.fixture
def bert_dir(tmp_path, tokenizer) -> Path:
    """A Hugging Face directory of the tiny BERT encoder (architectures: BertModel)."""
    return save_hf(make_bert(len(tokenizer)), tokenizer, tmp_path / "bert")


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Sequential:
    return make_cnn()


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "eval.txt"
    p.write_text(EVAL_TEXT, encoding="utf-8")
    return p


@pytest.fixture
def input_ids(tokenizer) -> torch.Tensor:
    """A fixed ``[2, 12]`` batch of token ids."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, len(tokenizer), (2, 12), generator=g)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def leftovers():
    """``leftovers(parent)``: temporary/backup entries an atomic write left behind in ``parent``."""
    return _leftovers


@pytest.fixture
def factories() -> dict:
    """Builders of the tiny models by name (``mlp``, ``cnn``, ``llama``, ``bert``), each taking ``seed``."""
    return {"mlp": make_mlp, "cnn": make_cnn, "llama": make_llama, "bert": make_bert}


@pytest.fixture
def eval_text() -> str:
    return EVAL_TEXT


@pytest.fixture
def native_lib():
    """The compiled native CPU kernels (:mod:`slimquant.kernels.native`). Skipped only when the user turned
    them off with ``SLIMQUANT_NATIVE=0``; a failed build fails the test with the reason (CI has a compiler)."""
    import os

    from slimquant.kernels import native

    if os.environ.get("SLIMQUANT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("native kernels disabled by SLIMQUANT_NATIVE=0")
    assert native.available(), f"native CPU kernels failed to build: {native.unavailable_reason()}"
    return native


@pytest.fixture
def make_llama_dir(tmp_path, tokenizer):
    """``make_llama_dir(name, layers=2, tie=True)``: a Hugging Face directory of a tiny Llama with that many blocks."""

    def make(name: str, layers: int = 2, tie: bool = True) -> Path:
        return save_hf(make_llama(len(tokenizer), layers=layers, tie=tie), tokenizer, tmp_path / name)

    return make


def fresh_process_logits(directory, input_ids: torch.Tensor, work: Path, loader: str = "slimquant.load(d).model",
                         timeout: float = 600) -> torch.Tensor:  # fmt: skip
    """Logits of the checkpoint at ``directory`` loaded (``loader``: an expression of ``d``) in a fresh interpreter
    that imported nothing of the test, on ``input_ids``. It runs with this process's thread count: float
    reductions split across threads round differently, so bit-identity needs the same one."""
    import subprocess
    import sys

    torch.save(input_ids, work / "fresh_ids.pt")
    code = (f"import sys, torch, slimquant\ntorch.set_num_threads({torch.get_num_threads()})\nd = sys.argv[1]\n"
            f"m = {loader}\nwith torch.no_grad():\n    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(work / "fresh_ids.pt"),
                          str(work / "fresh_logits.pt")], capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return torch.load(work / "fresh_logits.pt")
