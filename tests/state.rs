//! The state file: round trip, and the refusals of issue 3 (a newer format version, a
//! file that is not ours, tensors whose sizes do not fit), each a clear error.

mod common;

use std::collections::HashMap;
use std::path::Path;

use ekfac::curvature::fit::fit;
use ekfac::curvature::state::CurvatureState;

/// Rewrites the safetensors file `from` into `to`, letting `edit` change the metadata
/// JSON and `drop_key` leave one tensor out or give it a wrong shape.
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&mut serde_json::Value), reshape: Option<&str>) {
    let bytes = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["ekfac"]).unwrap();
    edit(&mut meta);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut shape = view.shape().to_vec();
            let mut data = view.data().to_vec();
            if reshape == Some(name.as_str()) {
                // One row fewer: a size that does not fit the recorded layout.
                let row: usize = shape[1..].iter().product::<usize>() * 4;
                shape[0] -= 1;
                data.truncate(data.len() - row);
            }
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(
        views,
        Some(HashMap::from([("ekfac".to_string(), meta.to_string())])),
    )
    .unwrap();
    std::fs::write(to, out).unwrap();
}

#[test]
fn state_round_trip_and_refusals() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture("mlp_tanh_ce_mean_type2_joint");
    let fitted = fit(&ctx, &case.model, &case.data, &case.options, Some(1e-2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    fitted.state.save(&path).unwrap();
    assert_eq!(CurvatureState::load(&path).unwrap(), fitted.state);

    let err = |p: &Path| CurvatureState::load(p).unwrap_err().to_string();

    let newer = dir.path().join("newer.safetensors");
    rewrite(&path, &newer, |m| m["format_version"] = 2.into(), None);
    let e = err(&newer);
    assert!(
        e.contains("format version 2") && e.contains("newer.safetensors"),
        "{e}"
    );

    let foreign = dir.path().join("foreign.safetensors");
    rewrite(
        &path,
        &foreign,
        |m| m["format"] = "something-else".into(),
        None,
    );
    let e = err(&foreign);
    assert!(e.contains("not an ekfac state file"), "{e}");

    let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature/mlp_tanh_ce_mean_type2_joint/weights.safetensors");
    let e = err(&weights);
    assert!(e.contains("not an ekfac state file"), "{e}");

    let resized = dir.path().join("resized.safetensors");
    rewrite(&path, &resized, |_| {}, Some("0.input_eigenvectors"));
    let e = err(&resized);
    assert!(
        e.contains("0.input_eigenvectors") && e.contains("expected shape"),
        "{e}"
    );

    let missing = dir.path().join("missing.safetensors");
    rewrite(
        &path,
        &missing,
        |m| m["params"][0]["name"] = "0.nonexistent".into(),
        None,
    );
    let e = err(&missing);
    assert!(e.contains("0.nonexistent"), "{e}");
}
