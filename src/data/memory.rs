//! The in-memory [`Dataset`] as a [`DataSource`] (examples built in Rust, or a file read
//! whole).

use super::{DataSource, InputDtype, TargetKind, TargetsMut};
use crate::error::Result;
use crate::model::data::{Dataset, Targets};

impl DataSource for Dataset {
    fn label(&self) -> &str {
        "data"
    }

    fn len(&self) -> usize {
        self.len
    }

    fn example_shape(&self) -> &[usize] {
        &self.example_shape
    }

    fn input_dtype(&self) -> InputDtype {
        if self.ids.is_some() {
            InputDtype::I64
        } else {
            InputDtype::F32
        }
    }

    fn targets(&self) -> TargetKind {
        match &self.y {
            Targets::Classes(_) => TargetKind::Classes,
            Targets::Values { cols, .. } => TargetKind::Values { cols: *cols },
        }
    }

    fn read(&self, start: usize, end: usize, x: &mut [u32], y: TargetsMut<'_>) -> Result<()> {
        let e = self.example_len();
        match &self.ids {
            Some(ids) => x.copy_from_slice(&ids[start * e..end * e]),
            None => {
                for (slot, v) in x.iter_mut().zip(&self.x[start * e..end * e]) {
                    *slot = v.to_bits();
                }
            }
        }
        match (y, &self.y) {
            (TargetsMut::Classes(out), Targets::Classes(c)) => out.copy_from_slice(&c[start..end]),
            (TargetsMut::Values(out), Targets::Values { data, cols }) => {
                out.copy_from_slice(&data[start * cols..end * cols])
            }
            _ => unreachable!("BatchBuffer::new shapes the targets after targets()"),
        }
        Ok(())
    }
}
