#!/usr/bin/env python3
"""Rebuild a ``torch.nn.Module`` from ekfac's ``model.json`` (+ weights).

Both formats of the README are read: the chain format
(``{"input_shape", "layers"}``) becomes a ``torch.nn.Sequential`` whose linear and conv
layers sit at their index (their ``name`` must be that index, as ``examples/bench.rs``
and ``tools/export_torch.py`` write them); the graph format (``"format":
"ekfac-graph"``, version 2) becomes a :class:`GraphModule` whose parameterised nodes
are real ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` /
``nn.Embedding`` / ``nn.MultiheadAttention`` (``batch_first=True``, called with
``need_weights=False``) modules at their module paths (``layer1.0.conv1``), and every
``add_parameter`` / ``cat_parameter`` tensor an ``nn.Parameter`` at its ``state_dict`` name
(``blocks.0.pos``), so ``state_dict`` names, curvlinops' layer
detection and ``named_parameters()`` order (``model.json``'s ``"parameters"``) are
those of the exported model. A module named by several nodes (tied weights) is one
module called several times.

Used by ``tools/bench_curvlinops.py`` (the curvlinops baseline on ekfac's benchmark
inputs) and by the export round-trip test ``tools/test_graph_roundtrip.py``.

Library: ``build(spec)``, ``load_weights(module, state)``, ``load(model_dir)``.
Command line: ``python tools/graph_torch.py MODEL_DIR`` prints the rebuilt module and,
when ``MODEL_DIR/data.safetensors`` exists, the output on its first rows.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

GRAPH_FORMAT = "ekfac-graph"
PARAMETERISED = ("linear", "conv2d", "batch_norm2d", "batch_norm1d", "layer_norm", "group_norm", "embedding",
                 "multi_head_attention")


def _pair(value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a 2-list, found {value!r}")
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


###############################################################################
#                               chain format                                  #
###############################################################################


def build_chain(spec: Dict[str, Any]) -> nn.Sequential:
    """The ``torch.nn.Sequential`` described by a chain-format ``model.json``.

    Linear and Conv2d entries must be named by their index in the Sequential, so the
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
                nn.Linear(layer["in_features"], layer["out_features"], bias=layer.get("bias", True))
            )
        elif kind == "conv2d":
            modules.append(_conv2d(layer))
        elif kind in ("relu", "sigmoid", "tanh", "flatten"):
            modules.append(
                {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "flatten": nn.Flatten}[kind]()
            )
        elif kind in ("max_pool2d", "avg_pool2d"):
            modules.append(_pool(kind, layer))
        else:
            raise ValueError(f"layers[{i}]: unknown layer type {kind!r}")
    return nn.Sequential(*modules)


def _conv2d(attrs: Dict[str, Any]) -> nn.Conv2d:
    return nn.Conv2d(
        attrs["in_channels"],
        attrs["out_channels"],
        _pair(attrs["kernel_size"]),
        stride=_pair(attrs.get("stride", 1)),
        padding=_pair(attrs.get("padding", 0)),
        dilation=_pair(attrs.get("dilation", 1)),
        groups=attrs.get("groups", 1),
        bias=attrs.get("bias", True),
    )


def _pool(kind: str, attrs: Dict[str, Any]) -> nn.Module:
    k = _pair(attrs["kernel_size"])
    stride = _pair(attrs.get("stride", attrs["kernel_size"]))
    padding = _pair(attrs.get("padding", 0))
    pool = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
    return pool(k, stride=stride, padding=padding)


###############################################################################
#                               graph format                                  #
###############################################################################


def _topological(nodes: List[Dict[str, Any]], inputs: Sequence[str]) -> List[Dict[str, Any]]:
    """Nodes in an order where every node follows its inputs (ValueError naming the
    node on an unknown input, a duplicate name or a cycle)."""
    by_name: Dict[str, Dict[str, Any]] = {}
    for node in nodes:
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"node {node!r}: missing name")
        if name in by_name or name in inputs:
            raise ValueError(f"node {name}: duplicate name")
        by_name[name] = node
    for node in nodes:
        for source in node.get("inputs", []):
            if source not in by_name and source not in inputs:
                raise ValueError(f"node {node['name']}: unknown input {source!r}")
    order: List[Dict[str, Any]] = []
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in nodes:
        stack = [(root["name"], iter(root.get("inputs", [])))]
        if state.get(root["name"]) == 2:
            continue
        state[root["name"]] = 1
        while stack:
            name, pending = stack[-1]
            child = next((s for s in pending if s in by_name and state.get(s) != 2), None)
            if child is None:
                stack.pop()
                state[name] = 2
                order.append(by_name[name])
            elif state.get(child) == 1:
                raise ValueError(f"node {child}: the graph has a cycle through it")
            else:
                state[child] = 1
                stack.append((child, iter(by_name[child].get("inputs", []))))
    return order


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted ``path``, creating empty containers."""
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if parts[-1] in parent._modules:
        raise ValueError(f"module {path}: registered twice")
    parent.add_module(parts[-1], module)


def _set_parameter(root: nn.Module, path: str, parameter: nn.Parameter) -> None:
    """Register ``parameter`` at the dotted ``path``, creating empty containers."""
    module, _, leaf = path.rpartition(".")
    parent = root
    if module:
        parent = _get_module(root, module)
        if parent is None:
            parent = nn.Module()
            _set_module(root, module, parent)
    if leaf in parent._parameters or leaf in parent._modules:
        raise ValueError(f"parameter {path}: registered twice")
    parent.register_parameter(leaf, parameter)


def _get_module(root: nn.Module, path: str) -> Optional[nn.Module]:
    m: Optional[nn.Module] = root
    for part in path.split("."):
        m = m._modules.get(part) if m is not None else None
    return m


def _make_module(node: Dict[str, Any]) -> nn.Module:
    op, a = node["op"], node.get("attrs", {})
    if op == "linear":
        return nn.Linear(a["in_features"], a["out_features"], bias=a.get("bias", True))
    if op == "conv2d":
        return _conv2d(a)
    if op == "batch_norm2d":
        return nn.BatchNorm2d(a["num_features"], eps=a.get("eps", 1e-5), affine=a.get("affine", True))
    if op == "group_norm":
        return nn.GroupNorm(a["num_groups"], a["num_channels"], eps=a.get("eps", 1e-5), affine=a.get("affine", True))
    if op == "batch_norm1d":
        return nn.BatchNorm1d(a["num_features"], eps=a.get("eps", 1e-5), affine=a.get("affine", True))
    if op == "embedding":
        return nn.Embedding(a["num_embeddings"], a["embedding_dim"], padding_idx=a.get("padding_idx"))
    if op == "multi_head_attention":
        return nn.MultiheadAttention(a["embed_dim"], a["num_heads"], bias=a.get("bias", True), batch_first=True)
    if op == "layer_norm":
        shape = a["normalized_shape"]
        shape = [shape] if isinstance(shape, int) else list(shape)
        return nn.LayerNorm(shape, eps=a.get("eps", 1e-5), elementwise_affine=a.get("elementwise_affine", True))
    raise AssertionError(op)


def _stateless(node: Dict[str, Any]):
    """The function ``values -> value`` of a node without parameters."""
    op, a, name = node["op"], node.get("attrs", {}), node["name"]
    unary = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "silu": F.silu,
        "identity": lambda t: t,
    }
    if op in unary:
        return lambda xs, f=unary[op]: f(xs[0])
    if op == "gelu":
        approximate = a.get("approximate", "none")
        return lambda xs: F.gelu(xs[0], approximate=approximate)
    pointwise = {
        "leaky_relu": lambda t: F.leaky_relu(t, a.get("negative_slope", 0.01)),
        "elu": lambda t: F.elu(t, a.get("alpha", 1.0)),
        "hardtanh": lambda t: F.hardtanh(t, a.get("min_val", -1.0), a.get("max_val", 1.0)),
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "softplus": lambda t: F.softplus(t, a.get("beta", 1.0), a.get("threshold", 20.0)),
        "mish": F.mish,
    }
    if op in pointwise:
        return lambda xs, f=pointwise[op]: f(xs[0])
    if op in ("max_pool2d", "avg_pool2d"):
        pool = _pool(op, a)
        return lambda xs: pool(xs[0])
    if op == "adaptive_avg_pool2d":
        size = _pair(a["output_size"])
        return lambda xs: F.adaptive_avg_pool2d(xs[0], size)
    if op == "flatten":
        start, end = a.get("start_dim", 1), a.get("end_dim", -1)
        return lambda xs: torch.flatten(xs[0], start, end)
    if op == "add":
        return lambda xs: xs[0] + xs[1]
    if op == "mul":
        return lambda xs: xs[0] * xs[1]
    if op == "add_constant":
        value = a["value"]
        return lambda xs: xs[0] + value
    if op == "cat":
        dim = a.get("dim", 1)
        return lambda xs: torch.cat(xs, dim=dim)
    if op == "upsample_nearest2d":
        factor = _pair(a["scale_factor"])
        return lambda xs: F.interpolate(xs[0], scale_factor=[float(f) for f in factor], mode="nearest")
    # Transformers (issue 11).
    if op == "reshape":
        shape = [int(d) for d in a["shape"]]
        return lambda xs: xs[0].reshape(xs[0].shape[0], *shape)
    if op == "transpose":
        d0, d1 = int(a["dim0"]), int(a["dim1"])
        return lambda xs: xs[0].transpose(d0, d1)
    if op == "permute":
        dims = [int(d) for d in a["dims"]]
        return lambda xs: xs[0].permute(*dims)
    if op == "slice":
        dim, start, end = int(a["dim"]), int(a["start"]), int(a["end"])
        return lambda xs: xs[0].narrow(dim, start, end - start)
    if op == "mean":
        dim, keepdim = a["dim"], bool(a.get("keepdim", False))
        return lambda xs: xs[0].mean(dim=dim, keepdim=keepdim)
    if op == "mul_constant":
        value = float(a["value"])
        return lambda xs: xs[0] * value
    if op == "div_constant":
        value = float(a["value"])
        return lambda xs: xs[0] / value
    if op == "softmax":
        dim = int(a["dim"])
        return lambda xs: torch.softmax(xs[0], dim)
    if op == "matmul":
        return lambda xs: torch.matmul(xs[0], xs[1])
    if op == "masked_fill":
        mask = _mask(name, a["mask"], a["mask_shape"])
        value = _number(name, a["value"])
        return lambda xs: xs[0].masked_fill(mask.to(xs[0].device), value)
    if op == "scaled_dot_product_attention":
        mask = None
        if a.get("attn_mask") is not None:
            mask = _mask(name, a["attn_mask"], a["attn_mask_shape"])
        causal, scale = bool(a.get("is_causal", False)), a.get("scale")
        return lambda xs: F.scaled_dot_product_attention(
            xs[0], xs[1], xs[2], attn_mask=mask, is_causal=causal,
            scale=None if scale is None else float(scale),
        )
    raise ValueError(f"node {name}: unknown op {op!r}")


def _attention(node: Dict[str, Any], mha: nn.MultiheadAttention):
    """A ``multi_head_attention`` node: the module on its (query, key, value), the
    node's keep mask (1 = attend) as PyTorch's boolean mask (True = masked out)."""
    a = node.get("attrs", {})
    mask = None
    if a.get("attn_mask") is not None:
        mask = ~_mask(node["name"], a["attn_mask"], a["attn_mask_shape"])
    return lambda xs: mha(xs[0], xs[1], xs[2], need_weights=False,
                          attn_mask=None if mask is None else mask.to(xs[0].device))[0]


def _mask(name: str, flat: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """A flat 0/1 list as a boolean tensor of ``shape``."""
    mask = torch.tensor([bool(v) for v in flat], dtype=torch.bool)
    count = 1
    for d in shape:
        count *= int(d)
    if mask.numel() != count:
        raise ValueError(f"node {name}: mask has {mask.numel()} entries, its shape {list(shape)} needs {count}")
    return mask.reshape([int(d) for d in shape])


def _number(name: str, value: Any) -> float:
    """A number, or the strings ``"inf"`` / ``"-inf"``."""
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"node {name}: value {value!r} is not a number")


class GraphModule(nn.Module):
    """A graph-format ``model.json`` as a module. ``forward(x)`` returns the output
    value; ``values(x)`` returns every value by name (the input included)."""

    def __init__(self, spec: Dict[str, Any]):
        super().__init__()
        if spec.get("format") != GRAPH_FORMAT or spec.get("version") != 2:
            raise ValueError(
                f"expected format {GRAPH_FORMAT!r} version 2, found "
                f"{spec.get('format')!r} version {spec.get('version')!r}"
            )
        inputs = spec["inputs"]
        if len(inputs) != 1:
            raise ValueError(f"inputs: expected one graph input, found {len(inputs)}")
        self.input_name = inputs[0]["name"]
        self.input_shape = list(inputs[0]["shape"])
        nodes = spec["nodes"]
        self.output_name = spec["output"]
        if self.output_name not in {n["name"] for n in nodes} | {self.input_name}:
            raise ValueError(f"output: unknown value {self.output_name!r}")
        self.order = _topological(nodes, [self.input_name])
        # Modules are created in "parameters" order first, so named_parameters() keeps
        # the exported model's order; modules without parameters follow in node order.
        param_nodes = [
            n for n in nodes
            if n["op"] in ("linear", "conv2d", "batch_norm2d", "batch_norm1d", "embedding", "multi_head_attention")
            or (n["op"] == "layer_norm" and n.get("attrs", {}).get("elementwise_affine", True))
            or (n["op"] == "group_norm" and n.get("attrs", {}).get("affine", True))
        ]
        modules = {}
        for n in param_nodes:
            module = n.get("module", n["name"])
            if module in modules:
                if n["op"] != modules[module]["op"] or n.get("attrs") != modules[module].get("attrs"):
                    raise ValueError(f"node {n['name']}: module {module} is used with other attributes by node {modules[module]['name']}")
                continue
            modules[module] = n
        # Learned tensors of add_parameter nodes, by state_dict name.
        learned: Dict[str, List[int]] = {}
        for n in nodes:
            if n["op"] in ("add_parameter", "cat_parameter", "mul_parameter"):
                a = n.get("attrs", {})
                name, shape = a["parameter"], [int(d) for d in a["shape"]]
                if learned.setdefault(name, shape) != shape:
                    raise ValueError(f"node {n['name']}: parameter {name} is used with another shape")
        names = list(spec.get("parameters", []))
        rank = {p.rsplit(".", 1)[0]: i for i, p in reversed(list(enumerate(names)))}
        rank.update({p: i for i, p in enumerate(names) if p in learned})
        items = [(m, True) for m in modules] + [(p, False) for p in learned]
        for key, is_module in sorted(items, key=lambda item: rank.get(item[0], len(names))):
            if is_module:
                _set_module(self, key, _make_module(modules[key]))
            else:
                _set_parameter(self, key, nn.Parameter(torch.zeros(learned[key])))
        self.calls = []
        for n in self.order:
            module = n.get("module", n["name"])
            if n["op"] == "add_parameter":
                path = n["attrs"]["parameter"]
                self.calls.append((n["name"], list(n["inputs"]), lambda xs, p=path: xs[0] + self.get_parameter(p)))
            elif n["op"] == "mul_parameter":
                path = n["attrs"]["parameter"]
                self.calls.append((n["name"], list(n["inputs"]), lambda xs, p=path: self.get_parameter(p) * xs[0]))
            elif n["op"] == "multi_head_attention":
                self.calls.append((n["name"], list(n["inputs"]), _attention(n, _get_module(self, module))))
            elif n["op"] == "cat_parameter":
                self.calls.append((n["name"], list(n["inputs"]), self._cat_parameter(n["attrs"])))
            elif module in modules:
                self.calls.append((n["name"], list(n["inputs"]), _get_module(self, module)))
            elif n["op"] == "layer_norm":  # no affine parameters
                a = n.get("attrs", {})
                self.calls.append((n["name"], list(n["inputs"]), nn.LayerNorm(
                    a["normalized_shape"], eps=a.get("eps", 1e-5), elementwise_affine=False)))
            elif n["op"] == "group_norm":  # no affine parameters
                a = n.get("attrs", {})
                self.calls.append((n["name"], list(n["inputs"]), nn.GroupNorm(
                    a["num_groups"], a["num_channels"], eps=a.get("eps", 1e-5), affine=False)))
            else:
                fn = _stateless(n)
                self.calls.append((n["name"], list(n["inputs"]), fn))

    def _cat_parameter(self, a: Dict[str, Any]):
        """``torch.cat`` of the input and the parameter expanded to its part's shape."""
        path, dim, first = a["parameter"], int(a["dim"]), int(a["index"]) == 0

        def fn(xs):
            x = xs[0]
            p = self.get_parameter(path)
            k = dim % x.dim()
            from_end = x.dim() - k  # the parameter's dims align with x's from the right
            shape = list(x.shape)
            shape[k] = p.shape[p.dim() - from_end] if from_end <= p.dim() else 1
            parts = [p.expand(shape), x]
            return torch.cat(parts if first else parts[::-1], dim=k)

        return fn

    def values(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        env = {self.input_name: x}
        for name, inputs, f in self.calls:
            args = [env[i] for i in inputs]
            env[name] = f(args[0]) if isinstance(f, nn.Module) else f(args)
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(x)[self.output_name]


###############################################################################
#                                 loading                                     #
###############################################################################


def build(spec: Dict[str, Any]) -> nn.Module:
    """An untrained module for either format (eval mode)."""
    if "layers" in spec and "nodes" not in spec:
        return build_chain(spec).eval()
    return GraphModule(spec).eval()


def load_weights(module: nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Load a state_dict; return the keys no node uses (e.g. a module whose output
    the graph does not need: the exporter keeps the full state_dict). A missing key
    (other than ``num_batches_tracked``, which ekfac ignores) or a wrong shape is a
    ValueError naming it."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"weights: missing {missing}")
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"weights: {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return [k for k in state if k not in expected]


def load(model_dir: str) -> nn.Module:
    """``model_dir/model.json`` + ``model_dir/weights.safetensors`` as a module in eval
    mode (float32, as stored)."""
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "model.json")) as f:
        spec = json.load(f)
    module = build(spec)
    load_weights(module, load_file(os.path.join(model_dir, "weights.safetensors")))
    return module.eval()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="directory with model.json and weights.safetensors")
    args = parser.parse_args()
    module = load(args.model_dir)
    print(module)
    data = os.path.join(args.model_dir, "data.safetensors")
    if os.path.exists(data):
        from safetensors.torch import load_file

        x = load_file(data)["x"][:4]
        with torch.no_grad():
            print(module(x))


if __name__ == "__main__":
    _main()
