//! Reading the cause of a failed boot out of the guest's serial console.
//!
//! When the guest dies the VM process just exits (`panic=-1` plus `-no-reboot`), so the console
//! is the only witness. The kernel's own lines are the clearest statement of the cause; this
//! module picks them out so the user sees "initramfs unpacking failed" rather than "exit 0".

/// Console lines that explain a failed boot, in the order they are reported.
const CAUSES: &[(&str, &str)] = &[
    ("Initramfs unpacking failed:", "initramfs unpacking failed:"),
    ("Requested init", "requested init"),
    ("Kernel panic - not syncing:", "guest kernel panic:"),
    ("Attempted to kill init", "the agent (PID 1) died"),
];

/// Returns the cause of a failed boot found in `console`, if any, as one line.
pub fn diagnose_console(console: &str) -> Option<String> {
    let mut used_lines: Vec<&str> = Vec::new();
    let mut found: Vec<String> = Vec::new();
    for (needle, label) in CAUSES {
        let Some(line) = console.lines().find(|line| line.contains(needle)) else {
            continue;
        };
        // One console line can match several needles; report it once, under the first.
        if used_lines.contains(&line) {
            continue;
        }
        used_lines.push(line);
        let rest = line.split_once(needle).map_or("", |(_, rest)| rest.trim());
        found.push(format!("{label} {rest}").trim().to_string());
    }
    (!found.is_empty()).then(|| found.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnose_console_corrupt_initramfs_names_unpacking_and_panic() {
        let console = "\
[    0.512] Initramfs unpacking failed: junk within compressed archive
[    0.900] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
";

        let cause = diagnose_console(console).unwrap();

        assert_eq!(
            cause,
            "initramfs unpacking failed: junk within compressed archive; \
             guest kernel panic: VFS: Unable to mount root fs on unknown-block(0,0)"
        );
    }

    #[test]
    fn diagnose_console_dead_init_is_reported_once() {
        let console = "\
[    1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009
";

        let cause = diagnose_console(console).unwrap();

        assert!(cause.starts_with("guest kernel panic: Attempted to kill init!"));
    }

    #[test]
    fn diagnose_console_clean_boot_finds_nothing() {
        let console = "berth-agent: ready on vsock port 1024 (protocol v1)\n";

        assert_eq!(diagnose_console(console), None);
    }
}
