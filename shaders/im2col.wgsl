// im2col for conv2d in torch.nn.functional.unfold order, its group-averaged variant
// (SPEC 2.2 step 1), and the adjoint col2im, over a chunk of examples
// first .. first + count of an NCHW input x [B, C, H, W].
//
// Patch layout, per group g (G groups, Cg = C / G input channels each), with
// S = OH * OW positions and D = Cg * KH * KW patch entries:
//   patches[(g * count + b) * S + oh * OW + ow][c * KH * KW + kh * KW + kw]
//     = x[first + b, g * Cg + c, oh * SH + kh * DH - PH, ow * SW + kw * DW - PW]
// (0 in the padding), i.e. [G, count * S, D] row-major: for each group a plain
// row-major [count * S, D] matrix, ready for a GEMM against the group's weight rows
// [Cout / G, D]. im2col_group_mean writes one such matrix ([count * S, D]) of the input
// averaged over the G channel groups. col2im is the adjoint of im2col: it overwrites
// examples first .. first + count of dx [B, C, H, W], each input element gathering the
// patch entries that read it (deterministic, no atomics).
//
// Bindings: src (read), dst (read_write), params. One invocation per output element:
// grid_1d(ceil(n / 256)) workgroups of 256.

struct Im2colParams {
    first: u32,
    count: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    groups: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> params: Im2colParams;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// One patch entry: example row `row` (b * S + s of the chunk), entry `e` of the patch.
struct Tap {
    b: u32,
    c: u32,
    // In-image coordinates, valid only when `inside`.
    h: u32,
    w: u32,
    inside: bool,
}

fn tap(row: u32, e: u32) -> Tap {
    let p = params;
    let positions = p.oh * p.ow;
    let b = row / positions;
    let s = row % positions;
    let kk = p.kh * p.kw;
    let c = e / kk;
    let kh = (e % kk) / p.kw;
    let kw = e % p.kw;
    let hp = (s / p.ow) * p.sh + kh * p.dh;
    let wp = (s % p.ow) * p.sw + kw * p.dw;
    let inside = hp >= p.ph && hp - p.ph < p.h && wp >= p.pw && wp - p.pw < p.w;
    return Tap(b, c, hp - p.ph, wp - p.pw, inside);
}

fn x_index(b: u32, channel: u32, h: u32, w: u32) -> u32 {
    let p = params;
    return (((p.first + b) * p.c + channel) * p.h + h) * p.w + w;
}

@compute @workgroup_size(256)
fn im2col(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let cg = p.c / p.groups;
    let d = cg * p.kh * p.kw;
    let rows = p.count * p.oh * p.ow;
    let i = flat(wid, nwg, lid);
    if (i >= p.groups * rows * d) {
        return;
    }
    let g = i / (rows * d);
    let t = tap((i / d) % rows, i % d);
    var v = 0.0;
    if (t.inside) {
        v = src[x_index(t.b, g * cg + t.c, t.h, t.w)];
    }
    dst[i] = v;
}

@compute @workgroup_size(256)
fn im2col_group_mean(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let cg = p.c / p.groups;
    let d = cg * p.kh * p.kw;
    let i = flat(wid, nwg, lid);
    if (i >= p.count * p.oh * p.ow * d) {
        return;
    }
    let t = tap(i / d, i % d);
    var v = 0.0;
    if (t.inside) {
        for (var g = 0u; g < p.groups; g++) {
            v += src[x_index(t.b, g * cg + t.c, t.h, t.w)];
        }
        v /= f32(p.groups);
    }
    dst[i] = v;
}

// Input element (b, channel, h, w) is read by tap (kh, kw) of output (oh, ow) exactly
// when oh * SH = h + PH - kh * DH and ow * SW = w + PW - kw * DW with oh < OH, ow < OW;
// the sum runs over kh, then kw, ascending.
@compute @workgroup_size(256)
fn col2im(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.count * p.c * p.h * p.w) {
        return;
    }
    let w = i % p.w;
    let h = (i / p.w) % p.h;
    let channel = (i / (p.w * p.h)) % p.c;
    let b = i / (p.w * p.h * p.c);
    let cg = p.c / p.groups;
    let g = channel / cg;
    let c = channel % cg;
    let d = cg * p.kh * p.kw;
    let hp = h + p.ph;
    let wp = w + p.pw;
    var acc = 0.0;
    for (var kh = 0u; kh < p.kh; kh++) {
        let dh = kh * p.dh;
        if (dh > hp || (hp - dh) % p.sh != 0u || (hp - dh) / p.sh >= p.oh) {
            continue;
        }
        let oh = (hp - dh) / p.sh;
        for (var kw = 0u; kw < p.kw; kw++) {
            let dw = kw * p.dw;
            if (dw > wp || (wp - dw) % p.sw != 0u || (wp - dw) / p.sw >= p.ow) {
                continue;
            }
            let ow = (wp - dw) / p.sw;
            let row = (g * p.count + b) * p.oh * p.ow + oh * p.ow + ow;
            acc += src[row * d + (c * p.kh + kh) * p.kw + kw];
        }
    }
    dst[x_index(b, channel, h, w)] = acc;
}
