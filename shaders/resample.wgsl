// Changing the spatial size of NCHW f32 tensors: nearest-neighbour upsampling by
// integer factors and adaptive average pooling, forward and backward. A "plane" is one
// (example, channel) pair: input planes are H x W, output planes OH x OW.
//
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params); every entry
// point binds (src; dst; params).
//
// upsample_nearest: OH = H * SH, OW = W * SW; y[oh, ow] = x[oh / SH, ow / SW]. Its
// backward sums each input's SH x SW block of output gradients.
// adaptive_avg_pool (PyTorch's windows): output oh averages input rows
// [floor(oh * H / OH), ceil((oh + 1) * H / OH)), and likewise for columns. Its backward
// gives each input element the sum of grad / (window size) over the outputs whose
// window holds it.
//
// One invocation per output element (forward) or input element (backward):
// grid_1d(ceil(n / 256)) workgroups of 256. Backward passes gather in increasing
// output order, so results are deterministic and need no atomics. flat and coords:
// planes.wgsl (prepended).

struct ResampleParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> params: ResampleParams;

@compute @workgroup_size(256)
fn upsample_nearest_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let o = flat(wid, nwg, lid);
    if (o >= p.planes * p.oh * p.ow) {
        return;
    }
    let c = coords(o, p.oh, p.ow);
    let sh = p.oh / p.h;
    let sw = p.ow / p.w;
    dst[o] = src[(c.x * p.h + c.y / sh) * p.w + c.z / sw];
}

@compute @workgroup_size(256)
fn upsample_nearest_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let c = coords(i, p.h, p.w);
    let sh = p.oh / p.h;
    let sw = p.ow / p.w;
    var acc = 0.0;
    for (var dh = 0u; dh < sh; dh++) {
        let row = (c.x * p.oh + c.y * sh + dh) * p.ow + c.z * sw;
        for (var dw = 0u; dw < sw; dw++) {
            acc += src[row + dw];
        }
    }
    dst[i] = acc;
}

// PyTorch's adaptive window along one axis for output o: input [start, end).
fn window(o: u32, size: u32, count: u32) -> vec2<u32> {
    return vec2<u32>(o * size / count, ((o + 1u) * size + count - 1u) / count);
}

@compute @workgroup_size(256)
fn adaptive_avg_pool_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let o = flat(wid, nwg, lid);
    if (o >= p.planes * p.oh * p.ow) {
        return;
    }
    let c = coords(o, p.oh, p.ow);
    let rows = window(c.y, p.h, p.oh);
    let cols = window(c.z, p.w, p.ow);
    var acc = 0.0;
    for (var h = rows.x; h < rows.y; h++) {
        let row = (c.x * p.h + h) * p.w;
        for (var w = cols.x; w < cols.y; w++) {
            acc += src[row + w];
        }
    }
    dst[o] = acc / f32((rows.y - rows.x) * (cols.y - cols.x));
}

// Outputs along one axis whose window holds input i: a superset
// [floor(i * count / size), ceil((i + 1) * count / size)) clipped to count; callers
// test membership.
fn holders(i: u32, size: u32, count: u32) -> vec2<u32> {
    return vec2<u32>(i * count / size, min(((i + 1u) * count + size - 1u) / size, count));
}

@compute @workgroup_size(256)
fn adaptive_avg_pool_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let c = coords(i, p.h, p.w);
    let plane = c.x;
    let h = c.y;
    let w = c.z;
    let out_rows = holders(h, p.h, p.oh);
    let out_cols = holders(w, p.w, p.ow);
    var acc = 0.0;
    for (var oh = out_rows.x; oh < out_rows.y; oh++) {
        let rows = window(oh, p.h, p.oh);
        if (h < rows.x || h >= rows.y) {
            continue;
        }
        for (var ow = out_cols.x; ow < out_cols.y; ow++) {
            let cols = window(ow, p.w, p.ow);
            if (w < cols.x || w >= cols.y) {
                continue;
            }
            let count = f32((rows.y - rows.x) * (cols.y - cols.x));
            acc += src[(plane * p.oh + oh) * p.ow + ow] / count;
        }
    }
    dst[i] = acc;
}
