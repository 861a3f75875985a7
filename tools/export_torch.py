#!/usr/bin/env python3
"""Export a ``torch.nn.Sequential`` to ekfac's model format.

Writes, into ``out_dir``:

- ``model.json``: ``{"input_shape": [...], "layers": [...]}``, one entry per module of
  the Sequential, in order. Linear and Conv2d entries carry ``"name"`` = the module's
  index in the Sequential, so its parameters are ``"<name>.weight"`` / ``"<name>.bias"``.
  Every pair (kernel size, stride, padding, dilation) is written as a two-element list.
- ``weights.safetensors``: the ``state_dict`` (``"<i>.weight"``, ``"<i>.bias"``) as F32,
  in PyTorch layouts (linear ``[out, in]``, conv ``[out, in/groups, kh, kw]``).
- ``data.safetensors`` (only when ``x`` is given): ``x`` F32 ``[N, *input_shape]`` and,
  when ``y`` is given, ``y`` as I64 (integer targets, i.e. class indices) or F32.

Modules that ekfac cannot represent exactly are refused with a ``ValueError`` naming
the module index and the reason, rather than exported with silently changed meaning.

Usage as a library: ``export(model, input_shape, out_dir, x=None, y=None)``.
Usage from the command line: ``python tools/export_torch.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn


class ExportError(ValueError):
    """A module (or input) that ekfac's model format cannot represent."""


def _pair(value: Any, what: str, index: int) -> List[int]:
    """Normalise an int or a 2-tuple of ints to a two-element list."""
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) for v in value
    ):
        return [int(value[0]), int(value[1])]
    raise ExportError(
        f"module {index}: {what} must be an int or a pair of ints, found {value!r}"
    )


def _linear(index: int, m: nn.Linear) -> Dict[str, Any]:
    return {
        "type": "linear",
        "name": str(index),
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _conv2d(index: int, m: nn.Conv2d) -> Dict[str, Any]:
    if m.padding_mode != "zeros":
        raise ExportError(
            f"module {index} (Conv2d): padding_mode={m.padding_mode!r} is not supported, "
            "only 'zeros'"
        )
    if isinstance(m.padding, str):
        raise ExportError(
            f"module {index} (Conv2d): string padding {m.padding!r} is not supported; "
            "give explicit integer padding"
        )
    return {
        "type": "conv2d",
        "name": str(index),
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": _pair(m.kernel_size, "kernel_size", index),
        "stride": _pair(m.stride, "stride", index),
        "padding": _pair(m.padding, "padding", index),
        "dilation": _pair(m.dilation, "dilation", index),
        "groups": m.groups,
        "bias": m.bias is not None,
    }


def _pool(index: int, m: nn.Module, kind: str) -> Dict[str, Any]:
    name = type(m).__name__
    if m.ceil_mode:
        raise ExportError(f"module {index} ({name}): ceil_mode=True is not supported")
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation, "dilation", index) != [1, 1]:
            raise ExportError(
                f"module {index} ({name}): dilation={m.dilation!r} is not supported, "
                "only 1"
            )
        if m.return_indices:
            raise ExportError(
                f"module {index} ({name}): return_indices=True is not supported"
            )
    else:
        if not m.count_include_pad:
            raise ExportError(
                f"module {index} ({name}): count_include_pad=False is not supported"
            )
        if m.divisor_override is not None:
            raise ExportError(
                f"module {index} ({name}): divisor_override={m.divisor_override} "
                "is not supported"
            )
    kernel = _pair(m.kernel_size, "kernel_size", index)
    stride = kernel if m.stride is None else _pair(m.stride, "stride", index)
    padding = _pair(m.padding, "padding", index)
    return {"type": kind, "kernel_size": kernel, "stride": stride, "padding": padding}


def _flatten(index: int, m: nn.Flatten) -> Dict[str, Any]:
    if m.start_dim != 1 or m.end_dim != -1:
        raise ExportError(
            f"module {index} (Flatten): only start_dim=1, end_dim=-1 is supported, "
            f"found start_dim={m.start_dim}, end_dim={m.end_dim}"
        )
    return {"type": "flatten"}


def describe(model: nn.Sequential, input_shape: Sequence[int]) -> Dict[str, Any]:
    """Return the ``model.json`` dictionary of ``model``; raise ``ExportError`` if a
    module cannot be represented or the shapes do not flow through the network."""
    if not isinstance(model, nn.Sequential):
        raise ExportError(
            f"expected a torch.nn.Sequential, found {type(model).__name__}"
        )
    layers: List[Dict[str, Any]] = []
    for index, m in enumerate(model):
        # Exact type checks: a subclass may override forward().
        if type(m) is nn.Linear:
            layers.append(_linear(index, m))
        elif type(m) is nn.Conv2d:
            layers.append(_conv2d(index, m))
        elif type(m) is nn.ReLU:
            layers.append({"type": "relu"})
        elif type(m) is nn.Sigmoid:
            layers.append({"type": "sigmoid"})
        elif type(m) is nn.Tanh:
            layers.append({"type": "tanh"})
        elif type(m) is nn.Flatten:
            layers.append(_flatten(index, m))
        elif type(m) is nn.MaxPool2d:
            layers.append(_pool(index, m, "max_pool2d"))
        elif type(m) is nn.AvgPool2d:
            layers.append(_pool(index, m, "avg_pool2d"))
        else:
            raise ExportError(
                f"module {index} ({type(m).__name__}) is not supported; supported: "
                "Linear, Conv2d, ReLU, Sigmoid, Tanh, Flatten, MaxPool2d, AvgPool2d"
            )
    input_shape = [int(s) for s in input_shape]
    if not input_shape or any(s <= 0 for s in input_shape):
        raise ExportError(f"input_shape must be non-empty and positive, found {input_shape}")
    # Check that the network runs on this input shape (a linear layer needs 2-D input).
    probe_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    h = torch.zeros(1, *input_shape, dtype=probe_dtype)
    with torch.no_grad():
        for index, m in enumerate(model):
            if type(m) is nn.Linear and h.dim() != 2:
                raise ExportError(
                    f"module {index} (Linear): input has shape {list(h.shape)}; "
                    "ekfac's linear layers take 2-D input, add a flatten"
                )
            if type(m) in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) and h.dim() != 4:
                raise ExportError(
                    f"module {index} ({type(m).__name__}): input has shape "
                    f"{list(h.shape)}, expected 4-D [N, C, H, W]"
                )
            try:
                h = m(h)
            except RuntimeError as e:
                raise ExportError(
                    f"module {index} ({type(m).__name__}) fails on input shape "
                    f"{list(h.shape)}: {e}"
                ) from e
    return {"input_shape": input_shape, "layers": layers}


def model_json(spec: Dict[str, Any]) -> str:
    """Serialise a ``model.json`` dictionary with one layer per line."""
    layers = ",\n".join("    " + json.dumps(layer) for layer in spec["layers"])
    return (
        "{\n"
        f'  "input_shape": {json.dumps(spec["input_shape"])},\n'
        f'  "layers": [\n{layers}\n  ]\n'
        "}\n"
    )


def export(
    model: nn.Sequential,
    input_shape: Sequence[int],
    out_dir: str,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Write ``model.json``, ``weights.safetensors`` and (if ``x`` is given)
    ``data.safetensors`` into ``out_dir``; return the ``model.json`` dictionary."""
    spec = describe(model, input_shape)
    os.makedirs(out_dir, exist_ok=True)

    weights = {
        k: v.detach().to(torch.float32).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    if y is not None and x is None:
        raise ExportError("y given without x")
    data = None
    if x is not None:
        if list(x.shape[1:]) != spec["input_shape"]:
            raise ExportError(
                f"x has shape {list(x.shape)}, expected [N, {spec['input_shape']}]"
            )
        data = {"x": x.detach().to(torch.float32).contiguous().cpu()}
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ExportError(
                    f"y has {y.shape[0]} rows but x has {x.shape[0]}"
                )
            if y.dtype.is_floating_point:
                data["y"] = y.detach().to(torch.float32).contiguous().cpu()
            elif y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                data["y"] = y.detach().to(torch.int64).contiguous().cpu()
            else:
                raise ExportError(f"y has unsupported dtype {y.dtype}")

    with open(os.path.join(out_dir, "model.json"), "w") as f:
        f.write(model_json(spec))
    save_file(weights, os.path.join(out_dir, "weights.safetensors"))
    if data is not None:
        save_file(data, os.path.join(out_dir, "data.safetensors"))
    return spec


def _main() -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Export a torch.nn.Sequential saved with torch.save(model, PATH) "
            "(a whole module, not a state_dict) to ekfac's model.json + "
            "weights.safetensors (+ data.safetensors)."
        )
    )
    parser.add_argument("model", help="file written by torch.save(model, PATH)")
    parser.add_argument(
        "--input-shape",
        required=True,
        help="per-example input shape, comma-separated, e.g. 3,32,32 or 784",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--data",
        help="optional file written by torch.save({'x': X, 'y': Y}, PATH)",
    )
    args = parser.parse_args()
    model = torch.load(args.model, weights_only=False)
    input_shape = [int(s) for s in args.input_shape.split(",") if s]
    x = y = None
    if args.data:
        d = torch.load(args.data, weights_only=False)
        x, y = d["x"], d.get("y")
    try:
        export(model, input_shape, args.out, x=x, y=y)
    except ExportError as e:
        raise SystemExit(f"export_torch: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _main()
