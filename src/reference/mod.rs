//! The f64 reference of the crate's maths: the test oracle. It walks the same graph
//! through the layers' f64 methods and shares no GPU code.

pub mod attention;
pub mod curvature;
pub mod graph_ops;
pub mod nn;
pub mod operator;
pub mod ops;
pub mod shape;
