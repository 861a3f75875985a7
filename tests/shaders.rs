//! Every WGSL file parses and validates with naga under the capabilities the crate
//! requests (none beyond WebGPU's), and translates with naga's SPIR-V, MSL and HLSL
//! back ends, so Vulkan, Metal and DX12 translation errors show up without those GPUs.
//! No GPU needed.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(name: &str, source: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl: {}", e.emit_to_string(source)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl: {}", e.emit_to_string(source)));
    (module, info)
}

#[test]
fn every_shader_validates_and_translates() {
    let shaders = ekfac::ops::all_shaders();
    assert!(!shaders.is_empty());
    for shader in shaders {
        let (module, info) = validate(shader.name, shader.source);
        assert!(
            module
                .entry_points
                .iter()
                .all(|ep| ep.stage == naga::ShaderStage::Compute),
            "shaders/{}.wgsl: only compute entry points are expected",
            shader.name
        );
        // Overrides keep their defaults, as when the crate creates a pipeline without
        // constants; every override must therefore have one. They are processed per
        // entry point, as wgpu's backends do (the module is first reduced to what the
        // entry point uses; override-sized workgroup arrays need that).
        for ep in &module.entry_points {
            let name = format!("shaders/{}.wgsl {}", shader.name, ep.name);
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, &ep.name)),
                &Default::default(),
            )
            .unwrap_or_else(|e| panic!("{name}: overrides: {e}"));
            let spv_options = spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: ep.name.clone(),
            };
            spv::write_vec(&module, &info, &spv::Options::default(), Some(&spv_options))
                .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
            msl::write_string(
                &module,
                &info,
                &msl::Options::default(),
                &msl::PipelineOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
            let mut hlsl_source = String::new();
            let hlsl_options = hlsl::Options::default();
            let pipeline_options = hlsl::PipelineOptions::default();
            hlsl::Writer::new(&mut hlsl_source, &hlsl_options, &pipeline_options)
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("{name}: HLSL: {e}"));
        }
    }
}

/// Many GPUs have neither 64-bit floats nor float atomics; the software driver has
/// both, so only this check keeps them out.
#[test]
fn no_shader_uses_f64_or_float_atomics() {
    for shader in ekfac::ops::all_shaders() {
        let (module, _) = validate(shader.name, shader.source);
        for (_, ty) in module.types.iter() {
            match &ty.inner {
                naga::TypeInner::Scalar(s) | naga::TypeInner::Vector { scalar: s, .. } => {
                    assert!(
                        !(s.kind == naga::ScalarKind::Float && s.width == 8),
                        "shaders/{}.wgsl uses f64",
                        shader.name
                    );
                }
                naga::TypeInner::Atomic(s) => assert!(
                    s.kind != naga::ScalarKind::Float,
                    "shaders/{}.wgsl uses a float atomic",
                    shader.name
                ),
                _ => {}
            }
        }
        assert!(
            !shader.source.contains("enable "),
            "shaders/{}.wgsl enables an extension",
            shader.name
        );
    }
}

/// The WGSL scalar type of a kernel parameter field's Rust type.
fn wgsl_scalar(rust: &str) -> naga::Scalar {
    match rust {
        "u32" => naga::Scalar::U32,
        "i32" => naga::Scalar::I32,
        "f32" => naga::Scalar::F32,
        other => panic!("kernel parameters hold only u32, i32 and f32, found {other}"),
    }
}

/// Every Rust kernel parameter struct has a WGSL twin of the same name in its shader:
/// the same fields in the same order with the same scalar types, and the same size.
#[test]
fn kernel_params_match_their_wgsl_structs() {
    let layouts = ekfac::ops::all_params();
    assert!(!layouts.is_empty());
    for layout in layouts {
        let shader = layout.shader.name;
        let (module, _) = validate(shader, layout.shader.source);
        let (members, span) = module
            .types
            .iter()
            .find_map(|(_, ty)| match (&ty.name, &ty.inner) {
                (Some(name), naga::TypeInner::Struct { members, span }) if name == layout.name => {
                    Some((members, *span))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("shaders/{shader}.wgsl declares no struct {}", layout.name));
        let wgsl: Vec<(String, naga::TypeInner)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap(), module.types[m.ty].inner.clone()))
            .collect();
        let rust: Vec<(String, naga::TypeInner)> = layout
            .fields
            .iter()
            .map(|&(name, ty)| (name.to_string(), naga::TypeInner::Scalar(wgsl_scalar(ty))))
            .collect();
        assert_eq!(
            wgsl, rust,
            "shaders/{shader}.wgsl struct {} differs from its Rust twin",
            layout.name
        );
        assert_eq!(span as usize, layout.size, "{} sizes differ", layout.name);
    }
}

/// Every struct a kernel reads its parameters from (a read-only storage variable of a
/// struct type) is one of [`ekfac::ops::all_params`].
#[test]
fn every_parameter_struct_has_a_rust_twin() {
    let layouts = ekfac::ops::all_params();
    for shader in ekfac::ops::all_shaders() {
        let (module, _) = validate(shader.name, shader.source);
        for (_, var) in module.global_variables.iter() {
            let ty = &module.types[var.ty];
            if let (naga::TypeInner::Struct { .. }, Some(name)) = (&ty.inner, &ty.name) {
                assert!(
                    layouts
                        .iter()
                        .any(|l| l.shader.name == shader.name && l.name == name),
                    "shaders/{}.wgsl reads parameters from struct {name}, which no Rust \
                     KernelParams struct mirrors (ekfac::ops::all_params)",
                    shader.name
                );
            }
        }
    }
}
