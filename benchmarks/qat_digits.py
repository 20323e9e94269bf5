"""QAT benchmark on scikit-learn's bundled digits (8x8 images, no download): a small CNN trained here in float,
then post-training quantization vs quantization-aware training (SimQAT observer ranges, LSQ, LSQ+) at W8A8,
W4A8 and W4A4, and SLB at W2A8 / W1A8 (binary weights), every layer quantized (the convolutions' and the
Linears' inputs too; BN folded, except under SLB).

Usage:
    python benchmarks/qat_digits.py            # writes the qat-digits section of BENCHMARKS.md and a PNG
    python benchmarks/qat_digits.py --quick    # fewer epochs; prints only

Protocol (fixed seeds): digits split 80/20 stratified (seed 0); for each of ``SEEDS`` the CNN (conv 1->4, BN,
ReLU; conv 4->8, BN, ReLU, 2x2 max-pool; conv 8->8, BN, ReLU; Linear 128->16, ReLU; Linear 16->10) trains
``FLOAT_EPOCHS`` epochs (Adam, lr 1e-3, batch 64) from that seed; the tables average over the seeds. PTQ = :func:`slimquant.prepare_qat` with ``calib_data`` (8 training
batches: min / max input ranges, RTN weights, BN folded with its running statistics) and :func:`slimquant.convert`
without training. QAT = the same start, then ``QAT_EPOCHS`` epochs of SGD (momentum 0.9, lr ``QAT_LR``, cosine
decay to 0, batch 64) on the training split, BN statistics frozen after half the steps, observer ranges (SimQAT)
frozen after 3/4; then convert. Accuracy is on the held-out 20%: the fake-quantized model's (before convert) and
the converted (deploy-mode) model's, and the converted model saved and reloaded with :func:`slimquant.load`.
Weights: symmetric per-channel int8 / int4; inputs: per-tensor static, asymmetric int8 / uint4 (LSQ+: weights
asymmetric uint4 / uint8 with learned zero points).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import weight_only as wo  # noqa: E402

FLOAT_EPOCHS, QAT_EPOCHS, QAT_LR, BATCH = 40, 15, 0.01, 64
SEEDS = (0, 1, 2)  # float model init + data order; the table averages over them
METHODS = ("PTQ", "QAT observer (SimQAT)", "QAT lsq", "QAT lsq+")
SCHEMES = {  # name: (weight qtype, input qtype, methods)
    "W8A8": ("int8", "int8", METHODS),
    "W4A8": ("int4", "int8", METHODS),
    "W4A4": ("int4", "uint4", METHODS),
    "W2A8": ("int2", "int8", ("PTQ", "QAT observer (SimQAT)", "QAT lsq", "QAT slb")),
    "W1A8": ("int2", "int8", ("PTQ binary", "QAT slb binary")),  # {-1, +1} weights, stored on the int2 grid
}
PLOT = HERE / "out" / "qat_digits.png"


class DigitsCNN(nn.Module):
    """Small on purpose (about 3k parameters): a wide network shrugs off 4-bit quantization of this easy task, so
    nothing would separate PTQ from QAT."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def batches(x: torch.Tensor, y: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[perm[i : i + BATCH]], y[perm[i : i + BATCH]]) for i in range(0, len(y), BATCH)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(-1)
    return float((pred == y).float().mean()) * 100, pred


def train_float(xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(xtr, ytr, 1000 * seed + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def finetune(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, seed: int) -> None:
    """QAT's training schedule (SGD momentum 0.9, lr QAT_LR with cosine decay to 0), in place."""
    steps = len(batches(xtr, ytr, 0)) * epochs
    opt = torch.optim.SGD(model.parameters(), lr=QAT_LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(xtr, ytr, 1000 * seed + 100 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()


def recipe(scheme: str, method: str, steps: int):  # noqa: ANN201
    import slimquant as sq
    from slimquant import QuantSpec, Recipe

    wq, iq, _ = SCHEMES[scheme]
    ranges = {"PTQ": "observer", "QAT observer (SimQAT)": "observer", "QAT lsq": "lsq", "QAT lsq+": "lsq+",
              "QAT slb": "slb", "PTQ binary": "slb", "QAT slb binary": "slb"}[method]  # fmt: skip
    if ranges == "lsq+":
        weight = QuantSpec(wq.replace("int", "uint"), "per_channel", symmetric=False)
    else:
        weight = QuantSpec(wq, "per_channel")
    inp = QuantSpec(iq, "per_tensor", symmetric=False)
    if ranges == "slb":  # BN stays after its convolution; the temperature reaches its end at 3/4 of the steps, so
        # the last quarter trains at the final temperature while the learning rate is still nonzero
        step = sq.QAT(ranges="slb", fold_bn=False, slb_binary="binary" in method,
                      slb_anneal_steps=max(3 * steps // 4, 1), freeze_observers_after=max(3 * steps // 4, 1))  # fmt: skip
    else:
        step = sq.QAT(ranges=ranges, freeze_bn_after=max(steps // 2, 1), freeze_observers_after=max(3 * steps // 4, 1))
    return Recipe(weight=weight, input=inp, steps=(step,), disable_last_linear=False)


def run(float_model: DigitsCNN, data, scheme: str, method: str, epochs: int, seed: int) -> dict:  # noqa: ANN001
    import slimquant as sq

    xtr, ytr, xte, yte = data
    per_epoch = len(batches(xtr, ytr, 0))
    steps = per_epoch * epochs
    model = copy.deepcopy(float_model)
    calib = [xb for xb, _ in batches(xtr, ytr, 1000)[:8]]
    sq.prepare_qat(model, recipe(scheme, method, steps), calib_data=calib, show_progress=False)
    t0 = time.perf_counter()
    if not method.startswith("PTQ"):
        finetune(model, xtr, ytr, epochs, seed)
    seconds = time.perf_counter() - t0
    fake_acc, fake_pred = accuracy(model, xte, yte)
    result = sq.convert(model)
    deploy_acc, deploy_pred = accuracy(result.model, xte, yte)
    with tempfile.TemporaryDirectory() as tmp:
        sq.save(result, Path(tmp) / "ckpt")
        loaded = sq.load(Path(tmp) / "ckpt", model=DigitsCNN()).model
        loaded_acc, loaded_pred = accuracy(loaded, xte, yte)
    return {"fake": fake_acc, "deploy": deploy_acc, "loaded": loaded_acc, "seconds": seconds,
            "same_preds": int((fake_pred == deploy_pred).sum()), "loaded_same": bool(torch.equal(loaded_pred, deploy_pred)),
            "n": len(yte)}  # fmt: skip


def plot(float_acc: float, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4))
    kinds = ["PTQ", "QAT observer (SimQAT)", "QAT lsq", "QAT lsq+", "QAT slb"]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs, ys = [], []
        for j, (scheme, (_, _, methods)) in enumerate(SCHEMES.items()):
            m = next((m for m in methods if m.replace(" binary", "") == kind), None)
            if m is not None:
                xs.append(j + i * width)
                ys.append(res[(scheme, m)]["deploy"])
        ax.bar(xs, ys, width, label=kind)
    ax.axhline(float_acc, color="k", linestyle="--", label=f"float {float_acc:.1f}%")
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(SCHEMES))], list(SCHEMES))
    ax.set_ylabel("test accuracy (%), deploy-mode model")
    lo = min(min(r["deploy"] for r in res.values()), float_acc) - 5
    ax.set_ylim(max(lo, 0), 100)
    ax.set_title("digits CNN: PTQ vs QAT (every layer quantized)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs; prints only")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    data = digits()
    xtr, ytr, xte, yte = data
    float_epochs, qat_epochs = (8, 3) if args.quick else (FLOAT_EPOCHS, QAT_EPOCHS)
    seeds = SEEDS[:1] if args.quick else SEEDS
    floats, controls, runs = [], [], {}
    for seed in seeds:
        model = train_float(xtr, ytr, float_epochs, seed)
        floats.append(accuracy(model, xte, yte)[0])
        control = copy.deepcopy(model)  # float trained on with QAT's schedule: what the extra epochs alone give
        finetune(control, xtr, ytr, qat_epochs, seed)
        controls.append(accuracy(control, xte, yte)[0])
        print(f"seed {seed}: float {floats[-1]:.2f}%, float + {qat_epochs} epochs of QAT's schedule "
              f"{controls[-1]:.2f}% ({len(yte)} test images)", flush=True)
        for scheme, (_, _, methods) in SCHEMES.items():
            for method in methods:
                runs[(scheme, method, seed)] = r = run(model, data, scheme, method, qat_epochs, seed)
                print(f"  {scheme} {method}: fake-quant {r['fake']:.2f}%, deploy {r['deploy']:.2f}%, reloaded "
                      f"{r['loaded']:.2f}%, {r['seconds']:.1f} s", flush=True)
    res = {(sc, me): {k: (sum(runs[(sc, me, s)][k] for s in seeds) / len(seeds) if k != "loaded_same" else
                          all(runs[(sc, me, s)][k] for s in seeds))
                      for k in runs[(sc, me, seeds[0])]}
           for sc, (_, _, methods) in SCHEMES.items() for me in methods}  # fmt: skip
    for key in res:
        res[key]["same_preds"] = sum(runs[(*key, s)]["same_preds"] for s in seeds)
        res[key]["n"] = sum(runs[(*key, s)]["n"] for s in seeds)
        res[key]["per_seed"] = [runs[(*key, s)]["deploy"] for s in seeds]
    float_acc, control_acc = sum(floats) / len(floats), sum(controls) / len(controls)
    report = render(float_acc, control_acc, res, len(xtr), len(yte), float_epochs, qat_epochs,
                    time.perf_counter() - t_start, floats, len(seeds))  # fmt: skip
    print(report)
    if not args.quick:
        plot(float_acc, res)
        wo.write_section(report, "qat-digits")


def render(float_acc: float, control_acc: float, res: dict, ntr: int, nte: int, fe: int, qe: int,
           elapsed: float, floats: list[float], nseeds: int) -> str:  # fmt: skip
    rows = ["| scheme | method | fake-quant acc % | deploy acc % (per seed) | reloaded acc % | deploy = fake-quant "
            "predictions | vs float (points) | train s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (scheme, method), r in res.items():
        per = ", ".join(f"{a:.1f}" for a in r["per_seed"])
        rows.append(f"| {scheme} | {method} | {r['fake']:.2f} | {r['deploy']:.2f} ({per}) | {r['loaded']:.2f} | "
                    f"{r['same_preds']}/{r['n']} | {r['deploy'] - float_acc:+.2f} | {r['seconds']:.1f} |")  # fmt: skip
    lines = []
    for scheme, (_, _, methods) in SCHEMES.items():
        ptq = res[(scheme, methods[0])]["deploy"]
        best_m = max(methods[1:], key=lambda m: res[(scheme, m)]["deploy"])
        best = res[(scheme, best_m)]["deploy"]
        lost = float_acc - ptq
        recovered = (best - ptq) / lost if lost > 0 else float("nan")
        lines.append(f"- {scheme}: PTQ {ptq:.2f}% ({ptq - float_acc:+.2f}), best QAT ({best_m}) {best:.2f}% "
                     f"({best - float_acc:+.2f}); QAT recovers {recovered:.0%} of what PTQ loses" if lost > 0 else
                     f"- {scheme}: PTQ {ptq:.2f}% ({ptq - float_acc:+.2f}: loses nothing), best QAT ({best_m}) "
                     f"{best:.2f}% ({best - float_acc:+.2f})")  # fmt: skip
    return "\n".join([
        "## QAT on a digits CNN (issue 15): PTQ vs SimQAT / LSQ / LSQ+ at W8A8, W4A8, W4A4; SLB at W2A8 / W1A8",
        "",
        f"Command: `.venv/bin/python benchmarks/qat_digits.py`. Machine: {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, torch {torch.__version__}, 2 threads; {elapsed / 60:.1f} min. scikit-learn's "
        f"digits, {ntr} training / {nte} test images (stratified 80/20 split, seed 0). The CNN (3 conv + BN, "
        f"2 Linear, {sum(p.numel() for p in DigitsCNN().parameters())} parameters) trains {fe} epochs in float; "
        f"QAT trains {qe} epochs from it (SGD momentum 0.9, lr {QAT_LR}, cosine to 0, BN frozen after half the "
        "steps, observed ranges after 3/4). Every layer is quantized, inputs included (the image into the first "
        "convolution too), BN folded into its convolution (SLB: BN kept after it, float; the temperature anneals "
        "1 -> 0.01 over the first 3/4 of the steps). PTQ = the same quantizers calibrated on 8 training batches (min / max) "
        "without training (*PTQ binary*: SLB's starting point, sign(w) times the channel's mean |w|, no training). *deploy* = after `slimquant.convert` (integer weights, stored input "
        "scales / zero points); *reloaded* = that model saved (`slimquant.save`, msmodelslim layout) and "
        "loaded into a fresh `DigitsCNN()` (`slimquant.load(dir, model=...)`). Plot: `benchmarks/out/qat_digits.png`.",
        "",
        f"Every number is the mean over {nseeds} seeds (each its own float model and data order). Float accuracy: "
        f"**{float_acc:.2f}%** ({', '.join(f'{a:.2f}' for a in floats)}); the float models trained {qe} more "
        f"epochs on QAT's schedule (a control: what the extra training alone gives): {control_acc:.2f}%. One test "
        f"image is {100 / nte:.2f} points.",
        "",
        *rows,
        "",
        *lines,
    ])


if __name__ == "__main__":
    main()
