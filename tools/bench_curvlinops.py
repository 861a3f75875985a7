#!/usr/bin/env python3
"""The curvlinops 3.0.1 baseline of ``examples/bench.rs`` on identical inputs.

First write the inputs with the Rust benchmark::

    cargo run --release --example bench -- --workload mlp --write-inputs /tmp/bench

then time curvlinops on them::

    python tools/bench_curvlinops.py /tmp/bench/mlp [--runs 5] [--device cuda|cpu]

The directory holds ``model.json`` (ekfac's model format, chain or graph: the module is
rebuilt by ``tools/graph_torch.py``), ``weights.safetensors`` (``state_dict`` names,
F32; BatchNorm buffers included), ``data.safetensors`` (``x`` F32, ``y`` I64) and
``bench.json`` (batch size, options and the benchmark's analytic FLOP counts, so the
GFLOP/s columns use the same counts as the Rust table).

The ``resnet`` workload (issue 9) and the ``transformer`` workload (issue 11) can
also be written from Python, with the same files (``bench.json`` without FLOP counts,
so the GFLOP/s columns show ``-``)::

    python tools/bench_curvlinops.py --write-inputs /tmp/bench [--workload transformer] [--quick | --smoke]
    python tools/bench_curvlinops.py /tmp/bench/resnet

The transformer (``TRANSFORMER_SIZES``; its ``x`` is I64 token ids ``[N, T]``):
``emb`` Embedding(vocab, d) + ``pos`` (learned, ``[1, T, d]``, 0.02·N(0,1)) →
``blocks.<i>`` pre-LN blocks (``ln1``, ``attn`` with ``q``, ``k``, ``v``, ``o``
Linear(d,d) and non-causal ``scaled_dot_product_attention`` over ``heads`` heads,
residual add, ``ln2``, ``mlp.fc1`` Linear(d,4d), GELU, ``mlp.fc2`` Linear(4d,d),
residual add) → ``ln_f`` → mean over the tokens → ``head`` Linear(d,10). Default 4
blocks, d = 256, 4 heads, T = 128, vocabulary 1000, N = 1024, batch 32 (3,157,514
curvature parameters); ``--quick`` 2 blocks, d = 64, 4 heads, T = 32, vocabulary 100,
N = 256, batch 64; ``--smoke`` 1 block, d = 16, 2 heads, T = 8, vocabulary 50, N = 32,
batch 16. Weights: PyTorch's default initialisation under ``torch.manual_seed(SEED)``
(LayerNorms 1 and 0); ``x`` uniform over the vocabulary, ``y`` over 10 classes.

It is a CIFAR-style ResNet (He et al. 2016, §4.2) in torchvision's naming:
``conv1`` Conv2d(3,w,3,p=1,no bias) → ``bn1`` → ReLU → ``layer1`` / ``layer2`` /
``layer3`` of ``n`` BasicBlocks each with ``w``, ``2w``, ``4w`` channels (block
``layer<s>.<i>``: ``conv1`` 3×3 (stride 2 in the first block of layers 2 and 3),
``bn1``, ReLU, ``conv2`` 3×3, ``bn2``, plus the input or, where the shape changes,
``downsample.0`` Conv2d 1×1 stride 2 (no bias) + ``downsample.1`` BatchNorm2d, then
ReLU) → AdaptiveAvgPool2d(1) → flatten → ``fc`` Linear(4w,10). All convs without bias.
Sizes (``RESNET_SIZES``): default ``w = 16, n = 3`` (ResNet-20, 270,906 curvature
parameters, 3×32×32 inputs, N = 2048, batch 128); ``--quick`` ``w = 8, n = 1``
(ResNet-8, 19,618 curvature parameters, 3×16×16, N = 512, batch 128); ``--smoke``
``w = 4, n = 1`` (5,046, 3×8×8, N = 32, batch 16). Weights: PyTorch's default initialisation under ``torch.manual_seed(SEED)``;
BatchNorm running statistics and affine weights randomised as in the fixtures
(mean 0.3·N(0,1), var 0.5+U(0,1), weight 0.6+0.8·U(0,1), bias 0.2·N(0,1)); data
``x`` ~ N(0,1), ``y`` uniform over 10 classes. Curvature parameters are the Linear
and Conv2d ones only (BatchNorm's are not), in ``named_parameters()`` order.

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
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graph_torch  # noqa: E402

SEED = 20240611
# (width w, blocks per stage n, image side, N, batch size) of the resnet workload.
RESNET_SIZES = {
    "full": dict(width=16, blocks=3, image=32, num_data=2048, batch_size=128),
    "quick": dict(width=8, blocks=1, image=16, num_data=512, batch_size=128),
    "smoke": dict(width=4, blocks=1, image=8, num_data=32, batch_size=16),
}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (expansion 1) with a 1x1-conv + BN ``downsample``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class CifarResNet(nn.Module):
    """The ``resnet`` workload (see the module docstring)."""

    def __init__(self, width: int, blocks: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width), start=1):
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# (blocks, d_model, heads, tokens T, vocabulary, N, batch size) of the transformer workload.
TRANSFORMER_SIZES = {
    "full": dict(blocks=4, d=256, heads=4, tokens=128, vocab=1000, num_data=1024, batch_size=32),
    "quick": dict(blocks=2, d=64, heads=4, tokens=32, vocab=100, num_data=256, batch_size=64),
    "smoke": dict(blocks=1, d=16, heads=2, tokens=8, vocab=50, num_data=32, batch_size=16),
}


class Attention(nn.Module):
    """Multi-head self-attention from ``nn.Linear`` q/k/v/o and
    ``F.scaled_dot_product_attention`` (not causal), heads split by ``view`` +
    ``transpose`` and merged back."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            f(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with ``mlp`` =
    ``fc1`` Linear(d, 4d) - GELU - ``fc2`` Linear(4d, d)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(d, 4 * d))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    """The ``transformer`` workload (see the module docstring)."""

    def __init__(self, blocks: int, d: int, heads: int, tokens: int, vocab: int, num_classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(dim=1))


def write_transformer_inputs(out_root: str, size: str) -> str:
    """Write ``out_root/transformer/{model.json, weights.safetensors,
    data.safetensors, bench.json}``; return the directory."""
    from export_torch import export

    cfg = TRANSFORMER_SIZES[size]
    torch.manual_seed(SEED)
    model = TransformerClassifier(cfg["blocks"], cfg["d"], cfg["heads"], cfg["tokens"], cfg["vocab"]).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    n, t = cfg["num_data"], cfg["tokens"]
    x = torch.randint(0, cfg["vocab"], (n, t), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    out_dir = os.path.join(out_root, "transformer")
    export(model, [t], out_dir, x=x, y=y)
    params = curvature_parameters(model)
    bench = {
        "workload": "transformer",
        "description": (
            f"transformer classifier: Embedding({cfg['vocab']},{cfg['d']}) + learned positions, "
            f"{cfg['blocks']} pre-LN blocks (d = {cfg['d']}, {cfg['heads']} heads, SDPA, GELU MLP "
            f"{4 * cfg['d']}), mean over T = {t} tokens, Linear({cfg['d']},10)"
        ),
        "num_data": n,
        "num_params": sum(p.numel() for p in params),
        "batch_size": cfg["batch_size"],
        "loss": "cross_entropy",
        "reduction": "mean",
        "fisher_type": "mc",
        "mc_samples": 1,
        "kfac_approx": "expand",
        "separate_weight_and_bias": True,
        "flops": None,
    }
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(bench, f, indent=2)
        f.write("\n")
    return out_dir


def write_resnet_inputs(out_root: str, size: str) -> str:
    """Write ``out_root/resnet/{model.json, weights.safetensors, data.safetensors,
    bench.json}``; return the directory."""
    from export_torch import export

    cfg = RESNET_SIZES[size]
    torch.manual_seed(SEED)
    model = CifarResNet(cfg["width"], cfg["blocks"])
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
    model.eval()
    n, side = cfg["num_data"], cfg["image"]
    x = torch.randn(n, 3, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    out_dir = os.path.join(out_root, "resnet")
    export(model, [3, side, side], out_dir, x=x, y=y)
    params = curvature_parameters(model)
    bench = {
        "workload": "resnet",
        "description": (
            f"CIFAR-style ResNet-{6 * cfg['blocks'] + 2} (BasicBlocks, width {cfg['width']}, "
            f"BatchNorm, 1x1 stride-2 shortcuts) on 3x{side}x{side}, 10 classes"
        ),
        "num_data": n,
        "num_params": sum(p.numel() for p in params),
        "batch_size": cfg["batch_size"],
        "loss": "cross_entropy",
        "reduction": "mean",
        "fisher_type": "mc",
        "mc_samples": 1,
        "kfac_approx": "expand",
        "separate_weight_and_bias": True,
        "flops": None,
    }
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(bench, f, indent=2)
        f.write("\n")
    return out_dir


def curvature_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The Linear and Conv2d parameters (curvlinops takes no others), in
    ``named_parameters()`` order."""
    ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters()
    }
    return [p for p in model.parameters() if id(p) in ids and p.requires_grad]


def _median_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="?", help="a directory written by bench --write-inputs")
    parser.add_argument("--runs", type=int, default=5, help="counted runs (default 5)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument(
        "--write-inputs", metavar="DIR",
        help="write a workload (--workload) to DIR/<workload> instead of timing anything",
    )
    parser.add_argument(
        "--workload", choices=["resnet", "transformer"], default="resnet",
        help="with --write-inputs: which workload (default resnet)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="with --write-inputs: the quick size")
    size.add_argument("--smoke", action="store_true", help="with --write-inputs: the smoke size")
    args = parser.parse_args()
    if args.write_inputs:
        write = write_transformer_inputs if args.workload == "transformer" else write_resnet_inputs
        out = write(args.write_inputs, "quick" if args.quick else "smoke" if args.smoke else "full")
        print(f"wrote {out}")
        return
    if args.inputs is None:
        parser.error("give an inputs directory (or --write-inputs DIR)")
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
    model = graph_torch.build(spec)
    graph_torch.load_weights(model, load_file(os.path.join(args.inputs, "weights.safetensors")))
    model = model.to(device).eval()
    tensors = load_file(os.path.join(args.inputs, "data.safetensors"))
    x, y = tensors["x"].to(device), tensors["y"].to(device)
    if bench["loss"] != "cross_entropy":
        raise ValueError(f"bench.json: expected loss cross_entropy, found {bench['loss']!r}")
    b = bench["batch_size"]
    data = [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]
    params = curvature_parameters(model)
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
    flops = bench.get("flops")
    counts = {}
    if flops:  # written by examples/bench.rs (absent for --write-inputs from here)
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
