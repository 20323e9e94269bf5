"""Streaming blocks from safetensors, the work directory and resuming: same checkpoint as in memory, bounded
memory, refusals."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe
from slimquant.data import calibration_windows
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.formats.msmodelslim import read_manifest
from slimquant.models.loading import load_model
from slimquant.models.streaming import open_streaming
from slimquant.pipeline import workdir as workdir_mod
from slimquant.types.steps import AWQ, CBQ, GPTQ, RTN, AutoRound

W4 = QuantSpec("int4", Granularity.PER_GROUP, 32, symmetric=False)


@pytest.fixture
def calib(tokenizer, eval_text) -> torch.Tensor:
    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def _checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in read_manifest(directory)["files"]:
        out.update(load_file(str(directory / f)))
    return out


def _same_checkpoint(a, b) -> None:
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["layers"] == mb["layers"] and ma["recipe"] == mb["recipe"]


RECIPES = {
    "gptq": Recipe(weight=W4, steps=(GPTQ(),)),
    "awq": Recipe(weight=W4, steps=(AWQ(grid=5), RTN())),
    "rtn": Recipe(weight=W4),
    "autoround": Recipe(weight=W4, steps=(AutoRound(iters=4, batch_size=2),)),
}


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("tie", [True, False])
def test_streaming_writes_the_in_memory_checkpoint(make_llama_dir, calib, tmp_path, name, tie):
    src = make_llama_dir("m", layers=3, tie=tie)
    recipe = RECIPES[name]
    data = calib if recipe.needs_calibration else None
    lm = load_model(str(src))
    lm_q = slimquant.quantize(lm.model, recipe, calib_data=data, show_progress=False)
    slimquant.save(lm_q, tmp_path / "mem")
    sm = open_streaming(src)
    assert all(p.is_meta for p in sm.blocks.parameters())
    sm_q = slimquant.quantize(sm.model, recipe, calib_data=data, show_progress=False, stream=sm, work_dir=tmp_path / "work")
    assert sm.max_loaded == 1 and not sm.loaded  # one block in memory at a time, none left
    slimquant.save(sm_q, tmp_path / "stream")
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert len(sm_q.report.layers) == len(lm_q.report.layers)


def test_peak_blocks_do_not_grow_with_depth(make_llama_dir, calib, tmp_path):
    """However many blocks, one is materialised at a time and the process holds no float block weights after."""
    for layers in (2, 6):
        sm = open_streaming(make_llama_dir(f"d{layers}", layers=layers))
        slimquant.quantize(sm.model, RECIPES["gptq"], calib_data=calib, show_progress=False, stream=sm,
                           work_dir=tmp_path / f"w{layers}")  # fmt: skip
        assert sm.max_loaded == 1
        real = [n for n, t in sm.blocks.state_dict().items() if not t.is_meta]
        assert real == []  # every block is back on meta; its tensors live in the work directory


class _Kill(Exception):
    pass


@pytest.mark.parametrize("stream, weight_step", [(True, GPTQ()), (False, GPTQ()), (False, AutoRound(iters=4, batch_size=2)),
                                                 (False, CBQ(iters=3, batch_size=2, rank=2))],
                         ids=["stream-gptq", "gptq", "autoround", "cbq"])  # fmt: skip
def test_resume_after_a_kill_gives_the_same_checkpoint(make_llama_dir, calib, tmp_path, monkeypatch, stream, weight_step):
    """Also AutoRound's: its targets come from the float model's hidden states, persisted beside the quantized ones;
    and CBQ's, whose window hands the overlapped block's tuned state to the next block (persisted too)."""
    src = make_llama_dir("m", layers=4)
    recipe = Recipe(weight=W4, steps=(AWQ(grid=4), weight_step))

    def run(out, work):
        if stream:
            sm = open_streaming(src)
            model, kw = sm.model, {"stream": sm}
        else:
            model, kw = load_model(str(src)).model, {}
        model_q = slimquant.quantize(model, recipe, calib_data=calib, show_progress=False, work_dir=work, **kw)
        slimquant.save(model_q, out)
        return model_q

    run(tmp_path / "once", tmp_path / "w_once")
    real_save = workdir_mod.WorkDir.save_block

    def dying_save(self, i, *a, **k):
        if i == 2:
            raise _Kill  # killed while block 2's files are being written
        return real_save(self, i, *a, **k)

    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", dying_save)
    with pytest.raises(_Kill):
        run(tmp_path / "twice", tmp_path / "w")
    assert json.loads((tmp_path / "w" / "state.json").read_text())["done"] == 2
    kept = sorted(p.name for p in (tmp_path / "w").glob("*inputs_*"))
    targets = isinstance(weight_step, (AutoRound, CBQ))
    assert kept == (["float_inputs_00002.safetensors"] if targets else []) + ["inputs_00002.safetensors"]
    assert [p.name for p in (tmp_path / "w").glob("carry_*")] == (["carry_00002.safetensors"] if isinstance(weight_step, CBQ) else [])
    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", real_save)
    solved = []
    real_solve = __import__("slimquant.pipeline.sequential", fromlist=["_solve_layer"])._solve_layer
    monkeypatch.setattr("slimquant.pipeline.sequential._solve_layer", lambda m, lp, *a: solved.append(lp.name) or real_solve(m, lp, *a))
    result = run(tmp_path / "twice", tmp_path / "w")
    assert solved and all(".layers.2." in n or ".layers.3." in n for n in solved)  # blocks 0, 1 were restored
    _same_checkpoint(tmp_path / "once", tmp_path / "twice")
    assert len(result.report.layers) == 4 * 7 and len(result.report.steps_of("awq")) == len(result.report.steps) == 4 * 3


def test_a_work_directory_from_another_recipe_is_refused(make_llama_dir, calib, tmp_path):
    src = make_llama_dir("m")
    slimquant.quantize(load_model(str(src)).model, Recipe(weight=W4, steps=(GPTQ(),)), calib_data=calib,
                       show_progress=False, work_dir=tmp_path / "w")  # fmt: skip
    other = Recipe(weight=W4, steps=(GPTQ(percdamp=0.05),))
    with pytest.raises(SlimquantError, match=r"different setup.*recipe.steps\[0\].percdamp: 0.01 -> 0.05"):
        slimquant.quantize(load_model(str(src)).model, other, calib_data=calib, show_progress=False,
                           work_dir=tmp_path / "w")  # fmt: skip
    with pytest.raises(SlimquantError, match="different setup.*calibration"):
        slimquant.quantize(load_model(str(src)).model, Recipe(weight=W4, steps=(GPTQ(),)), calib_data=calib[:2],
                           show_progress=False, work_dir=tmp_path / "w")  # fmt: skip
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(SlimquantError, match="not a slimquant work directory"):
        slimquant.quantize(load_model(str(src)).model, Recipe(weight=W4, steps=(GPTQ(),)), calib_data=calib,
                           show_progress=False, work_dir=tmp_path / "junk")  # fmt: skip


def test_streaming_refusals_and_bad_tensors(make_llama_dir, calib, tmp_path):
    src = make_llama_dir("m")
    sm = open_streaming(src)
    with pytest.raises(SlimquantError, match="work_dir"):
        sm_q = slimquant.quantize(sm.model, RECIPES["gptq"], calib_data=calib, show_progress=False, stream=sm)
    w8a8 = Recipe(weight=QuantSpec("int8", "per_channel"), input=QuantSpec("int8", "per_token", dynamic=True))
    with pytest.raises(NotSupportedYet, match="weight-only"):
        sm_q = slimquant.quantize(sm.model, w8a8, show_progress=False, stream=sm, work_dir=tmp_path / "w")
    # a NaN in a block's weights is named when that block is read
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    sm = open_streaming(src)
    with pytest.raises(SlimquantError, match=r"model.layers.1.mlp.up_proj.weight has 1 NaN"):
        slimquant.quantize(sm.model, RECIPES["gptq"], calib_data=calib, show_progress=False, stream=sm,
                           work_dir=tmp_path / "w2")  # fmt: skip
    with pytest.raises(SlimquantError, match="Hugging Face model directory.*is not one"):
        open_streaming(tmp_path / "nowhere")


@pytest.mark.parametrize("stream", [False, True])
def test_activations_spill_to_disk_past_the_budget(make_llama_dir, calib, tmp_path, monkeypatch, stream):
    """A tiny budget keeps the hidden states between blocks in files; the checkpoint is the same as in memory."""
    from slimquant.pipeline import sequential

    src = make_llama_dir("m", layers=3)
    recipe = Recipe(weight=W4, steps=(GPTQ(),))
    lm = load_model(str(src))
    lm_q = slimquant.quantize(lm.model, recipe, calib_data=calib, show_progress=False)
    slimquant.save(lm_q, tmp_path / "mem")
    spilled = []
    real = sequential.BlockInputs._store

    def watch(self, hiddens):
        real(self, hiddens)
        if self.shapes:  # not the empty placeholder
            spilled.append(self.spilled)

    monkeypatch.setattr(sequential.BlockInputs, "_store", watch)
    if stream:
        sm = open_streaming(src)
        model, kw = sm.model, {"stream": sm, "work_dir": tmp_path / "w"}
    else:
        model, kw = load_model(str(src)).model, {}
    model_q = slimquant.quantize(model, recipe, calib_data=calib, show_progress=False, max_activation_gb=1e-7, **kw)
    assert spilled and all(spilled)  # 4 windows x 16 tokens x 64 floats = 16 kB > 100 bytes
    slimquant.save(model_q, tmp_path / "spill")
    _same_checkpoint(tmp_path / "mem", tmp_path / "spill")
    if stream:
        assert not (tmp_path / "w" / "activations").exists()  # scratch, removed at the end
    with pytest.raises(SlimquantError, match="max_activation_gb must be positive"):
        slimquant.quantize(load_model(str(src)).model, recipe, calib_data=calib, show_progress=False,
                           max_activation_gb=0)  # fmt: skip


def test_cbq_windows_stream_the_block_ahead(make_llama_dir, calib, tmp_path):
    """CBQ's window reads the next block from disk too (two blocks in memory at most) and writes the in-memory
    checkpoint."""
    src = make_llama_dir("m", layers=3)
    recipe = Recipe(weight=W4, steps=(CBQ(iters=3, batch_size=2, rank=2),))
    lm_q = slimquant.quantize(load_model(str(src)).model, recipe, calib_data=calib, show_progress=False)
    slimquant.save(lm_q, tmp_path / "mem")
    sm = open_streaming(src)
    sm_q = slimquant.quantize(sm.model, recipe, calib_data=calib, show_progress=False, stream=sm, work_dir=tmp_path / "work")
    assert sm.max_loaded == 2 and not sm.loaded
    slimquant.save(sm_q, tmp_path / "stream")
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
