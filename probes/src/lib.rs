//! Empty on purpose: this library target exists only so that the installer can name the probes
//! as a build dependency and be rebuilt when they change. The programs are in the binary target
//! (`main.rs` and its modules).
#![no_std]
