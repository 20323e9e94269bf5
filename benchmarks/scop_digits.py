"""SCOP structured pruning benchmark (issue 15, item 4) on scikit-learn's bundled digits with qat_digits.py's CNN.

Usage:
    python benchmarks/scop_digits.py            # writes the scop-digits section of BENCHMARKS.md and a PNG
    python benchmarks/scop_digits.py --quick    # one seed, fewer epochs; prints only

Protocol (fixed seeds, qat_digits.py's split, float training and fine-tuning schedule): for each seed the float
CNN trains; SCOP = :func:`slimquant.prepare_scop` (knockoffs: the batch shuffled), ``KF_EPOCHS`` epochs of Adam
(lr ``KF_LR``) on the knockoff mixes only with the task's cross-entropy, then :func:`slimquant.prune_scop` at 30% and
50% of every convolution's output channels (each conv's channel count times the rate, rounded down), accuracy
without fine-tuning and after ``FT_EPOCHS`` epochs of fine-tuning (qat_digits.py's SGD schedule). The control
prunes the same number of channels by the BatchNorm scale alone (``|gamma|``, network slimming's criterion) with
the same surgery and fine-tuning. Every SCOP-pruned model is saved (``PruneResult.save``) and reloaded
(:func:`slimquant.load_pruned` into a fresh CNN): its predictions must equal the in-memory model's. Last, the
fine-tuned 50% SCOP model is quantized (W8A8 post-training: int8 per-channel weights, int8 static inputs, BN
folded; :func:`slimquant.prepare_qat` with calibration batches, then :func:`slimquant.convert`) to show pruning
composes with quantization.
"""

from __future__ import annotations

import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import qat_digits as qd  # noqa: E402
import weight_only as wo  # noqa: E402

RATES = (0.3, 0.5)
KF_EPOCHS, KF_LR, FT_EPOCHS = 5, 0.005, 15  # a small lr: with 0.05 every mix saturates at 1 and the score is |gamma| alone
PLOT = HERE / "out" / "scop_digits.png"


def kf_train(scop: torch.nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)  # the knockoff permutations
    opt = torch.optim.Adam(scop.kf_parameters(), lr=KF_LR)
    for epoch in range(epochs):
        scop.train()
        for xb, yb in qd.batches(xtr, ytr, 1000 * seed + 500 + epoch):
            opt.zero_grad()
            F.cross_entropy(scop(xb), yb).backward()
            opt.step()


def gamma_prune(model: torch.nn.Module, example: torch.Tensor, rate: float):  # noqa: ANN201
    """The control: keep each convolution's channels with the largest BatchNorm |gamma| (same counts as SCOP)."""
    from slimquant.pipeline.prune import pruned_count
    from slimquant.surgery.prune import channel_groups, shrink_channels

    groups, _ = channel_groups(model, example)
    for g in groups.values():
        gamma = model.get_submodule(g.bn).weight.detach().abs()
        keep = torch.argsort(gamma, descending=True, stable=True)[: g.channels - pruned_count(rate, g.channels)]
        shrink_channels(model, g, keep.sort().values)
    return model


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_seed(seed: int, data, fe: int, kfe: int, fte: int) -> dict:  # noqa: ANN001
    import slimquant as sq

    xtr, ytr, xte, yte = data
    float_model = qd.train_float(xtr, ytr, fe, seed)
    out: dict = {"float": qd.accuracy(float_model, xte, yte)[0], "float_params": params(float_model)}
    example = xtr[:2]
    for rate in RATES:
        scop = sq.prepare_scop(copy.deepcopy(float_model), example)
        t0 = time.perf_counter()
        kf_train(scop, xtr, ytr, kfe, seed)
        res = sq.prune_scop(scop, rate)
        model = res.model.eval()
        row = {"params": res.params_after, "kf_s": time.perf_counter() - t0,
               "no_ft": qd.accuracy(model, xte, yte)[0]}  # fmt: skip
        qd.finetune(model, xtr, ytr, fte, seed)
        acc, pred = qd.accuracy(model, xte, yte)
        row["ft"] = acc
        with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
            res.save(Path(tmp) / "pruned")
            back = sq.load_pruned(Path(tmp) / "pruned", qd.DigitsCNN(), example)
            row["reload_equal"] = bool(torch.equal(qd.accuracy(back, xte, yte)[1], pred))
        control = gamma_prune(copy.deepcopy(float_model), example, rate).eval()
        row["gamma_params"] = params(control)
        row["gamma_no_ft"] = qd.accuracy(control, xte, yte)[0]
        qd.finetune(control, xtr, ytr, fte, seed)
        row["gamma_ft"] = qd.accuracy(control, xte, yte)[0]
        if rate == max(RATES):  # prune, then quantize: W8A8 post-training on the pruned, fine-tuned model
            recipe = qd.recipe("W8A8", "PTQ", 1)
            calib = [xb for xb, _ in qd.batches(xtr, ytr, 7)[:8]]
            qmodel = sq.prepare_qat(copy.deepcopy(model), recipe, calib_data=calib, show_progress=False)
            row["w8a8"] = qd.accuracy(sq.convert(qmodel).model, xte, yte)[0]
        out[rate] = row
        print(f"seed {seed} rate {rate}: {row}", flush=True)
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def plot(res: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    fp = res[0]["float_params"]
    ax.scatter([fp], [mean([r["float"] for r in res])], marker="*", s=120, label="float", color="black")
    for key, label, marker in (("no_ft", "SCOP, no fine-tuning", "o"), ("ft", "SCOP + fine-tuning", "s"),
                               ("gamma_ft", "|gamma| + fine-tuning", "^")):  # fmt: skip
        pkey = "gamma_params" if key.startswith("gamma") else "params"
        ax.plot([res[0][r][pkey] for r in RATES], [mean([s[r][key] for s in res]) for r in RATES], marker=marker, label=label)
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SCOP on digits (30% / 50% of conv channels)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer epochs; prints only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    wo.OUT.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    data = qd.digits()
    seeds = qd.SEEDS[:1] if args.quick else qd.SEEDS
    fe, kfe, fte = (10, 2, 3) if args.quick else (qd.FLOAT_EPOCHS, KF_EPOCHS, FT_EPOCHS)
    res = [run_seed(s, data, fe, kfe, fte) for s in seeds]
    report = render(res, len(data[1]), len(data[3]), seeds, fe, kfe, fte, time.perf_counter() - t0)
    print(report)
    if not args.quick:
        plot(res)
        wo.write_section(report, "scop-digits")


def render(res: list[dict], ntr: int, nte: int, seeds, fe: int, kfe: int, fte: int, elapsed: float) -> str:  # noqa: ANN001
    lines = [
        "## SCOP structured pruning (issue 15) on digits",
        "",
        f"Command: `.venv/bin/python benchmarks/scop_digits.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}; {elapsed / 60:.1f} min. Plot: `benchmarks/out/scop_digits.png`.",
        "",
        f"qat_digits.py's CNN and split ({ntr} training / {nte} test images; float training {fe} epochs), seeds "
        f"{', '.join(map(str, seeds))}, accuracies averaged over them. SCOP: knockoff mixes trained {kfe} epochs (Adam "
        f"lr {KF_LR}, only the mixes; knockoffs = the batch shuffled), then each convolution's lowest-scoring channels "
        f"(score |gamma| * (2 beta - 1)) removed physically; fine-tuning: {fte} epochs of qat_digits.py's SGD schedule. "
        "Control: the same counts removed by |gamma| alone, same fine-tuning. *reload*: the saved pruned model loaded "
        "into a fresh CNN (`slimquant.load_pruned`) predicts exactly as the in-memory one (all seeds). *then W8A8*: "
        "the fine-tuned SCOP model quantized post-training (int8 weights per channel and static int8 inputs, BN folded).",
        "",
        "| model | parameters | accuracy, no fine-tuning | accuracy, fine-tuned | reload equal | then W8A8 |",
        "|---|---|---|---|---|---|",
        f"| float | {res[0]['float_params']} | {mean([r['float'] for r in res]):.2f} | - | - | - |",
    ]
    for rate in RATES:
        rows = [r[rate] for r in res]
        w8 = f"{mean([r['w8a8'] for r in rows]):.2f}" if "w8a8" in rows[0] else "-"
        lines.append(f"| SCOP {int(rate * 100)}% | {rows[0]['params']} | {mean([r['no_ft'] for r in rows]):.2f} | "
                     f"{mean([r['ft'] for r in rows]):.2f} | {all(r['reload_equal'] for r in rows)} | {w8} |")  # fmt: skip
        lines.append(f"| \\|gamma\\| {int(rate * 100)}% (control) | {rows[0]['gamma_params']} | "
                     f"{mean([r['gamma_no_ft'] for r in rows]):.2f} | {mean([r['gamma_ft'] for r in rows]):.2f} | - | - |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
