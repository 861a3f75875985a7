//! The network: JSON layer spec, safetensors weights, data, Sequential forward/backward.
