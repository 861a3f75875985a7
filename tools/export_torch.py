#!/usr/bin/env python3
"""Export a PyTorch model to ekfac's model format.

Tested with torch 2.15.0 (CPU) and curvlinops-for-pytorch 3.0.1; ``torch.export``'s IR
changes between torch releases, so other versions may name operators differently.

Writes, into ``out_dir``:

- ``model.json``, in one of the two formats of the README ("Inputs" and "Graph models"):
  - the **chain** format ``{"input_shape": [...], "layers": [...]}`` for a
    ``torch.nn.Sequential`` of Linear, Conv2d, ReLU, Sigmoid, Tanh, Flatten, MaxPool2d
    and AvgPool2d modules (one entry per module, linear and conv entries named by their
    index, every pair written as a two-element list). This is what earlier versions
    wrote, and the committed chain fixtures are byte-identical under it;
  - the **graph** format (``"format": "ekfac-graph", "version": 2``) for any other
    ``torch.nn.Module`` in eval mode. The model is traced with ``torch.export`` with a
    dynamic batch dimension (so no batch size is baked into a ``view``), functionalised
    without decompositions (``run_decompositions({})``: a ``linear`` stays ``linear``
    and keeps its sequence axes), and every ATen operator is mapped to one graph node.
    Lifted parameters and buffers are mapped back to their module paths: a node of a
    parameterised op (``linear``, ``conv2d``, ``batch_norm2d``, ``batch_norm1d``, ``layer_norm``,
    ``embedding``) is named by its module path (``layer1.0.conv1``), other nodes by
    their op (``relu``, ``relu_1``, ``add``, ...). A module called twice (tied
    weights) is refused; with ``allow_tied=True`` (only for the fixture that checks
    ekfac's own refusal) it gives two nodes with the same ``"module"`` (the second
    named ``<module>_1``). No-ops (eval-mode ``Dropout``, ``nn.Identity``, an
    empty ``nn.Sequential``, ``clone``, a ``view`` to the same shape) are elided: the
    consumer reads the no-op's input directly. ``x.view(x.size(0), -1)``,
    ``reshape`` and ``torch.flatten`` become ``flatten`` when they merge consecutive
    axes after the batch axis; ``x.mean((2, 3), keepdim=...)`` becomes
    ``adaptive_avg_pool2d`` to 1×1 (and a ``flatten`` without ``keepdim``).
    Transformers (issue 11; the op spec is in the README): integer inputs are token
    ids (graph input dtype ``i64``) for ``embedding``; any other ``view``/``reshape``/
    ``unsqueeze``/``squeeze`` becomes ``reshape`` with its per-example target shape
    (``x.shape`` arithmetic is resolved by tracing), ``transpose``/``permute`` keep
    their dims (the batch axis must stay first), a slice of a per-example dim with
    step 1 (``h[:, 1:]``) becomes ``slice`` and an index (``h[:, 0]``, ``h[:, -1]``:
    cls-token or last-token pooling) a ``slice`` of length 1 and a ``reshape``;
    ``split``/``chunk`` (nanoGPT's ``qkv.split(C, dim=2)``) give one ``slice`` per
    item used, ``unbind`` one index per item, and a ``permute`` that moves the batch
    axis is accepted when only indices along its first dim read it (timm's
    ``qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)``: item ``i`` is the
    source's index ``i`` along the moved dim, then a ``permute`` keeping the batch first), ``x * c`` and ``x / c`` become
    ``mul_constant``/``div_constant``, other means ``mean``; a learned tensor added to
    an activation (positional embeddings: ``self.pos``, ``self.pos[:, :T]`` when that is
    all of it, or ``self.wpe(torch.arange(T))`` when the table has exactly T rows)
    becomes ``add_parameter``, and one concatenated with an activation
    (``torch.cat([cls.expand(B, -1, -1), x], 1)``: a ViT's cls token)
    ``cat_parameter``. Subgraphs computed from constants only (buffers,
    ``torch.ones(T, T).tril() == 0``, ``torch.arange``) are evaluated at export time, so
    ``masked_fill`` and ``scaled_dot_product_attention``'s ``attn_mask`` get constant
    0/1 masks (a 0/-inf float ``attn_mask`` becomes boolean); ``torch.where(mask, x,
    c)`` with a constant mask and number, and ``x + M`` with a constant 0/-inf ``M``,
    become ``masked_fill`` too. Tied weights are refused: one parameter under two
    names (GPT-2's ``lm_head.weight = wte.weight``) or used by two nodes (a module
    called twice).
    ``nn.MultiheadAttention`` (session 13; also inside ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerEncoder``) becomes one ``multi_head_attention`` node named by its
    module path, inputs (query, key, value), attrs ``embed_dim``, ``num_heads``,
    ``bias`` and, with an ``attn_mask``, ``attn_mask_shape`` ``[L, S]`` + ``attn_mask``
    (flat 0/1, 1 = attend: PyTorch's boolean True = masked out and float 0/-inf masks
    converted); its parameters (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias``) are no curvature parameters (curvlinops'
    hooks never see them either). During ``torch.export`` each instance gets a forward
    that calls the custom op ``ekfac::multi_head_attention`` (one graph node); its
    original forward is restored afterwards. Refused, naming the module:
    ``batch_first=False``, ``kdim``/``vdim`` other than ``embed_dim``,
    ``add_bias_kv``, ``add_zero_attn``, a ``key_padding_mask``, an ``attn_mask`` that is
    not constant or not ``[L, S]``, a float mask with values other than 0 and -inf, a
    query with every key masked, ``is_causal=True`` with a mask that is not causal (the
    mask is written; PyTorch needs it with ``is_causal``), and any use of the returned
    attention weights.
  ``"parameters"`` lists ``model.named_parameters()`` in order.
- ``weights.safetensors``: the full ``state_dict`` (BatchNorm's running statistics and
  ``num_batches_tracked`` included) except buffers of modules no node uses (a causal
  mask folded into ``masked_fill``), floating tensors as F32, integer ones as I64, in
  PyTorch layouts (linear ``[out, in]``, conv ``[out, in/groups, kh, kw]``).
- ``data.safetensors`` (only when ``x`` is given): ``x`` ``[N, *input_shape]`` in its
  own kind (floating as F32, integer as I64) and, when ``y`` is given, ``y`` as I64
  (integer targets, i.e. class indices) or F32.

Anything ekfac cannot represent exactly is refused with an ``ExportError`` naming the
node (or module) and the PyTorch operator, rather than exported with silently changed
meaning: a module in training mode, an operator without a mapping, an ``add`` of
differently shaped tensors, a value whose first axis is not the batch axis. Before
anything is written, the exported graph is rebuilt with ``tools/graph_torch.py`` and
its outputs are compared with the model's on a probe batch.

Usage as a library: ``export(model, input_shape, out_dir, x=None, y=None)`` (keyword
``format="auto" | "chain" | "graph"``; ``auto`` writes the chain format when the model
is a chain-expressible ``nn.Sequential``).
Usage from the command line: ``python tools/export_torch.py --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graph_torch  # noqa: E402


class ExportError(ValueError):
    """A module (or input) that ekfac's model format cannot represent."""


###############################################################################
#                 the chain format (a torch.nn.Sequential)                    #
###############################################################################


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


###############################################################################
#                 the graph format (any module, torch.export)                 #
###############################################################################

GRAPH_FORMAT = "ekfac-graph"
GRAPH_VERSION = 2
# Ops whose node reads tensors of its module from the weights file.
PARAMETERISED_OPS = ("linear", "conv2d", "batch_norm2d", "batch_norm1d", "layer_norm", "group_norm",
                     "embedding", "multi_head_attention")
INPUT_NAME = "x"
aten = torch.ops.aten


def _refuse_training(model: nn.Module) -> None:
    """Refuse a model with any submodule in training mode (BatchNorm would use batch
    statistics and update its buffers, Dropout would drop). The message names a
    module whose behaviour depends on the mode when there is one."""
    training = [(p, m) for p, m in model.named_modules() if m.training]
    if not training:
        return
    mode_dependent = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
    path, m = next(((p, m) for p, m in training if isinstance(m, mode_dependent)), training[0])
    others = len(training) - 1
    raise ExportError(
        f"module {path or '<root>'} ({type(m).__name__}) is in training mode"
        + (f" (and {others} other module{'s' if others > 1 else ''})" if others else "")
        + "; call model.eval() first (ekfac evaluates BatchNorm with its running "
        "statistics and Dropout as the identity)"
    )


def _bind(node) -> Dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound: Dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _op_name(node) -> str:
    """``aten.linear.default`` for an ATen operator, the function's name otherwise."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _int_list(value: Any, n: int, default: Sequence[int]) -> List[int]:
    """An int or a list of 1 or ``n`` ints, as ATen's ``int[2]`` arguments."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return [int(v) for v in default]
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    return value * n if len(value) == 1 else value


class _GraphMapper:
    """Maps a functionalised ``torch.export`` program to the graph format."""

    def __init__(
        self, model: nn.Module, program, input_shape: List[int], dtype: str, allow_tied: bool = False
    ):
        self.model = model
        self.program = program
        self.input_shape = input_shape
        self.dtype = dtype
        sig = program.graph_signature
        self.parameters = dict(sig.inputs_to_parameters)  # placeholder -> "a.b.weight"
        self.buffers = dict(sig.inputs_to_buffers)
        self.values: Dict[Any, str] = {}  # fx node -> graph value name
        self.nodes: List[Dict[str, Any]] = []
        # Paths of modules with tensors are reserved for the nodes of parameterised ops.
        self.taken = {INPUT_NAME} | {
            p for p, m in model.named_modules()
            if p and (m._parameters or m._buffers)
        }
        self.calls: Dict[str, int] = {}  # module path -> nodes emitted for it
        self.batch = None
        # Constant tensors: buffers, lifted constants and every node computed from
        # constants only (a causal mask built by ``torch.ones(T, T).tril() == 0``).
        self.consts: Dict[Any, torch.Tensor] = {}
        tensors = {**program.state_dict, **program.constants}
        self.const_placeholders = {
            placeholder: tensors[target]
            for placeholder, target in {
                **self.buffers, **dict(sig.inputs_to_lifted_tensor_constants)
            }.items()
            if target in tensors
        }
        # Views of a whole parameter (an alias, a full slice, an embedding of
        # ``arange(num_embeddings)``): fx node -> the parameter's state_dict name.
        self.param_views: Dict[Any, str] = {}
        self.param_users: Dict[str, Any] = {}  # parameter -> the fx node that uses it
        self.allow_tied = allow_tied
        # Multi-output nodes (split, unbind): fx node -> emitter of its item ``i`` for the
        # getitem node that reads it.
        self.items: Dict[Any, Callable[[Any, int], None]] = {}
        # Permutes that move the batch axis, read only by an index along their first dim
        # (timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``): fx node -> (source, dims).
        self.batch_moves: Dict[Any, Any] = {}

    # -- helpers ---------------------------------------------------------------

    def fail(self, node, message: str) -> ExportError:
        return ExportError(f"node {node.name} (PyTorch operator {_op_name(node)}){self.where(node)}: {message}")

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def shape(self, node) -> List[int]:
        """Per-example shape of a tensor-valued fx node (its first axis must be the
        batch axis and the others static)."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise self.fail(node, "does not produce a single tensor")
        if val.dim() == 0 or str(val.shape[0]) != str(self.batch):
            raise self.fail(
                node,
                f"its value has shape {list(val.shape)} whose first axis is not the batch "
                "axis; ekfac's graphs keep the batch axis first everywhere",
            )
        try:
            return [int(d) for d in val.shape[1:]]
        except (TypeError, ValueError):
            raise self.fail(node, f"per-example shape {list(val.shape[1:])} depends on the batch size")

    def value(self, node, arg, what: str) -> str:
        """The graph value name of a tensor argument."""
        if arg in self.values:
            return self.values[arg]
        if getattr(arg, "op", None) == "placeholder" and (
            arg.name in self.parameters or arg.name in self.buffers
        ):
            target = self.parameters.get(arg.name) or self.buffers[arg.name]
            raise self.fail(node, f"uses the tensor {target} as its {what}; only activations can be")
        if arg in self.param_views:
            raise self.fail(node, f"uses the parameter {self.param_views[arg]} as its {what}; only activations can be")
        if arg in self.consts:
            raise self.fail(
                node,
                f"its {what} is a constant tensor of shape {list(self.consts[arg].shape)}, not computed "
                "from the input; only activations can be",
            )
        raise self.fail(node, f"its {what} is {arg!r}, not a tensor computed from the input")

    def param(self, node, arg, what: str, buffer: bool = False) -> Optional[str]:
        """The state_dict name of a lifted parameter (or buffer) argument, or None.
        A parameter used by a second node (tied weights) is refused by name."""
        if arg is None:
            return None
        if not buffer and arg in self.param_views:
            name = self.param_views[arg]
        else:
            table = self.buffers if buffer else self.parameters
            if getattr(arg, "op", None) != "placeholder" or arg.name not in table:
                kind = "buffer" if buffer else "parameter"
                raise self.fail(node, f"its {what} is not a module {kind} (computed weights are not supported)")
            name = table[arg.name]
        if not buffer:
            first = self.param_users.setdefault(name, node)
            if first is not node and not self.allow_tied:
                raise self.fail(
                    node,
                    f"uses the parameter {name} that node {first.name}{self.where(first)} uses too: "
                    "tied weights (a module called twice, or one parameter in two layers as "
                    "GPT-2's lm_head shares wte's weight) are not supported; KFAC gives each "
                    "layer its own block, so untie them (a separate module per call)",
                )
        return name

    def where(self, node) -> str:
        """`` in module <path> (<Kind>)`` for a node with a module stack, else empty."""
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, kind = list(stack.values())[-1]
            if path:
                return f" in module {path} ({kind.rsplit('.', 1)[-1]})"
        return ""

    def module_of(self, node, target: str, leaf: str) -> str:
        module, _, name = target.rpartition(".")
        if name != leaf:
            raise self.fail(
                node, f"its {leaf} is the tensor {target!r}, not a module's {leaf!r}"
            )
        return module

    def emit(self, node, op: str, inputs: List[str], attrs=None, module: Optional[str] = None) -> None:
        entry: Dict[str, Any] = {}
        if module is not None:
            if module == "":
                raise self.fail(node, "the root module itself holds the parameters; wrap them in a submodule")
            count = self.calls.get(module, 0)
            self.calls[module] = count + 1
            # A tied layer's later calls get fresh names; all keep "module".
            entry["name"] = module if count == 0 else self.fresh(f"{module}_{count}")
        else:
            entry["name"] = self.fresh(op)
        entry["op"] = op
        entry["inputs"] = inputs
        if module is not None and entry["name"] != module:
            entry["module"] = module
        if attrs is not None:
            entry["attrs"] = attrs
        self.nodes.append(entry)
        self.values[node] = entry["name"]

    # -- the mapping -------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        handlers = self.handlers()
        output = None
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.const_placeholders:
                    self.consts[node] = self.const_placeholders[node.name]
                    continue
                if node.name in self.parameters or node.name in self.buffers:
                    continue
                val = node.meta.get("val")
                self.batch = val.shape[0]
                self.values[node] = INPUT_NAME
                continue
            if node.op == "output":
                outs = node.args[0]
                if not isinstance(outs, (list, tuple)) or len(outs) != 1:
                    raise ExportError(
                        f"the model returns {len(outs)} values; ekfac needs exactly one tensor"
                    )
                out = outs[0]
                if not hasattr(out, "op"):
                    raise ExportError(f"the model returns {out!r}, not a tensor")
                self.shape(out)
                if self.values.get(out) == INPUT_NAME:
                    self.emit(out, "identity", [INPUT_NAME])
                output = self.values[out]
                continue
            if node.op != "call_function":
                raise self.fail(node, f"{node.op} nodes are not supported")
            if self.fold(node):
                continue
            handler = handlers.get(node.target)
            if handler is None:
                raise self.fail(
                    node,
                    "is not supported by ekfac's graph format (supported: linear, conv2d, "
                    "relu, sigmoid, tanh, gelu, silu, leaky_relu, elu, hardtanh, relu6, "
                    "hardswish, hardsigmoid, softplus, mish, max_pool2d, avg_pool2d, "
                    "adaptive_avg_pool2d, flatten/view/reshape/unsqueeze/squeeze, "
                    "transpose, permute, add, add of a parameter, mul/div by a constant, "
                    "mul of two activations or by a parameter, add/sub of a constant, "
                    "sub of two activations, "
                    "mean, batch_norm (eval), layer_norm, group_norm, instance_norm, cat, "
                    "upsample_nearest2d, "
                    "embedding, matmul, softmax, masked_fill with a constant mask, "
                    "scaled_dot_product_attention, slicing and indexing a per-example dim "
                    "(x[:, a:b], x[:, i], split, chunk, unbind), cat of a parameter expanded "
                    "over the batch, "
                    "dropout (eval))",
                )
            handler(node)
        assert output is not None
        used = {v for n in self.nodes for v in n["inputs"]} | {output}
        dead = [n["name"] for n in self.nodes if n["name"] not in used]
        if dead:
            # Values the output does not depend on (e.g. a computed but unused branch).
            keep = self.live(output)
            self.nodes = [n for n in self.nodes if n["name"] in keep]
        return {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "inputs": [{"name": INPUT_NAME, "shape": self.input_shape, "dtype": self.dtype}],
            "nodes": self.nodes,
            "output": output,
            "parameters": [n for n, _ in self.model.named_parameters()],
        }

    def live(self, output: str) -> set:
        by_name = {n["name"]: n for n in self.nodes}
        keep, stack = set(), [output]
        while stack:
            name = stack.pop()
            if name in keep or name not in by_name:
                continue
            keep.add(name)
            stack.extend(by_name[name]["inputs"])
        return keep

    def handlers(self) -> Dict[Any, Callable]:
        table: Dict[Any, Callable] = {}

        def add(names: Sequence[str], fn: Callable) -> None:
            for name in names:
                packet, _, overload = name.partition(".")
                op = getattr(getattr(aten, packet, None), overload or "default", None)
                if op is not None:
                    table[op] = fn

        add(["linear"], self.linear)
        add(["conv2d"], self.conv2d)
        add(["conv2d.padding"], self.conv2d_string_padding)
        for op in ("relu", "sigmoid", "tanh", "silu"):
            add([op, f"{op}_"], self.unary(op))
        add(["gelu", "gelu_"], self.gelu)
        for op in ("leaky_relu", "elu", "hardtanh", "relu6", "hardswish", "hardsigmoid",
                   "softplus", "mish"):
            add([op, f"{op}_"], self.pointwise(op))
        add(["max_pool2d", "max_pool2d_with_indices"], self.max_pool2d)
        add(["avg_pool2d"], self.avg_pool2d)
        add(["adaptive_avg_pool2d"], self.adaptive_avg_pool2d)
        add(["mean.dim"], self.mean)
        add(["flatten.using_ints", "view", "reshape", "_unsafe_view"], self.flatten)
        add(["add.Tensor", "add_.Tensor", "add.Scalar"], self.add)
        add(["sub.Tensor", "sub_.Tensor", "sub.Scalar"], self.sub)
        add(["rsub.Scalar", "rsub.Tensor"], self.rsub)
        add(["batch_norm", "_native_batch_norm_legit_no_training"], self.batch_norm)
        add(["_native_batch_norm_legit"], self.batch_norm_training)
        add(["_native_batch_norm_legit.no_stats"], self.batch_norm_no_stats)
        add(["layer_norm"], self.layer_norm)
        add(["group_norm"], self.group_norm)
        add(["instance_norm"], self.instance_norm)
        add(["cat"], self.cat)
        add(["upsample_nearest2d.vec", "upsample_nearest2d"], self.upsample_nearest2d)
        add(["dropout", "clone", "alias", "contiguous", "lift_fresh_copy", "detach"], self.identity)
        add(["sym_size.int"], lambda node: None)
        table[operator.getitem] = self.getitem
        # Arithmetic on sizes (``B * T``, ``C // h``): a shape that depends on it is
        # checked where it is used (its first axis must stay the batch axis).
        for op in (operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv):
            table[op] = lambda node: None
        # Transformers (issue 11).
        add(["unsqueeze", "squeeze", "squeeze.dim", "squeeze.dims"], self.flatten)
        add(["transpose.int"], self.transpose)
        add(["permute"], self.permute)
        add(["slice.Tensor"], self.slice)
        add(["select.int"], self.select)
        add(["split.Tensor", "split_with_sizes", "chunk"], self.split)
        add(["unbind.int"], self.unbind)
        add(["expand"], self.expand)
        add(["embedding"], self.embedding)
        add(["mul.Tensor", "mul.Scalar", "mul_.Tensor"], self.scale("mul_constant"))
        add(["div.Tensor", "div.Scalar", "div_.Tensor"], self.scale("div_constant"))
        add(["softmax.int", "_softmax"], self.softmax)
        add(["masked_fill.Scalar", "masked_fill.Tensor", "masked_fill_.Scalar"], self.masked_fill)
        add(["where.self", "where.ScalarOther", "where.ScalarSelf"], self.where_mask)
        add(["matmul", "bmm"], self.matmul)
        add(["scaled_dot_product_attention"], self.attention)
        table[_MHA_OP] = self.multi_head_attention
        comparisons = ["eq", "ne", "gt", "ge", "lt", "le"]
        add([f"{op}.{kind}" for op in comparisons for kind in ("Scalar", "Tensor")]
            + ["logical_not", "logical_and", "logical_or", "bitwise_not", "bitwise_and.Tensor",
               "bitwise_or.Tensor"], self.data_mask)
        return table

    def data_mask(self, node) -> None:
        raise self.fail(
            node,
            "computes a mask from the input (or from parameters); only constant masks (buffers, "
            "or tensors built from constants such as torch.ones(T, T).tril()) are supported",
        )

    # -- constants and parameter views ---------------------------------------------

    def fold(self, node) -> bool:
        """Evaluate ``node`` now when it is computed from constants only (a mask from
        ``torch.ones(T, T).tril() == 0`` or a buffer); True when it was."""
        inputs = node.all_input_nodes
        if any(n not in self.consts for n in inputs):
            return False
        if not isinstance(node.meta.get("val"), torch.Tensor):
            # A check on constants (``_assert_tensor_metadata`` after ``mask.bool()``).
            return bool(inputs) and not node.users
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.consts[n])
        try:
            with torch.no_grad():
                result = node.target(*args, **kwargs)
        except Exception as e:  # report, whatever the operator raises
            raise self.fail(node, f"cannot evaluate this constant ({type(e).__name__}: {e})") from e
        if not isinstance(result, torch.Tensor):
            return False
        self.consts[node] = result
        return True

    def param_name(self, arg) -> Optional[str]:
        """The state_dict name when ``arg`` is a whole parameter (or a view of all of
        it), else None."""
        if arg in self.param_views:
            return self.param_views[arg]
        if getattr(arg, "op", None) == "placeholder":
            return self.parameters.get(arg.name)
        return None

    def constant(self, node, arg, what: str, finite: bool = True) -> Optional[float]:
        """A Python number, or a one-element constant tensor, as a float; None when
        ``arg`` is neither. Refused when not finite, unless ``finite`` is False."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            value = float(arg)
        elif arg in self.consts and self.consts[arg].numel() == 1:
            value = float(self.consts[arg].item())
        else:
            return None
        if finite and not math.isfinite(value):
            raise self.fail(node, f"its {what} {value} is not finite")
        return value

    def mask(self, node, arg, what: str, target: List[int]) -> torch.Tensor:
        """The constant mask ``arg`` (see ``shaped_mask``); refused when it is computed
        from the input or from parameters."""
        if arg not in self.consts:
            raise self.fail(
                node,
                f"its {what} is computed from the input (or from parameters); only constant masks "
                "(buffers, or tensors built from constants such as torch.ones(T, T).tril()) are supported",
            )
        return self.shaped_mask(node, self.consts[arg], what, target)

    def shaped_mask(self, node, mask: torch.Tensor, what: str, target: List[int]) -> torch.Tensor:
        """A constant mask broadcasting against the per-example shape ``target``, its
        leading axes of size 1 removed (``[1, 1, T, T]`` -> ``[T, T]``)."""
        given = list(mask.shape)
        while mask.dim() > 1 and mask.shape[0] == 1:
            mask = mask[0]
        shape = list(mask.shape)
        if mask.dim() > len(target) or any(
            m not in (1, t) for m, t in zip(reversed(shape), reversed(target))
        ):
            raise self.fail(
                node,
                f"its {what} of shape {given} does not broadcast against the "
                f"per-example shape {target} (it may not vary over the batch)",
            )
        return mask

    def slice(self, node) -> None:
        """A slice that keeps all of a parameter (``pos[:, :T]`` with T the whole
        length) is that parameter; any other slice of a parameter is refused. A slice
        of an activation along a per-example dim with step 1 is a ``slice`` node."""
        b = _bind(node)
        source = b["self"]
        name = self.param_name(source)
        if name is not None and list(node.meta["val"].shape) == list(source.meta["val"].shape):
            self.param_views[node] = name
            return
        if name is not None:
            raise self.fail(
                node,
                f"slices the parameter {name} of shape {list(source.meta['val'].shape)} to "
                f"{list(node.meta['val'].shape)}; only whole parameters can be used (make its "
                "length equal to the sequence length)",
            )
        before, after = self.shape(source), self.shape(node)
        x = self.value(node, source, "input")
        if before == after:
            self.values[node] = x
            return
        rank = len(before) + 1
        dim = int(b["dim"]) % rank
        step = int(b["step"])
        if dim == 0:
            raise self.fail(node, "slices the batch axis; the batch axis must stay whole")
        if step != 1:
            raise self.fail(node, f"step={step} is not supported, only 1")
        # PyTorch clamps start and end to [0, size] (after adding size to negatives).
        size = before[dim - 1]
        start = 0 if b["start"] is None else int(b["start"])
        start = min(max(start + size if start < 0 else start, 0), size)
        self.emit(node, "slice", [x], {"dim": dim, "start": start, "end": start + after[dim - 1]})

    def select(self, node) -> None:
        """``x[:, i]`` (``select``) of an activation: a ``slice`` of length 1 and a
        ``reshape`` without that dim (a cls token's or the last token's features)."""
        b = _bind(node)
        source, dim, index = b["self"], int(b["dim"]), int(b["index"])
        if source in self.batch_moves:
            return self.moved_index(node, source, dim, index)
        self.emit_index(node, source, dim, index)

    def emit_index(self, node, source, dim: int, index: int) -> None:
        """``node`` = ``source.select(dim, index)``: ``slice`` + ``reshape``."""
        x = self.value(node, source, "input")
        before = self.shape(source)
        rank = len(before) + 1
        if not -rank <= dim < rank:
            raise self.fail(node, f"dim={dim} out of range for rank {rank}")
        dim %= rank
        if dim == 0:
            raise self.fail(node, "selects along the batch axis; the batch axis must stay whole")
        size = before[dim - 1]
        if not -size <= index < size:
            raise self.fail(node, f"index {index} is out of range for size {size}")
        index %= size
        after = before[: dim - 1] + before[dim:]
        if not after:
            raise self.fail(node, "leaves a per-example scalar; ekfac's values keep at least one dim")
        self.emit(node, "slice", [x], {"dim": dim, "start": index, "end": index + 1})
        self.emit(node, "reshape", [self.values[node]], {"shape": after})

    def moved_index(self, node, permuted, dim: int, index: int) -> None:
        """``node`` = ``source.permute(dims)[index]`` where ``dims`` moves the batch axis
        off the front and ``dims[0]`` becomes the indexed one: ``source.select(dims[0],
        index)`` permuted by the other dims, which keep the batch axis first."""
        source, dims = self.batch_moves[permuted]
        if dim % len(dims) != 0:
            raise self.fail(node, f"indexes dim {dim} of a permute that moved the batch axis; only dim 0 can be")
        self.emit_index(node, source, dims[0], index)
        rest = [d - (d > dims[0]) for d in dims[1:]]
        if rest[0] != 0:
            raise self.fail(node, f"permutes the batch axis (dims {dims}); the batch axis must stay first")
        self.shape(node)
        if rest != list(range(len(rest))):
            self.emit(node, "permute", [self.values[node]], {"dims": rest})

    def split(self, node) -> None:
        """``split`` / ``split_with_sizes`` / ``chunk`` of an activation along a
        per-example dim (nanoGPT's ``qkv.split(C, dim=2)``): item ``i`` is a ``slice``."""
        b = _bind(node)
        source, dim = b["self"], int(b.get("dim") or 0)
        x = self.value(node, source, "input")
        before = self.shape(source)
        rank = len(before) + 1
        if not -rank <= dim < rank:
            raise self.fail(node, f"dim={dim} out of range for rank {rank}")
        dim %= rank
        if dim == 0:
            raise self.fail(node, "splits the batch axis; the batch axis must stay whole")
        sizes = [int(t.shape[dim]) for t in node.meta["val"]]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def item(getitem, i: int) -> None:
            self.shape(getitem)
            if sizes[i] == before[dim - 1]:
                self.values[getitem] = x
                return
            self.emit(getitem, "slice", [x], {"dim": dim, "start": starts[i], "end": starts[i] + sizes[i]})

        self.items[node] = item

    def unbind(self, node) -> None:
        """``unbind`` along a per-example dim, or along dim 0 of a permute that moved
        the batch axis (timm's attention): item ``i`` is that index."""
        b = _bind(node)
        source, dim = b["self"], int(b.get("dim") or 0)
        if source in self.batch_moves:
            self.items[node] = lambda getitem, i: self.moved_index(getitem, source, dim, i)
            return
        self.items[node] = lambda getitem, i: self.emit_index(getitem, source, dim, i)

    # -- transformer ops (issue 11) --------------------------------------------------

    def embedding(self, node) -> None:
        b = _bind(node)
        weight, indices = b["weight"], b["indices"]
        num, dim = (int(d) for d in weight.meta["val"].shape)
        if indices in self.consts:
            ids = self.consts[indices]
            name = self.param_name(weight)
            if name is not None and ids.dim() == 1 and torch.equal(ids, torch.arange(num)):
                self.param_views[node] = name  # the whole table: a learned [T, D] tensor
                return
            raise self.fail(
                node,
                f"looks up the constant positions {list(ids.shape)} in a table of {num} rows; only "
                f"all rows in order (torch.arange({num})) can be exported, as a learned positional "
                "tensor: give the table exactly T rows",
            )
        x = self.value(node, indices, "indices")
        if x != INPUT_NAME or self.dtype != "i64":
            raise self.fail(
                node,
                "looks up indices that are not the model's integer input; only the token ids x "
                "(an integer tensor [N, T]) can be embedded",
            )
        w = self.param(node, weight, "weight")
        module = self.module_of(node, w, "weight")
        padding = b["padding_idx"]
        self.shape(node)
        self.emit(node, "embedding", [x], {
            "num_embeddings": num,
            "embedding_dim": dim,
            "padding_idx": None if padding is None or int(padding) < 0 else int(padding),
        }, module=module)

    def add_parameter(self, node, activation, parameter) -> None:
        """``x + p`` for a learned ``p`` that broadcasts to ``x`` (a positional embedding)."""
        self.parameter_op(node, activation, parameter, "add_parameter",
                          "adds the parameter {name} of shape {shape} to a value")

    def mul_parameter(self, node, activation, parameter) -> None:
        """``x * p`` for a learned ``p`` that broadcasts to ``x`` (a layer scale)."""
        self.parameter_op(node, activation, parameter, "mul_parameter",
                          "multiplies by the parameter {name} of shape {shape} a value")

    def parameter_op(self, node, activation, parameter, op: str, what: str) -> None:
        """``op`` of an activation and a whole parameter that broadcasts to its shape
        without a batch axis; ``what`` (with ``{name}`` and ``{shape}``) words the refusal."""
        x = self.value(node, activation, "input")
        name = self.param(node, parameter, "parameter")
        in_shape, shape = self.shape(activation), self.param_shape(name)
        rank = len(in_shape) + 1
        if len(shape) > rank or (len(shape) == rank and shape[0] != 1) or self.shape(node) != in_shape:
            raise self.fail(
                node,
                f"{what.format(name=name, shape=shape)} of per-example shape "
                f"{in_shape}; it must broadcast to the value's shape without a batch axis",
            )
        self.emit(node, op, [x], {"parameter": name, "shape": shape})

    def scale(self, op: str) -> Callable:
        """``x * c`` / ``x / c`` (and ``c * x``) for a constant number ``c``."""

        def handler(node) -> None:
            b = _bind(node)
            a, c = b["self"], b["other"]
            if op == "mul_constant" and self.constant(node, a, "factor") is not None:
                a, c = c, a
            value = self.constant(node, c, "factor" if op == "mul_constant" else "divisor")
            if value is None and op == "mul_constant" and a in self.values and c in self.values:
                return self.multiply(node, a, c)
            if value is None and op == "mul_constant":
                for act, par in ((a, c), (c, a)):
                    if act in self.values and self.param_name(par) is not None:
                        return self.mul_parameter(node, act, par)
            if value is None:
                kind = "multiplies" if op == "mul_constant" else "divides"
                raise self.fail(
                    node,
                    f"{kind} by a tensor; only multiplication and division of an activation by a "
                    "constant number are supported",
                )
            if b.get("rounding_mode") is not None:
                raise self.fail(node, f"rounding_mode={b['rounding_mode']!r} is not supported")
            if op == "div_constant" and value == 0:
                raise self.fail(node, "divides by zero")
            x = self.value(node, a, "input")
            self.shape(node)
            self.emit(node, op, [x], {"value": value})

        return handler

    def multiply(self, node, a, c) -> None:
        """``a * c`` of two activations (gating, squeeze-and-excitation): per-example
        shapes of the same rank whose sizes are equal or 1 in one of them."""
        sa, sc = self.shape(a), self.shape(c)
        if len(sa) != len(sc) or any(x != y and 1 not in (x, y) for x, y in zip(sa, sc)):
            raise self.fail(
                node,
                f"multiplies values of per-example shapes {sa} and {sc}; they must have the same "
                "number of dims, each equal or 1 in one of them",
            )
        x, y = self.value(node, a, "first input"), self.value(node, c, "second input")
        self.shape(node)
        self.emit(node, "mul", [x, y])

    def softmax(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["self"], "input")
        rank = len(self.shape(b["self"])) + 1
        dim = int(b["dim"])
        if dim % rank != rank - 1 or not -rank <= dim < rank:
            raise self.fail(node, f"softmax over dim={dim} of a rank-{rank} value; only the last dim is supported")
        if b.get("dtype") is not None or b.get("half_to_float"):
            raise self.fail(node, "softmax with a dtype conversion is not supported")
        self.shape(node)
        self.emit(node, "softmax", [x], {"dim": dim})

    def masked_fill(self, node) -> None:
        b = _bind(node)
        mask = self.mask(node, b["mask"], "mask", self.shape(b["self"]))
        self.emit_masked_fill(node, b["self"], mask, b["value"])

    def where_mask(self, node) -> None:
        """``torch.where(mask, x, c)`` (or ``where(mask, c, x)``) with a constant mask
        and a constant number ``c``: a ``masked_fill`` where the mask selects ``c``."""
        b = _bind(node)
        cond, a, c = b["condition"], b["self"], b["other"]
        def number(arg):
            return self.constant(node, arg, "value", finite=False)

        if number(a) is not None and number(c) is None:
            a, c, invert = c, a, False  # where(mask, c, x): fill where mask is true
        else:
            invert = True  # where(mask, x, c): fill where mask is false
        if number(c) is None:
            raise self.fail(node, "selects between two tensors; only torch.where(constant mask, x, number) is supported")
        mask = self.mask(node, cond, "condition", self.shape(a)).bool()
        self.emit_masked_fill(node, a, ~mask if invert else mask, number(c))

    def emit_masked_fill(self, node, source, mask: torch.Tensor, value) -> None:
        """A ``masked_fill`` node of ``source`` with the constant ``mask`` (shaped by
        ``shaped_mask``) and fill ``value``."""
        x = self.value(node, source, "input")
        in_shape = self.shape(source)
        if isinstance(value, torch.fx.Node):
            if value not in self.consts or self.consts[value].numel() != 1:
                raise self.fail(node, "the fill value is not a constant number")
            value = self.consts[value].item()
        value = float(value)
        if math.isnan(value):
            raise self.fail(node, "the fill value is NaN")
        if self.shape(node) != in_shape:
            raise self.fail(node, "the mask broadcasts the input to a larger shape")
        self.emit(node, "masked_fill", [x], {
            "mask_shape": list(mask.shape),
            "mask": [int(v) for v in mask.bool().flatten().tolist()],
            "value": value if math.isfinite(value) else ("inf" if value > 0 else "-inf"),
        })

    def matmul(self, node) -> None:
        a, c = node.args[0], node.args[1]
        for arg, what in ((a, "first"), (c, "second")):
            name = self.param_name(arg)
            if name is not None:
                raise self.fail(
                    node,
                    f"multiplies by the parameter {name}; write it as an nn.Linear (a curvature layer) "
                    "rather than a matmul with a parameter",
                )
        sa, sc = self.shape(a), self.shape(c)
        if len(sa) < 2 or len(sc) < 2 or sa[:-2] != sc[:-2] or sa[-1] != sc[-2]:
            raise self.fail(
                node,
                f"multiplies values of per-example shapes {sa} and {sc}; only [*, M, K] @ [*, K, N] "
                "with equal leading dims (no broadcasting, no vectors) is supported",
            )
        inputs = [self.value(node, a, "first input"), self.value(node, c, "second input")]
        self.shape(node)
        self.emit(node, "matmul", inputs)

    def attention(self, node) -> None:
        b = _bind(node)
        q, k, v = b["query"], b["key"], b["value"]
        sq, sk, sv = self.shape(q), self.shape(k), self.shape(v)
        if (
            min(len(sq), len(sk), len(sv)) < 2
            or not sq[:-2] == sk[:-2] == sv[:-2]
            or sq[-1] != sk[-1]
            or sk[-2] != sv[-2]
        ):
            raise self.fail(
                node,
                f"attention of per-example shapes q {sq}, k {sk}, v {sv}; expected [*, L, E], [*, S, E], "
                "[*, S, Ev] with equal leading dims",
            )
        if float(b.get("dropout_p") or 0.0) != 0.0:
            raise self.fail(node, f"dropout_p={b['dropout_p']}; export in eval mode with dropout_p=0")
        if b.get("enable_gqa"):
            raise self.fail(node, "enable_gqa=True is not supported")
        inputs = [self.value(node, t, what) for t, what in ((q, "query"), (k, "key"), (v, "value"))]
        scale = b.get("scale")
        attrs: Dict[str, Any] = {
            "is_causal": bool(b.get("is_causal")),
            "scale": None if scale is None else float(scale),
        }
        if b.get("attn_mask") is not None:
            target = sq[:-1] + [sk[-2]]
            mask = self.mask(node, b["attn_mask"], "attn_mask", target)
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == -math.inf)).all()):
                    raise self.fail(
                        node,
                        "attn_mask is a float mask with values other than 0 and -inf; only boolean "
                        "masks (or 0/-inf masks) are supported",
                    )
                mask = mask == 0
            if not bool(mask.broadcast_to(target).any(-1).all()):
                raise self.fail(node, "attn_mask masks every key of some query (PyTorch gives NaN there)")
            attrs["attn_mask_shape"] = list(mask.shape)
            attrs["attn_mask"] = [int(t) for t in mask.flatten().tolist()]
        self.shape(node)
        self.emit(node, "scaled_dot_product_attention", inputs, attrs)

    def multi_head_attention(self, node) -> None:
        """The custom op of a patched nn.MultiheadAttention (see ``_mha_forward``)."""
        b = _bind(node)
        q, k, v = b["query"], b["key"], b["value"]
        sq, sk, sv = self.shape(q), self.shape(k), self.shape(v)
        w = self.param(node, b["in_proj_weight"], "in_proj_weight")
        module = self.module_of(node, w, "in_proj_weight")
        where = f"module {module} (MultiheadAttention)"
        embed_dim = int(b["in_proj_weight"].meta["val"].shape[1])
        heads = int(b["num_heads"])
        if len(sq) != 2 or len(sk) != 2 or sk != sv or sq[1] != embed_dim or sk[1] != embed_dim:
            raise ExportError(
                f"{where}: query, key, value of per-example shapes {sq}, {sk}, {sv}; expected "
                f"[L, {embed_dim}], [S, {embed_dim}], [S, {embed_dim}]"
            )
        names = {"in_proj_bias": b["in_proj_bias"], "out_proj.weight": b["out_proj_weight"],
                 "out_proj.bias": b["out_proj_bias"]}
        for suffix, arg in names.items():
            name = self.param(node, arg, suffix)
            if name is not None and name != f"{module}.{suffix}":
                raise ExportError(f"{where}: its {suffix} is the tensor {name}, not {module}.{suffix}")
            names[suffix] = name
        bias = names["in_proj_bias"] is not None
        if bias != (names["out_proj.bias"] is not None):
            raise ExportError(f"{where}: only one of in_proj_bias and out_proj.bias exists; not supported")
        inputs = [self.value(node, t, what) for t, what in ((q, "query"), (k, "key"), (v, "value"))]
        attrs: Dict[str, Any] = {"embed_dim": embed_dim, "num_heads": heads, "bias": bias}
        mask_arg = b["attn_mask"]
        if mask_arg is not None:
            if mask_arg not in self.consts:
                raise ExportError(
                    f"{where}: its attn_mask is computed from the input (or from parameters); only "
                    "constant masks (buffers, or tensors built from constants such as "
                    "nn.Transformer.generate_square_subsequent_mask(T)) are supported"
                )
            mask = self.consts[mask_arg]
            target = [sq[0], sk[0]]
            if list(mask.shape) != target:
                raise ExportError(
                    f"{where}: its attn_mask has shape {list(mask.shape)}; only a 2-D [L, S] = "
                    f"{target} mask (the same for every example and head) is supported"
                )
            if mask.dtype == torch.bool:
                keep = ~mask
            elif mask.is_floating_point() and bool(((mask == 0) | (mask == -math.inf)).all()):
                keep = mask == 0
            else:
                raise ExportError(
                    f"{where}: its attn_mask is a {mask.dtype} mask with values other than 0 and "
                    "-inf; only boolean masks (True = masked out) and 0/-inf float masks are supported"
                )
            if not bool(keep.any(-1).all()):
                raise ExportError(f"{where}: its attn_mask masks every key of some query (PyTorch gives NaN there)")
            if b["is_causal"] and not torch.equal(keep, torch.ones(target, dtype=torch.bool).tril()):
                raise ExportError(
                    f"{where}: is_causal=True with an attn_mask that is not the causal mask; PyTorch "
                    "uses the one or the other depending on its code path"
                )
            attrs["attn_mask_shape"] = target
            attrs["attn_mask"] = [int(t) for t in keep.flatten().tolist()]
        self.shape(node)
        self.emit(node, "multi_head_attention", inputs, attrs, module=module)

    def transpose(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["self"], "input")
        rank = len(self.shape(b["self"])) + 1
        d0, d1 = int(b["dim0"]), int(b["dim1"])
        if not (-rank <= d0 < rank and -rank <= d1 < rank):
            raise self.fail(node, f"dims ({d0}, {d1}) out of range for rank {rank}")
        if d0 % rank == d1 % rank:
            self.values[node] = x
            return
        if d0 % rank == 0 or d1 % rank == 0:
            raise self.fail(node, f"transposes the batch axis (dims {d0}, {d1}); the batch axis must stay first")
        self.shape(node)
        self.emit(node, "transpose", [x], {"dim0": d0, "dim1": d1})

    def permute(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["self"], "input")
        rank = len(self.shape(b["self"])) + 1
        dims = [int(d) % rank for d in b["dims"]]
        if sorted(dims) != list(range(rank)):
            raise self.fail(node, f"dims {list(b['dims'])} are not a permutation of rank {rank}")
        if dims[0] != 0:
            indexed = all(
                u.target in (aten.unbind.int, aten.select.int) and int(_bind(u).get("dim") or 0) % rank == 0
                for u in node.users
            )
            if not indexed or dims[1] != 0:
                raise self.fail(node, f"permutes the batch axis (dims {dims}); the batch axis must stay first")
            self.batch_moves[node] = (b["self"], dims)
            return
        self.shape(node)
        if dims == list(range(rank)):
            self.values[node] = x
            return
        self.emit(node, "permute", [x], {"dims": dims})

    def identity(self, node) -> None:
        b = _bind(node)
        if node.target == aten.dropout.default and b.get("train"):
            raise self.fail(node, "dropout in training mode; call model.eval() first")
        first = next(iter(b.values()))
        name = self.param_name(first)
        if name is not None:  # an alias of a parameter, e.g. ``self.pos`` read twice
            self.param_views[node] = name
            return
        self.shape(node)
        self.values[node] = self.value(node, first, "input")

    def getitem(self, node) -> None:
        source, index = node.args
        if source in self.items:
            self.items[source](node, int(index))
            return
        if source.target in (
            aten._native_batch_norm_legit_no_training.default,
            aten.batch_norm.default,
            aten.max_pool2d_with_indices.default,
        ) and index == 0:
            self.values[node] = self.values[source]
            return
        if source.target in (
            aten._native_batch_norm_legit_no_training.default,
            aten.max_pool2d_with_indices.default,
        ):
            # The saved statistics / indices: not a value of the graph.
            if node.users:
                raise self.fail(node, f"output {index} of {_op_name(source)} is used; only output 0 can be")
            return
        raise self.fail(node, f"indexing the result of {_op_name(source)} is not supported")

    def linear(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["input"], "input")
        in_shape = self.shape(b["input"])
        w = self.param(node, b["weight"], "weight")
        module = self.module_of(node, w, "weight")
        bias = self.param(node, b["bias"], "bias")
        if bias is not None and bias != f"{module}.bias":
            raise self.fail(node, f"weight {w} and bias {bias} belong to different modules")
        weight = b["weight"].meta["val"]
        if not in_shape:
            raise self.fail(node, "linear of a per-example scalar")
        self.shape(node)
        self.emit(node, "linear", [x], {
            "in_features": int(weight.shape[1]),
            "out_features": int(weight.shape[0]),
            "bias": bias is not None,
        }, module=module)

    def conv2d(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["input"], "input")
        in_shape = self.shape(b["input"])
        if len(in_shape) != 3:
            raise self.fail(node, f"conv2d input has per-example shape {in_shape}, expected [C, H, W]")
        w = self.param(node, b["weight"], "weight")
        module = self.module_of(node, w, "weight")
        bias = self.param(node, b["bias"], "bias")
        if bias is not None and bias != f"{module}.bias":
            raise self.fail(node, f"weight {w} and bias {bias} belong to different modules")
        weight = b["weight"].meta["val"]
        groups = int(b["groups"])
        self.shape(node)
        self.emit(node, "conv2d", [x], {
            "in_channels": int(weight.shape[1]) * groups,
            "out_channels": int(weight.shape[0]),
            "kernel_size": [int(weight.shape[2]), int(weight.shape[3])],
            "stride": _int_list(b["stride"], 2, [1, 1]),
            "padding": _int_list(b["padding"], 2, [0, 0]),
            "dilation": _int_list(b["dilation"], 2, [1, 1]),
            "groups": groups,
            "bias": bias is not None,
        }, module=module)

    def conv2d_string_padding(self, node) -> None:
        raise self.fail(
            node, f"string padding {_bind(node)['padding']!r} is not supported; give explicit integer padding"
        )

    def unary(self, op: str) -> Callable:
        def handler(node) -> None:
            x = self.value(node, node.args[0], "input")
            self.shape(node)
            self.emit(node, op, [x])

        return handler

    def pointwise(self, op: str) -> Callable:
        """An activation with constants (ops ``leaky_relu``, ``elu``, ``hardtanh``,
        ``hardswish``, ``hardsigmoid``, ``softplus``, ``mish``; ``relu6`` is
        ``hardtanh`` from 0 to 6)."""
        names = {
            "leaky_relu": ["negative_slope"],
            "elu": ["alpha"],
            "hardtanh": ["min_val", "max_val"],
            "softplus": ["beta", "threshold"],
        }

        def handler(node) -> None:
            b = _bind(node)
            x = self.value(node, b["self"], "input")
            self.shape(node)
            if op == "elu" and (float(b["scale"]) != 1.0 or float(b["input_scale"]) != 1.0):
                raise self.fail(node, "elu with scale or input_scale other than 1 (SELU, CELU) "
                                "is not supported")
            attrs = {k: float(b[k]) for k in names.get(op, [])}
            if op == "relu6":
                self.emit(node, "hardtanh", [x], {"min_val": 0.0, "max_val": 6.0})
            else:
                self.emit(node, op, [x], attrs)

        return handler

    def gelu(self, node) -> None:
        b = _bind(node)
        approximate = b.get("approximate") or "none"
        if approximate not in ("none", "tanh"):
            raise self.fail(node, f"approximate={approximate!r} is not supported")
        x = self.value(node, b["self"], "input")
        self.shape(node)
        self.emit(node, "gelu", [x], {"approximate": approximate})

    def pool_input(self, node, b) -> str:
        x = self.value(node, b["self"], "input")
        if len(self.shape(b["self"])) != 3:
            raise self.fail(node, f"pooling input has per-example shape {self.shape(b['self'])}, expected [C, H, W]")
        if b.get("ceil_mode"):
            raise self.fail(node, "ceil_mode=True is not supported")
        return x

    def max_pool2d(self, node) -> None:
        b = _bind(node)
        x = self.pool_input(node, b)
        kernel = _int_list(b["kernel_size"], 2, [])
        dilation = _int_list(b["dilation"], 2, [1, 1])
        if dilation != [1, 1]:
            raise self.fail(node, f"dilation={dilation} is not supported, only 1")
        self.emit(node, "max_pool2d", [x], {
            "kernel_size": kernel,
            "stride": _int_list(b["stride"], 2, kernel),
            "padding": _int_list(b["padding"], 2, [0, 0]),
        })

    def avg_pool2d(self, node) -> None:
        b = _bind(node)
        x = self.pool_input(node, b)
        if not b["count_include_pad"]:
            raise self.fail(node, "count_include_pad=False is not supported")
        if b["divisor_override"] is not None:
            raise self.fail(node, f"divisor_override={b['divisor_override']} is not supported")
        kernel = _int_list(b["kernel_size"], 2, [])
        self.emit(node, "avg_pool2d", [x], {
            "kernel_size": kernel,
            "stride": _int_list(b["stride"], 2, kernel),
            "padding": _int_list(b["padding"], 2, [0, 0]),
        })

    def adaptive_avg_pool2d(self, node) -> None:
        b = _bind(node)
        x = self.value(node, b["self"], "input")
        if len(self.shape(b["self"])) != 3:
            raise self.fail(node, f"input has per-example shape {self.shape(b['self'])}, expected [C, H, W]")
        self.shape(node)
        self.emit(node, "adaptive_avg_pool2d", [x], {"output_size": _int_list(b["output_size"], 2, [])})

    def mean(self, node) -> None:
        """``x.mean((2, 3), keepdim)`` of a 4-D value: a global average pool; any
        other mean over per-example dims (token pooling): ``mean``."""
        b = _bind(node)
        in_shape = self.shape(b["self"])
        rank = len(in_shape) + 1
        given = list(b["dim"] or [])
        dims = sorted(d % rank for d in given)
        if b.get("dtype") is not None:
            raise self.fail(node, "mean with a dtype conversion is not supported")
        if not given or 0 in dims or any(not -rank <= d < rank for d in given):
            raise self.fail(node, f"mean over dims {given} of a rank-{rank} value; the batch axis cannot be reduced")
        x = self.value(node, b["self"], "input")
        self.shape(node)
        if len(in_shape) != 3 or dims != [2, 3]:
            self.emit(node, "mean", [x], {
                "dim": int(given[0]) if len(given) == 1 else [int(d) for d in given],
                "keepdim": bool(b["keepdim"]),
            })
            return
        if b["keepdim"]:
            self.emit(node, "adaptive_avg_pool2d", [x], {"output_size": [1, 1]})
            return
        self.emit(node, "adaptive_avg_pool2d", [x], {"output_size": [1, 1]})
        self.emit(node, "flatten", [self.values[node]], {"start_dim": 1, "end_dim": -1})

    def flatten(self, node) -> None:
        """``flatten``, ``view`` and ``reshape`` that merge consecutive axes after the
        batch axis (or change nothing)."""
        source = node.args[0]
        x = self.value(node, source, "input")
        before, after = self.shape(source), self.shape(node)
        if before == after:
            self.values[node] = x
            return
        # Find the merged range [i, j) of the per-example axes.
        i = 0
        while i < min(len(before), len(after)) and before[i] == after[i]:
            i += 1
        i = min(i, len(after) - 1)
        tail = len(after) - i - 1
        j = len(before) - tail
        ok = (
            i < len(after)
            and j > i + 1
            and before[:i] == after[:i]
            and before[j:] == after[i + 1:]
        )
        if ok:
            merged = 1
            for d in before[i:j]:
                merged *= d
            ok = merged == after[i]
        if not ok:
            # Any other per-example reshape (a head split [T, D] -> [T, h, D/h]); its
            # first axis is the batch axis (checked by self.shape), so nothing crosses
            # examples.
            self.emit(node, "reshape", [x], {"shape": after})
            return
        end = -1 if j == len(before) else j  # PyTorch dims count the batch axis
        self.emit(node, "flatten", [x], {"start_dim": i + 1, "end_dim": end})

    def add(self, node) -> None:
        b = _bind(node)
        if b.get("alpha", 1) != 1:
            raise self.fail(node, f"alpha={b['alpha']} is not supported")
        other = b["other"]
        if not hasattr(other, "op"):
            return self.add_constant(node, b["self"], other)
        if self.param_name(other) is not None:
            return self.add_parameter(node, b["self"], other)
        if self.param_name(b["self"]) is not None:
            return self.add_parameter(node, other, b["self"])
        for act, const in ((b["self"], other), (other, b["self"])):
            if const in self.consts and act not in self.consts:
                return self.additive_mask(node, act, const)
        a, c = self.value(node, b["self"], "first input"), self.value(node, other, "second input")
        sa, sc = self.shape(b["self"]), self.shape(other)
        if sa != sc:
            raise self.fail(node, f"adds values of per-example shapes {sa} and {sc}; they must be equal")
        self.shape(node)
        self.emit(node, "add", [a, c])

    def add_constant(self, node, activation, value, negate: bool = False) -> None:
        """``x + c`` (``-x + c`` with ``negate``) for a finite constant number ``c``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(node, f"adds {value!r}; only a finite constant number or an activation")
        x = self.value(node, activation, "input")
        self.shape(node)
        if negate:
            self.emit(node, "mul_constant", [x], {"value": -1.0})
            x = self.values[node]
        self.emit(node, "add_constant", [x], {"value": float(value)})

    def sub(self, node) -> None:
        """``x - c`` (an ``add_constant`` of ``-c``) and ``x - y`` of two activations of
        the same shape (``y`` times -1, then ``add``)."""
        b = _bind(node)
        alpha = b.get("alpha", 1)
        if alpha != 1:
            raise self.fail(node, f"alpha={alpha} is not supported")
        other = b["other"]
        if not hasattr(other, "op"):
            if isinstance(other, bool) or not isinstance(other, (int, float)):
                raise self.fail(node, f"subtracts {other!r}; only a finite constant number or an activation")
            return self.add_constant(node, b["self"], -other)
        a, c = self.value(node, b["self"], "first input"), self.value(node, other, "second input")
        sa, sc = self.shape(b["self"]), self.shape(other)
        if sa != sc:
            raise self.fail(node, f"subtracts values of per-example shapes {sa} and {sc}; they must be equal")
        self.shape(node)
        self.emit(node, "mul_constant", [c], {"value": -1.0})
        self.emit(node, "add", [a, self.values[node]])

    def rsub(self, node) -> None:
        """``c - x`` for a constant number ``c``."""
        b = _bind(node)
        if b.get("alpha", 1) != 1:
            raise self.fail(node, f"alpha={b['alpha']} is not supported")
        self.add_constant(node, b["self"], b["other"], negate=True)

    def additive_mask(self, node, activation, constant) -> None:
        """``x + M`` with a constant ``M`` of zeros and ``-inf`` (an additive attention
        mask): a ``masked_fill`` with ``-inf`` where ``M`` is ``-inf``."""
        m = self.consts[constant]
        if not bool(((m == 0) | (m == -math.inf)).all()):
            raise self.fail(
                node,
                f"adds a constant tensor of shape {list(m.shape)}; only additive masks of zeros and "
                "-inf (as masked_fill) are supported",
            )
        mask = self.mask(node, constant, "additive mask", self.shape(activation))
        self.emit_masked_fill(node, activation, mask == -math.inf, -math.inf)

    def batch_norm(self, node) -> None:
        b = _bind(node)
        if b.get("training"):
            raise self.fail(node, "batch norm in training mode; call model.eval() first")
        in_shape = self.shape(b["input"])
        if len(in_shape) not in (1, 2, 3):
            raise self.fail(node, f"batch norm of per-example shape {in_shape}; only BatchNorm1d ([C] or [C, L]) "
                            "and BatchNorm2d ([C, H, W]) are supported")
        x = self.value(node, b["input"], "input")
        if b["running_mean"] is None or b["running_var"] is None:
            raise self.fail(node, "batch norm without running statistics (track_running_stats=False) is not supported")
        mean = self.param(node, b["running_mean"], "running mean", buffer=True)
        var = self.param(node, b["running_var"], "running variance", buffer=True)
        module = self.module_of(node, mean, "running_mean")
        if var != f"{module}.running_var":
            raise self.fail(node, f"running statistics {mean} and {var} belong to different modules")
        weight = self.param(node, b["weight"], "weight")
        bias = self.param(node, b["bias"], "bias")
        if (weight is None) != (bias is None) or (
            weight is not None and (weight, bias) != (f"{module}.weight", f"{module}.bias")
        ):
            raise self.fail(node, f"affine parameters {weight}, {bias} do not belong to module {module}")
        self.emit(node, "batch_norm2d" if len(in_shape) == 3 else "batch_norm1d", [x], {
            "num_features": in_shape[0],
            "eps": float(b["eps"]),
            "affine": weight is not None,
        }, module=module)

    def batch_norm_no_stats(self, node) -> None:
        raise self.fail(
            node,
            "batch norm without running statistics (track_running_stats=False) is not supported",
        )

    def batch_norm_training(self, node) -> None:
        raise self.fail(node, "batch norm in training mode; call model.eval() first")

    def group_norm(self, node) -> None:
        b = _bind(node)
        self.emit_group_norm(node, b["input"], int(b["num_groups"]), b["weight"], b["bias"], b["eps"])

    def instance_norm(self, node) -> None:
        """InstanceNorm with instance statistics (``track_running_stats=False``, the
        default) is the group norm of one channel per group."""
        b = _bind(node)
        if not b["use_input_stats"]:
            raise self.fail(node, "instance norm with running statistics (track_running_stats=True in eval "
                            "mode) is not supported")
        channels = self.shape(b["input"])[0] if self.shape(b["input"]) else 0
        self.emit_group_norm(node, b["input"], channels, b["weight"], b["bias"], b["eps"])

    def emit_group_norm(self, node, arg, groups: int, weight_arg, bias_arg, eps) -> None:
        in_shape = self.shape(arg)
        if len(in_shape) < 2:
            raise self.fail(node, f"group norm of per-example shape {in_shape}; it needs [C, *spatial]")
        x = self.value(node, arg, "input")
        weight = self.param(node, weight_arg, "weight")
        bias = self.param(node, bias_arg, "bias")
        if (weight is None) != (bias is None):
            raise self.fail(node, "group norm with only one of weight and bias is not supported")
        module = None
        if weight is not None:
            module = self.module_of(node, weight, "weight")
            if bias != f"{module}.bias":
                raise self.fail(node, f"weight {weight} and bias {bias} belong to different modules")
        self.shape(node)
        self.emit(node, "group_norm", [x], {
            "num_groups": groups,
            "num_channels": in_shape[0],
            "eps": float(eps),
            "affine": weight is not None,
        }, module=module)

    def layer_norm(self, node) -> None:
        b = _bind(node)
        in_shape = self.shape(b["input"])
        shape = [int(s) for s in b["normalized_shape"]]
        if len(shape) != 1 or not in_shape or shape[0] != in_shape[-1]:
            raise self.fail(node, f"normalized_shape={shape} on per-example shape {in_shape}; only the last dimension is supported")
        x = self.value(node, b["input"], "input")
        weight = self.param(node, b["weight"], "weight")
        bias = self.param(node, b["bias"], "bias")
        if weight is None and bias is None:
            module = None
        else:
            if weight is None or bias is None:
                raise self.fail(node, "layer norm with only one of weight and bias (bias=False) is not supported")
            module = self.module_of(node, weight, "weight")
            if bias != f"{module}.bias":
                raise self.fail(node, f"weight {weight} and bias {bias} belong to different modules")
        attrs = {"normalized_shape": shape, "eps": float(b["eps"]), "elementwise_affine": module is not None}
        self.shape(node)
        self.emit(node, "layer_norm", [x], attrs, module=module)

    def cat(self, node) -> None:
        b = _bind(node)
        tensors = list(b["tensors"])
        shapes = [self.shape(t) for t in tensors]
        rank = len(shapes[0]) + 1
        dim = int(b["dim"])
        if not -rank <= dim < rank:
            raise self.fail(node, f"dim={dim} out of range for rank {rank}")
        dim %= rank
        if dim == 0:
            raise self.fail(node, "concatenation along the batch axis is not supported")
        for s in shapes:
            if len(s) != len(shapes[0]) or any(
                a != c for k, (a, c) in enumerate(zip(s, shapes[0])) if k != dim - 1
            ):
                raise self.fail(node, f"inputs of per-example shapes {shapes} differ outside dim {dim}")
        params = [self.param_name(t) for t in tensors]
        if any(params):
            return self.cat_parameters(node, tensors, params, shapes, dim)
        inputs = [self.value(node, t, f"input {k}") for k, t in enumerate(tensors)]
        self.shape(node)
        self.emit(node, "cat", inputs, {"dim": dim})

    def cat_parameters(self, node, tensors, params, shapes, dim: int) -> None:
        """``torch.cat`` of one activation and learned tensors broadcast over the batch
        (``cls.expand(B, -1, -1)``: a ViT's cls token): one ``cat_parameter`` node per
        parameter, the nearest first."""
        acts = [k for k, p in enumerate(params) if p is None]
        if len(acts) != 1:
            raise self.fail(
                node,
                f"concatenates the parameters {[p for p in params if p]} with {len(acts)} activations; "
                "only one activation and parameters around it are supported",
            )
        a = acts[0]
        x = self.value(node, tensors[a], f"input {a}")
        order = [(k, 0) for k in range(a - 1, -1, -1)] + [(k, 1) for k in range(a + 1, len(tensors))]
        for k, index in order:
            name = params[k]
            shape = self.param_shape(name)
            from_end = len(shapes[k]) + 1 - dim
            size = shape[len(shape) - from_end] if from_end <= len(shape) else 1
            if size != shapes[k][dim - 1]:
                raise self.fail(
                    node,
                    f"repeats the parameter {name} of shape {shape} to {shapes[k][dim - 1]} along dim "
                    f"{dim}; only broadcasting over the batch (and dims of size 1 elsewhere) is supported",
                )
            self.emit(node, "cat_parameter", [x], {"parameter": name, "shape": shape, "dim": dim, "index": index})
            x = self.values[node]
        self.shape(node)

    def param_shape(self, name: str) -> List[int]:
        """The PyTorch shape of the parameter ``name``."""
        return [int(d) for d in dict(self.model.named_parameters())[name].shape]

    def expand(self, node) -> None:
        """``expand`` of a parameter (``cls.expand(B, -1, -1)``) is a view of it, used by
        ``add`` and ``cat``; of an activation only when it changes nothing."""
        b = _bind(node)
        source = b["self"]
        name = self.param_name(source)
        if name is not None:
            self.param_views[node] = name
            return
        x = self.value(node, source, "input")
        if self.shape(source) != self.shape(node):
            raise self.fail(node, "expands an activation; only parameters can be expanded (broadcast over the batch)")
        self.values[node] = x

    def upsample_nearest2d(self, node) -> None:
        source = node.args[0]
        x = self.value(node, source, "input")
        before, after = self.shape(source), self.shape(node)
        if len(before) != 3:
            raise self.fail(node, f"input has per-example shape {before}, expected [C, H, W]")
        factors = []
        for a, c in zip(before[1:], after[1:]):
            if c % a:
                raise self.fail(node, f"resizes {before[1:]} to {after[1:]}, not by an integer factor")
            factors.append(c // a)
        b = _bind(node)
        scales = [s for k, s in b.items() if k.startswith("scale") and s is not None]
        flat = []
        for s in scales:
            flat.extend(s if isinstance(s, (list, tuple)) else [s])
        if any(float(s) != round(float(s)) for s in flat):
            raise self.fail(node, f"scale factors {flat} are not integers")
        factor = factors[0] if factors[0] == factors[1] else factors
        self.emit(node, "upsample_nearest2d", [x], {"scale_factor": factor})


# -- nn.MultiheadAttention (session 13) ----------------------------------------------
# During torch.export every nn.MultiheadAttention gets a forward (an instance attribute,
# removed afterwards) that checks what ekfac cannot represent and calls the custom op
# below, which torch.export keeps as one node: the mapper turns it into a
# ``multi_head_attention`` node named by the module's path. The attn_mask travels in
# PyTorch's convention (bool True = masked out, or a float 0/-inf mask): it is a
# constant by then (folded like scaled_dot_product_attention's), so the mapper can check
# its values and convert it into the node's keep mask (1 = attend).


@torch.library.custom_op("ekfac::multi_head_attention", mutates_args=())
def _mha_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    out_proj_weight: torch.Tensor,
    out_proj_bias: Optional[torch.Tensor],
    num_heads: int,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
) -> torch.Tensor:
    """nn.MultiheadAttention (batch_first, eval) on ``[B, L, E]``, ``[B, S, E]`` inputs."""
    t = [a.transpose(0, 1) for a in (query, key, value)]
    out, _ = torch.nn.functional.multi_head_attention_forward(
        t[0], t[1], t[2], query.shape[-1], num_heads, in_proj_weight, in_proj_bias, None, None,
        False, 0.0, out_proj_weight, out_proj_bias, training=False, need_weights=False,
        attn_mask=attn_mask,
    )
    return out.transpose(0, 1).contiguous()


@_mha_op.register_fake
def _(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
      num_heads, attn_mask, is_causal):
    return query.new_empty(query.shape)


_MHA_OP = torch.ops.ekfac.multi_head_attention.default


class _AttentionWeightsUnavailable:
    """What the patched forward returns for the attention weights: any use of it is
    refused (ekfac's node computes the output only)."""

    def __init__(self, refuse: Callable[[str], ExportError]):
        object.__setattr__(self, "_refuse", refuse)

    def _fail(self, *args, **kwargs):
        raise object.__getattribute__(self, "_refuse")(
            "its returned attention weights are used; ekfac computes the attention output only "
            "(call it with need_weights=False, or ignore the weights)"
        )

    def __getattr__(self, name):
        self._fail()

    __getitem__ = __iter__ = __len__ = __float__ = __array__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _fail
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __neg__ = _fail

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, cls):
                a._fail()
        return NotImplemented


def _mha_forward(path: str, m: nn.MultiheadAttention, refusals: List[ExportError]) -> Callable:
    """The forward ``m`` gets during ``torch.export``: the refusals of the op spec, then
    the custom op. Each refusal is recorded in ``refusals`` (torch.export may wrap the
    exception it raises)."""
    where = f"module {path or '<root>'} (MultiheadAttention)"

    def refuse(reason: str) -> ExportError:
        error = ExportError(f"{where}: {reason}")
        refusals.append(error)
        return error

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not m.batch_first:
            raise refuse(
                "batch_first=False is not supported: ekfac's graphs keep the batch axis first "
                "(construct it with batch_first=True)"
            )
        if not m._qkv_same_embed_dim:
            raise refuse(
                f"kdim={m.kdim}, vdim={m.vdim} differ from embed_dim={m.embed_dim} (separate q/k/v "
                "projection weights) is not supported"
            )
        if m.bias_k is not None or m.bias_v is not None:
            raise refuse("add_bias_kv=True is not supported")
        if m.add_zero_attn:
            raise refuse("add_zero_attn=True is not supported")
        if key_padding_mask is not None:
            raise refuse(
                "a key_padding_mask is not supported (its mask would depend on the example); "
                "give every example the same length"
            )
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise refuse(f"its {name} has shape {shape}; only batched [N, L, E] inputs are supported")
        if attn_mask is not None and list(attn_mask.shape) != [query.shape[1], key.shape[1]]:
            raise refuse(
                f"its attn_mask has shape [{', '.join(str(d) if isinstance(d, int) else 'N·H' for d in attn_mask.shape)}]; "
                "only a 2-D [L, S] = "
                f"{[int(query.shape[1]), int(key.shape[1])]} mask (the same for every example and "
                "head) is supported"
            )
        if is_causal and attn_mask is None:
            raise refuse("is_causal=True without an attn_mask (PyTorch requires the mask)")
        out_proj = m.out_proj
        out = _MHA_OP(
            query, key, value, m.in_proj_weight, m.in_proj_bias, out_proj.weight, out_proj.bias,
            m.num_heads, attn_mask, bool(is_causal),
        )
        return out, (_AttentionWeightsUnavailable(refuse) if need_weights else None)

    return forward


class _PatchedAttention:
    """Context manager: every nn.MultiheadAttention of ``model`` gets the export
    forward; the original forwards are restored on exit, also on error."""

    def __init__(self, model: nn.Module):
        self.modules = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        self.refusals: List[ExportError] = []

    def __enter__(self) -> "_PatchedAttention":
        for path, m in self.modules:
            if "forward" in m.__dict__:
                raise ExportError(
                    f"module {path or '<root>'} (MultiheadAttention) has a forward of its own "
                    "(an instance attribute); not supported"
                )
        for path, m in self.modules:
            m.forward = _mha_forward(path, m, self.refusals)
        return self

    def __exit__(self, *exc) -> None:
        for _, m in self.modules:
            m.__dict__.pop("forward", None)


def _refuse_tied_parameters(model: nn.Module) -> None:
    """One parameter under two names (GPT-2's ``lm_head.weight = wte.weight``)."""
    seen: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ExportError(
                f"parameter {name} is the same tensor as {seen[id(p)]} (tied weights, as GPT-2's "
                "lm_head shares wte's weight): not supported; KFAC gives each layer its own "
                "block, so untie them (a separate parameter per layer)"
            )
        seen[id(p)] = name


def describe_graph(
    model: nn.Module,
    input_shape: Sequence[int],
    input_dtype: torch.dtype = torch.float32,
    *,
    allow_tied: bool = False,
) -> Dict[str, Any]:
    """Return the graph-format ``model.json`` dictionary of ``model`` (any module in
    eval mode); raise ``ExportError`` naming the node and operator it cannot map.

    ``allow_tied=True`` exports a module called twice as two nodes sharing
    ``"module"`` instead of refusing it (only to write the fixture that checks
    ekfac's own refusal of such graphs)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, found {type(model).__name__}")
    input_shape = [int(s) for s in input_shape]
    if not input_shape or any(s <= 0 for s in input_shape):
        raise ExportError(f"input_shape must be non-empty and positive, found {input_shape}")
    _refuse_training(model)
    if not allow_tied:
        _refuse_tied_parameters(model)
    if input_dtype.is_floating_point:
        probe_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        example = torch.randn(2, *input_shape, dtype=probe_dtype)
        dtype = "f32"
    elif input_dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        example = torch.zeros(2, *input_shape, dtype=torch.int64)
        dtype = "i64"
    else:
        raise ExportError(f"input dtype {input_dtype} is not supported")
    batch = torch.export.Dim("batch")
    patched = _PatchedAttention(model)
    try:
        with patched:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            program = program.run_decompositions({})  # functionalise, decompose nothing
    except ExportError:
        raise
    except Exception as e:  # torch raises many kinds; report them uniformly
        if patched.refusals:  # a refusal of a MultiheadAttention, wrapped by torch
            raise patched.refusals[0] from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"torch.export could not trace {type(model).__name__} with a dynamic batch "
            f"dimension on input shape {input_shape}: {type(e).__name__}: {first}"
        ) from e
    return _GraphMapper(model, program, input_shape, dtype, allow_tied).run()


def graph_json(spec: Dict[str, Any]) -> str:
    """Serialise a graph-format ``model.json`` dictionary with one node per line."""
    nodes = ",\n".join("    " + json.dumps(node) for node in spec["nodes"])
    params = ",\n".join("    " + json.dumps(p) for p in spec["parameters"])
    return (
        "{\n"
        f'  "format": {json.dumps(spec["format"])},\n'
        f'  "version": {spec["version"]},\n'
        f'  "inputs": {json.dumps(spec["inputs"])},\n'
        f'  "nodes": [\n{nodes}\n  ],\n'
        f'  "output": {json.dumps(spec["output"])},\n'
        f'  "parameters": [\n{params}\n  ]\n'
        "}\n"
    )


def _check_rebuild(model: nn.Module, spec: Dict[str, Any], state: Dict[str, torch.Tensor], dtype: str) -> None:
    """Rebuild the exported model with graph_torch and compare outputs on a probe
    batch of 3: a mapping error must not go unnoticed."""
    probe_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    try:
        rebuilt = graph_torch.build(spec)
        graph_torch.load_weights(
            rebuilt, {k: v.to(probe_dtype) if v.is_floating_point() else v for k, v in state.items()}
        )
    except ValueError as e:
        raise ExportError(f"the exported graph cannot be rebuilt ({e}); please report this model") from e
    rebuilt = rebuilt.to(probe_dtype).eval()
    generator = torch.Generator().manual_seed(0)
    shape = spec["inputs"][0]["shape"] if "inputs" in spec else spec["input_shape"]
    if dtype == "i64":
        vocab = min(
            (n["attrs"]["num_embeddings"] for n in spec.get("nodes", []) if n["op"] == "embedding"),
            default=2,
        )
        probe = torch.randint(0, vocab, (3, *shape), generator=generator)
    else:
        probe = torch.randn(3, *shape, generator=generator).to(probe_dtype)
    with torch.no_grad():
        want, got = model(probe), rebuilt(probe)
    if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        diff = (got - want).abs().max().item() if want.shape == got.shape else None
        raise ExportError(
            f"the exported graph does not reproduce the model (output shapes {list(want.shape)} "
            f"vs {list(got.shape)}, largest difference {diff}); please report this model"
        )


###############################################################################
#                                  export                                     #
###############################################################################


def _data(x: Optional[torch.Tensor], y: Optional[torch.Tensor], input_shape: List[int]):
    if y is not None and x is None:
        raise ExportError("y given without x")
    if x is None:
        return None
    if list(x.shape[1:]) != input_shape:
        raise ExportError(f"x has shape {list(x.shape)}, expected [N, {input_shape}]")
    if x.dtype.is_floating_point:
        data = {"x": x.detach().to(torch.float32).contiguous().cpu()}
    elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        data = {"x": x.detach().to(torch.int64).contiguous().cpu()}
    else:
        raise ExportError(f"x has unsupported dtype {x.dtype}")
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise ExportError(f"y has {y.shape[0]} rows but x has {x.shape[0]}")
        if y.dtype.is_floating_point:
            data["y"] = y.detach().to(torch.float32).contiguous().cpu()
        elif y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            data["y"] = y.detach().to(torch.int64).contiguous().cpu()
        else:
            raise ExportError(f"y has unsupported dtype {y.dtype}")
    return data


def _unused_buffers(model: nn.Module, spec: Dict[str, Any]) -> set:
    """The state_dict buffers of modules that no graph node uses (a causal-mask buffer
    folded into a ``masked_fill`` node's constant ``mask``): left out of the weights,
    which ekfac reads strictly (every tensor belongs to a node)."""
    modules = {n.get("module", n["name"]) for n in spec["nodes"] if n["op"] in PARAMETERISED_OPS}
    return {
        name for name, _ in model.named_buffers()
        if name.rpartition(".")[0] not in modules
    }


def export(
    model: nn.Module,
    input_shape: Sequence[int],
    out_dir: str,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    *,
    format: str = "auto",
    allow_tied: bool = False,
) -> Dict[str, Any]:
    """Write ``model.json``, ``weights.safetensors`` and (if ``x`` is given)
    ``data.safetensors`` into ``out_dir``; return the ``model.json`` dictionary.

    ``format``: ``"chain"`` (a ``torch.nn.Sequential`` of chain layers only),
    ``"graph"`` (any module in eval mode) or ``"auto"`` (chain when possible, else
    graph). Nothing is written when the model or data is refused. ``allow_tied``: see
    ``describe_graph``."""
    if format not in ("auto", "chain", "graph"):
        raise ExportError(f"format must be auto, chain or graph, found {format!r}")
    input_shape = [int(s) for s in input_shape]
    spec = None
    if format in ("auto", "chain"):
        try:
            spec = describe(model, input_shape)
        except ExportError:
            if format == "chain":
                raise
    dtype = "f32"
    if spec is None:
        input_dtype = x.dtype if x is not None else torch.float32
        spec = describe_graph(model, input_shape, input_dtype, allow_tied=allow_tied)
        dtype = spec["inputs"][0]["dtype"]
    data = _data(x, y, input_shape)
    unused = _unused_buffers(model, spec) if "nodes" in spec else set()
    weights = {
        k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach().to(torch.int64))
        .contiguous()
        .cpu()
        for k, v in model.state_dict().items()
        if k not in unused
    }
    _check_rebuild(model, spec, model.state_dict(), dtype)

    os.makedirs(out_dir, exist_ok=True)
    text = graph_json(spec) if "nodes" in spec else model_json(spec)
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        f.write(text)
    save_file(weights, os.path.join(out_dir, "weights.safetensors"))
    if data is not None:
        save_file(data, os.path.join(out_dir, "data.safetensors"))
    return spec


def _main() -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Export a torch.nn.Module saved with torch.save(model, PATH) (a whole module "
            "in eval mode, not a state_dict) to ekfac's model.json + weights.safetensors "
            "(+ data.safetensors)."
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
    parser.add_argument(
        "--format",
        choices=["auto", "chain", "graph"],
        default="auto",
        help="model.json format (default auto: chain for a plain nn.Sequential, else graph)",
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="call model.eval() before exporting (a module in training mode is refused)",
    )
    args = parser.parse_args()
    try:
        model = torch.load(args.model, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise SystemExit(
            f"export_torch: {args.model}: cannot unpickle the model ({e}); the module's class "
            "must be importable: add the directory of its source file to PYTHONPATH"
        )
    if not isinstance(model, nn.Module):
        raise SystemExit(
            f"export_torch: {args.model} holds a {type(model).__name__}, not a torch.nn.Module "
            "(save the whole module with torch.save(model, PATH), not its state_dict)"
        )
    if args.eval:
        model.eval()
    input_shape = [int(s) for s in args.input_shape.split(",") if s]
    x = y = None
    if args.data:
        d = torch.load(args.data, weights_only=False)
        x, y = d["x"], d.get("y")
    try:
        export(model, input_shape, args.out, x=x, y=y, format=args.format)
    except ExportError as e:
        raise SystemExit(f"export_torch: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _main()
