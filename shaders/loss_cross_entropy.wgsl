
// ---- cross-entropy ----------------------------------------------------------------
// type-2: column v of √p_v (e_v − p)·scale; empirical/MC: (p − e_y)·scale, with y the
// label, or for MC sample v a categorical draw from p.

// Vector v of example n (global index global_n, the MC counter) into vectors[out..out + C].
fn write_vectors(v: u32, n: u32, global_n: u32, out: u32) {
    let cc = params.classes;
    let scale = params.scale;

    // Softmax statistics.
    var max_f = logit(n, 0u);
    var denom = 0.0;
    for (var i = 1u; i < cc; i++) {
        max_f = max(max_f, logit(n, i));
    }
    for (var i = 0u; i < cc; i++) {
        denom += exp(logit(n, i) - max_f);
    }

    if (params.mode == 0u) {
        // type-2: column v of the loss Hessian's square root.
        let c = v;
        for (var i = 0u; i < cc; i++) {
            let pc = exp(logit(n, c) - max_f) / denom;
            let pi = exp(logit(n, i) - max_f) / denom;
            vectors[out + i] = scale * sqrt(pc) * (select(0.0, 1.0, i == c) - pi);
        }
        return;
    }

    // Empirical (true labels) or MC sample v (labels drawn from the model).
    var label = labels[n];
    if (params.mode == 2u) {
        let u = to_uniform(block(global_n, v, 0u).x);
        label = cc - 1u;
        var cdf = 0.0;
        for (var i = 0u; i < cc; i++) {
            cdf += exp(logit(n, i) - max_f) / denom;
            if (u < cdf) {
                label = i;
                break;
            }
        }
    }
    for (var i = 0u; i < cc; i++) {
        let p = exp(logit(n, i) - max_f) / denom;
        vectors[out + i] = scale * (p - select(0.0, 1.0, i == label));
    }
}
