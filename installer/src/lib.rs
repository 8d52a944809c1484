//! install-cni: the node agent of the istio-cni DaemonSet, and fastpath's accelerator loader.
pub mod accel;
pub mod probes;
