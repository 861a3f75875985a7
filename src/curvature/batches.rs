//! The batch loop both passes over the data share: per batch of examples (split to
//! fit the memory budget) a forward pass and the GPU loss kernel's backpropagated
//! vectors ([`record_backprop_vectors`], the Philox contract of [`crate::rng`], so the
//! logits never leave the GPU and both passes see the same samples), then stacked
//! backward passes over chunks of vectors. A [`BatchStage`] records its work on the
//! layer inputs once per batch and on the output gradients once per chunk.

use crate::curvature::layer::CurvatureLayer;
use crate::curvature::layout::{BlockKind, LayerBlocks, ParamLayout};
use crate::curvature::options::{FisherType, KfacApprox, Options};
use crate::data::{BatchBuffer, DataSource, TargetBuffer};
use crate::distributed::{Communicator, CompensatedSum, Partition};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::{Backward, Forward, Graph, Network};
use crate::layers::Pass;
use crate::loss::gpu::{GpuTargets, record_backprop_vectors};
use crate::ops::reduce::{append_ones_column, copy};
use crate::progress::{Event, Progress, Stage};

/// One pass over the data: work on each batch's layer inputs, then on each chunk of
/// its output gradients.
pub(super) trait BatchStage {
    /// What the input side keeps for the gradient side of the same batch.
    type Inputs;

    /// What the GPU is waiting for, for errors.
    const WORK: &'static str;

    /// The stage this pass reports its batches as.
    const STAGE: Stage;

    /// Where this pass reports its progress.
    fn progress(&self) -> &dyn Progress;

    /// Records the work on the layer inputs of a batch of `batch` examples.
    fn inputs(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        batch: &BatchPass,
    ) -> Result<Self::Inputs>;

    /// The quantities the pass sums over the batches.
    fn sums(&mut self) -> Vec<&mut BatchSum>;

    /// Records the work on the output gradients of one chunk of `stack` vectors.
    fn gradients(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        inputs: &Self::Inputs,
        backward: &Backward,
        stack: usize,
        batch: &BatchPass,
    ) -> Result<()>;
}

/// What a pass over the data ([`for_each_batch`]) runs on: the fit's network, parameter
/// layout, data and options, and how its batches are split and shared among the ranks.
#[derive(Clone, Copy)]
pub(super) struct Batches<'a> {
    pub ctx: &'a GpuContext,
    pub network: &'a Network,
    pub data: &'a dyn DataSource,
    pub options: &'a Options,
    pub layout: &'a ParamLayout,
    /// Examples per batch, vectors per stacked backward pass.
    pub chunks: Chunking,
    /// This rank's groups of consecutive batches.
    pub partition: Partition,
}

/// Runs `stage` over this rank's batches of `batches.data` (batch `b` covers examples
/// `b·chunks.examples ..`; rank `r` of `K` takes the groups of consecutive batches
/// [`Partition`] gives it), reading its sums back after each group, reporting each batch to
/// [`BatchStage::progress`] (an `Advanced` event between `Started` and `Finished`).
/// Each batch is read from the source into one reused host buffer just before it runs.
pub(super) fn for_each_batch<S: BatchStage>(batches: &Batches, stage: &mut S) -> Result<()> {
    let Batches {
        ctx,
        network,
        data,
        options,
        layout,
        chunks,
        partition,
    } = *batches;
    let layers: Vec<LayerRows> = layout
        .layers
        .iter()
        .map(|layer| LayerRows::new(network.graph(), layout, layer))
        .collect();
    let n = data.len();
    let total = partition.batches(n, chunks.examples).count();
    stage.progress().report(&Event::Started {
        stage: S::STAGE,
        total,
    });
    let mut buffer = BatchBuffer::new(data);
    let mut examples = 0;
    for (done, span) in partition.batches(n, chunks.examples).enumerate() {
        let (start, len) = (span.start, span.len);
        buffer.read(data, start, start + len)?;
        let batch = run_buffer(ctx, network, &buffer, n, options)?;
        let mut pass = Pass::new(ctx);
        let inputs = stage.inputs(&mut pass, &layers, &batch)?;
        pass.submit()?;
        // The previous group's contributions are added while the GPU runs this batch.
        for sum in stage.sums() {
            sum.add_read();
        }
        batch.for_each_chunk(ctx, network, chunks.vectors, |backward, stack| {
            let mut pass = Pass::new(ctx);
            stage.gradients(&mut pass, &layers, &inputs, backward, stack, &batch)?;
            pass.submit()?;
            ctx.wait(S::WORK)
        })?;
        ctx.wait(S::WORK)?;
        drop(inputs);
        if span.ends_group {
            BatchSum::read_groups(ctx, stage.sums())?;
        }
        examples += len;
        stage.progress().report(&Event::Advanced {
            stage: S::STAGE,
            done: done + 1,
            total,
            examples,
            sweeps: None,
        });
    }
    stage
        .progress()
        .report(&Event::Finished { stage: S::STAGE });
    Ok(())
}

/// One quantity a pass sums over the batches (a Kronecker factor, a block's corrected
/// eigenvalues): each group of batches' contribution ([`crate::distributed::Partition`])
/// is accumulated from zero on the GPU in f32 in `batch`, read back once the group's
/// last batch is done ([`BatchSum::read_groups`]) and added on the host into `sum`
/// ([`BatchSum::add_read`], which the batch loop calls once the next batch's first pass
/// is on the GPU, so that the host add overlaps GPU work). See
/// [`crate::distributed::sum`] for why the sum over groups is on the host.
pub(super) struct BatchSum {
    /// The current group's contribution (zeros at the start of each group).
    pub batch: GpuTensor,
    /// The last group's contribution, read back and not yet added.
    read: Option<Vec<f32>>,
    /// The contributions of the batches added so far.
    sum: CompensatedSum,
}

impl BatchSum {
    /// Zeros of `shape`.
    pub fn new(ctx: &GpuContext, shape: &[usize]) -> Result<Self> {
        let batch = ctx.zeros(shape)?;
        Ok(Self {
            sum: CompensatedSum::new(batch.len()),
            read: None,
            batch,
        })
    }

    /// Reads the finished group's contributions of every quantity in `sums` back in one
    /// readback ([`GpuContext::read_many`]; each added later by [`Self::add_read`]) and
    /// starts the next group's from zeros (fresh buffers, which the GPU zeroes; the old
    /// ones go first).
    pub fn read_groups(ctx: &GpuContext, mut sums: Vec<&mut BatchSum>) -> Result<()> {
        let done: Vec<GpuTensor> = sums
            .iter_mut()
            .map(|sum| {
                sum.add_read();
                let placeholder = sum.batch.released();
                std::mem::replace(&mut sum.batch, placeholder)
            })
            .collect();
        let reads = ctx.read_many(&done.iter().collect::<Vec<_>>())?;
        let shapes: Vec<Vec<usize>> = done.iter().map(|t| t.shape().to_vec()).collect();
        drop(done);
        for ((sum, read), shape) in sums.iter_mut().zip(reads).zip(shapes) {
            sum.read = Some(read);
            sum.batch = ctx.zeros(&shape)?;
        }
        Ok(())
    }

    /// Adds the contribution [`Self::read_groups`] read, if any, to the sum.
    pub fn add_read(&mut self) {
        if let Some(terms) = self.read.take() {
            self.sum.add(&terms);
        }
    }

    /// The sum over every batch of every rank, rounded once to f32 (collective, see
    /// [`CompensatedSum::total`]).
    pub fn total(&mut self, comm: &dyn Communicator) -> Result<Vec<f32>> {
        self.add_read();
        self.sum.total(comm)
    }

    /// The shape of the summed quantity.
    pub fn shape(&self) -> &[usize] {
        self.batch.shape()
    }
}

/// One curvature layer's rows in one batch, as the factors and the correction take
/// them (SPEC §2–§3).
pub(super) struct LayerRows<'a> {
    pub blocks: &'a LayerBlocks,
    layer: &'a dyn CurvatureLayer,
    /// Whether the layer is one joint weight-and-bias block (inputs get a ones column).
    joint: bool,
}

impl<'a> LayerRows<'a> {
    fn new(graph: &'a Graph, layout: &ParamLayout, blocks: &'a LayerBlocks) -> Self {
        let joint = blocks
            .blocks
            .iter()
            .any(|&b| layout.blocks[b].kind == BlockKind::Joint);
        Self {
            blocks,
            layer: graph
                .layer(blocks.layer)
                .curvature()
                .expect("the layout holds curvature layers"),
            joint,
        }
    }

    /// `x` with a ones column appended when the layer is joint: `[rows, d_in(+1)]`.
    fn with_ones(&self, pass: &mut Pass, x: GpuTensor) -> Result<GpuTensor> {
        if !self.joint {
            return Ok(x);
        }
        let d_in = self.blocks.d_in;
        let rows = x.len() / d_in;
        let out = pass.zeros(&[rows, d_in + 1])?;
        append_ones_column(&mut pass.rec, &x, &out, rows, d_in)?;
        pass.keep(x);
        Ok(out)
    }

    /// Expand-format inputs `ã` `[B·S, D]` (a ones column for a joint block).
    pub fn expand_inputs(&self, pass: &mut Pass, forward: &Forward) -> Result<GpuTensor> {
        let input = forward.layer_input(self.blocks.layer);
        let x = self.layer.expand_inputs(pass, input, forward.batch())?;
        self.with_ones(pass, x)
    }

    /// The rows whose Gram matrix gives `A` (scaled by `1/(N·S)` for expand, `1/N` for
    /// reduce): expand `ã` `[B·S, D]`, or reduce `[mean_s a; 1]` `[B, D]`.
    pub fn factor_inputs(
        &self,
        pass: &mut Pass,
        forward: &Forward,
        approx: KfacApprox,
    ) -> Result<GpuTensor> {
        if approx == KfacApprox::Expand || self.blocks.positions == 1 {
            return self.expand_inputs(pass, forward);
        }
        let input = forward.layer_input(self.blocks.layer);
        let x = self.layer.reduce_inputs(pass, input, forward.batch())?;
        self.with_ones(pass, x)
    }

    /// Output gradients as rows, `[V·B·S, d_out]`.
    pub fn expand_grads(&self, pass: &mut Pass, backward: &Backward) -> Result<GpuTensor> {
        let grads = backward.output_grad(self.blocks.layer);
        self.layer.expand_grads(pass, grads)
    }

    /// Output gradients summed over positions, `[V·B, d_out]`.
    pub fn summed_grads(&self, pass: &mut Pass, backward: &Backward) -> Result<GpuTensor> {
        let grads = backward.output_grad(self.blocks.layer);
        self.layer.summed_grads(pass, grads)
    }

    /// The rows whose Gram matrix (times κ) gives `G`: expand `[V·B·S, d_out]`, reduce
    /// position sums `[V·B, d_out]`.
    pub fn factor_grads(
        &self,
        pass: &mut Pass,
        backward: &Backward,
        approx: KfacApprox,
    ) -> Result<GpuTensor> {
        match approx {
            KfacApprox::Expand => self.expand_grads(pass, backward),
            KfacApprox::Reduce => self.summed_grads(pass, backward),
        }
    }
}

/// The GPU tensors of one batch after the forward pass, with its `V` backpropagated
/// vectors (none for forward-only).
pub(super) struct BatchPass {
    pub forward: Forward,
    /// `[V, B, C]`.
    pub vectors: Option<GpuTensor>,
    /// κ_b.
    pub kappa: f64,
}

impl BatchPass {
    /// Runs the stacked backward pass over chunks of at most `chunk` vectors and calls
    /// `f(backward, stack)` for each; every per-vector quantity of the curvature is a
    /// sum over vectors, so the chunks' contributions simply add up.
    fn for_each_chunk(
        &self,
        ctx: &GpuContext,
        network: &Network,
        chunk: usize,
        mut f: impl FnMut(&Backward, usize) -> Result<()>,
    ) -> Result<()> {
        let Some(vectors) = &self.vectors else {
            return Ok(());
        };
        let [nv, batch, outputs] = [vectors.shape()[0], vectors.shape()[1], vectors.shape()[2]];
        let per_vector = batch * outputs;
        for v0 in (0..nv).step_by(chunk.max(1)) {
            let stack = chunk.min(nv - v0);
            let backward = if stack == nv {
                network.backward(ctx, &self.forward, vectors, nv, false)?
            } else {
                let slice = ctx.zeros(&[stack, batch, outputs])?;
                let mut rec = ctx.recorder();
                copy(
                    &mut rec,
                    vectors,
                    v0 * per_vector,
                    &slice,
                    0,
                    stack * per_vector,
                )?;
                rec.submit()?;
                network.backward(ctx, &self.forward, &slice, stack, false)?
            };
            f(&backward, stack)?;
        }
        Ok(())
    }
}

/// How a batch is processed within the context's memory budget.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunking {
    /// Examples per pass over the network (at most the batch size).
    pub examples: usize,
    /// Backpropagated vectors per stacked backward pass.
    pub vectors: usize,
}

/// Splits batches and stacks of vectors so that one pass fits the memory budget and
/// every tensor fits one storage binding. The conv layers' im2col workspaces are
/// bounded by the budget on their own ([`Network::workspace_bytes`]) and come off it
/// first. Per example, a pass holds the forward values backward and the curvature read
/// ([`Network::kept_elements`]; the forward pass itself holds every activation, which
/// one stacked vector's share below covers), about three tensors the size of the
/// activations per stacked vector (gradients, repeated saved activations, rotated
/// gradients), and per layer with an input factor three `[S, D]` input matrices (the
/// expand-format inputs, their copy with a ones column, and their rotation in the
/// correction pass).
pub(super) fn chunking(
    ctx: &GpuContext,
    network: &Network,
    options: &Options,
    layout: &ParamLayout,
    nv: usize,
) -> Result<Chunking> {
    let workspaces = network.workspace_bytes(ctx);
    let budget = ctx.memory_budget().saturating_sub(workspaces);
    let binding = ctx.limits.max_storage_buffer_binding_size;
    let inputs = layout
        .layers
        .iter()
        .filter_map(|layer| Some(layer.positions * layer.input_dim(layout)?));
    let input_rows = 3 * inputs.clone().sum::<usize>();
    let per_example = 4 * (network.activation_elements() + input_rows) as u64;
    let held = 4 * (network.kept_elements() + input_rows) as u64;
    let largest = 4 * network
        .largest_activation()
        .max(inputs.max().unwrap_or(0))
        .max(1) as u64;
    let stack = nv.max(1) as u64;
    // Per example: the kept forward set plus three backward sets per stacked vector.
    let fits = |examples: u64, vectors: u64| {
        examples * (held + 3 * vectors * per_example) <= budget
            && examples * vectors * largest <= binding
            && examples * largest <= binding
    };
    if !fits(1, 1) {
        return Err(Error::Memory(format!(
            "one example with one backpropagated vector needs about {} bytes of GPU memory \
             ({per_example} per example and vector, largest tensor {largest} bytes), more than \
             the memory budget of {} bytes less {workspaces} bytes of conv workspaces, or the \
             adapter's binding limit of {binding} bytes",
            held + 3 * per_example,
            ctx.memory_budget(),
        )));
    }
    let mut examples = options.batch_size as u64;
    while examples > 1 && !fits(examples, 1) {
        examples = examples.div_ceil(2);
    }
    let mut vectors = stack;
    while vectors > 1 && !fits(examples, vectors) {
        vectors = vectors.div_ceil(2);
    }
    Ok(Chunking {
        examples: examples as usize,
        vectors: vectors as usize,
    })
}

/// Runs the network on examples `start .. start + len` of `data` and computes their
/// backpropagated vectors ([`run_buffer`]).
pub(super) fn run_batch(
    ctx: &GpuContext,
    network: &Network,
    data: &dyn DataSource,
    options: &Options,
    start: usize,
    len: usize,
) -> Result<BatchPass> {
    let mut buffer = BatchBuffer::new(data);
    buffer.read(data, start, start + len)?;
    run_buffer(ctx, network, &buffer, data.len(), options)
}

/// Runs the network on one batch of a source of `num_data` examples and computes its
/// backpropagated vectors, all on the GPU: upload `x` (f32 values, or token ids as u32
/// words) and `y`, forward, loss vectors, with no readback in between. The MC samples
/// are keyed by the batch's global example indices.
fn run_buffer(
    ctx: &GpuContext,
    network: &Network,
    batch: &BatchBuffer,
    num_data: usize,
    options: &Options,
) -> Result<BatchPass> {
    let len = batch.len;
    let mut shape = vec![len];
    shape.extend(network.graph().input.shape.iter());
    // The words as they are: f32 bits, or token ids (the buffer is untyped).
    let x = ctx.upload_u32(&batch.x, &shape)?;
    let forward = network.forward(ctx, x)?;
    if options.fisher == FisherType::ForwardOnly {
        return Ok(BatchPass {
            forward,
            vectors: None,
            kappa: 1.0,
        });
    }
    let outputs = network.num_outputs();
    let targets = match &batch.y {
        TargetBuffer::Classes(y) => {
            let classes: Vec<u32> = y.iter().map(|&c| c as u32).collect();
            ctx.upload_u32(&classes, &[len])?
        }
        TargetBuffer::Values { data: y, .. } => ctx.upload(y, &[len, outputs])?,
    };
    let gpu_targets = match batch.y {
        TargetBuffer::Classes(_) => GpuTargets::Classes(&targets),
        TargetBuffer::Values { .. } => GpuTargets::Dense(&targets),
    };
    let nv = options.num_vectors(outputs);
    let vectors = ctx.zeros(&[nv, len, outputs])?;
    let mut rec = ctx.recorder();
    let kappa = record_backprop_vectors(
        &mut rec,
        options,
        forward.output(),
        gpu_targets,
        batch.start,
        num_data,
        &vectors,
    )?;
    rec.submit()?;
    Ok(BatchPass {
        forward,
        vectors: Some(vectors),
        kappa,
    })
}
