//! Pictures: `ekfac plot` writes a PNG (or an SVG by its name) of the stated size that
//! is not blank; the library's curves and image grids likewise.

mod common;

use std::path::Path;
use std::process::Command;

use ekfac::plot::{Format, PALETTE, Series, Tile, curves, image_grid};

/// Width, height and RGB pixels of a PNG.
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Asserts that the picture is not blank: a share of its pixels is not white, and it
/// has several colours.
fn assert_not_blank(rgb: &[u8], what: &str) {
    let pixels = rgb.len() / 3;
    let inked = rgb.chunks(3).filter(|p| p.iter().any(|&c| c < 200)).count();
    assert!(
        inked * 100 > pixels,
        "{what}: only {inked} of {pixels} pixels are not white"
    );
    let mut colours: Vec<&[u8]> = rgb.chunks(3).collect();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 8, "{what}: {} colours", colours.len());
}

#[test]
fn the_command_line_plots_a_state_as_png_and_svg() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture("cnn_a_ce_mean_type2_expand_sep");
    let fitted =
        ekfac::curvature::fit::fit(&ctx, &case.model, &case.data, &case.options, Some(1e-3))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.safetensors");
    fitted.state.save(&state).unwrap();
    let run = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ekfac"))
            .args(["plot", "--state", state.to_str().unwrap(), "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let png_path = dir.path().join("spectrum.png");
    let out = run(&png_path);
    assert!(out.status.success(), "{out:?}");
    let (w, h, rgb) = decode(&std::fs::read(&png_path).unwrap());
    // Two layers: two panels of 480 × 300 side by side, as stated on stdout.
    assert_eq!((w, h), (960, 300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("960 × 300"), "{stdout}");
    assert_not_blank(&rgb, "spectrum.png");
    // The KFAC and EKFAC lines and the damping line are drawn in their colours.
    for c in [PALETTE[0], PALETTE[1], PALETTE[3]] {
        let n = rgb.chunks(3).filter(|p| *p == [c.0, c.1, c.2]).count();
        assert!(n > 50, "colour {c:?} drawn on {n} pixels only");
    }

    let svg_path = dir.path().join("spectrum.SVG");
    let out = run(&svg_path);
    assert!(out.status.success(), "{out:?}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("width=\"960\""),
        "{svg:.200}"
    );
    assert!(
        svg.contains("EKFAC") && svg.contains("damping"),
        "no text in the SVG"
    );

    // A missing state: an error naming it, no picture.
    let missing = dir.path().join("missing.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .args(["plot", "--state", missing.to_str().unwrap(), "--out"])
        .arg(dir.path().join("never.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.safetensors"));
    assert!(!dir.path().join("never.png").exists());
}

#[test]
fn curves_and_image_grids_have_their_size_and_ink() {
    let series = |scale: f64| -> Vec<Series> {
        (0..3)
            .map(|i| Series {
                label: format!("method {i}"),
                color: PALETTE[i],
                points: (0..20)
                    .map(|s| (s as f64, scale * (-(s as f64) / (i + 2) as f64).exp()))
                    .collect(),
            })
            .collect()
    };
    let picture = curves(&[
        ("loss".into(), series(2.0), true),
        ("accuracy".into(), series(1.0), false),
    ]);
    let path = Path::new("curves.png");
    assert_eq!(Format::of(path), Format::Png);
    let (w, h, rgb) = decode(&picture.encode(Format::Png, path).unwrap());
    assert_eq!((w, h), (960, 320));
    assert_eq!((w, h), (picture.width, picture.height));
    assert_not_blank(&rgb, "curves");

    let pixels: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect();
    let tiles: Vec<Tile> = (0..3)
        .map(|i| Tile {
            pixels: &pixels,
            shape: [1, 8, 8],
            caption: [format!("tile {i}"), "label 0".into()],
        })
        .collect();
    let picture = image_grid("three tiles", &tiles, 3);
    let (w, h, rgb) = decode(&picture.encode(Format::Png, Path::new("g.png")).unwrap());
    assert_eq!((w, h), (360, 168));
    assert_not_blank(&rgb, "image grid");
}
