"""SparseGPT and Wanda (issue 16, item 3) on smollm2-135m: 50% unstructured and 2:4, alone (float weights) and with
W8A8 (dynamic, per-channel) / W4A16 (g64), beside the dense rows.

Usage:
    python benchmarks/sparsity.py            # writes the sparsity section of BENCHMARKS.md
    python benchmarks/sparsity.py --quick    # 1 evaluation window per text, three configs; prints only

Every config runs in its own process: load float, prune (and quantize) block by block on gptq.py's calibration
windows, save, reload from disk, evaluate on gptq.py's windows. The papers' anchors (Llama-2-7B, WikiText2): dense
5.12, SparseGPT 50% 6.51, Wanda 50% 6.42 (+27% / +25% perplexity).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import w8a8  # noqa: E402
import weight_only as wo  # noqa: E402

W8A8 = "--a_bit 8 --is_dynamic True --mm_tensor False"
W4 = "--w_bit 4 --group_size 64"
CONFIGS: dict[str, str] = {
    "SparseGPT 50%": "--w_bit 16 --sparsity 0.5",
    "Wanda 50%": "--w_bit 16 --sparsity 0.5 --sparse_method wanda",
    "SparseGPT 2:4": "--w_bit 16 --sparsity_pattern 2:4",
    "Wanda 2:4": "--w_bit 16 --sparsity_pattern 2:4 --sparse_method wanda",
    "W8A8 dynamic (dense)": W8A8,
    "SparseGPT 50% + W8A8 dynamic": f"{W8A8} --sparsity 0.5",
    "Wanda 50% + W8A8 dynamic": f"{W8A8} --sparsity 0.5 --sparse_method wanda",
    "W4A16 g64 GPTQ (dense)": f"{W4} --w_method gptq",
    "SparseGPT 2:4 + W4A16 g64": f"{W4} --sparsity_pattern 2:4",
    "Wanda 2:4 + W4A16 g64": f"{W4} --sparsity_pattern 2:4 --sparse_method wanda",
}
QUICK = {"SparseGPT 50%", "Wanda 50%", "SparseGPT 2:4 + W4A16 g64"}


def child_main(args) -> None:  # noqa: ANN001
    from slimquant.types.flags import recipe_from_flags

    def pruned(result) -> dict:  # noqa: ANN001
        rows = [r for r in result.report.layers if "sparsity" in r.details]
        return {"pruned_layers": len(rows), "sparsity": sum(r.details["sparsity"] for r in rows) / max(len(rows), 1)}

    wo.quantize_reload_eval(args, lambda: recipe_from_flags(CONFIGS[args.config]), w8a8.calibration, pruned)


def float_perplexity(ref: Path, windows_per_text: int) -> float:
    """The float model's perplexity on the evaluation windows, from the reference logits."""
    import slimquant as sq
    from safetensors import safe_open

    windows = wo.eval_windows(sq.load_model(wo.LLM).tokenizer, windows_per_text)
    nll, count = 0.0, 0
    with safe_open(str(ref), framework="pt") as f:
        for i, ids in enumerate(windows):
            nll += float(torch.nn.functional.cross_entropy(f.get_tensor(f"w{i}"), ids[1:], reduction="sum"))
            count += ids.numel() - 1
    return float(torch.exp(torch.tensor(nll / count)))


def render(rows: dict[str, dict], float_ppl: float, tokens: int, windows: int, elapsed: float) -> str:
    import transformers

    lines = [
        "## Sparsity (issue 16, item 3): SparseGPT and Wanda on smollm2-135m",
        "",
        f"Command: `.venv/bin/python benchmarks/sparsity.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; one run, "
        f"{elapsed / 60:.1f} min.",
        "",
        f"gptq.py's protocol: {len(corpus.EVAL_FILES) * windows} windows x {wo.SEQ_LEN} tokens of "
        f"{', '.join(corpus.EVAL_FILES)} ({tokens} predicted tokens; KL(float || pruned) per token; float perplexity "
        f"{float_ppl:.3f}); calibration {w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of "
        f"{', '.join(corpus.CALIB_FILES)}. Every linear of the 30 blocks is pruned (lm_head and embeddings are not), "
        "block by block on the pruned blocks' outputs; SparseGPT: dampening 0.01, blocks of 128 columns, quantized "
        "jointly where the row quantizes; Wanda: |W| x input-channel norm per row, no update, then round to "
        "nearest. *sparsity*: zeros per pruned layer, mean. Measured on the checkpoint reloaded from disk. The "
        "papers' Llama-2-7B anchors (WikiText2): dense 5.12, SparseGPT 50% 6.51 (+27%), Wanda 50% 6.42 (+25%); a "
        "135M model has far less redundancy.",
        "",
        "| config | flags | perplexity | vs float | KL/token | top-1 | sparsity | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        sp = f"{r['sparsity']:.3f}" if r["pruned_layers"] else "-"
        lines.append(f"| {name} | `{CONFIGS[name]}` | {r['perplexity']:.3f} | {100 * (r['perplexity'] / float_ppl - 1):+.1f}% | "
                     f"{r['kl']:.5f} | {r['top1']:.4f} | {sp} | {r['quantize_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    wo.benchmark_main(__doc__, "1 window per text, three configs; prints only", CONFIGS, QUICK, __file__, child_main,
                      lambda rows, ref, windows, elapsed: render(rows, float_perplexity(ref, windows),
                                                                 next(iter(rows.values()))["tokens"], windows, elapsed),
                      "sparsity")  # fmt: skip

if __name__ == "__main__":
    main()
