//! Which parameters are selected, in which order they are flattened, and how they form
//! the blocks of the block-diagonal operator (SPEC §1.4).
//!
//! The flattened parameter vector is always in **model order**: layer by layer, weight
//! before bias, each row-major in PyTorch layout (linear `[out, in]`, conv2d
//! `[C_out, C_in/groups, KH, KW]`, whose flattening `o·D + c·KH·KW + kh·KW + kw` matches
//! the im2col patch order), whatever order the names were given in.
//!
//! Blocks, per curvature layer in model order:
//! - weight and bias selected and treated jointly → one [`BlockKind::Joint`] block on
//!   `W̃ = [W | b] ∈ R^{d_out×(d_in+1)}`, internal index `o·(d_in+1) + j` (`j = d_in` is
//!   the bias). In the model-order vector the layer's weight comes first (all
//!   `d_out·d_in` entries), then its bias (`d_out`), so the internal layout never leaks.
//! - otherwise a [`BlockKind::Weight`] block (`d_out×d_in`) and/or a [`BlockKind::Bias`]
//!   block (`d_out`).
//!
//! A block's `[d_out, D]` slice of a `[P, K]` matrix is gathered as `[K, d_out, D]`
//! (column `k` of the input becomes the matrix `V_k` of SPEC §4.1).

use std::collections::{HashMap, HashSet};

use crate::curvature::Options;
use crate::error::{Error, Result};
use crate::graph::{Graph, Model};

/// What a block covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// The weight alone: `G ⊗ A` on `[d_out, d_in]`.
    Weight,
    /// The bias alone: `G` on `[d_out]` (no `A`).
    Bias,
    /// Weight and bias together: `G ⊗ Ã` on `[d_out, d_in + 1]`.
    Joint,
}

/// One diagonal block of the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Index of the layer's node in the graph.
    pub layer: usize,
    /// The layer's name (parameter prefix, the PyTorch module path).
    pub name: String,
    pub kind: BlockKind,
    /// `out_features` / `out_channels`.
    pub d_out: usize,
    /// `D`: `in_features` or `(C_in/groups)·KH·KW`, plus 1 for a joint block; 1 for a
    /// bias block.
    pub d_in: usize,
    /// Index of the block's first entry in the flattened (model-order) parameter vector.
    pub offset: usize,
}

impl Block {
    /// Number of parameters in the block, `d_out·D`.
    pub fn len(&self) -> usize {
        self.d_out * self.d_in
    }

    /// Always false: a block has at least one parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the block has an input factor `A` (not for bias blocks).
    pub fn has_input_factor(&self) -> bool {
        self.kind != BlockKind::Bias
    }

    /// `d_in` of the layer's weight, without the joint block's ones column.
    pub fn weight_features(&self) -> usize {
        match self.kind {
            BlockKind::Weight => self.d_in,
            BlockKind::Joint => self.d_in - 1,
            BlockKind::Bias => 0,
        }
    }

    /// Position in the flattened parameter vector of the block's internal entry
    /// `(o, j)`, `o < d_out`, `j < D`.
    pub fn param_index(&self, o: usize, j: usize) -> usize {
        match self.kind {
            BlockKind::Weight => self.offset + o * self.d_in + j,
            BlockKind::Bias => self.offset + o,
            BlockKind::Joint => {
                let w = self.d_in - 1;
                if j < w {
                    self.offset + o * w + j
                } else {
                    self.offset + self.d_out * w + o
                }
            }
        }
    }
}

/// Weight or bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    Weight,
    Bias,
}

/// One selected parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// `"<layer name>.weight"` or `"<layer name>.bias"`.
    pub name: String,
    pub layer: usize,
    pub kind: ParamKind,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// Index of its first entry in the flattened parameter vector.
    pub offset: usize,
}

impl Param {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no entries (never, for a valid model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A curvature layer (linear, conv2d) with at least one selected parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlocks {
    /// Index of the layer's node in the graph.
    pub layer: usize,
    /// The parameter prefix (the PyTorch module path).
    pub name: String,
    pub d_out: usize,
    /// `in_features` / `(C_in/groups)·KH·KW` (no ones column).
    pub d_in: usize,
    /// `S`, the number of weight-sharing positions: 1 for linear, `OH·OW` for conv2d.
    pub positions: usize,
    /// Indices into [`ParamLayout::blocks`] of this layer's blocks (1 or 2).
    pub blocks: Vec<usize>,
}

impl LayerBlocks {
    /// `D` of the layer's input factor `A` (`d_in`, plus one when joint), or `None` when
    /// only the bias is selected and `A` is not needed.
    pub fn input_dim(&self, layout: &ParamLayout) -> Option<usize> {
        self.blocks
            .iter()
            .map(|&b| &layout.blocks[b])
            .find(|b| b.has_input_factor())
            .map(|b| b.d_in)
    }

    /// Whether any block of the layer needs the input factor `A` (not if only the bias is
    /// selected).
    pub fn needs_input_factor(&self, layout: &ParamLayout) -> bool {
        self.blocks
            .iter()
            .any(|&b| layout.blocks[b].has_input_factor())
    }
}

/// The selected parameters, their flattening and the blocks of the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// Curvature layers with a selected parameter, in model order.
    pub layers: Vec<LayerBlocks>,
    /// The blocks, in model order (weight block before bias block).
    pub blocks: Vec<Block>,
    /// The selected parameters in model order.
    pub params: Vec<Param>,
    /// `P`, the length of the flattened parameter vector.
    pub num_params: usize,
}

impl ParamLayout {
    /// The layout of `opts.params` (all parameters if `None`) with `opts.joint_bias`.
    pub fn from_options(model: &Model, opts: &Options) -> Result<Self> {
        Self::new(&model.graph, opts.params.as_deref(), opts.joint_bias)
    }

    /// Validates the selection (unknown, duplicate or empty names, and names of
    /// parameters KFAC does not approximate are errors) and builds the layout. The
    /// parameters are ordered as the graph's `parameters` list where it has one, else
    /// in node order (weight before bias).
    pub fn new(graph: &Graph, selected: Option<&[String]>, joint_bias: bool) -> Result<Self> {
        let mut available: Vec<(usize, ParamKind, String)> = Vec::new();
        for i in graph.curvature_layers() {
            let layer = graph.layer(i).curvature().expect("a curvature layer");
            let module = graph.nodes[i].module();
            available.push((i, ParamKind::Weight, format!("{module}.weight")));
            if layer.has_bias() {
                available.push((i, ParamKind::Bias, format!("{module}.bias")));
            }
        }
        if let Some(order) = &graph.parameters {
            let rank: HashMap<&str, usize> = order
                .iter()
                .enumerate()
                .map(|(k, n)| (n.as_str(), k))
                .collect();
            available.sort_by_key(|(_, _, n)| rank.get(n.as_str()).copied().unwrap_or(usize::MAX));
        }
        let chosen: HashSet<String> = match selected {
            None => available.iter().map(|(_, _, n)| n.clone()).collect(),
            Some(names) => check_selection(graph, &available, names)?,
        };

        let mut layout = ParamLayout {
            layers: Vec::new(),
            blocks: Vec::new(),
            params: Vec::new(),
            num_params: 0,
        };
        for &(i, kind, ref name) in &available {
            if !chosen.contains(name) {
                continue;
            }
            let layer = graph.layer(i).curvature().expect("a curvature layer");
            let shape = match kind {
                ParamKind::Weight => layer.weight_shape(),
                ParamKind::Bias => vec![layer.out_features()],
            };
            layout.push_param(i, graph.nodes[i].module(), kind, shape);
        }
        // Blocks per layer, in the order of each layer's first selected parameter.
        let mut seen = HashSet::new();
        let order: Vec<usize> = layout
            .params
            .iter()
            .map(|p| p.layer)
            .filter(|&i| seen.insert(i))
            .collect();
        for i in order {
            let layer = graph.layer(i).curvature().expect("a curvature layer");
            let name = graph.nodes[i].module().to_string();
            let (d_out, d_in) = (layer.out_features(), layer.in_features());
            let find = |kind| {
                layout
                    .params
                    .iter()
                    .find(|p| p.layer == i && p.kind == kind)
                    .map(|p| p.offset)
            };
            let (weight, bias) = (find(ParamKind::Weight), find(ParamKind::Bias));
            let mut cl = LayerBlocks {
                layer: i,
                name: name.clone(),
                d_out,
                d_in,
                positions: layer.positions(),
                blocks: Vec::new(),
            };
            let mut push_block = |kind, d, offset| {
                cl.blocks.push(layout.blocks.len());
                layout.blocks.push(Block {
                    layer: i,
                    name: name.clone(),
                    kind,
                    d_out,
                    d_in: d,
                    offset,
                });
            };
            match (weight, bias) {
                (Some(w), Some(_)) if joint_bias => push_block(BlockKind::Joint, d_in + 1, w),
                _ => {
                    if let Some(w) = weight {
                        push_block(BlockKind::Weight, d_in, w);
                    }
                    if let Some(b) = bias {
                        push_block(BlockKind::Bias, 1, b);
                    }
                }
            }
            layout.layers.push(cl);
        }
        Ok(layout)
    }

    fn push_param(&mut self, layer: usize, name: &str, kind: ParamKind, shape: Vec<usize>) {
        let suffix = match kind {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
        };
        let len: usize = shape.iter().product();
        self.params.push(Param {
            name: format!("{name}.{suffix}"),
            layer,
            kind,
            shape,
            offset: self.num_params,
        });
        self.num_params += len;
    }

    /// The names of the selected parameters in model order.
    pub fn param_names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    /// The curvature layer entry of model layer `layer`, if it has selected parameters.
    pub fn layer(&self, layer: usize) -> Option<&LayerBlocks> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// Block `b`'s slice of the row-major `[P, K]` matrix `x`, as row-major
    /// `[K, d_out, D]`.
    pub fn gather<T: Copy + Default>(&self, b: usize, x: &[T], k: usize) -> Vec<T> {
        let block = &self.blocks[b];
        let mut out = vec![T::default(); k * block.len()];
        for o in 0..block.d_out {
            for j in 0..block.d_in {
                let p = block.param_index(o, j);
                for col in 0..k {
                    out[(col * block.d_out + o) * block.d_in + j] = x[p * k + col];
                }
            }
        }
        out
    }

    /// Writes block `b`'s row-major `[K, d_out, D]` values `y` into its rows of the
    /// row-major `[P, K]` matrix `out` (the inverse of [`ParamLayout::gather`]).
    pub fn scatter<T: Copy>(&self, b: usize, y: &[T], out: &mut [T], k: usize) {
        let block = &self.blocks[b];
        for o in 0..block.d_out {
            for j in 0..block.d_in {
                let p = block.param_index(o, j);
                for col in 0..k {
                    out[p * k + col] = y[(col * block.d_out + o) * block.d_in + j];
                }
            }
        }
    }

    /// The selected parameter values of `model`, flattened in model order (`[P]`).
    pub fn flatten_params(&self, model: &Model) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_params);
        for p in &self.params {
            if let Some(lp) = model.layer_params(p.layer) {
                match p.kind {
                    ParamKind::Weight => out.extend_from_slice(lp.weight()),
                    ParamKind::Bias => out.extend_from_slice(lp.bias().unwrap_or(&[])),
                }
            }
        }
        out
    }
}

/// Checks user-given names against the model's curvature parameters.
fn check_selection(
    graph: &Graph,
    available: &[(usize, ParamKind, String)],
    names: &[String],
) -> Result<HashSet<String>> {
    if names.is_empty() {
        return Err(Error::Options(
            "the parameter selection is empty: name at least one parameter".into(),
        ));
    }
    let known: HashSet<&str> = available.iter().map(|(_, _, n)| n.as_str()).collect();
    let mut chosen = HashSet::new();
    for name in names {
        if !known.contains(name.as_str()) {
            return Err(Error::Options(unknown_param_message(
                graph, available, name,
            )));
        }
        if !chosen.insert(name.clone()) {
            return Err(Error::Options(format!(
                "parameter \"{name}\" is selected twice"
            )));
        }
    }
    Ok(chosen)
}

fn unknown_param_message(
    graph: &Graph,
    available: &[(usize, ParamKind, String)],
    name: &str,
) -> String {
    let list = crate::io::cut_names(
        &available
            .iter()
            .map(|(_, _, n)| n.as_str())
            .collect::<Vec<_>>(),
    );
    // A parameter of a layer KFAC does not approximate, named in full (the multi-head
    // attention's `out_proj.weight` has a dot in its suffix).
    let owner = (0..graph.nodes.len()).find(|&i| {
        let layer = graph.layer(i);
        let module = graph.nodes[i].module();
        layer.curvature().is_none()
            && layer
                .params()
                .iter()
                .any(|p| layer.param_key(module, p.suffix) == name)
    });
    if let Some(i) = owner {
        return format!(
            "parameter \"{name}\" of {} is not a curvature parameter: KFAC approximates \
             only linear and conv2d layers (available: {list})",
            graph.label(i)
        );
    }
    let (prefix, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
    let Some(i) = graph.nodes.iter().position(|n| n.module() == prefix) else {
        return format!("unknown parameter \"{name}\" (available: {list})");
    };
    let label = graph.label(i);
    let layer = graph.layer(i);
    if layer.curvature().is_some() && suffix == "bias" {
        format!("parameter \"{name}\": {label} has no bias (available: {list})")
    } else if layer.params().is_empty() {
        format!(
            "parameter \"{name}\": {label} has no parameters; only linear and conv2d layers \
             do (available: {list})"
        )
    } else {
        format!("unknown parameter \"{name}\" (available: {list})")
    }
}
