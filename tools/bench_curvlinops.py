#!/usr/bin/env python3
"""The curvlinops 3.0.1 baseline of ``examples/bench.rs`` on identical inputs.

First write the inputs with the Rust benchmark::

    cargo run --release --example bench -- --workload mlp --write-inputs /tmp/bench

then time curvlinops on them::

    python tools/bench_curvlinops.py /tmp/bench/mlp [--runs 5] [--device cuda|cpu]

The directory holds ``model.json`` (ekfac's model format, chain or graph: the module is
rebuilt by ``tools/graph_torch.py``), ``weights.safetensors`` (``state_dict`` names,
F32; BatchNorm buffers included), ``data.safetensors`` (``x`` F32, or I64 token ids
for the transformer; ``y`` I64) and
``bench.json`` (batch size, options and the benchmark's analytic FLOP counts, so the
GFLOP/s columns use the same counts as the Rust table).

The ``resnet`` workload (issue 9) can also be written from Python, with the same
files (``bench.json`` without FLOP counts, so the GFLOP/s columns show ``-``)::

    python tools/bench_curvlinops.py --write-inputs /tmp/bench [--quick | --smoke]
    python tools/bench_curvlinops.py /tmp/bench/resnet

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

The ``transformer`` workload (issue 11) is written by the Rust benchmark only
(``--workload transformer``). Its model is also written here by hand as
:class:`Transformer` (token ids through ``embed`` plus the learned positions
``pos``, then pre-LN blocks ``blocks.<i>`` of ``ln1``, ``attn.{q,k,v,o}``
``nn.Linear``\ s around ``F.scaled_dot_product_attention`` over ``heads`` heads,
``ln2``, ``mlp.fc1`` / GELU / ``mlp.fc2`` with ``4d`` hidden; ``ln_f``, the mean over
tokens, ``head``), with the same ``state_dict`` names and ``named_parameters()``
order; ``--check`` loads the weights into it (strictly) and compares its outputs with
the rebuilt ``model.json`` and with ekfac's GPU outputs::

    python tools/bench_curvlinops.py /tmp/bench/transformer --check

Before timing, every workload whose ``bench.json`` carries ``outputs`` (ekfac's GPU
outputs on the first examples, written by ``examples/bench.rs``) is checked against
the rebuilt module (relative error below 1e-4, else the run stops).

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
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

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


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        for name in ("q", "k", "v", "o"):
            setattr(self.attn, name, nn.Linear(width, width))
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 4 * width)
        self.mlp.fc2 = nn.Linear(4 * width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (self._split(getattr(self.attn, p)(h)) for p in ("q", "k", "v"))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.o(a.transpose(1, 2).reshape(x.shape))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """The ``transformer`` workload of ``examples/bench.rs``: token ids ``[N, T]``
    through ``embed`` (``nn.Embedding(vocab, d)``) plus learned positions ``pos``
    ``[1, T, d]`` when ``vocab`` is given, else float inputs ``[N, T, d]``; then
    ``blocks`` pre-LN blocks, ``ln_f``, the mean over tokens and a classification
    ``head``."""

    def __init__(
        self, blocks: int, width: int, heads: int, num_classes: int = 10,
        vocab: Optional[int] = None, tokens: Optional[int] = None,
    ):
        super().__init__()
        if vocab is not None:
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed"):
            x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(dim=1))


def transformer_from_spec(spec: Dict[str, Any]) -> Transformer:
    """The :class:`Transformer` of a ``model.json`` written by ``examples/bench.rs``
    (blocks, width and heads read off its nodes)."""
    nodes = {n["name"]: n for n in spec["nodes"]}
    blocks = sum(1 for name in nodes if name.endswith(".ln1"))
    width = nodes["head"]["attrs"]["in_features"]
    split = nodes["blocks.0.attn.q_split"]["attrs"]["shape"]
    vocab = nodes["embed"]["attrs"]["num_embeddings"] if "embed" in nodes else None
    return Transformer(blocks, width, split[1], vocab=vocab, tokens=split[0])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def check_outputs(model: nn.Module, x: torch.Tensor, bench: Dict[str, Any], what: str) -> float:
    """The relative error of ``model`` against ekfac's GPU outputs in ``bench.json``
    (ValueError above 1e-4: the baseline would time another model)."""
    rows, values = bench["outputs"]["rows"], bench["outputs"]["values"]
    with torch.no_grad():
        got = model(x[:rows])
    want = torch.tensor(values, dtype=torch.float64).reshape(got.shape)
    err = relative_error(got, want)
    if not err < 1e-4:
        raise ValueError(
            f"{what}: outputs on the first {rows} examples differ from ekfac's by "
            f"{err:.2e} (relative), above 1e-4"
        )
    return err


def check_transformer(inputs: str) -> None:
    """``--check``: the hand-written :class:`Transformer` with the written weights
    against the rebuilt ``model.json`` (all examples) and ekfac's GPU outputs."""
    with open(os.path.join(inputs, "model.json")) as f:
        spec = json.load(f)
    with open(os.path.join(inputs, "bench.json")) as f:
        bench = json.load(f)
    state = load_file(os.path.join(inputs, "weights.safetensors"))
    model = transformer_from_spec(spec)
    model.load_state_dict(state, strict=True)
    model.eval()
    rebuilt = graph_torch.build(spec)
    graph_torch.load_weights(rebuilt, state)
    rebuilt.eval()
    names = [n for n, _ in model.named_parameters()]
    if names != spec["parameters"]:
        raise ValueError(f"named_parameters() {names} differ from model.json's {spec['parameters']}")
    x = load_file(os.path.join(inputs, "data.safetensors"))["x"]
    with torch.no_grad():
        err = relative_error(model(x), rebuilt(x))
    if not err < 1e-6:
        raise ValueError(f"Transformer vs rebuilt model.json: relative error {err:.2e}")
    print(f"Transformer vs rebuilt model.json on {x.shape[0]} examples: relative error {err:.2e}")
    for what, m in (("Transformer", model), ("rebuilt model.json", rebuilt)):
        err = check_outputs(m, x, bench, what)
        print(f"{what} vs ekfac's GPU outputs ({bench['outputs']['rows']} examples): relative error {err:.2e}")


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
        help="write the resnet workload to DIR/resnet instead of timing anything",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="with --write-inputs: the quick size")
    size.add_argument("--smoke", action="store_true", help="with --write-inputs: the smoke size")
    parser.add_argument(
        "--check", action="store_true",
        help="transformer inputs: check the hand-written Transformer against the "
        "rebuilt model.json and ekfac's outputs instead of timing anything",
    )
    args = parser.parse_args()
    if args.check:
        if args.inputs is None:
            parser.error("--check needs an inputs directory")
        check_transformer(args.inputs)
        return
    if args.write_inputs:
        out = write_resnet_inputs(
            args.write_inputs, "quick" if args.quick else "smoke" if args.smoke else "full"
        )
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
    if bench.get("outputs"):  # ekfac's GPU outputs on the first examples
        check_outputs(model, x, bench, "the rebuilt model.json")
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
