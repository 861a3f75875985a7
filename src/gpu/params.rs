//! Typed kernel parameters: one `#[repr(C)]` plain-old-data struct per kernel entry
//! or family, mirrored field for field by a WGSL struct of the same name that the
//! kernel reads from its parameter binding (see [`crate::gpu::pipeline`]).
//!
//! Declare one with [`kernel_params!`](crate::kernel_params); `tests/shaders.rs`
//! checks every declared struct against its WGSL twin (names, order, types, size).

use crate::gpu::Shader;

/// A kernel's parameter block: 32-bit fields only (`u32`, `i32`, `f32`), so the
/// `#[repr(C)]` layout has no padding and equals WGSL's for a struct of scalars.
pub trait KernelParams: bytemuck::Pod {
    /// The name of the mirroring WGSL struct (the Rust struct's name).
    const WGSL_STRUCT: &'static str;
    /// `(field, Rust type)` in declaration order.
    const FIELDS: &'static [(&'static str, &'static str)];
}

/// Declares a [`KernelParams`] struct: `#[repr(C)]`, `Pod`, with its field list.
///
/// ```ignore
/// kernel_params! {
///     /// Parameters of `copy`.
///     pub struct CopyParams {
///         /// Elements to copy.
///         len: u32,
///     }
/// }
/// ```
#[macro_export]
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($(#[$field_meta:meta])* $field:ident : $ty:ident),* $(,)?
    }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$field_meta])* pub $field: $ty),*
        }

        impl $crate::gpu::KernelParams for $name {
            const WGSL_STRUCT: &'static str = stringify!($name);
            const FIELDS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($field), stringify!($ty))),*];
        }
    };
}

/// A parameter struct and the shader whose WGSL declares its twin, for checking the two
/// against each other.
#[derive(Debug, Clone, Copy)]
pub struct ParamsLayout {
    pub shader: &'static Shader,
    /// [`KernelParams::WGSL_STRUCT`].
    pub name: &'static str,
    /// [`KernelParams::FIELDS`].
    pub fields: &'static [(&'static str, &'static str)],
    /// `size_of` the Rust struct, bytes.
    pub size: usize,
}

impl ParamsLayout {
    /// The layout of `P`, declared in `shader`.
    pub fn of<P: KernelParams>(shader: &'static Shader) -> Self {
        Self {
            shader,
            name: P::WGSL_STRUCT,
            fields: P::FIELDS,
            size: std::mem::size_of::<P>(),
        }
    }
}
