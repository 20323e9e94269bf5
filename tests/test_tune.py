"""Accuracy-aware tuning (slimquant.autotune, slimquant tune --config)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
import time

import pytest
import torch
from torch import nn

import slimquant as sq
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.nn.modules import QModule
from slimquant.search.tune import TuningConfig, autotune, recipe_cost, trial_order


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 64, generator=g) for _ in range(n)]


def _agreement(reference: nn.Module, data: list[torch.Tensor]):
    """A user's metric: top-1 agreement with the float model, in percent (higher is better)."""
    with torch.no_grad():
        ref = [reference(x).argmax(-1) for x in data]

    def eval_fn(model: nn.Module) -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(-1) == r).sum()) for x, r in zip(data, ref))
        return 100.0 * hits / sum(len(r) for r in ref)

    return eval_fn


def test_config_validation():
    with pytest.raises(SlimquantError, match="config_set is empty"):
        TuningConfig([])
    with pytest.raises(SlimquantError, match="config_set is a list"):
        TuningConfig("--w_bit 4")
    with pytest.raises(SlimquantError, match=r"config_set\[1\] '--w_bit 5': .*invalid choice"):
        TuningConfig(["--w_bit 8", "--w_bit 5"])
    with pytest.raises(SlimquantError, match="tolerable_loss must be a finite number >= 0"):
        TuningConfig(["--w_bit 8"], tolerable_loss=-0.1)
    with pytest.raises(SlimquantError, match="max_trials must be a positive integer"):
        TuningConfig(["--w_bit 8"], max_trials=0)
    with pytest.raises(SlimquantError, match="fallback_levels are positive integers"):
        TuningConfig(["--w_bit 8"], fallback_levels=[0])
    with pytest.raises(SlimquantError, match=r"config_set\[0\]: expected a Recipe"):
        TuningConfig([4])


def test_trial_order_is_cheapest_first_then_levels_best_first():
    cfg = TuningConfig(["--w_bit 4 --group_size 64 --w_method gptq", "--w_bit 8 --a_bit 8 --mm_tensor False",
                        "--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False", "--w_bit 4"],
                       fallback_levels=[2, 1])  # fmt: skip
    assert [recipe_cost(r) for _, r in cfg.candidates()] == [3, 2, 1, 0]
    order = trial_order(cfg)
    assert [(label.split(" --mm")[0], lvl) for label, _, lvl in order[:4]] == [
        ("--w_bit 4", 0), ("--w_bit 8 --a_bit 8 --is_dynamic True", 0), ("--w_bit 8 --a_bit 8", 0),
        ("--w_bit 4 --group_size 64 --w_method gptq", 0)]  # fmt: skip
    metrics = {label: m for (label, _, _), m in zip(order[:4], [50.0, 90.0, 80.0, 70.0])}
    later = trial_order(cfg, metrics)[4:]
    assert [lvl for _, _, lvl in later] == [1] * 4 + [2] * 4
    assert later[0][0] == order[1][0] and later[0][1].disable_level == 1  # the best first-phase candidate first


def test_autotune_stops_at_the_first_passing_candidate(mlp):
    data = _data()
    cfg = TuningConfig(["--w_bit 2 --w_sym False", "--w_bit 4 --w_sym False", "--w_bit 8"], tolerable_loss=0.02,
                       fallback_levels=())  # fmt: skip
    seen = []
    res = autotune(mlp, cfg, _agreement(mlp, data), on_trial=lambda t, table: seen.append(table))
    assert not any(isinstance(m, QModule) for m in mlp.modules())  # the user's model stays float
    assert res.baseline == 100.0 and res.target == pytest.approx(98.0)
    assert res.passed and res.best is res.history[-1] and res.best.metric >= 98.0
    assert all(not t.passed for t in res.history[:-1])
    assert len(seen) == len(res.history) and "| Baseline (float) | 100" in seen[0] and "| Target" in seen[0]
    assert any(isinstance(m, QModule) for m in res.model.modules())
    assert res.recipe == sq.Recipe.from_dict(res.best.recipe)


def test_failures_are_recorded_and_the_walk_goes_on(mlp):
    data = _data()
    good = _agreement(mlp, data)
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("evaluation server is down")
        if calls["n"] == 3:
            return float("nan")
        return good(model)

    cfg = TuningConfig(["--w_bit 8", "--w_bit 8 --w_sym False", "--w_bit 4"], tolerable_loss=0.0, fallback_levels=())
    res = autotune(mlp, cfg, flaky)
    errors = [t.error for t in res.history]
    assert errors[0] == "RuntimeError: evaluation server is down"
    assert errors[1] == "SlimquantError: the eval function returned nan"
    assert res.history[2].metric is not None and res.best is res.history[2]


def test_lower_is_better_and_unreachable_targets_keep_the_best(llama, tokenizer):
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = llama(input_ids=calib).logits

    def nll(model):  # 1 + the mean squared logit change: 1.0 for the float model, more for any quantized one
        with torch.no_grad():
            return 1.0 + float(((model(input_ids=calib).logits - ref) ** 2).mean())

    cfg = TuningConfig(["--w_bit 2 --w_sym False --group_size 32"], tolerable_loss=0.0, higher_is_better=False,
                       fallback_levels=[1, 2])  # fmt: skip
    res = autotune(llama, cfg, nll, calib_data=calib)
    assert res.target == res.baseline  # no loss tolerated: nothing passes
    assert not res.passed and [t.level for t in res.history] == [0, 1, 2]
    assert res.best.metric == min(t.metric for t in res.history)
    assert res.result is not None
    with pytest.raises(SlimquantError, match="autotune needs calib_data: fallback levels rank layers on it"):
        autotune(llama, cfg, nll)


def test_resume_from_history_and_refuse_another_setup(mlp, tmp_path):
    data = _data()
    good = _agreement(mlp, data)
    cfg = TuningConfig(["--w_bit 2 --w_sym False", "--w_bit 3 --w_sym False", "--w_bit 8"], tolerable_loss=0.02,
                       fallback_levels=())  # fmt: skip
    calls = []

    def dying(model):
        calls.append(1)
        if len(calls) == 3:  # baseline + 1 trial finished, killed during the second
            raise KeyboardInterrupt
        return good(model)

    with pytest.raises(KeyboardInterrupt):
        autotune(mlp, cfg, dying, work_dir=tmp_path)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["baseline"] == 100.0
    calls.clear()
    res = autotune(mlp, cfg, lambda m: calls.append(1) or good(m), work_dir=tmp_path)
    assert len(calls) == 2  # no baseline again, trial 1 not repeated: trials 2 and 3 only
    assert [t.index for t in res.history] == [0, 1, 2] and res.passed
    other = TuningConfig(["--w_bit 8"], fallback_levels=())
    with pytest.raises(SlimquantError, match="holds the history of another tuning setup"):
        autotune(mlp, other, good, work_dir=tmp_path)


def test_a_trial_that_takes_too_long_fails(mlp):
    def slow(model):
        if any(isinstance(m, QModule) for m in model.modules()):
            time.sleep(2)
        return 1.0

    res = autotune(mlp, TuningConfig(["--w_bit 8"], fallback_levels=(), timeout=0.2), slow)
    assert res.history[0].error == "TrialTimeout: the trial took longer than 0.2 s"
    assert res.result is None and not res.passed


USER_MODULE = '''
import torch
from torch import nn

def build(config=None):
    torch.manual_seed(config["seed"])
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()

def inputs():
    return torch.randn(4, 64)

def calibrate(model):
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        model(torch.randn(8, 64, generator=g))

_REF = {}

def top1(model, config=None):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256, 64, generator=g)
    if "ref" not in _REF:
        _REF["ref"] = model(x).argmax(-1)
    return 100.0 * float((model(x).argmax(-1) == _REF["ref"]).float().mean())
'''


def _task(tmp_path, **over) -> str:
    (tmp_path / "user").mkdir(exist_ok=True)
    (tmp_path / "user" / "usermod.py").write_text(USER_MODULE)
    general = over.get("general", "general:\n  backend: pytorch\n  task:\n    local_base_path: ./tasks/\n    task_id: t1\n"
                                  "  logger:\n    level: info\n  worker:\n    timeout: 600\n")  # fmt: skip
    register = over.get("register", textwrap.dedent('''\
        register:
          pkg_path: ["user"]
          modules:
            - module: "usermod"
              script_network: "build"
              script_network_input: ["inputs"]
              ori_correct_func: ["calibrate"]
              ori_eval_func: ["top1"]
        '''))
    tuning = over.get("tuning", textwrap.dedent('''\
        tuning:
          candidates: ["--w_bit 2 --w_sym False", "--w_bit 8 --a_bit 8 --mm_tensor False"]
          tolerable_loss: 0.02
          max_trials: 10
          fallback_levels: [1]
          network: {config: {seed: 0}}
        '''))
    path = tmp_path / "tune.yml"
    path.write_text(general + register + tuning)
    return str(path)


def test_cli_tune(tmp_path, capsys):
    from slimquant.cli.main import main

    assert main(["tune", "--config", _task(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Baseline (float) | 100" in out and "best: --w_bit 8 --a_bit 8 --mm_tensor False" in out
    task = tmp_path / "tasks" / "t1"
    assert {p.name for p in task.iterdir()} >= {"history.jsonl", "best_recipe.yaml", "best", "tune.md"}
    recipe = sq.Recipe.from_file(str(task / "best_recipe.yaml"))
    assert recipe.input is not None and recipe.input.qtype == "int8"
    history = [json.loads(x) for x in (task / "history.jsonl").read_text().splitlines()[1:]]
    assert [h["label"] for h in history] == ["--w_bit 2 --w_sym False", "--w_bit 8 --a_bit 8 --mm_tensor False"]
    # a rerun resumes: nothing is quantized or evaluated again
    assert main(["tune", "--config", _task(tmp_path)]) == 0
    assert len((task / "history.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("over, exc, words", [
    ({"general": "general:\n  backend: mindspore\n  task: {task_id: t}\n"}, NotSupportedYet, "general.backend mindspore"),
    ({"general": "general:\n  task: {task_id: t}\n  colour: red\n"}, SlimquantError, "unknown key general.colour; valid: backend"),
    ({"general": "general:\n  parallel_search: true\n  task: {task_id: t}\n"}, NotSupportedYet, "parallel_search"),
    ({"register": "register:\n  modules:\n    - module: nope_mod\n      script_network: build\n"}, SlimquantError,
     "register.modules[0].module: cannot import module 'nope_mod'"),
    ({"register": "register:\n  pkg_path: [user]\n  modules:\n    - {module: usermod, script_network: buildd, "
                  "ori_eval_func: top1}\n"}, SlimquantError,
     "register.modules[0].script_network: module 'usermod' has no function 'buildd'"),
    ({"register": "register:\n  pkg_path: [missing]\n  modules: []\n"}, SlimquantError, "register.pkg_path"),
    ({"tuning": "tuning:\n  candidates: ['--w_bit 7']\n"}, SlimquantError, "tuning: config_set[0] '--w_bit 7'"),
    ({"tuning": "tuning:\n  candidates: ['--w_bit 8']\n  patience: 3\n"}, SlimquantError, "unknown key tuning.patience"),
    ({"tuning": "tuning:\n  candidates: ['--w_bit 8']\n  custom_eval: {type: accuracy}\n"}, SlimquantError,
     "tuning.custom_eval.type 'accuracy' is not the registered function (usermod.top1)"),
])  # fmt: skip
def test_cli_tune_bad_task_files(tmp_path, over, exc, words):
    from slimquant.cli import tune_cmd
    from slimquant.cli.main import build_parser

    args = build_parser().parse_args(["tune", "--config", _task(tmp_path, **over)])
    with pytest.raises(exc) as ei:
        tune_cmd.run(args)
    assert words in str(ei.value)
    assert not (tmp_path / "tasks").exists()


def test_metric_that_is_not_a_number(mlp):
    res = autotune(mlp, TuningConfig(["--w_bit 8"], fallback_levels=()), lambda m: 1.0 if not any(
        isinstance(x, QModule) for x in m.modules()) else "good")  # fmt: skip
    assert res.history[0].error == "SlimquantError: the eval function returned str 'good', not a number"


def test_the_shipped_digits_example(tmp_path, capsys):
    """examples/tune/tune_digits.yml as shipped, with its outputs moved to a temporary directory."""
    import yaml

    from slimquant.cli.main import main

    example = Path(__file__).resolve().parent.parent / "examples" / "tune"
    task = yaml.safe_load((example / "tune_digits.yml").read_text())
    task["register"]["pkg_path"] = [str(example)]
    task["general"]["task"]["local_base_path"] = str(tmp_path)
    (tmp_path / "tune.yml").write_text(yaml.safe_dump(task))
    rc = main(["tune", "--config", str(tmp_path / "tune.yml")])
    out = capsys.readouterr().out
    assert rc == 0, out
    history = [json.loads(x) for x in (tmp_path / "digits_tune" / "history.jsonl").read_text().splitlines()]
    assert history[0]["baseline"] > 90.0  # the trained CNN: ~97-98% held-out accuracy
    assert history[-1]["passed"] and all(h["metric"] is not None for h in history[1:])
    assert (tmp_path / "digits_tune" / "best" / "slimquant_manifest.json").is_file()
