#!/usr/bin/env python3
"""Build ``assets/digits/``: the main job's embedded model, data and reference.

A small MLP, ``Linear(64,32) - Tanh - Linear(32,10)``, is trained briefly (Adam, fixed
seed) on scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, BSD-3;
the data ship inside the scikit-learn package, nothing is downloaded), pixels scaled
to [0, 1]. Written:

- ``model.json``, ``weights.safetensors`` (F32), via ``tools/export_torch.py``;
- ``data.safetensors``: the first 1024 examples, ``x`` F32 ``[1024, 64]``, ``y`` I64;
- ``reference.json``: curvlinops 3.0.1 KFAC and EKFAC (type-2, cross-entropy with mean
  reduction, all parameters, separate weight and bias, batch size 128, float64 on an
  exact float64 copy of the float32 weights and data) trace, Frobenius norm, det,
  logdet, damped logdet at δ = 1e-3 and the zero-eigenvalue counts (conventions as in
  tests/fixtures/README.md);
- ``reference.safetensors`` (F64): ``vectors`` ``[P, 2]`` (float32-representable),
  ``kfac_mv``, ``ekfac_mv`` and ``ekfac_inv_mv`` (``(EKFAC + δI)⁻¹ @ vectors``).

Run: ``python tools/make_digits_asset.py`` (needs torch, curvlinops-for-pytorch==3.0.1,
safetensors, scikit-learn).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from export_torch import export  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), "assets", "digits")
NUM_EXPORT = 1024
BATCH_SIZE = 128
DAMPING = 1e-3
KFAC_ZERO = 1e-6
EKFAC_ZERO = 1e-10
F64 = torch.float64


def train() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, float]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_func = nn.CrossEntropyLoss()
    for _epoch in range(3):
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_func(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).double().mean())
    return model, x, y, accuracy


def finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def curvature(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor):
    """curvlinops KFAC and EKFAC in the dtype of ``model`` and ``X``: scalars and
    products with ``vectors``."""
    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

    data = [(X[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, X.shape[0], BATCH_SIZE)]
    params = list(model.parameters())  # model order
    options = dict(fisher_type="type-2", check_deterministic=False)
    loss_func = nn.CrossEntropyLoss(reduction="mean")
    vectors = vectors.to(X.dtype)

    K = KFACLinearOperator(model, loss_func, params, data, **options)
    K.compute_kronecker_factors()
    # Separate weight and bias: per layer a weight block G ⊗ A and a bias block G.
    k_blocks, k_zero = [], 0
    for layer in K._mapping:
        lam_a = np.linalg.eigvalsh(K._input_covariances[layer].numpy())
        lam_g = np.linalg.eigvalsh(K._gradient_covariances[layer].numpy())
        z_a, z_g = lam_a <= KFAC_ZERO * lam_a.max(), lam_g <= KFAC_ZERO * lam_g.max()
        k_blocks += [np.outer(lam_g, lam_a).ravel(), lam_g]
        k_zero += int(np.logical_or.outer(z_g, z_a).sum()) + int(z_g.sum())
    kfac_mv = K @ vectors

    E = EKFACLinearOperator(model, loss_func, params, data, **options)
    E._maybe_compute_ekfac()
    e_blocks, e_zero = [], 0
    for lam in E._corrected_eigenvalues.values():
        for part in lam.values() if isinstance(lam, dict) else [lam]:
            part = part.numpy().ravel()
            e_blocks.append(part)
            e_zero += int((part <= EKFAC_ZERO * part.max()).sum())
    ekfac_mv = E @ vectors
    ekfac_inv_mv = KFACInverseLinearOperator(E, damping=DAMPING, use_exact_damping=True) @ vectors

    def scalars(op, blocks, zero):
        det, logdet = finite_or_none(op.det), finite_or_none(op.logdet)
        return {
            "trace": float(op.trace),
            "det": 0.0 if zero else det,
            "logdet": None if zero else logdet,
            "logdet_damped": float(sum(np.log(b + DAMPING).sum() for b in blocks)),
            "frobenius_norm": float(op.frobenius_norm),
            "zero_eigenvalues": zero,
            "curvlinops_raw": {"det": det, "logdet": logdet},
        }

    scal = {"kfac": scalars(K, k_blocks, k_zero), "ekfac": scalars(E, e_blocks, e_zero)}
    tensors = {"kfac_mv": kfac_mv, "ekfac_mv": ekfac_mv, "ekfac_inv_mv": ekfac_inv_mv}
    return scal, tensors


def reference(model32: nn.Sequential, x32: torch.Tensor, y: torch.Tensor):
    P = sum(p.numel() for p in model32.parameters())
    torch.manual_seed(1)
    vectors = torch.randn(P, 2, dtype=torch.float32).to(F64)
    model = copy.deepcopy(model32).to(F64)
    scal, tensors = curvature(model, x32.to(F64), y, vectors)
    # The same computation in float32: what float32 arithmetic costs here.
    scal32, tensors32 = curvature(model32, x32, y, vectors)
    proxy = {
        k: float((tensors32[k].to(F64) - v).norm() / v.norm()) for k, v in tensors.items()
    }
    for op in ("kfac", "ekfac"):
        for key in ("trace", "frobenius_norm", "logdet_damped"):
            want = scal[op][key]
            proxy[f"{op}_{key}"] = abs(scal32[op][key] - want) / abs(want)
        proxy[f"{op}_zero_eigenvalues"] = scal32[op]["zero_eigenvalues"] - scal[op]["zero_eigenvalues"]
    ref = {
        "loss": "cross_entropy",
        "reduction": "mean",
        "fisher": "type-2",
        "approx": "expand",
        "joint_bias": False,
        "params": [n for n, _ in model32.named_parameters()],
        "batch_size": BATCH_SIZE,
        "num_data": int(x32.shape[0]),
        "num_params": P,
        "damping": DAMPING,
        "kfac": scal["kfac"],
        "ekfac": scal["ekfac"],
        "float32_curvlinops_error": proxy,
    }
    return ref, {"vectors": vectors, **tensors}


def main() -> None:
    torch.set_default_dtype(torch.float32)
    model, x, y, accuracy = train()
    x_export, y_export = x[:NUM_EXPORT], y[:NUM_EXPORT]
    os.makedirs(OUT, exist_ok=True)
    export(model, [64], OUT, x=x_export, y=y_export)
    ref, tensors = reference(model, x_export, y_export)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    save_file(
        {k: v.detach().to(F64).clone().contiguous() for k, v in tensors.items()},
        os.path.join(OUT, "reference.safetensors"),
    )
    print(f"training accuracy {accuracy:.4f}")
    print(json.dumps({k: ref[k] for k in ("num_params", "kfac", "ekfac", "float32_curvlinops_error")}, indent=1))
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
