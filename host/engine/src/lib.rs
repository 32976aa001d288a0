//! Docker-shaped logic of Berth, with no HTTP and no KVM.
