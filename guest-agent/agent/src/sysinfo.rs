//! Facts about the running guest for [`agent_protocol::Request::SystemInfo`].
//!
//! [`do_system_info`] gathers them from `uname(2)`, `/proc` and `/sys`; the parsing lives in
//! small pure functions so it is tested on sample text rather than on whatever machine runs the
//! tests.

use std::fs;
use std::io;

use agent_protocol::SystemInfo;
use thiserror::Error;

const MEMINFO: &str = "/proc/meminfo";
const UPTIME: &str = "/proc/uptime";
const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Why a fact could not be read.
#[derive(Debug, Error)]
pub enum SysInfoError {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("uname failed")]
    Uname(#[source] nix::Error),
    #[error("/proc/meminfo has no {0} line")]
    MissingMemField(&'static str),
    #[error("cannot parse {what} from {value:?}")]
    BadValue { what: &'static str, value: String },
    #[error("cannot count the online cpus in {0:?}")]
    BadCpuList(String),
}

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`, or `MemFree` on kernels too old to report it.
    pub available_bytes: u64,
}

/// Gathers [`SystemInfo`] for the running kernel.
pub fn do_system_info(agent_version: &str, boot_id: &str) -> Result<SystemInfo, SysInfoError> {
    let uts = nix::sys::utsname::uname().map_err(SysInfoError::Uname)?;
    let mem = parse_meminfo(&read(MEMINFO)?)?;
    let uptime_secs = parse_uptime(&read(UPTIME)?)?;
    Ok(SystemInfo {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        kernel_version: uts.version().to_string_lossy().into_owned(),
        arch: uts.machine().to_string_lossy().into_owned(),
        mem_total_bytes: mem.total_bytes,
        mem_available_bytes: mem.available_bytes,
        cpus: online_cpus()?,
        uptime_secs,
        agent_version: agent_version.to_owned(),
        boot_id: boot_id.to_owned(),
        wall_clock_unix_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    })
}

/// The kernel's random per-boot identifier, trimmed.
pub fn read_boot_id() -> Result<String, SysInfoError> {
    Ok(read(BOOT_ID)?.trim().to_owned())
}

/// Online CPUs from sysfs, falling back to `sysconf(_SC_NPROCESSORS_ONLN)` when sysfs is not
/// there (native mode in a restricted sandbox).
fn online_cpus() -> Result<u32, SysInfoError> {
    match read(CPUS_ONLINE) {
        Ok(list) => parse_cpu_list(&list),
        Err(read_error) => match nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN) {
            Ok(Some(n)) => u32::try_from(n).map_err(|_| SysInfoError::BadCpuList(n.to_string())),
            _ => Err(read_error),
        },
    }
}

fn read(path: &'static str) -> Result<String, SysInfoError> {
    fs::read_to_string(path).map_err(|source| SysInfoError::Read { path, source })
}

/// Parses `MemTotal` and `MemAvailable` (`MemFree` if absent) from `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, SysInfoError> {
    let field = |name: &'static str| -> Result<Option<u64>, SysInfoError> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| parse_kib(name, value))
            .transpose()
    };
    let total_bytes = field("MemTotal")?.ok_or(SysInfoError::MissingMemField("MemTotal"))?;
    let available_bytes = match field("MemAvailable")? {
        Some(bytes) => bytes,
        None => field("MemFree")?.ok_or(SysInfoError::MissingMemField("MemAvailable"))?,
    };
    Ok(MemInfo {
        total_bytes,
        available_bytes,
    })
}

/// Parses a meminfo value such as `"  16318164 kB"` into bytes.
fn parse_kib(what: &'static str, value: &str) -> Result<u64, SysInfoError> {
    let bad = || SysInfoError::BadValue {
        what,
        value: value.trim().to_owned(),
    };
    let mut words = value.split_whitespace();
    let number: u64 = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let scale = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return Err(bad()),
    };
    number.checked_mul(scale).ok_or_else(bad)
}

/// Parses the first field of `/proc/uptime` (`"350735.47 234388.90"`): seconds since boot.
pub fn parse_uptime(text: &str) -> Result<f64, SysInfoError> {
    let bad = || SysInfoError::BadValue {
        what: "uptime",
        value: text.trim().to_owned(),
    };
    let secs: f64 = text
        .split_whitespace()
        .next()
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    if secs.is_finite() && secs >= 0.0 {
        Ok(secs)
    } else {
        Err(bad())
    }
}

/// Counts the CPUs in a kernel cpu list such as `"0-3,5,7-8"`.
pub fn parse_cpu_list(text: &str) -> Result<u32, SysInfoError> {
    let bad = || SysInfoError::BadCpuList(text.trim().to_owned());
    let mut count: u32 = 0;
    for range in text.trim().split(',') {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first, last),
            None => (range, range),
        };
        let first: u32 = first.parse().map_err(|_| bad())?;
        let last: u32 = last.parse().map_err(|_| bad())?;
        let width = last.checked_sub(first).ok_or_else(bad)?;
        count = count
            .checked_add(width)
            .and_then(|c| c.checked_add(1))
            .ok_or_else(bad)?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head of a real `/proc/meminfo` from a 512 MiB guest.
    const MEMINFO_SAMPLE: &str = "\
MemTotal:         503312 kB
MemFree:          431092 kB
MemAvailable:     440100 kB
Buffers:               0 kB
Cached:            21840 kB
HugePages_Total:       0
";

    #[test]
    fn parse_meminfo_sample_reports_bytes() {
        let mem = parse_meminfo(MEMINFO_SAMPLE).unwrap();

        assert_eq!(
            mem,
            MemInfo {
                total_bytes: 503_312 * 1024,
                available_bytes: 440_100 * 1024,
            }
        );
    }

    #[test]
    fn parse_meminfo_without_mem_available_falls_back_to_mem_free() {
        let text = "MemTotal: 1000 kB\nMemFree: 600 kB\n";

        let mem = parse_meminfo(text).unwrap();

        assert_eq!(mem.available_bytes, 600 * 1024);
    }

    #[test]
    fn parse_meminfo_without_mem_total_is_an_error() {
        let err = parse_meminfo("MemFree: 600 kB\n").unwrap_err();

        assert!(matches!(err, SysInfoError::MissingMemField("MemTotal")));
    }

    #[test]
    fn parse_meminfo_garbage_value_is_an_error() {
        let err = parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 kB\n").unwrap_err();

        assert!(matches!(err, SysInfoError::BadValue { .. }));
    }

    #[test]
    fn parse_meminfo_overflowing_value_is_an_error() {
        // u64::MAX KiB does not fit in u64 bytes.
        let text = format!("MemTotal: {} kB\nMemAvailable: 1 kB\n", u64::MAX);

        let err = parse_meminfo(&text).unwrap_err();

        assert!(matches!(err, SysInfoError::BadValue { .. }));
    }

    #[test]
    fn parse_uptime_sample_reports_first_field() {
        assert_eq!(parse_uptime("350735.47 234388.90\n").unwrap(), 350_735.47);
    }

    #[test]
    fn parse_uptime_empty_is_an_error() {
        assert!(parse_uptime("").is_err());
    }

    #[test]
    fn parse_uptime_not_a_number_is_an_error() {
        assert!(parse_uptime("NaN 1.0").is_err());
    }

    #[test]
    fn parse_cpu_list_ranges_and_singles_are_counted() {
        assert_eq!(parse_cpu_list("0-3,5,7-8\n").unwrap(), 7);
    }

    #[test]
    fn parse_cpu_list_single_cpu_is_one() {
        assert_eq!(parse_cpu_list("0\n").unwrap(), 1);
    }

    #[test]
    fn parse_cpu_list_reversed_range_is_an_error() {
        assert!(parse_cpu_list("3-1").is_err());
    }

    #[test]
    fn parse_cpu_list_empty_is_an_error() {
        assert!(parse_cpu_list("\n").is_err());
    }
}
