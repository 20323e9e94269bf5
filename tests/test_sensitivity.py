"""Layer sensitivity (slimquant.search.sensitivity): exact ablation, proxies, cache/resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.math.metrics import average_ranks, kl_divergence, spearman
from slimquant.pipeline.convert import plan, quantized
from slimquant.search import sensitivity as sens
from slimquant.search.sensitivity import Sensitivity, layer_sensitivity

W4 = sq.Recipe(weight=sq.QuantSpec("int4", "per_group", 32, True))


def _calib(vocab: int, n: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _direct_kl(model: nn.Module, recipe: sq.Recipe, layer: str, calib: torch.Tensor) -> float:
    """KL of ``layer`` alone quantized, measured with plain full forward passes (no replay)."""
    lp = next(lp for lp in plan(model, recipe)[0] if lp.name == layer)
    with torch.no_grad():
        ref = [model(input_ids=c[None]).logits for c in calib]
        with quantized(model, recipe, layers=[lp]):
            out = [model(input_ids=c[None]).logits for c in calib]
    return sum(float(kl_divergence(a, b).sum()) for a, b in zip(ref, out)) / calib.numel()


def test_spearman_matches_hand_computed_values():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # ranks 1 2 4 3: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 25])) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))
    with pytest.raises(ValueError):
        spearman(torch.tensor([1.0, 2]), torch.tensor([1.0]))


def test_ablation_with_replayed_blocks_equals_full_forward(llama, tokenizer):
    calib = _calib(len(tokenizer))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    s = layer_sensitivity(llama, W4, calib, metrics=("ablation",), show_progress=False)
    scores = s.scores()
    assert len(scores) == 14  # 2 blocks x 7 linears; the tied lm_head stays float
    # layers of the second block run from replayed float outputs of the first: same value as a full forward
    for layer in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        assert scores[layer] == pytest.approx(_direct_kl(llama, W4, layer, calib), rel=1e-5)
    # the float model is back as it was: same modules, same tensors
    assert all(type(m) in (nn.Linear,) for n, m in llama.named_modules() if n.endswith("_proj"))
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fisher_predicts_the_exact_kl(tokenizer):
    from conftest import make_llama

    model = make_llama(len(tokenizer), layers=3)
    s = layer_sensitivity(model, W4, _calib(len(tokenizer), n=4, length=32), show_progress=False)
    rho = s.spearman()
    # observed +0.97: the second-order prediction ranks the layers as the exact ablation does
    assert rho["fisher"] > 0.8
    ex, fi = s.scores("ablation"), s.scores("fisher")
    ratio = sum(fi.values()) / sum(ex.values())
    assert 0.5 < ratio < 2.0  # observed ~1.2: it predicts the value too, not only the order
    md = s.to_markdown(top=3)
    assert "Spearman rank correlation with the exact ablation: fisher +" in md
    assert md.count("| model.layers.") == 3


def test_generic_modules_mlp_and_cnn(mlp, cnn):
    xs = [torch.randn(8, 64) for _ in range(3)]
    recipe = sq.Recipe(weight=sq.QuantSpec("int4", "per_channel"), disable_last_linear=False)
    s = layer_sensitivity(mlp, recipe, xs, loss="kl", show_progress=False)
    assert set(s.scores()) == {"0", "2", "4"} and s.loss == "kl"
    assert s.calibration == {"items": 3, "positions": 24}  # one distribution per row
    # the last layer alone: the exact loss is KL of the model output, computed here by hand
    with torch.no_grad():
        ref = [mlp(x) for x in xs]
        lp = next(lp for lp in plan(mlp, recipe)[0] if lp.name == "4")
        with quantized(mlp, recipe, layers=[lp]):
            out = [mlp(x) for x in xs]
    kl = sum(float(kl_divergence(a, b).sum()) for a, b in zip(ref, out)) / 24
    assert s.scores()["4"] == pytest.approx(kl, rel=1e-6)
    # a CNN with conv layers and tuple inputs; auto loss on plain tensors is the relative squared error
    xs = [(torch.randn(2, 3, 4, 4),) for _ in range(2)]
    s = layer_sensitivity(cnn, recipe, xs, show_progress=False)
    assert s.loss == "mse"
    assert {r.kind for r in s.rows} == {"conv2d", "linear"}
    assert all(math.isfinite(v) and v > 0 for r in s.rows for v in r.scores.values())


def test_custom_loss_callable(mlp):
    xs = [torch.randn(4, 64) for _ in range(2)]
    recipe = sq.Recipe(weight=sq.QuantSpec("int4", "per_channel"), disable_last_linear=False)

    def max_abs(ref, out):
        return (ref - out).abs().max()

    s = layer_sensitivity(mlp, recipe, xs, loss=max_abs, show_progress=False, cache_dir=None)
    assert s.loss == "max_abs" and "fisher" not in s.metrics
    assert any("fisher not measured" in n for n in s.notes)


def test_w8a8_static_ranges_are_calibrated_once_and_dynamic_works(llama, tokenizer, monkeypatch):
    calls = []
    real = sens.calibrate_input_ranges

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sens, "calibrate_input_ranges", counting)
    cands = {"static": sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --mm_tensor False"),
             "dynamic": sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False")}  # fmt: skip
    s = layer_sensitivity(llama, cands, _calib(len(tokenizer)), metrics=("ablation", "output_mse"), show_progress=False)
    assert len(calls) == 1
    for label in cands:
        assert len(s.scores(candidate=label)) == 14
        assert all(v > 0 for v in s.scores("output_mse", label).values())
    with pytest.raises(SlimquantError, match="several candidates"):
        s.scores()
    with pytest.raises(SlimquantError, match="unknown candidate 'x'"):
        s.scores(candidate="x")


def test_smoothing_is_applied_first_and_keeps_the_outputs(llama, tokenizer):
    calib = _calib(len(tokenizer))
    with torch.no_grad():
        before = llama(input_ids=calib).logits
    recipe = sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --anti_method m1 --mm_tensor False")
    q_before = llama.model.layers[0].self_attn.q_proj.weight.clone()
    layer_sensitivity(llama, recipe, calib, metrics=("weight_error",), show_progress=False)
    assert not torch.equal(llama.model.layers[0].self_attn.q_proj.weight, q_before)  # smoothed in place
    with torch.no_grad():
        assert torch.allclose(llama(input_ids=calib).logits, before, atol=1e-4)
    other = sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --anti_method m2 --mm_tensor False")
    with pytest.raises(SlimquantError, match="smooth the model differently"):
        layer_sensitivity(llama, [recipe, other], calib, show_progress=False)


def test_cache_reuse_and_resume_after_a_kill(llama, tokenizer, tmp_path, monkeypatch):
    calib = _calib(len(tokenizer))
    real = sens._measure
    calls = []

    def dying(*a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(a[2].name)
        return real(*a, **k)

    monkeypatch.setattr(sens, "_measure", dying)
    with pytest.raises(KeyboardInterrupt):
        layer_sensitivity(llama, W4, calib, cache_dir=tmp_path, show_progress=False)
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1 and not json.loads(files[0].read_text())["complete"]
    monkeypatch.setattr(sens, "_measure", real)
    resumed = []
    monkeypatch.setattr(sens, "_measure", lambda *a, **k: resumed.append(a[2].name) or real(*a, **k))
    s = layer_sensitivity(llama, W4, calib, cache_dir=tmp_path, show_progress=False)
    assert len(resumed) == 14 - 5 and not set(resumed) & set(calls)  # finished layers are not measured again
    assert s.complete and len(s.rows) == 14
    fresh = layer_sensitivity(llama, W4, calib, show_progress=False)
    for a, b in zip(s.rows, fresh.rows):
        assert a.layer == b.layer and a.scores == pytest.approx(b.scores, rel=1e-9)
    # complete: the next call reuses it without measuring anything
    class MeasuredAgain(Exception):
        pass

    def measuring(*a, **k):
        raise MeasuredAgain

    monkeypatch.setattr(sens, "_reference", measuring)
    again = layer_sensitivity(llama, W4, calib, cache_dir=tmp_path, show_progress=False)
    assert again.to_dict()["rows"] == s.to_dict()["rows"]
    # other calibration data is another fingerprint: measured anew
    with pytest.raises(MeasuredAgain):
        layer_sensitivity(llama, W4, _calib(len(tokenizer), n=2), cache_dir=tmp_path, show_progress=False)


def test_round_trip_save_and_bad_files(llama, tokenizer, tmp_path):
    s = layer_sensitivity(llama, W4, _calib(len(tokenizer)), metrics=("weight_error", "act_range"), show_progress=False)
    files = s.save(tmp_path / "out")
    assert [f.name for f in files] == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = Sensitivity.load(files[0])
    assert back.to_dict() == json.loads(json.dumps(s.to_dict()))
    assert back.ranking("weight_error") == s.ranking("weight_error")
    with pytest.raises(SlimquantError, match="sensitivity.json exists"):
        s.save(tmp_path / "out")
    s.save(tmp_path / "out", overwrite=True)
    with pytest.raises(SlimquantError, match="metric 'ablation' was not measured"):
        s.ranking("ablation")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SlimquantError, match="bad.json is not a slimquant sensitivity file"):
        Sensitivity.load(bad)
    bad.write_text("{")
    with pytest.raises(SlimquantError, match="bad.json is not valid JSON"):
        Sensitivity.load(bad)


def test_bad_input(llama, tokenizer):
    calib = _calib(len(tokenizer))
    with pytest.raises(SlimquantError, match="unknown sensitivity metric speed; valid: ablation, fisher"):
        layer_sensitivity(llama, W4, calib, metrics=("speed",))
    with pytest.raises(SlimquantError, match="unknown loss 'l1'"):
        layer_sensitivity(llama, W4, calib, loss="l1")
    with pytest.raises(SlimquantError, match="layer model.layers.9.mlp.up_proj is not a planned"):
        layer_sensitivity(llama, W4, calib, layers=["model.layers.9.mlp.up_proj"])
    with pytest.raises(SlimquantError, match="calibration data is empty"):
        layer_sensitivity(llama, W4, [])
    with pytest.raises(SlimquantError, match="candidates are Recipes"):
        layer_sensitivity(llama, ["--w_bit 4"], calib)
    sq.quantize(llama, W4, show_progress=False)
    with pytest.raises(SlimquantError, match="already quantized"):
        layer_sensitivity(llama, W4, calib)


def test_cli_sensitivity(llama_dir, tmp_path, capsys, monkeypatch):
    from slimquant.cli.main import main

    monkeypatch.setenv("SLIMQUANT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sens"
    argv = ["sensitivity", "--model_path", str(llama_dir), "--output", str(out), "--calib_size", "2",
            "--calib_seq_len", "16", "--top", "3", "--candidates", "--w_bit 4 --group_size 32",
            "--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "--w_bit 4 --group_size 32: most sensitive by ablation (kl" in text
    assert "Spearman with the exact ablation: fisher" in text
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1
    assert main(argv) == 1
    assert "already holds sensitivity.json" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # reused from the cache
    bad = ["sensitivity", "--model_path", str(llama_dir), "--output", str(tmp_path / "x")]
    assert main([*bad, "--candidates", "--w_bit 5"]) == 1
    assert "--candidates '--w_bit 5'" in capsys.readouterr().err
    assert main([*bad, "--w_bit", "4", "--candidates", "--w_bit 8"]) == 1
    assert "--candidates replaces --recipe and the recipe flags; remove --w_bit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
