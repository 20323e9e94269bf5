"""Architecture descriptions: every smoothing group is an exact equivalence on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from slimquant.adapters import ARCHITECTURES, architecture_for, smooth_groups
from slimquant.algorithms.smoothquant import apply_smoothing
from slimquant.errors import SlimquantError


def _tiny(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50)  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    if name == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50)  # fmt: skip
        return tf.Qwen2ForCausalLM(cfg)
    if name == "mistral":
        cfg = tf.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=50)  # fmt: skip
        return tf.MistralForCausalLM(cfg)
    if name == "opt":
        cfg = tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                           word_embed_proj_dim=32, max_position_embeddings=64)  # fmt: skip
        return tf.OPTForCausalLM(cfg)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=50, max_position_embeddings=64)  # fmt: skip
        return tf.BertModel(cfg)
    raise AssertionError(name)


def _out(model, ids):
    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "opt", "gpt2", "bert"])
def test_every_group_is_an_equivalence(name):
    model = _tiny(name).eval()
    # Non-trivial norms/biases, so a wrong transform cannot hide behind ones and zeros.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, 50, (2, 10))
    ref = _out(model, ids)
    groups = smooth_groups(model)
    assert len(groups) == 2 * len(architecture_for(model).smooth)
    g = torch.Generator().manual_seed(1)
    for prev, linears in groups:
        k = model.get_submodule(linears[0])
        width = k.in_features if hasattr(k, "in_features") else k.weight.shape[0]
        s = torch.exp(torch.randn(width, generator=g))  # scales between ~0.1 and ~10
        apply_smoothing(model.get_submodule(prev), [model.get_submodule(n) for n in linears], s)
    out = _out(model, ids)
    assert not torch.equal(out, ref)  # the weights did change ...
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # ... the function did not


def test_unknown_architecture_lists_the_known_ones(mlp):
    with pytest.raises(SlimquantError, match=r"no architecture description for Sequential \(no Hugging Face config\); known: bert, gpt2, llama"):
        architecture_for(mlp)
    import transformers as tf

    t5 = tf.T5Model(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=20, d_kv=8))
    with pytest.raises(SlimquantError, match="model_type 't5'"):
        smooth_groups(t5)


def test_descriptions_cover_the_required_families():
    types = {t for a in ARCHITECTURES for t in a.model_types}
    assert {"llama", "qwen2", "mistral", "bert", "opt", "gpt2"} <= types
