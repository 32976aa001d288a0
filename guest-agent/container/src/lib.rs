//! One Linux container from a config: namespaces, cgroup v2, overlayfs, mounts, pivot_root and
//! exec, run in a fresh single-threaded process.
