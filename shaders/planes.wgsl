// Element indexing of the NCHW kernels (pool.wgsl, resample.wgsl), prepended to their
// source: a "plane" is one (example, channel) pair, and one invocation handles one
// element of a grid_1d grid of workgroups of 256.

// The invocation's element index.
fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// (plane, row, column) of element i of planes rows x cols.
fn coords(i: u32, rows: u32, cols: u32) -> vec3<u32> {
    return vec3<u32>(i / (rows * cols), (i / cols) % rows, i % cols);
}
