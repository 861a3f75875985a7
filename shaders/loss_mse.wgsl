
// ---- mean squared error -------------------------------------------------------------
// type-2: scale·e_v; empirical/MC: (f − y)·scale, with y the target, or for MC sample v
// y = f + √0.5·ε.

@compute @workgroup_size(256)
fn backprop_vectors(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let t = (wid.x + wid.y * nwg.x) * 256u + lid;
    let b = params.batch;
    let cc = params.classes;
    if (t >= params.num_vectors * b) {
        return;
    }
    let v = t / b;
    let n = t % b;
    let global_n = params.batch_start + n;
    let out = (v * b + n) * cc;
    let scale = params.scale;

    if (params.mode == 0u) {
        // type-2: column v of the loss Hessian's square root.
        for (var i = 0u; i < cc; i++) {
            vectors[out + i] = select(0.0, scale, i == v);
        }
        return;
    }

    // Empirical (true targets) or MC sample v (targets drawn from the model).
    for (var i = 0u; i < cc; i++) {
        let f = logit(n, i);
        var y = targets[n * cc + i];
        if (params.mode == 2u) {
            y = f + 0.7071067811865476 * gaussian(global_n, v, i);
        }
        vectors[out + i] = scale * (f - y);
    }
}
