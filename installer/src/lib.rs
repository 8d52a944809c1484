//! install-cni: the node agent of the istio-cni DaemonSet, and fastpath's accelerator loader.
//!
//! Layout: [`config`] reads and builds settings, [`conflist`] and [`kubeconfig`] are pure
//! renderers/mergers, [`install`] decides and applies (binary, kubeconfig, CNI config, cleanup),
//! [`fight`] spots another agent fighting over the config, [`agent`] wires watches, servers,
//! signals and the loop, [`readiness`] and [`metrics`] report state. [`pod_watch`] is the one
//! watch of the node's pods that [`pod_cache`] and [`repair`] share.
pub mod accel;
pub mod agent;
pub mod config;
pub mod conflist;
pub mod fight;
pub mod fsutil;
pub mod http;
pub mod install;
pub mod kubeconfig;
pub mod logging;
pub mod logsock;
pub mod metrics;
pub mod pod_cache;
pub mod pod_watch;
pub mod probes;
pub mod readiness;
pub mod repair;
pub mod shutdown;
pub mod uninstall;
