//! The container-setup helper on its own: a binary that does nothing but serve
//! `berth_container`'s re-exec. Tests (whose harness owns `main`) and callers that do not want
//! to re-exec themselves point `ContainerConfig::init_binary` at it.

fn main() {
    berth_container::run_init_if_requested();
    eprintln!("berth-container-init: only runs as the container setup helper");
    std::process::exit(2);
}
