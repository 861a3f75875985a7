
// ---- binary cross-entropy with logits --------------------------------------------------
// type-2: scale·√(p_v(1 − p_v))·e_v; empirical/MC: (σ(f) − y)·scale, with y the target,
// or for MC sample v a Bernoulli draw of σ(f).

// Vector v of example n (global index global_n, the MC counter) into vectors[out..out + C].
fn write_vectors(v: u32, n: u32, global_n: u32, out: u32) {
    let cc = params.classes;
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
