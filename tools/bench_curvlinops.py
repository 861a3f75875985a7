#!/usr/bin/env python3
"""The curvlinops 3.0.1 baseline of ``examples/bench.rs`` on identical inputs.

First write the inputs with the Rust benchmark::

    cargo run --release --example bench -- --workload mlp --write-inputs /tmp/bench

then time curvlinops on them::

    python tools/bench_curvlinops.py /tmp/bench/mlp [--runs 5] [--device cuda|cpu]

The directory holds ``model.json`` (ekfac's model format), ``weights.safetensors``
(``state_dict`` names, F32), ``data.safetensors`` (``x`` F32, ``y`` I64) and
``bench.json`` (batch size, options and the benchmark's analytic FLOP counts, so the
GFLOP/s columns use the same counts as the Rust table).

Per run, on CUDA when available (else CPU), in float32, with the options of
``bench.json`` (cross-entropy mean, MC with one sample, expand, separate bias):

- ``factors``: ``EKFACLinearOperator.compute_kronecker_factors()``;
- ``eigendecomposition``: ``_compute_eigenvectors()`` (``torch.linalg.eigh`` per factor);
- ``correction``: ``compute_eigenvalue_correction()``;
- products ``K @ V`` (``KFACLinearOperator``, factors computed beforehand, not timed)
  and ``E @ V`` with ``V`` of 1 and 16 columns.

Each phase is bracketed by ``torch.cuda.synchronize()`` on CUDA. One warm-up run is
not counted; the table shows medians. Peak memory is
``torch.cuda.max_memory_allocated`` (CUDA only). MC samples come from torch's
generator, so the sampled labels differ from ekfac's (same distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from safetensors.torch import load_file
from torch import nn


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list) else (value, value)


def build_model(spec: Dict[str, Any]) -> nn.Sequential:
    """The ``torch.nn.Sequential`` described by an ekfac ``model.json``.

    Linear and Conv2d entries must be named by their index in the Sequential (as
    ``examples/bench.rs`` and ``tools/export_torch.py`` write them), so the
    ``state_dict`` keys match.
    """
    modules: List[nn.Module] = []
    for i, layer in enumerate(spec["layers"]):
        kind = layer["type"]
        if kind in ("linear", "conv2d") and layer.get("name", str(i)) != str(i):
            raise ValueError(
                f"layers[{i}] ({kind}): name {layer['name']!r} is not its index {i}"
            )
        if kind == "linear":
            modules.append(
                nn.Linear(
                    layer["in_features"], layer["out_features"], bias=layer.get("bias", True)
                )
            )
        elif kind == "conv2d":
            modules.append(
                nn.Conv2d(
                    layer["in_channels"],
                    layer["out_channels"],
                    _pair(layer["kernel_size"]),
                    stride=_pair(layer.get("stride", 1)),
                    padding=_pair(layer.get("padding", 0)),
                    dilation=_pair(layer.get("dilation", 1)),
                    groups=layer.get("groups", 1),
                    bias=layer.get("bias", True),
                )
            )
        elif kind in ("relu", "sigmoid", "tanh", "flatten"):
            modules.append(
                {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "flatten": nn.Flatten}[
                    kind
                ]()
            )
        elif kind in ("max_pool2d", "avg_pool2d"):
            k = _pair(layer["kernel_size"])
            stride = _pair(layer.get("stride", layer["kernel_size"]))
            padding = _pair(layer.get("padding", 0))
            pool = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
            modules.append(pool(k, stride=stride, padding=padding))
        else:
            raise ValueError(f"layers[{i}]: unknown layer type {kind!r}")
    return nn.Sequential(*modules)


def _median_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", help="a directory written by bench --write-inputs")
    parser.add_argument("--runs", type=int, default=5, help="counted runs (default 5)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    with open(os.path.join(args.inputs, "model.json")) as f:
        spec = json.load(f)
    with open(os.path.join(args.inputs, "bench.json")) as f:
        bench = json.load(f)
    model = build_model(spec)
    model.load_state_dict(load_file(os.path.join(args.inputs, "weights.safetensors")))
    model = model.to(device).eval()
    tensors = load_file(os.path.join(args.inputs, "data.safetensors"))
    x, y = tensors["x"].to(device), tensors["y"].to(device)
    if bench["loss"] != "cross_entropy":
        raise ValueError(f"bench.json: expected loss cross_entropy, found {bench['loss']!r}")
    b = bench["batch_size"]
    data = [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]
    params = [p for p in model.parameters() if p.requires_grad]
    loss_func = nn.CrossEntropyLoss(reduction=bench["reduction"])
    options = dict(
        fisher_type=bench["fisher_type"],
        mc_samples=bench["mc_samples"],
        kfac_approx=bench["kfac_approx"],
        separate_weight_and_bias=bench["separate_weight_and_bias"],
        check_deterministic=False,
        progressbar=False,
    )
    num_params = sum(p.numel() for p in params)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(f: Callable[[], Any]) -> float:
        sync()
        start = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - start

    generator = torch.Generator(device="cpu").manual_seed(1)
    vectors = {
        k: torch.randn(num_params, k, generator=generator).to(device) for k in (1, 16)
    }

    def run_once() -> Dict[str, float]:
        t: Dict[str, float] = {}
        E = EKFACLinearOperator(model, loss_func, params, data, **options)
        t["factors"] = timed(E.compute_kronecker_factors)
        t["eigendecomposition"] = timed(E._compute_eigenvectors)
        t["correction"] = timed(E.compute_eigenvalue_correction)
        t["fit total"] = t["factors"] + t["eigendecomposition"] + t["correction"]
        K = KFACLinearOperator(model, loss_func, params, data, **options)
        K.compute_kronecker_factors()
        for name, op in (("KFAC", K), ("EKFAC", E)):
            for k, v in vectors.items():
                t[f"{name} product K={k}"] = timed(lambda: op @ v)
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    print(f"curvlinops baseline on {name}, torch {torch.__version__}")
    print(
        f"\nworkload {bench['workload']}: {bench['description']}\n"
        f"  N = {bench['num_data']}, batch {b}, {num_params} parameters; fisher "
        f"{bench['fisher_type']} ({bench['mc_samples']} sample), {bench['loss']} "
        f"{bench['reduction']}, {bench['kfac_approx']}, separate bias: "
        f"{bench['separate_weight_and_bias']}; median of {args.runs} run(s) after 1 "
        "warm-up run"
    )
    warmup = run_once()
    runs = [run_once() for _ in range(args.runs)]
    flops = bench["flops"]
    counts = {
        "factors": flops["factors"],
        "eigendecomposition": flops["eigendecomposition"],
        "correction": flops["correction"],
    }
    for name in ("KFAC", "EKFAC"):
        for k in vectors:
            counts[f"{name} product K={k}"] = flops["product_per_column"] * k
    print(f"  {'phase':<22} {'median ms':>11} {'GFLOP':>10} {'GFLOP/s':>9}")
    for phase in runs[0]:
        ms = _median_ms([r[phase] for r in runs])
        if phase in counts:
            gflop = counts[phase] / 1e9
            print(f"  {phase:<22} {ms:>11.2f} {gflop:>10.4f} {gflop / (ms * 1e-3):>9.2f}")
        else:
            print(f"  {phase:<22} {ms:>11.2f} {'-':>10} {'-':>9}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"  peak CUDA memory (torch allocator, data included): {peak:.2f} MiB")
    print(
        f"  warm-up run: fit {warmup['fit total'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
