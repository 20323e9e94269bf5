"""``slimquant tune --config tune.yml``: accuracy-aware tuning of a user's model (Neural Compressor's autotune).

The task file has the AutoML seed's ``general`` and ``register`` sections (:mod:`slimquant.search.config`) and a
``tuning`` section::

    tuning:
      candidates: ["--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False", "--w_bit 8 --a_bit 8 --anti_method m1"]
      tolerable_loss: 0.01        # relative to the float model's metric
      max_trials: 100
      higher_is_better: true      # false for perplexity-like metrics
      fallback_levels: [1, 2, 3, 4, 5]
      network: {config: {...}, file_config: path}       # keyword arguments of script_network
      custom_calib: {config: {...}, file_config: path}  # ... of ori_correct_func
      custom_eval: {config: {...}, file_config: path, metric_name: top1}

Outputs in ``<local_base_path>/<task_id>/``: ``history.jsonl`` (every trial; a rerun resumes from it),
``best_recipe.yaml`` (loadable by ``slimquant quantize --recipe``), ``best/`` (the best checkpoint) and
``tune.md`` (the trials as a table).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from slimquant.errors import SlimquantError

log = logging.getLogger("slimquant.cli")

TOP_KEYS = ("general", "register", "tuning")
TUNING_KEYS = ("candidates", "tolerable_loss", "max_trials", "higher_is_better", "fallback_levels", "network",
               "custom_calib", "custom_eval")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="accuracy-aware tuning: the first candidate recipe within a tolerable loss",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, help="the task YAML (general, register, tuning)")
    p.set_defaults(func=run)


def read_task(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlimquantError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise SlimquantError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SlimquantError(f"{path}: the task file must be a mapping with general, register and tuning")
    return data


def run(args: argparse.Namespace) -> int:
    from slimquant import api
    from slimquant.formats.atomic import write_file_atomic
    from slimquant.search.config import call, captured_inputs, check_keys, function_block, read_general, read_register
    from slimquant.search.tune import TuningConfig, autotune
    from torch import nn

    data = read_task(args.config)
    base = Path(args.config).resolve().parent
    top = check_keys(data, TOP_KEYS, "(task file)", required=("general", "register", "tuning"))
    general = read_general(top["general"], base)
    logging.getLogger("slimquant").setLevel(general.log_level.upper())
    t = check_keys(top["tuning"], TUNING_KEYS, "tuning", required=("candidates",))
    if not isinstance(t["candidates"], list) or not all(isinstance(c, str) for c in t["candidates"]):
        raise SlimquantError("tuning.candidates must be a list of msModelSlim flag strings")
    try:
        config = TuningConfig(t["candidates"], tolerable_loss=t.get("tolerable_loss", 0.01),
                              max_trials=t.get("max_trials", 100), higher_is_better=t.get("higher_is_better", True),
                              fallback_levels=t.get("fallback_levels", (1, 2, 3, 4, 5)), timeout=general.timeout)  # fmt: skip
    except SlimquantError as e:
        raise type(e)(f"tuning: {e}") from None
    reg = read_register(top["register"], base)
    net_kw = function_block(t.get("network"), "tuning.network", reg.where.get("script_network"))
    calib_kw = function_block(t.get("custom_calib"), "tuning.custom_calib", reg.where.get("ori_correct_func"))
    eval_kw = function_block(t.get("custom_eval"), "tuning.custom_eval", reg.where.get("ori_eval_func"))
    metric_name = str((t.get("custom_eval") or {}).get("metric_name", "metric"))

    model = call(reg.network, "script_network", reg.where["script_network"], **net_kw)
    if not isinstance(model, nn.Module):
        raise SlimquantError(f"script_network {reg.where['script_network']} returned {type(model).__name__}, not an "
                             "nn.Module")  # fmt: skip
    model.eval()
    calib = None
    if reg.correct is not None:
        calib = captured_inputs(model, reg.correct, reg.where["ori_correct_func"], **calib_kw)
        log.info("calibration: %d model call(s) recorded from %s", len(calib), reg.where["ori_correct_func"])
    elif reg.inputs:
        calib = [call(f, "script_network_input", reg.where["script_network_input"], **net_kw) for f in reg.inputs]
        log.info("calibration: the %d example input(s) of script_network_input (register ori_correct_func for more)",
                 len(calib))  # fmt: skip
    evaluate = reg.evaluate
    assert evaluate is not None

    def eval_fn(m: nn.Module) -> Any:
        return call(evaluate, "ori_eval_func", reg.where["ori_eval_func"], m, **eval_kw)

    def show(trial: Any, table: str) -> None:
        print(table, flush=True)

    out = general.output
    res = autotune(model, config, eval_fn, calib_data=calib, work_dir=out, on_trial=show)
    lines = ["| trial | candidate | level | metric | passed | s | error |", "|---|---|---|---|---|---|---|"]
    for tr in res.history:
        metric = "" if tr.metric is None else f"{tr.metric:.6g}"
        lines.append(f"| {tr.index + 1} | {tr.label} | L{tr.level} | {metric} | {'yes' if tr.passed else 'no'} | "
                     f"{tr.seconds:.1f} | {tr.error or ''} |")  # fmt: skip
    lines[0] = lines[0].replace("| metric |", f"| {metric_name} |")
    summary = (f"# Tuning {out.name}\n\n{metric_name}: baseline (float) {res.baseline:.6g}, target {res.target:.6g} "
               f"({'higher' if config.higher_is_better else 'lower'} is better, tolerable loss {config.tolerable_loss:g})"
               f"\n\n" + "\n".join(lines) + "\n")  # fmt: skip
    write_file_atomic(out / "tune.md", summary)
    if res.result is None:
        print(f"every trial failed; see {out / 'history.jsonl'}")
        return 1
    write_file_atomic(out / "best_recipe.yaml", res.result.recipe.to_yaml())
    api.save(res.result, out / "best", overwrite=True)
    assert res.best is not None and res.best.metric is not None
    verdict = "meets" if res.passed else "does NOT meet"
    print(f"best: {res.best.name}: {res.best.metric:.6g} {verdict} the target {res.target:.6g} (float {res.baseline:.6g}) "
          f"after {len(res.history)} trial(s); {out / 'best_recipe.yaml'}, {out / 'best'}, {out / 'history.jsonl'}")  # fmt: skip
    return 0 if res.passed else 3
