"""The AutoML bit-width search: agents, the search loop (resume, failures, thresholds) and ``slimquant search``."""

from __future__ import annotations

import copy
import json
import math
import random
import textwrap
from pathlib import Path

import pytest
import torch

import slimquant as sq
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.search.agents import AGENTS, DDPGAgent, GreedyAgent, Problem, agent_name, make_agent
from slimquant.search.bits import SearchConfig, bit_search, layer_macs, measure_latency
from slimquant.nn.modules import QModule
from slimquant.search.space import FLOAT


def _problem(layers: int = 12, seed: int = 0) -> Problem:
    """Options small -> large (w2, w4, w8, float); predicted loss falls with bits, each layer scaled differently."""
    rng = random.Random(seed)
    scale = [rng.uniform(0.01, 10.0) for _ in range(layers)]
    size = [rng.choice([1000, 4000]) for _ in range(layers)]
    nbytes = [[s * b / 32 for b in (2, 4, 8, 32)] for s in size]
    cost = [[sc * 4.0 ** -(b / 2) if b < 32 else 0.0 for b in (2, 4, 8, 32)] for sc in scale]
    feats = [[i / (layers - 1), 1.0, 0.5, 0.5, 0.0, math.log(s) / 10, 0.5, sc / 10] for i, (s, sc) in enumerate(zip(size, scale))]
    return Problem([f"l{i}" for i in range(layers)], ["w2", "w4", "w8", FLOAT], nbytes, cost, feats)


def test_agent_names_and_the_seed_alias():
    assert agent_name("MsQuantRL") == "rl" and agent_name("DDPG") == "rl" and agent_name("knapsack") == "greedy"
    with pytest.raises(SlimquantError, match="unknown search algorithm 'bayes'; valid: rl, evolutionary, greedy, random"):
        agent_name("bayes")


def test_fit_meets_the_budget_lowering_the_cheapest_loss_per_byte_first():
    pb = _problem()
    top = [pb.k - 1] * pb.layers
    budget = pb.size([1] * pb.layers)
    fitted = pb.fit(top, budget)
    assert pb.size(fitted) <= budget and pb.fit(fitted, budget) == fitted
    # never worse than the uniform configuration of the same size under the sensitivity model
    assert pb.predicted(fitted) <= pb.predicted([1] * pb.layers)
    assert pb.fit([0] * pb.layers, 0.0) == [0] * pb.layers  # nothing smaller exists: the smallest is returned


def test_greedy_path_grows_in_size_and_its_points_are_knapsack_optimal_enough():
    pb = _problem()
    g = GreedyAgent(pb)
    sizes = [pb.size(g.at(p)) for p in range(len(g.moves) + 1)]
    assert sizes == sorted(sizes) and g.at(len(g.moves)) == [pb.k - 1] * pb.layers
    mid = g.at(len(g.moves) // 2)
    # random configurations no larger than the path point predict no lower loss (the greedy order is efficient)
    rng = random.Random(1)
    for _ in range(200):
        c = [rng.randrange(pb.k) for _ in range(pb.layers)]
        if pb.size(c) <= pb.size(mid):
            assert pb.predicted(c) >= pb.predicted(mid) - 1e-12


@pytest.mark.parametrize("name", list(AGENTS))
def test_every_agent_proposes_valid_configurations_and_is_deterministic(name):
    pb = _problem()

    def run() -> list[list[int]]:
        agent = make_agent(name, pb, seed=3, num_warmup=4, max_episode=20)
        out = []
        for _ in range(20):
            c = agent.ask()
            assert len(c) == pb.layers and all(0 <= x < pb.k for x in c)
            agent.tell(c, -pb.predicted(c) - 1e-4 * pb.size(c))
            out.append(c)
        return out

    assert run() == run()


def test_ddpg_learns_beyond_its_random_warmup():
    """Reward: minus the predicted loss at a size budget; the trained actor beats its 10 random episodes."""
    pb = _problem(layers=16)
    budget = 0.5 * pb.size([pb.k - 1] * pb.layers)
    agent = DDPGAgent(pb, seed=0, num_warmup=10, max_episode=80)
    rewards = []
    for _ in range(80):
        c = pb.fit(agent.ask(), budget)
        r = -pb.predicted(c)
        agent.tell(c, r)
        rewards.append(r)
    assert max(rewards[10:]) > max(rewards[:10])
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10


# -- the search loop on a model -------------------------------------------------------------------------------
def _kl_eval(model, x):
    with torch.no_grad():
        ref = torch.log_softmax(model(x), -1)
    calls = []

    def ev(m):
        calls.append(1)
        with torch.no_grad():
            lp = torch.log_softmax(m(x), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    return ev, calls


def test_bit_search_on_an_mlp_resumes_without_repeating(mlp, tmp_path):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ev, calls = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="evolutionary", max_episode=6, num_warmup=3, compress_threshold=70.0,
                       higher_is_better=False, objective_keys=["accuracy", "compress_ratio", "flops"])  # fmt: skip
    base = sq.Recipe(disable_last_linear=False)
    res = bit_search(mlp, ev, (2, 4, 8, 32), calib_data=[x[:16], x[16:32]], config=cfg, base=base, work_dir=tmp_path,
                     show_progress=False)  # fmt: skip
    assert len(res.history) == 6 and len(calls) == 7  # the float model, then six configurations
    assert all(e.compress_ratio >= 70.0 and e.feasible for e in res.history)
    assert res.best is not None and res.best.reward == max(e.reward for e in res.history)
    assert not any(isinstance(m, QModule) for m in mlp.modules())  # the model stays float
    # a longer rerun: the float model and the six finished configurations are not evaluated again
    calls.clear()
    res2 = bit_search(mlp, ev, (2, 4, 8, 32), calib_data=[x[:16], x[16:32]],
                      config=SearchConfig(**{**cfg.__dict__, "max_episode": 9}), base=base, work_dir=tmp_path,
                      show_progress=False)  # fmt: skip
    assert len(res2.history) == 9 and len(calls) == 3
    assert [e.choice for e in res2.history[:6]] == [e.choice for e in res.history]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["baseline"]["accuracy"] == 0.0
    # the best configuration's recipe quantizes the model to exactly the evaluated one
    result = sq.quantize(copy.deepcopy(mlp), res2.recipe, show_progress=False)
    with res2.space.configured(res2.best.choice) as m, torch.no_grad():
        assembled = m(x)
    with torch.no_grad():
        assert torch.equal(result.model(x), assembled)
    # another setup in the same directory is refused
    with pytest.raises(SlimquantError, match="history of another search"):
        bit_search(mlp, ev, (4, 8), calib_data=[x[:16]], config=cfg, base=base, work_dir=tmp_path, show_progress=False)


def test_failed_evaluations_are_recorded_and_the_search_goes_on(mlp):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, calls = _kl_eval(mlp, x)

    def flaky(m):
        v = ev(m)
        if len(calls) == 3:
            raise RuntimeError("the evaluation data set went away")
        return float("nan") if len(calls) == 4 else v

    cfg = SearchConfig(agent="random", max_episode=5, higher_is_better=False, custom_reward=True)
    res = bit_search(mlp, flaky, (4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    assert len(res.history) == 5
    errors = [e.error for e in res.history]
    assert errors[1] == "RuntimeError: the evaluation data set went away"
    assert errors[2] == "SlimquantError: the eval function returned nan"
    assert res.best is not None and res.best.error is None and "## Failed evaluations" in res.to_markdown()


def test_thresholds_that_cannot_be_met_are_named_and_the_front_kept(mlp, tmp_path):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="greedy", max_episode=6, higher_is_better=False, reward_type="compress_first",
                       acc_threshold=-1.0, objective_keys=["accuracy", "compress_ratio"])  # KL is never below -1
    res = bit_search(mlp, ev, (4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    assert res.unmet and res.unmet[0].startswith("accuracy threshold -1 (closest: ")
    assert res.best is not None and res.pareto()
    paths = res.save(tmp_path)
    assert "**Not met by any configuration:** accuracy threshold -1" in paths[0].read_text()
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_early_ends_at_the_first_configuration_meeting_every_threshold(mlp):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="random", max_episode=20, higher_is_better=False, reward_type="compress_first",
                       acc_threshold=10.0, stop_early=True)  # any configuration has KL < 10  # fmt: skip
    res = bit_search(mlp, ev, (4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    assert len(res.history) == 1 and res.best.feasible and not res.unmet


def test_compress_first_prefers_the_smallest_configuration_within_the_accuracy_threshold(mlp):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="greedy", max_episode=12, higher_is_better=False, reward_type="compress_first",
                       acc_threshold=0.02)  # fmt: skip
    res = bit_search(mlp, ev, (2, 4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    feasible = [e for e in res.history if e.feasible]
    assert feasible and res.best.compress_ratio == max(e.compress_ratio for e in feasible)
    assert all(e.accuracy <= 0.02 for e in feasible)


def test_latency_and_flops_are_measured_on_the_example(cnn):
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    layers = {n: m for n, m in cnn.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    macs = layer_macs(cnn, layers, x)
    first = next(iter(layers))
    conv = layers[first]
    with torch.no_grad():
        out = conv(x)
    assert macs[first] == out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    total, pre, dec = measure_latency(cnn, x, repeat=2)
    assert total == pre > 0 and dec == 0.0
    ev = lambda m: float(m(x).detach().abs().mean())  # noqa: E731
    cfg = SearchConfig(agent="random", max_episode=3, objective_keys=["accuracy", "compress_ratio", "flops", "latency"],
                       repeat_times=1, latency_threshold=1e6)  # fmt: skip
    res = bit_search(cnn, ev, (4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    assert res.baseline.latency > 0 and all(e.latency > 0 and e.flops < res.baseline.flops or e.flops == res.baseline.flops
                                            for e in res.history)  # fmt: skip


def test_causal_lm_latency_is_prefill_plus_decode(llama, tokenizer):
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    total, pre, dec = measure_latency(llama, {"input_ids": ids}, repeat=1, decode_tokens=3)
    assert pre > 0 and dec > 0 and total == pytest.approx(pre + dec)


@pytest.mark.parametrize("kw, words", [
    ({"objective_keys": ["compress_ratio"]}, "objective_keys must include accuracy"),
    ({"objective_keys": ["accuracy", "energy"]}, "unknown objective_keys entry 'energy'; valid: accuracy, compress_ratio"),
    ({"reward_type": "size_first"}, "unknown reward_type 'size_first'; valid: acc_first, compress_first"),
    ({"reward_type": "compress_first"}, "compress_first needs acc_threshold"),
    ({"latency_threshold": -5.0}, "latency_threshold is in milliseconds and must be > 0"),
    ({"compress_threshold": 140}, "compress_threshold is the percent of float32 bytes saved"),
    ({"custom_reward": True, "metric_to_reward": "flops"}, "metric_to_reward flops must be one of objective_keys"),
    ({"max_episode": 0}, "max_episode must be a positive integer"),
    ({"agent": "tabu"}, "unknown search algorithm 'tabu'"),
    ({"sensitivity": "hessian"}, "unknown sensitivity 'hessian'; valid: auto, fisher, kfac"),
])  # fmt: skip
def test_search_config_errors(kw, words):
    with pytest.raises(SlimquantError) as ei:
        SearchConfig(**kw)
    assert words in str(ei.value)


# -- slimquant search --config -----------------------------------------------------------------------------
USER_MODULE = '''
import torch
from torch import nn

def build(config=None):
    torch.manual_seed(int((config or {}).get("seed", 0)))
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()

def inputs(config=None):
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1))

def calibrate(model, config=None):
    g = torch.Generator().manual_seed(2)
    for _ in range(int((config or {}).get("batches", 3))):
        model(torch.randn(16, 64, generator=g))

_REF = {}

def top1(model, config=None):
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(9))
    if "ref" not in _REF:
        _REF["ref"] = model(x).argmax(-1)
    return 100.0 * float((model(x).argmax(-1) == _REF["ref"]).float().mean())
'''

NAS = '''\
pipeline: [ nas ]
nas:
  pipe_step: {type: SearchPipeStep}
  model:
    model_desc:
      type: ScriptModelGen
      common:
        network: {type: build, config: {seed: 0}}
        multiple_inputs: {type: inputs}
  search_algorithm:
    type: MsQuantRL
    codec: QuantRLCodec
    policy: {max_episode: 8, num_warmup: 3}
    objective_keys: [accuracy, compress_ratio, flops, latency]
    reward_type: acc_first
    acc_threshold: 50
    compress_threshold: 60
  search_space:
    type: SearchSpace
    hyperparameters:
      - {key: network.bit_candidates, type: CATEGORY, range: [2, 4, 8, 32]}
      - {key: network.group_size, type: CATEGORY, range: [32]}
  trainer:
    type: QuantTrainer
    seed: 7
    calib_portion: 1.0
    callbacks: [OptExportCallback]
    custom_calib: {type: calibrate, config: {batches: 2}}
    custom_eval: {type: top1, metric_name: top1}
  evaluator:
    type: Evaluator
    device_evaluator: {type: DeviceEvaluator, hardware: cpu, repeat_times: 1}
'''


def _task(tmp_path: Path, nas: str = NAS, extra: str = "") -> str:
    (tmp_path / "user").mkdir(exist_ok=True)
    (tmp_path / "user" / "usermod_s.py").write_text(USER_MODULE)
    text = textwrap.dedent('''\
        general:
          backend: pytorch
          task: {local_base_path: ./tasks/, task_id: s1}
        register:
          pkg_path: ["user"]
          modules:
            - module: "usermod_s"
              script_network: "build"
              script_network_input: ["inputs"]
              ori_correct_func: ["calibrate"]
              ori_eval_func: ["top1"]
        ''') + nas + extra  # fmt: skip
    path = tmp_path / "search.yml"
    path.write_text(text)
    return str(path)


def test_cli_search_outputs_and_resume(tmp_path, capsys):
    from slimquant.cli.main import main

    assert main(["search", "--config", _task(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "best: evaluation #" in out and "of 8: top1 " in out
    task = tmp_path / "tasks" / "s1"
    assert {p.name for p in task.iterdir()} >= {"history.jsonl", "best_recipe.yaml", "best", "pareto.md", "pareto.png",
                                                 "bits.md"}  # fmt: skip
    lines = (task / "history.jsonl").read_text().splitlines()
    assert len(lines) == 9
    rows = [json.loads(x) for x in lines[1:]]
    assert all({"accuracy", "compress_ratio", "flops", "latency", "reward", "choice"} <= r.keys() for r in rows)
    assert all(r["compress_ratio"] >= 60 for r in rows)
    recipe = sq.Recipe.from_file(str(task / "best_recipe.yaml"))
    assert len(recipe.overrides) == 2  # the two searchable layers (the last Linear stays float by default)
    assert "| 0 |" in (task / "bits.md").read_text()
    # rerun: resumes, evaluates nothing again
    assert main(["search", "--config", _task(tmp_path)]) == 0
    assert len((task / "history.jsonl").read_text().splitlines()) == 9


@pytest.mark.parametrize("old, new, exc, words", [
    ("hardware: cpu", "hardware: Davinci", NotSupportedYet, "device_evaluator.hardware Davinci is the Ascend NPU"),
    ("hardware: cpu,", "hardware: cpu, om_input_shape: 'input_0:1,3,224,224',", NotSupportedYet,
     "nas.evaluator.device_evaluator.om_input_shape is Ascend-only"),
    ("hardware: cpu,", "hardware: cpu, remote_host: 'http://x',", NotSupportedYet,
     "nas.evaluator.device_evaluator.remote_host is Ascend-only"),
    ("    codec: QuantRLCodec\n", "    codec: QuantRLCodec\n    patience: 3\n", SlimquantError,
     "unknown key nas.search_algorithm.patience; valid: type, codec, policy"),
    ("network.group_size", "network.width", SlimquantError,
     "hyperparameters[1].key 'network.width'; valid: network.bit_candidates, network.group_size, network.act_bits"),
    ("type: MsQuantRL", "type: BayesOpt", SlimquantError,
     "nas.search_algorithm.type: unknown search algorithm 'BayesOpt'; valid: rl, evolutionary, greedy, random"),
    ("policy: {max_episode: 8,", "policy: {max_episode: 0,", SlimquantError,
     "nas.search_algorithm.policy.max_episode: max_episode must be a positive integer"),
    ("seed: 7", "seed: seven", SlimquantError, "nas.trainer.seed: seed must be an integer"),
    ("repeat_times: 1}", "repeat_times: 0}", SlimquantError, "nas.evaluator.device_evaluator.repeat_times: repeat_times"),
    ("compress_threshold: 60", "compress_threshold: 99", SlimquantError,
     "compress_threshold 99 is out of reach: the smallest configuration (every layer w2g32) saves"),
    ("{type: top1, metric_name: top1}", "{type: accuracy}", SlimquantError,
     "nas.trainer.custom_eval.type 'accuracy' is not the registered function (usermod_s.top1)"),
    ("objective_keys: [accuracy, compress_ratio, flops, latency]", "objective_keys: [compress_ratio]", SlimquantError,
     "nas.search_algorithm.objective_keys: objective_keys must include accuracy"),
    ("callbacks: [OptExportCallback]", "callbacks: [EarlyStop]", SlimquantError, "nas.trainer.callbacks: 'EarlyStop'"),
    ("range: [2, 4, 8, 32]", "range: [7, 8]", SlimquantError, "bit candidate 7: valid are 2, 3, 4, 5, 6, 8 and 16 / 32"),
    ("multiple_inputs: {type: inputs}", "multiple_inputs: {type: data}", SlimquantError,
     "multiple_inputs.type 'data' is not the registered script_network_input"),
])  # fmt: skip
def test_cli_search_bad_task_files(tmp_path, old, new, exc, words):
    from slimquant.cli import search_cmd
    from slimquant.cli.main import build_parser

    assert old in NAS
    args = build_parser().parse_args(["search", "--config", _task(tmp_path, NAS.replace(old, new))])
    with pytest.raises(exc) as ei:
        search_cmd.run(args)
    assert words in str(ei.value)
    assert not (tmp_path / "tasks").exists()


def test_cli_search_act_bits_adds_w8a8(tmp_path):
    from slimquant.cli.search_cmd import options_from

    opts = options_from({"network.bit_candidates": [4, 8, 16], "network.group_size": [32, 64], "network.act_bits": [8, 16]})
    assert [o.label for o in opts] == ["w4g32", "w8", "float", "w4g64", "w8a8"]
    assert opts[-1].input is not None and opts[-1].input.dynamic
    with pytest.raises(SlimquantError, match="act_bits 8 pairs with 8-bit weights"):
        options_from({"network.bit_candidates": [4, 16], "network.act_bits": [8]})


def test_the_shipped_digits_search_example(tmp_path, capsys):
    """examples/search/search_digits.yml as shipped (outputs moved to a temporary directory)."""
    import yaml

    from slimquant.cli.main import main

    here = Path(__file__).resolve().parent.parent / "examples"
    task = yaml.safe_load((here / "search" / "search_digits.yml").read_text())
    task["register"]["pkg_path"] = [str(here / "tune")]
    task["general"]["task"]["local_base_path"] = str(tmp_path)
    (tmp_path / "s.yml").write_text(yaml.safe_dump(task))
    rc = main(["search", "--config", str(tmp_path / "s.yml")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "digits_search" / "best" / "slimquant_manifest.json").is_file()


def test_kfac_sees_what_gptq_compensates_and_the_diagonal_fisher_does_not(llama, tokenizer):
    """Predicted vs exact KL of quantizing one layer alone (GPTQ w2 g32): the diagonal Fisher over-predicts GPTQ's
    layers several-fold (their errors sit where the inputs are small); K-FAC's input second moment sees it."""
    import dataclasses
    import statistics

    from slimquant.search.sensitivity import fisher_diagonal, kfac_factors
    from slimquant.search.space import Assembly, bit_options

    ids = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    gptq = sq.Recipe.from_flags("--w_method gptq")
    space = Assembly(llama, bit_options([2, 16], 32), base=dataclasses.replace(gptq, steps=(gptq.weight_step,)),
                     calib_data=ids, show_progress=False)  # fmt: skip
    kfac = kfac_factors(llama, space.floats, ids, show_progress=False)
    fisher = fisher_diagonal(llama, space.floats, ids, show_progress=False)
    with torch.no_grad():
        ref = torch.log_softmax(llama(input_ids=ids).logits, -1)
    ratios_k, ratios_f = [], []
    for name, mod in space.floats.items():
        w = mod.weight.detach().float()
        d = space.modules[(name, "w2g32")].dequantized_weight(torch.float32).reshape(w.shape) - w
        g, h = kfac[name]
        choice = {n: FLOAT for n in space.floats}
        choice[name] = "w2g32"
        with space.configured(choice) as m, torch.no_grad():
            lp = torch.log_softmax(m(input_ids=ids).logits, -1)
        exact = float((ref.exp() * (ref - lp)).sum(-1).mean())
        ratios_k.append(float((g[:, None] * (d @ h) * d).sum()) / exact)
        ratios_f.append(float((fisher[name] * d * d).sum()) / exact)
    assert 0.5 < statistics.median(ratios_k) < 1.5
    assert statistics.median(ratios_f) > 2.0


def test_cli_search_takes_the_seed_thresholds_and_lowercase_algorithm_names(tmp_path, capsys):
    """The seed sets latency_threshold with objective_keys [accuracy, compress_ratio, flops]: latency is then
    measured as a constraint; algorithm names are case-insensitive (msquantrl, ea, knapsack)."""
    from slimquant.cli.main import main

    nas = (NAS.replace("type: MsQuantRL", "type: knapsack").replace("policy: {max_episode: 8,", "policy: {max_episode: 3,")
           .replace("objective_keys: [accuracy, compress_ratio, flops, latency]", "objective_keys: [accuracy, compress_ratio, flops]")
           .replace("    compress_threshold: 60\n", "    compress_threshold: 60\n    latency_threshold: 100000\n"))  # fmt: skip
    assert main(["search", "--config", _task(tmp_path, nas)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "tasks" / "s1" / "history.jsonl").read_text().splitlines()[1:]]
    assert len(rows) == 3 and all(r["latency"] > 0 and r["feasible"] for r in rows)


def test_a_latency_threshold_is_enforced_when_latency_is_not_an_objective(mlp):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="random", max_episode=3, higher_is_better=False, custom_reward=True,
                       latency_threshold=1e-9, repeat_times=1)  # nothing runs in a femtosecond  # fmt: skip
    res = bit_search(mlp, ev, (4, 8, 32), calib_data=[x], config=cfg, show_progress=False)
    assert all(e.latency is not None and not e.feasible for e in res.history)
    assert res.unmet and res.unmet[0].startswith("latency threshold 1e-09")


def test_a_dict_metric_is_read_and_a_latency_failure_keeps_the_accuracy(mlp, monkeypatch):
    from slimquant.search import bits

    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="random", max_episode=3, higher_is_better=False, custom_reward=True)
    res = bit_search(mlp, lambda m: {"accuracy": ev(m), "other": 1.0}, (4, 8, 32), calib_data=[x], config=cfg,
                     show_progress=False)  # fmt: skip
    assert all(e.accuracy is not None and e.accuracy >= 0 for e in res.history)
    with pytest.raises(SlimquantError, match=r"a dict with keys \['a', 'b'\]: return a number"):
        bit_search(mlp, lambda m: {"a": 1.0, "b": 2.0}, (4, 32), calib_data=[x], config=cfg, show_progress=False)
    calls = []

    def slow(*a, **k):
        calls.append(1)
        if len(calls) > 1:  # the float model's measurement works, the next one fails
            raise RuntimeError("the timer broke")
        return 1.0, 1.0, 0.0

    monkeypatch.setattr(bits, "measure_latency", slow)
    lat = SearchConfig(agent="random", max_episode=1, higher_is_better=False, custom_reward=True,
                       objective_keys=["accuracy", "compress_ratio", "latency"])  # fmt: skip
    res = bit_search(mlp, ev, (4, 8, 32), calib_data=[x], config=lat, show_progress=False)
    err = res.history[0].error
    assert err.startswith("latency measurement: RuntimeError: the timer broke (its accuracy was ") and res.best is None


def test_acc_first_without_a_size_or_latency_threshold_warns(mlp, caplog):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    ev, _ = _kl_eval(mlp, x)
    cfg = SearchConfig(agent="random", max_episode=1, higher_is_better=False, acc_threshold=0.5)
    with caplog.at_level("WARNING", logger="slimquant"):
        bit_search(mlp, ev, (4, 32), calib_data=[x], config=cfg, show_progress=False)
    assert "the float configuration wins" in caplog.text


def test_resume_cuts_a_half_written_line_retries_failures_and_names_what_differs(mlp, tmp_path):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ev, calls = _kl_eval(mlp, x)
    fail = {"on": True}

    def flaky(m):
        v = ev(m)
        if fail["on"] and len(calls) == 3:
            raise RuntimeError("transient")
        return v

    cfg = SearchConfig(agent="rl", max_episode=4, num_warmup=2, higher_is_better=False, compress_threshold=60.0)
    kw = dict(calib_data=[x], config=cfg, work_dir=tmp_path, show_progress=False)
    first = bit_search(mlp, flaky, (2, 4, 8, 32), **kw)
    assert first.history[1].error == "RuntimeError: transient"
    hist = tmp_path / "history.jsonl"
    text = hist.read_text()
    hist.write_text(text[: len(text) - 25])  # the last evaluation was killed mid-write
    fail["on"] = False
    calls.clear()
    kw["config"] = SearchConfig(**{**cfg.__dict__, "max_episode": 5})
    again = bit_search(mlp, flaky, (2, 4, 8, 32), **kw)
    lines = hist.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(ln) for ln in lines)  # whole lines: nothing joined the cut one
    # the failed evaluation stays on record and its configuration is evaluated again (it succeeds now)
    assert [e.error for e in again.history].count("RuntimeError: transient") == 1
    assert len(again.history) == 5 and len(calls) == 2
    retried = [e for e in again.history[3:] if e.choice == first.history[1].choice]
    assert retried and retried[0].error is None
    # a different setting is named
    with pytest.raises(SlimquantError, match=r"\(search setting seed differ\)"):
        bit_search(mlp, flaky, (2, 4, 8, 32), **{**kw, "config": SearchConfig(**{**kw["config"].__dict__, "seed": 5})})


def test_a_half_precision_model_counts_its_float_layers_at_their_dtype(mlp):
    m16 = copy.deepcopy(mlp).to(torch.bfloat16)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cfg = SearchConfig(agent="random", max_episode=1, custom_reward=True)
    res = bit_search(m16, lambda m: float(m(x).detach().float().mean()), (8, 16), calib_data=[x], config=cfg, show_progress=False)
    total = sum(t.numel() * t.element_size() for t in m16.parameters())
    assert res.baseline.size_bytes == total  # bf16 parameters: 2 bytes each, not 4
    assert res.baseline.compress_ratio == pytest.approx(50.0)  # of the float32 bytes


def test_a_dataloader_of_input_label_pairs_gets_a_clear_error(cnn):
    from slimquant.pipeline.calibrate import run_batches

    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(SlimquantError, match=r"a DataLoader of \(input, label\) pairs: pass \[x for x, _ in loader\]"):
        run_batches(cnn, [(x, torch.zeros(4, dtype=torch.long))], show_progress=False)
