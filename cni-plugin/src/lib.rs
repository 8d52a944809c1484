//! istio-cni: the chained CNI plugin.
