//! The options of a KFAC / EKFAC fit, with curvlinops' names, strings and defaults.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The loss whose curvature is approximated (curvlinops: `MSELoss`, `CrossEntropyLoss`,
/// `BCEWithLogitsLoss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LossKind {
    /// `Σ_i (f_i − y_i)²` per row; targets are `[B, C]` floats.
    #[serde(rename = "mse")]
    Mse,
    /// `−log softmax(f)_y` per row; targets are class indices `[B]`.
    #[serde(rename = "cross_entropy")]
    CrossEntropy,
    /// `Σ_i −y_i log σ(f_i) − (1−y_i) log(1−σ(f_i))` per row; targets are `[B, C]` floats.
    #[serde(rename = "bce_with_logits")]
    BceWithLogits,
}

/// How per-example losses are combined: `mean` divides the summed loss by `N·C'`
/// (SPEC §0, `C' = C` for MSE/BCE, 1 for CE), `sum` does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reduction {
    #[serde(rename = "mean")]
    Mean,
    #[serde(rename = "sum")]
    Sum,
}

/// Which matrix the Kronecker factor `G` approximates (SPEC §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FisherType {
    /// The GGN, through the `C` columns of the loss Hessian's square root.
    #[serde(rename = "type-2")]
    Type2,
    /// The Fisher, estimated with `mc_samples` sampled labels per example.
    #[serde(rename = "mc")]
    Mc,
    /// The empirical Fisher, from the true labels.
    #[serde(rename = "empirical")]
    Empirical,
    /// FOOF / ISAAC: `G = I` for every block (KFAC only).
    #[serde(rename = "forward-only")]
    ForwardOnly,
}

/// How weight sharing (conv positions, sequence axes) enters the factors (SPEC §2.3, §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KfacApprox {
    #[serde(rename = "expand")]
    Expand,
    #[serde(rename = "reduce")]
    Reduce,
}

macro_rules! string_enum {
    ($ty:ident, $what:literal, $($variant:ident => $s:literal),+ $(,)?) => {
        impl $ty {
            /// curvlinops' string for this value.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $s),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($ty::$variant),)+
                    other => Err(Error::Options(format!(
                        concat!("unknown ", $what, " '{}': expected one of {}"),
                        other,
                        [$($s),+].join(", ")
                    ))),
                }
            }
        }
    };
}

string_enum!(LossKind, "loss", Mse => "mse", CrossEntropy => "cross_entropy",
    BceWithLogits => "bce_with_logits");
string_enum!(Reduction, "reduction", Mean => "mean", Sum => "sum");
string_enum!(FisherType, "fisher type", Type2 => "type-2", Mc => "mc",
    Empirical => "empirical", ForwardOnly => "forward-only");
string_enum!(KfacApprox, "KFAC approximation", Expand => "expand", Reduce => "reduce");

/// Everything that determines a fit, with curvlinops' defaults ([`Options::DEFAULTS`]:
/// cross-entropy, mean, MC with 1 sample, expand, separate weight and bias, all
/// parameters, batch size 128, seed 2147483647).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub loss: LossKind,
    pub reduction: Reduction,
    pub fisher: FisherType,
    /// Samples per example for [`FisherType::Mc`]; must be 1 for every other type.
    pub mc_samples: usize,
    pub approx: KfacApprox,
    /// Treat weight and bias of a layer as one block `[W | b]` (curvlinops'
    /// `separate_weight_and_bias=False`). Default `false`.
    pub joint_bias: bool,
    /// The selected parameters by name (`"<layer name>.weight"` / `".bias"`), in any
    /// order; `None` selects all parameters of the curvature layers.
    pub params: Option<Vec<String>>,
    /// Examples per batch of the passes over the data; the results do not depend on it.
    pub batch_size: usize,
    /// Key of the MC generator (see [`crate::rng`]).
    pub seed: u64,
}

impl Options {
    /// The defaults, the one source of them (the command line's too): curvlinops'
    /// (`fisher_type="mc"` with one sample, `mean`, `expand`, separate bias), with
    /// cross-entropy, batches of 128 and curvlinops' seed.
    pub const DEFAULTS: Options = Options {
        loss: LossKind::CrossEntropy,
        reduction: Reduction::Mean,
        fisher: FisherType::Mc,
        mc_samples: 1,
        approx: KfacApprox::Expand,
        joint_bias: false,
        params: None,
        batch_size: 128,
        seed: 2147483647,
    };
}

impl Default for Options {
    /// [`Options::DEFAULTS`].
    fn default() -> Self {
        Self::DEFAULTS
    }
}

impl Options {
    /// Rejects the combinations curvlinops rejects: `mc_samples != 1` without MC,
    /// zero MC samples, zero batch size.
    pub fn validate(&self) -> Result<()> {
        if self.fisher != FisherType::Mc && self.mc_samples != 1 {
            return Err(Error::Options(format!(
                "mc_samples must be 1 unless the fisher type is 'mc' (fisher type '{}', \
                 mc_samples {})",
                self.fisher, self.mc_samples
            )));
        }
        if self.mc_samples == 0 {
            return Err(Error::Options(
                "mc_samples must be at least 1, found 0".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::Options(
                "batch_size must be at least 1, found 0".into(),
            ));
        }
        Ok(())
    }

    /// [`Options::validate`], plus EKFAC's restriction: no forward-only Fisher.
    pub fn validate_ekfac(&self) -> Result<()> {
        self.validate()?;
        if self.fisher == FisherType::ForwardOnly {
            return Err(Error::Options(
                "EKFAC does not support the fisher type 'forward-only' (KFAC only)".into(),
            ));
        }
        Ok(())
    }

    /// Number of backpropagated vectors per batch: `C` (type-2), `mc_samples` (MC),
    /// 1 (empirical), 0 (forward-only).
    pub fn num_vectors(&self, num_outputs: usize) -> usize {
        match self.fisher {
            FisherType::Type2 => num_outputs,
            FisherType::Mc => self.mc_samples,
            FisherType::Empirical => 1,
            FisherType::ForwardOnly => 0,
        }
    }
}

/// How the damped inverse of KFAC is formed (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DampingMode {
    /// `(KFAC + δI)⁻¹`, through the factor eigenbases (the default).
    #[serde(rename = "exact")]
    Exact,
    /// curvlinops' default: `(G + δI)⁻¹ ⊗ (A + δI)⁻¹` per block.
    #[serde(rename = "plain")]
    Plain,
    /// Martens & Grosse's π rule per module, as curvlinops 3.0.1: with
    /// `π = √((tr A/dim A)/(tr G/dim G))` (if `A` exists, `tr A ≥ 0` and `tr G > 0`),
    /// `δ_A = max(√δ·π, 1e-8)`, `δ_G = max(√δ/π, 1e-8)`, and a separately treated bias
    /// reuses its module's `δ_G`; otherwise `δ_A = δ_G = δ`.
    #[serde(rename = "heuristic")]
    Heuristic,
}

string_enum!(DampingMode, "damping mode", Exact => "exact", Plain => "plain",
    Heuristic => "heuristic");

/// Which eigensolver decomposes the Kronecker factors (`--eigensolver`; see
/// [`crate::curvature::eigen::solver_for`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EigensolverKind {
    /// The parallel Jacobi on the GPU in f32 (the default; the only GPU path).
    #[default]
    #[serde(rename = "jacobi")]
    Jacobi,
    /// faer in f64 on the CPU.
    #[serde(rename = "host")]
    Host,
    /// `host` when the adapter's device type is CPU, `jacobi` otherwise.
    #[serde(rename = "auto")]
    Auto,
}

string_enum!(EigensolverKind, "eigensolver", Jacobi => "jacobi", Host => "host",
    Auto => "auto");

/// curvlinops' `min_damping` of the heuristic damping mode.
pub const MIN_DAMPING: f64 = 1e-8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip() {
        for s in ["mse", "cross_entropy", "bce_with_logits"] {
            assert_eq!(s.parse::<LossKind>().unwrap().as_str(), s);
            let json = serde_json::to_string(&s.parse::<LossKind>().unwrap()).unwrap();
            assert_eq!(json, format!("\"{s}\""));
        }
        for s in ["type-2", "mc", "empirical", "forward-only"] {
            assert_eq!(s.parse::<FisherType>().unwrap().to_string(), s);
        }
        for s in ["mean", "sum"] {
            assert_eq!(s.parse::<Reduction>().unwrap().to_string(), s);
        }
        for s in ["expand", "reduce"] {
            assert_eq!(s.parse::<KfacApprox>().unwrap().to_string(), s);
        }
        for s in ["exact", "plain", "heuristic"] {
            assert_eq!(s.parse::<DampingMode>().unwrap().to_string(), s);
        }
        for s in ["jacobi", "host", "auto"] {
            assert_eq!(s.parse::<EigensolverKind>().unwrap().to_string(), s);
        }
        let err = "lapack".parse::<EigensolverKind>().unwrap_err().to_string();
        assert!(
            err.contains("lapack") && err.contains("jacobi, host, auto"),
            "{err}"
        );
        let err = "type2".parse::<FisherType>().unwrap_err().to_string();
        assert!(err.contains("type2") && err.contains("type-2"), "{err}");
    }

    #[test]
    fn validation() {
        assert!(Options::default().validate().is_ok());
        let o = Options {
            fisher: FisherType::Type2,
            mc_samples: 2,
            ..Options::default()
        };
        assert!(o.validate().unwrap_err().to_string().contains("mc_samples"));
        let o = Options {
            fisher: FisherType::Mc,
            mc_samples: 0,
            ..Options::default()
        };
        assert!(o.validate().is_err());
        let o = Options {
            fisher: FisherType::ForwardOnly,
            ..Options::default()
        };
        assert!(o.validate().is_ok());
        assert!(
            o.validate_ekfac()
                .unwrap_err()
                .to_string()
                .contains("forward-only")
        );
        let o = Options {
            batch_size: 0,
            ..Options::default()
        };
        assert!(o.validate().is_err());
    }
}
