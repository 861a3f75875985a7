
// ---- binary cross-entropy with logits --------------------------------------------------
// type-2: scale·√(p_v(1 − p_v))·e_v; empirical/MC: (σ(f) − y)·scale, with y the target,
// or for MC sample v a Bernoulli draw of σ(f).

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
            var value = 0.0;
            if (i == v) {
                let p = sigmoid(logit(n, v));
                value = scale * sqrt(p * (1.0 - p));
            }
            vectors[out + i] = value;
        }
        return;
    }

    // Empirical (true targets) or MC sample v (targets drawn from the model).
    for (var i = 0u; i < cc; i++) {
        let p = sigmoid(logit(n, i));
        var y = targets[n * cc + i];
        if (params.mode == 2u) {
            y = select(0.0, 1.0, to_uniform(block(global_n, v, i).x) < p);
        }
        vectors[out + i] = scale * (p - y);
    }
}
