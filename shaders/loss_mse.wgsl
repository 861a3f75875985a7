
// ---- mean squared error -------------------------------------------------------------
// type-2: scale·e_v; empirical/MC: (f − y)·scale, with y the target, or for MC sample v
// y = f + √0.5·ε.

// Vector v of example n (global index global_n, the MC counter) into vectors[out..out + C].
fn write_vectors(v: u32, n: u32, global_n: u32, out: u32) {
    let cc = params.classes;
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
