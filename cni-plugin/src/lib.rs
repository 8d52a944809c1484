//! istio-cni: the chained CNI plugin.
pub mod accel;
