"""llm-compressor's GPTQModifier on a float Hugging Face checkpoint, for benchmarks/gptq.py.

Runs inside its own virtual environment (benchmarks/gptq.py creates it: llm-compressor pins its own
transformers), so it imports neither slimquant nor the other benchmark modules.

    llmc-venv/bin/python benchmarks/llmc_gptq.py --model DIR --calib windows.safetensors --out DIR [--actorder]
        [--compressed_out DIR]

Calibrates on exactly the given token windows (``input_ids`` [N, L] in a safetensors file, no shuffling), then
writes the quantized-dequantized weights (each quantized Linear's weight passed through compressed-tensors'
own fake quantization with the scales GPTQ chose) as a plain float checkpoint that the caller evaluates with
its own code (and with ``--compressed_out`` llm-compressor's own compressed checkpoint, for
benchmarks/llmc_import.py). Prints one JSON line: quantize seconds (``oneshot`` only), peak RSS, versions.
"""

from __future__ import annotations

import argparse
import json
import time


def peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--actorder", action="store_true", help="static activation ordering (else none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compressed_out", default=None,
                    help="also write llm-compressor's own compressed checkpoint (save_compressed=True) here")
    a = ap.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ids = load_file(a.calib)["input_ids"]
    n, length = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    actorder = "static" if a.actorder else None
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=a.group,
                               actorder=actorder)  # fmt: skip
    # actorder also at the modifier level: its default ("static") overrides a scheme's None
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder=actorder)  # fmt: skip
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=length,
            shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    # the weights the quantized model computes with, as plain float tensors
    deq: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
                continue
            deq[f"{name}.weight"] = forward_quantize(m, m.weight, "weight", scheme.weights).detach().clone()
    if a.compressed_out:  # what llm-compressor users ship: compressed-tensors pack-quantized
        model.save_pretrained(a.compressed_out, save_compressed=True)
        tok.save_pretrained(a.compressed_out)
    float_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    missing = [k for k in deq if k not in float_model.state_dict()]
    if missing or not deq:
        raise SystemExit(f"unexpected quantized module names: {missing[:3]} (of {len(deq)})")
    float_model.load_state_dict(deq, strict=False)
    float_model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"quantize_s": seconds, "peak_rss_quantize_mib": peak_rss_mib(), "quantized_layers": len(deq),
                      "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                      "transformers": transformers.__version__, "torch": torch.__version__}))  # fmt: skip


if __name__ == "__main__":
    main()
