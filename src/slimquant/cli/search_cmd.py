"""``slimquant search --config search.yml``: the AutoML bit-width search of the Ascend seed, on any PyTorch model.

The task file is the seed's YAML: ``general`` and ``register`` (:mod:`slimquant.search.config`), ``pipeline:
[nas]`` and a ``nas`` section::

    nas:
      pipe_step: {type: SearchPipeStep}
      model:
        model_desc:
          type: ScriptModelGen
          common:
            network: {type: build, config: {...}, file_config: path}   # script_network and its arguments
            multiple_inputs: {type: example_input}                      # script_network_input
      search_algorithm:
        type: MsQuantRL            # rl (DDPG); also evolutionary, greedy (knapsack on the sensitivity), random
        codec: QuantRLCodec
        policy: {max_episode: 100, num_warmup: 10}
        objective_keys: [accuracy, compress_ratio, flops, latency]      # accuracy required
        reward_type: acc_first     # or compress_first
        custom_reward: false
        metric_to_reward: compress_ratio
        metric_ratio: 0.5
        stop_early: false
        acc_threshold: 0.5         # the metric's value
        latency_threshold: 5       # milliseconds
        compress_threshold: 40     # percent of the float32 bytes saved
        higher_is_better: true     # slimquant: false for KL / perplexity-like metrics
        sensitivity: auto          # slimquant: the agents' predicted loss: fisher, kfac (sees GPTQ's compensation)
      search_space:
        type: SearchSpace
        base: "--w_method gptq"    # slimquant: msModelSlim flags of the base recipe (weight step, disable_names)
        hyperparameters:
          - {key: network.bit_candidates, type: CATEGORY, range: [4, 8, 16]}  # 16 / 32 = float
          - {key: network.group_size, type: CATEGORY, range: [64]}           # for < 8 bits; per channel if absent
          - {key: network.act_bits, type: CATEGORY, range: [8, 16]}          # 8: also W8A8 (dynamic per token)
      trainer:
        type: QuantTrainer
        seed: 234
        calib_portion: 1.0         # the share of the calibration calls (ori_correct_func) used
        custom_calib: {type: calibrate, config: {...}}
        custom_eval: {type: accuracy, config: {...}, metric_name: top1}
      evaluator:
        type: Evaluator
        device_evaluator: {type: DeviceEvaluator, hardware: cpu, repeat_times: 3, decode_tokens: 8}

Outputs in ``<local_base_path>/<task_id>/``: ``history.jsonl`` (every evaluated configuration with all objectives;
a rerun resumes from it), ``pareto.md`` / ``pareto.png`` (accuracy against size, latency and FLOPs), ``bits.md``
(the chosen option per layer), ``best_recipe.yaml`` (loadable by ``slimquant quantize --recipe``) and ``best/``
(the best configuration quantized and saved). Exit status 3 when no configuration meets every threshold.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path
from typing import Any

from slimquant.errors import NotSupportedYet, SlimquantError

log = logging.getLogger("slimquant.cli")

TOP_KEYS = ("general", "register", "pipeline", "nas")
NAS_KEYS = ("pipe_step", "model", "search_algorithm", "search_space", "trainer", "evaluator")
ALGORITHM_KEYS = ("type", "codec", "policy", "objective_keys", "reward_type", "custom_reward", "metric_to_reward",
                  "metric_ratio", "stop_early", "acc_threshold", "latency_threshold", "compress_threshold",
                  "higher_is_better", "sensitivity")  # fmt: skip
POLICY_KEYS = ("max_episode", "num_warmup")
SPACE_KEYS = ("type", "base", "hyperparameters")
HYPER_KEYS = ("key", "type", "range")
HYPERPARAMETERS = ("network.bit_candidates", "network.group_size", "network.act_bits")
TRAINER_KEYS = ("type", "seed", "calib_portion", "callbacks", "custom_calib", "custom_eval")
CALLBACKS = ("OptExportCallback",)
EVALUATOR_KEYS = ("type", "device_evaluator")
DEVICE_KEYS = ("type", "custom", "om_input_shape", "backend", "delete_eval_model", "hardware", "remote_host",
               "repeat_times", "muti_input", "decode_tokens")  # fmt: skip
ASCEND_ONLY = {"om_input_shape": "an offline-model input shape for the Ascend NPU; latency is measured on the example "
                                 "input of script_network_input",
               "remote_host": "a remote Ascend evaluation server; latency is measured on this machine"}  # fmt: skip
HARDWARE = ("cpu", "cuda")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="AutoML bit-width search: mixed precision per layer by RL / evolution / greedy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, help="the task YAML (general, register, pipeline, nas)")
    p.set_defaults(func=run)


def _type(d: dict[str, Any], where: str, valid: tuple[str, ...]) -> None:
    if "type" in d and str(d["type"]) not in valid:
        raise SlimquantError(f"{where}.type {d['type']!r}; valid: {', '.join(valid)}")


# where each SearchConfig field is set in the task file (for error messages)
FIELD_KEYS = {"agent": "nas.search_algorithm.type", "max_episode": "nas.search_algorithm.policy.max_episode",
              "num_warmup": "nas.search_algorithm.policy.num_warmup", "seed": "nas.trainer.seed",
              "repeat_times": "nas.evaluator.device_evaluator.repeat_times",
              "decode_tokens": "nas.evaluator.device_evaluator.decode_tokens", "timeout": "general.timeout"}


def config_key(message: str) -> str:
    """The task-file key a SearchConfig error ``message`` is about (``nas.search_algorithm`` by default)."""
    import re

    for field_name, key in FIELD_KEYS.items():
        if re.search(rf"\b{field_name}\b", message):
            return key
    for m in re.finditer(r"\b([a-z_]+)\b", message):
        if m.group(1) in ALGORITHM_KEYS:
            return f"nas.search_algorithm.{m.group(1)}"
    return "nas.search_algorithm"


def _number(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SlimquantError(f"{where} must be a number, got {v!r}")
    return float(v)


def read_search(nas: Any, reg_where: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """The ``nas`` section as keyword arguments (see the module docstring); every key is checked."""
    from slimquant.search.bits import SearchConfig
    from slimquant.search.config import check_keys, function_block

    n = check_keys(nas, NAS_KEYS, "nas", required=("search_algorithm", "search_space"))
    _type(check_keys(n.get("pipe_step"), ("type",), "nas.pipe_step"), "nas.pipe_step", ("SearchPipeStep",))
    net_kw: dict[str, Any] = {}
    if n.get("model") is not None:
        model = check_keys(n["model"], ("model_desc",), "nas.model")
        desc = check_keys(model.get("model_desc"), ("type", "common"), "nas.model.model_desc")
        _type(desc, "nas.model.model_desc", ("ScriptModelGen",))
        common = check_keys(desc.get("common"), ("network", "multiple_inputs"), "nas.model.model_desc.common")
        net_kw = function_block(common.get("network"), "nas.model.model_desc.common.network", reg_where.get("script_network"))
        mi = check_keys(common.get("multiple_inputs"), ("type",), "nas.model.model_desc.common.multiple_inputs")
        if "type" in mi and str(mi["type"]) != reg_where.get("script_network_input", "").rsplit(".", 1)[-1]:
            raise SlimquantError(f"nas.model.model_desc.common.multiple_inputs.type {mi['type']!r} is not the registered "
                                 f"script_network_input ({reg_where.get('script_network_input') or 'none is registered'})")  # fmt: skip

    a = check_keys(n["search_algorithm"], ALGORITHM_KEYS, "nas.search_algorithm")
    if "type" in a:
        from slimquant.search.agents import agent_name

        try:
            agent_name(str(a["type"]))  # case-insensitive: MsQuantRL, msquantrl, DDPG, ea, knapsack, ...
        except SlimquantError as e:
            raise type(e)(f"nas.search_algorithm.type: {e}") from None
    if "codec" in a and str(a["codec"]) not in ("QuantRLCodec", "QuantCodec"):
        raise SlimquantError(f"nas.search_algorithm.codec {a['codec']!r}; valid: QuantRLCodec, QuantCodec (one option "
                             "index per layer)")  # fmt: skip
    policy = check_keys(a.get("policy"), POLICY_KEYS, "nas.search_algorithm.policy")
    space = check_keys(n["search_space"], SPACE_KEYS, "nas.search_space", required=("hyperparameters",))
    _type(space, "nas.search_space", ("SearchSpace",))
    hyper: dict[str, Any] = {}
    hp = space["hyperparameters"]
    if not isinstance(hp, list):
        raise SlimquantError("nas.search_space.hyperparameters must be a list of {key, type, range} entries")
    for i, h in enumerate(hp):
        where = f"nas.search_space.hyperparameters[{i}]"
        e = check_keys(h, HYPER_KEYS, where, required=("key", "range"))
        if str(e["key"]) not in HYPERPARAMETERS:
            raise SlimquantError(f"{where}.key {e['key']!r}; valid: {', '.join(HYPERPARAMETERS)}")
        if str(e.get("type", "CATEGORY")).upper() != "CATEGORY":
            raise SlimquantError(f"{where}.type {e['type']!r}; valid: CATEGORY")
        values = e["range"] if isinstance(e["range"], list) else [e["range"]]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise SlimquantError(f"{where}.range must be a list of integers, got {e['range']!r}")
        if e["key"] in hyper:
            raise SlimquantError(f"{where}: {e['key']} is given twice")
        hyper[str(e["key"])] = values
    if "network.bit_candidates" not in hyper:
        raise SlimquantError("nas.search_space.hyperparameters needs network.bit_candidates (e.g. [4, 8, 16])")

    t = check_keys(n.get("trainer"), TRAINER_KEYS, "nas.trainer")
    _type(t, "nas.trainer", ("QuantTrainer",))
    for cb in t.get("callbacks") or []:
        if str(cb) not in CALLBACKS:
            raise SlimquantError(f"nas.trainer.callbacks: {cb!r}; valid: {', '.join(CALLBACKS)} (the best configuration "
                                 "is always exported to best/)")  # fmt: skip
    portion = _number(t.get("calib_portion", 1.0), "nas.trainer.calib_portion")
    if portion is None or not 0 < portion <= 1:
        raise SlimquantError(f"nas.trainer.calib_portion must be in (0, 1], got {t.get('calib_portion')!r}")
    calib_kw = function_block(t.get("custom_calib"), "nas.trainer.custom_calib", reg_where.get("ori_correct_func"))
    eval_kw = function_block(t.get("custom_eval"), "nas.trainer.custom_eval", reg_where.get("ori_eval_func"))
    metric_name = str((t.get("custom_eval") or {}).get("metric_name", "accuracy"))

    ev = check_keys(n.get("evaluator"), EVALUATOR_KEYS, "nas.evaluator")
    _type(ev, "nas.evaluator", ("Evaluator",))
    dev = check_keys(ev.get("device_evaluator"), DEVICE_KEYS, "nas.evaluator.device_evaluator")
    _type(dev, "nas.evaluator.device_evaluator", ("DeviceEvaluator",))
    for key, why in ASCEND_ONLY.items():
        if key in dev:
            raise NotSupportedYet(f"nas.evaluator.device_evaluator.{key} is Ascend-only ({why}); remove it")
    hardware = str(dev.get("hardware", "cpu")).lower()
    if hardware == "davinci":
        raise NotSupportedYet("nas.evaluator.device_evaluator.hardware Davinci is the Ascend NPU; slimquant measures "
                              "latency with its own kernels on this machine: cpu or cuda")  # fmt: skip
    if hardware not in HARDWARE:
        raise SlimquantError(f"nas.evaluator.device_evaluator.hardware {dev['hardware']!r}; valid: {', '.join(HARDWARE)}")
    if str(dev.get("backend", "pytorch")).lower() != "pytorch":
        raise NotSupportedYet(f"nas.evaluator.device_evaluator.backend {dev['backend']!r}: slimquant evaluates PyTorch "
                              "models (pytorch)")  # fmt: skip
    for key in ("delete_eval_model", "muti_input"):
        if key in dev and not isinstance(dev[key], bool):
            raise SlimquantError(f"nas.evaluator.device_evaluator.{key} must be true or false")
    if "custom" in dev and str(dev["custom"]) != "QuantCustomEvaluator":
        raise SlimquantError(f"nas.evaluator.device_evaluator.custom {dev['custom']!r}; valid: QuantCustomEvaluator")

    kwargs = dict(agent=str(a.get("type", "MsQuantRL")), max_episode=policy.get("max_episode", 100),
                  num_warmup=policy.get("num_warmup", 10),
                  objective_keys=a.get("objective_keys", ["accuracy", "compress_ratio"]),
                  reward_type=a.get("reward_type", "acc_first"), custom_reward=a.get("custom_reward", False),
                  metric_to_reward=a.get("metric_to_reward", "compress_ratio"),
                  metric_ratio=a.get("metric_ratio", 0.5), stop_early=a.get("stop_early", False),
                  acc_threshold=a.get("acc_threshold"), latency_threshold=a.get("latency_threshold"),
                  compress_threshold=a.get("compress_threshold"), higher_is_better=a.get("higher_is_better", True),
                  seed=t.get("seed", 0), repeat_times=dev.get("repeat_times", 3),
                  decode_tokens=dev.get("decode_tokens", 8), timeout=timeout,
                  sensitivity=a.get("sensitivity", "auto"))  # fmt: skip
    try:
        config = SearchConfig(**kwargs)
    except SlimquantError as e:
        raise type(e)(f"{config_key(str(e))}: {e}") from None
    return {"config": config, "hyper": hyper, "base": space.get("base"), "portion": portion, "net_kw": net_kw,
            "calib_kw": calib_kw, "eval_kw": eval_kw, "metric_name": metric_name, "hardware": hardware}  # fmt: skip


def options_from(hyper: dict[str, list[int]]) -> list[Any]:
    """The options of ``network.bit_candidates`` x ``network.group_size`` (for < 8 bits) and, with
    ``network.act_bits`` 8, an int8-weight option with int8 dynamic per-token inputs (W8A8)."""
    from slimquant.search.space import Option, bit_options
    from slimquant.types.spec import Granularity, QuantSpec

    out: list[Option] = []
    for g in hyper.get("network.group_size") or [None]:
        if g is not None and (g < 1 or g & (g - 1)):
            raise SlimquantError(f"network.group_size {g} must be a power of two")
        out += [o for o in bit_options(hyper["network.bit_candidates"], g) if o.label not in {x.label for x in out}]
    acts = hyper.get("network.act_bits") or [16]
    bad = [a for a in acts if a not in (8, 16, 32)]
    if bad:
        raise SlimquantError(f"network.act_bits {bad[0]}: valid are 8 (int8 dynamic per token) and 16 / 32 (float)")
    if 8 in acts:
        w8 = next((o for o in out if o.label == "w8"), None)
        if w8 is None:
            raise SlimquantError("network.act_bits 8 pairs with 8-bit weights: add 8 to network.bit_candidates")
        if not any(a in (16, 32) for a in acts):
            out.remove(w8)
        out.append(Option("w8a8", w8.weight, QuantSpec("int8", Granularity.PER_TOKEN, None, True, dynamic=True)))
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from slimquant import api
    from slimquant.formats.atomic import write_file_atomic
    from slimquant.search.bits import _metric, bit_search
    from slimquant.search.config import call, captured_inputs, check_keys, read_general, read_register
    from slimquant.cli.tune_cmd import read_task
    from slimquant.types.flags import recipe_from_flags

    data = read_task(args.config)
    base_dir = Path(args.config).resolve().parent
    top = check_keys(data, TOP_KEYS, "(task file)", required=("general", "register", "nas"))
    if top.get("pipeline") not in (None, ["nas"], "nas"):
        raise SlimquantError(f"pipeline {top['pipeline']!r}: slimquant runs the nas step only ([nas])")
    general = read_general(top["general"], base_dir)
    logging.getLogger("slimquant").setLevel(general.log_level.upper())
    reg = read_register(top["register"], base_dir)
    s = read_search(top["nas"], reg.where, general.timeout)
    options = options_from(s["hyper"])
    base = None
    if s["base"] is not None:
        if not isinstance(s["base"], str):
            raise SlimquantError("nas.search_space.base is a string of msModelSlim flags, e.g. \"--w_method gptq\"")
        try:
            base = recipe_from_flags(s["base"])
        except SlimquantError as e:
            raise type(e)(f"nas.search_space.base: {e}") from None
        # only the weight step and the plan knobs (disable_names, disable_last_linear) of the base apply
        import dataclasses

        base = dataclasses.replace(base, input=None, kv=None, fa=None, steps=(base.weight_step,))
    if s["hardware"] == "cuda" and not torch.cuda.is_available():
        raise SlimquantError("nas.evaluator.device_evaluator.hardware cuda: no CUDA device is available here")

    model = call(reg.network, "script_network", reg.where["script_network"], **s["net_kw"])
    if not isinstance(model, nn.Module):
        raise SlimquantError(f"script_network {reg.where['script_network']} returned {type(model).__name__}, not an "
                             "nn.Module")  # fmt: skip
    model.eval()
    if s["hardware"] == "cuda":
        model = model.cuda()
    example = None
    if reg.inputs:
        example = call(reg.inputs[0], "script_network_input", reg.where["script_network_input"], **s["net_kw"])
    calib = None
    if reg.correct is not None:
        calib = captured_inputs(model, reg.correct, reg.where["ori_correct_func"], **s["calib_kw"])
        keep = max(1, math.ceil(len(calib) * s["portion"]))
        log.info("calibration: %d of %d model call(s) recorded from %s (calib_portion %g)", keep, len(calib),
                 reg.where["ori_correct_func"], s["portion"])  # fmt: skip
        calib = calib[:keep]
    elif example is not None:
        calib = [example]
        log.info("calibration: the example input of script_network_input (register ori_correct_func for more)")
    evaluate = reg.evaluate
    assert evaluate is not None

    metric_name = s["metric_name"]

    def eval_fn(m: nn.Module) -> Any:
        value = call(evaluate, "ori_eval_func", reg.where["ori_eval_func"], m, **s["eval_kw"])
        if isinstance(value, dict) and metric_name in value:  # a dict of metrics: the one metric_name names
            return value[metric_name]
        return value

    out = general.output
    config = s["config"]
    res = bit_search(model, eval_fn, options, calib_data=calib, config=config, base=base, example_input=example,
                     work_dir=out)  # fmt: skip
    res.save(out)
    if res.best is None or res.recipe is None:
        print(f"every evaluation failed; see {out / 'history.jsonl'} and {out / 'pareto.md'}")
        return 1
    recipe = res.recipe
    write_file_atomic(out / "best_recipe.yaml", recipe.to_yaml())
    quantized = api.quantize(copy.deepcopy(model), recipe, calib_data=calib if recipe.needs_calibration else None)
    api.save(quantized, out / "best", overwrite=True)
    try:
        real_text = f"{_metric(eval_fn(quantized.model)):.6g}"
    except Exception as ex:  # noqa: BLE001 - the checkpoint is saved; say what failed instead of losing the summary
        log.error("evaluating the saved checkpoint %s failed: %s: %s", out / "best", type(ex).__name__, ex)
        real_text = f"its evaluation failed ({type(ex).__name__})"
    name = metric_name
    counts = {o: sum(1 for v in res.best.choice.values() if v == o) for o in res.options}
    mix = ", ".join(f"{n} x {o}" for o, n in counts.items() if n)
    print(f"best: evaluation #{res.best.index + 1} of {len(res.history)}: {name} {res.best.accuracy:.6g} (float "
          f"{res.baseline.accuracy:.6g}; the saved checkpoint: {real_text}), {res.best.compress_ratio:.1f}% of "
          f"the float32 bytes saved" + (f", latency {res.best.latency:.1f} ms (float {res.baseline.latency:.1f})"
                                        if res.best.latency is not None and res.baseline.latency is not None else "")
          + f"; layers: {mix}")  # fmt: skip
    print(f"outputs: {out / 'best_recipe.yaml'}, {out / 'best'}, {out / 'history.jsonl'}, {out / 'pareto.md'}, "
          f"{out / 'pareto.png'}, {out / 'bits.md'}")  # fmt: skip
    if res.unmet:
        print("thresholds not met by any configuration: " + "; ".join(res.unmet))
        return 3
    return 0
