//! User-defined networks (`docker network create`): records under `<data>/networks/<id>.json`,
//! written atomically, and an address pool per network. The built-in `bridge`, `host` and
//! `none` are not stored: they always exist.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Ipam, NetworkError, DEFAULT_NETWORK};
use crate::containers::{new_id, now_rfc3339};

/// Subnets handed to networks created without `--subnet`: 172.18.0.0/16 to 172.31.0.0/16,
/// as dockerd's default pools continue after the default bridge.
const POOL_SECOND_OCTETS: std::ops::RangeInclusive<u8> = 18..=31;

/// One user-defined network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// 64 hex characters.
    pub id: String,
    /// Unique among networks.
    pub name: String,
    /// RFC 3339.
    pub created: String,
    /// The subnet's network address.
    pub subnet: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The bridge's address in the guest, the containers' gateway and DNS server.
    pub gateway: Ipv4Addr,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `--internal` (kept for inspect).
    #[serde(default)]
    pub internal: bool,
    /// `--attachable` (kept for inspect).
    #[serde(default)]
    pub attachable: bool,
}

impl NetworkRecord {
    /// The bridge device in the guest, named after the subnet (`br-ac120000` for
    /// 172.18.0.0): subnets of existing networks never overlap, and a network created again
    /// on a subnet reuses the bridge a removed one left in a running guest instead of adding a
    /// second bridge with the same gateway address.
    pub fn bridge(&self) -> String {
        format!("br-{:08x}", u32::from(self.subnet))
    }
}

/// What `docker network create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    /// The name.
    pub name: String,
    /// `--driver`; only `bridge` (or empty) is supported.
    pub driver: String,
    /// `--subnet` (CIDR), optional.
    pub subnet: Option<String>,
    /// `--gateway`, optional.
    pub gateway: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `--internal`.
    pub internal: bool,
    /// `--attachable`.
    pub attachable: bool,
}

/// A stable id for a built-in network, so `docker network ls` shows the same id every time.
pub fn builtin_id(name: &str) -> String {
    hex::encode(Sha256::digest(format!("berth-builtin-network:{name}")))
}

/// The built-in networks.
pub const BUILTIN: [&str; 3] = [DEFAULT_NETWORK, "host", "none"];

/// The user-defined networks and their address pools.
#[derive(Debug)]
pub struct Networks {
    dir: PathBuf,
    records: RwLock<HashMap<String, (NetworkRecord, Arc<Ipam>)>>,
}

impl Networks {
    /// Opens (creating) the records under `dir`; an unreadable record is skipped.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut records = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<NetworkRecord>(&bytes) else {
                tracing::warn!(path = %path.display(), "skipping an unreadable network record");
                continue;
            };
            let ipam = Arc::new(Ipam::new(record.subnet, record.prefix_len, record.gateway));
            records.insert(record.id.clone(), (record, ipam));
        }
        Ok(Self {
            dir: dir.to_owned(),
            records: RwLock::new(records),
        })
    }

    /// Every user-defined network.
    pub fn list(&self) -> Vec<NetworkRecord> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<NetworkRecord> = records.values().map(|(r, _)| r.clone()).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// A network by id, name or unique id prefix, with its address pool.
    pub fn get(&self, reference: &str) -> Result<(NetworkRecord, Arc<Ipam>), NetworkError> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        if let Some((record, ipam)) = records.get(reference) {
            return Ok((record.clone(), Arc::clone(ipam)));
        }
        if let Some((record, ipam)) = records.values().find(|(r, _)| r.name == reference) {
            return Ok((record.clone(), Arc::clone(ipam)));
        }
        let mut matching = records
            .values()
            .filter(|(r, _)| !reference.is_empty() && r.id.starts_with(reference));
        match (matching.next(), matching.next()) {
            (Some((record, ipam)), None) => Ok((record.clone(), Arc::clone(ipam))),
            _ => Err(NetworkError::NoSuchNetwork(reference.to_owned())),
        }
    }

    /// `docker network create`.
    pub fn create(&self, request: NetworkRequest) -> Result<NetworkRecord, NetworkError> {
        if !matches!(request.driver.as_str(), "" | "bridge") {
            return Err(NetworkError::Invalid(format!(
                "plugin \"{}\" not found: only the bridge driver is supported",
                request.driver
            )));
        }
        let valid_name = !request.name.is_empty()
            && request.name.len() <= 64
            && request
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid_name {
            return Err(NetworkError::Invalid(format!(
                "invalid network name {:?}",
                request.name
            )));
        }
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        if BUILTIN.contains(&request.name.as_str())
            || records.values().any(|(r, _)| r.name == request.name)
        {
            return Err(NetworkError::Exists(request.name));
        }
        let (subnet, prefix_len) = match &request.subnet {
            Some(cidr) => parse_cidr(cidr)?,
            None => POOL_SECOND_OCTETS
                .map(|b| Ipv4Addr::new(172, b, 0, 0))
                .find(|s| !records.values().any(|(r, _)| r.subnet == *s))
                .map(|s| (s, 16))
                .ok_or_else(|| {
                    NetworkError::Invalid(
                        "could not find an available, non-overlapping IPv4 address pool".into(),
                    )
                })?,
        };
        if records
            .values()
            .any(|(r, _)| overlaps(r.subnet, r.prefix_len, subnet, prefix_len))
            || overlaps(
                super::DEFAULT_SUBNET,
                super::DEFAULT_PREFIX_LEN,
                subnet,
                prefix_len,
            )
        {
            return Err(NetworkError::Invalid(
                "Pool overlaps with other one on this address space".into(),
            ));
        }
        let gateway = match &request.gateway {
            Some(text) => text
                .parse::<Ipv4Addr>()
                .ok()
                .filter(|g| overlaps(subnet, prefix_len, *g, 32))
                .ok_or_else(|| NetworkError::Invalid(format!("invalid gateway {text}")))?,
            None => Ipv4Addr::from(u32::from(subnet) + 1),
        };
        let record = NetworkRecord {
            id: new_id(),
            name: request.name,
            created: now_rfc3339(),
            subnet,
            prefix_len,
            gateway,
            labels: request.labels,
            internal: request.internal,
            attachable: request.attachable,
        };
        self.write(&record)
            .map_err(|e| NetworkError::Store("store the network", e))?;
        let ipam = Arc::new(Ipam::new(subnet, prefix_len, gateway));
        records.insert(record.id.clone(), (record.clone(), ipam));
        Ok(record)
    }

    /// `docker network rm` of a network no container uses (the caller checks).
    pub fn remove(&self, id: &str) -> Result<(), NetworkError> {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        if records.remove(id).is_none() {
            return Err(NetworkError::NoSuchNetwork(id.to_owned()));
        }
        match std::fs::remove_file(self.dir.join(format!("{id}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(NetworkError::Store("remove the network", e))
            }
            _ => Ok(()),
        }
    }

    fn write(&self, record: &NetworkRecord) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", record.id));
        let partial = self.dir.join(format!("{}.json.partial", record.id));
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        std::fs::write(&partial, bytes)?;
        std::fs::rename(partial, path)
    }
}

/// Parses `172.20.0.0/16`; the address is masked to the network's.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let invalid = || NetworkError::Invalid(format!("invalid subnet {text}: want an IPv4 CIDR"));
    let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(invalid)?;
    let mask = u32::MAX << (32 - u32::from(prefix));
    Ok((Ipv4Addr::from(u32::from(address) & mask), prefix))
}

fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> NetworkRequest {
        NetworkRequest {
            name: name.into(),
            ..NetworkRequest::default()
        }
    }

    #[test]
    fn create_takes_the_next_free_pool_and_its_first_address_as_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let networks = Networks::open(dir.path()).unwrap();

        let first = networks.create(request("a")).unwrap();
        let second = networks.create(request("b")).unwrap();

        assert_eq!(first.subnet, Ipv4Addr::new(172, 18, 0, 0));
        assert_eq!(first.gateway, Ipv4Addr::new(172, 18, 0, 1));
        assert_eq!(second.subnet, Ipv4Addr::new(172, 19, 0, 0));
    }

    #[test]
    fn create_duplicate_or_builtin_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let networks = Networks::open(dir.path()).unwrap();
        networks.create(request("a")).unwrap();

        assert!(matches!(
            networks.create(request("a")),
            Err(NetworkError::Exists(_))
        ));
        assert!(matches!(
            networks.create(request("host")),
            Err(NetworkError::Exists(_))
        ));
    }

    #[test]
    fn create_overlapping_subnet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let networks = Networks::open(dir.path()).unwrap();
        let overlapping = NetworkRequest {
            subnet: Some("172.17.5.0/24".into()),
            ..request("x")
        };

        assert!(networks.create(overlapping).is_err());
    }

    #[test]
    fn records_survive_reopening_and_resolve_by_name_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let created = Networks::open(dir.path())
            .unwrap()
            .create(request("app"))
            .unwrap();

        let reopened = Networks::open(dir.path()).unwrap();

        assert_eq!(reopened.get("app").unwrap().0, created);
        assert_eq!(reopened.get(&created.id[..8]).unwrap().0.name, "app");
    }

    #[test]
    fn parse_cidr_masks_the_address() {
        assert_eq!(
            parse_cidr("10.1.2.3/16").unwrap(),
            (Ipv4Addr::new(10, 1, 0, 0), 16)
        );
        assert!(parse_cidr("10.1.2.3").is_err());
        assert!(parse_cidr("10.1.2.3/31").is_err());
    }

    #[test]
    fn bridge_name_fits_the_kernel_limit() {
        let record = NetworkRecord {
            id: "a".repeat(64),
            name: "n".into(),
            created: String::new(),
            subnet: Ipv4Addr::new(172, 18, 0, 0),
            prefix_len: 16,
            gateway: Ipv4Addr::new(172, 18, 0, 1),
            labels: BTreeMap::new(),
            internal: false,
            attachable: false,
        };

        assert_eq!(record.bridge(), "br-ac120000");
    }
}
