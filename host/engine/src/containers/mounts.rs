//! A container's mounts in the engine's terms: bind mounts of host paths and volumes, parsed
//! from Docker's two syntaxes (`HostConfig.Binds` strings and `HostConfig.Mounts` objects)
//! with dockerd's error messages.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::volumes::{validate_name, VolumeError};

/// What a mount's source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A host path, shared into the guest over virtio-fs.
    Bind,
    /// A volume on the guest's data disk.
    Volume,
}

impl MountKind {
    /// Docker's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Volume => "volume",
        }
    }
}

/// One mount of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPoint {
    /// Bind or volume.
    pub kind: MountKind,
    /// The host path of a bind; the volume's name (empty until an anonymous volume is made).
    pub source: String,
    /// Where it appears in the container (absolute).
    pub destination: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// For a volume: do not fill a fresh volume with the image's content.
    #[serde(default)]
    pub no_copy: bool,
    /// For a bind from `-v`: create a missing source directory, as dockerd does (a
    /// `--mount` bind of a missing source is an error instead).
    #[serde(default)]
    pub create_source: bool,
}

/// `HostConfig.Mounts[]` as the API sends it (the fields Berth reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MountBody {
    /// `bind`, `volume`, `tmpfs`, ...
    #[serde(rename = "Type")]
    pub kind: String,
    /// Host path or volume name.
    pub source: String,
    /// Path in the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
    /// Volume options.
    pub volume_options: Option<VolumeOptionsBody>,
}

/// `HostConfig.Mounts[].VolumeOptions`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct VolumeOptionsBody {
    /// Do not copy the image's content into a fresh volume.
    pub no_copy: bool,
}

/// Why a mount cannot be used.
#[derive(Debug, Error)]
pub enum MountSpecError {
    #[error("invalid volume specification: '{0}'")]
    Spec(String),
    #[error("invalid mode: {0}")]
    Mode(String),
    #[error("invalid volume specification: '{0}': invalid mount config for type \"{1}\": invalid specification: destination can't be '/'")]
    RootDestination(String, &'static str),
    #[error("invalid mount config for type \"{0}\": field {1} must not be empty")]
    EmptyField(String, &'static str),
    #[error("invalid mount config for type \"{0}\": invalid mount path: '{1}' mount path must be absolute")]
    RelativeTarget(String, String),
    #[error("mount type {0:?} is not supported by Berth (bind and volume are)")]
    Type(String),
    #[error("{0}")]
    Volume(#[from] VolumeError),
}

/// Bind options dockerd accepts that change nothing here (SELinux labels, propagation, the
/// macOS consistency hints).
const IGNORED_MODES: &[&str] = &[
    "z",
    "Z",
    "consistent",
    "cached",
    "delegated",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
];

/// Parses a `-v` bind string: `/host:/ctr[:opts]` or `name:/ctr[:opts]`.
pub fn parse_bind(spec: &str) -> Result<MountPoint, MountSpecError> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, destination, mode) = match parts.as_slice() {
        [source, destination] => (*source, *destination, ""),
        [source, destination, mode] => (*source, *destination, *mode),
        _ => return Err(MountSpecError::Spec(spec.to_owned())),
    };
    if source.is_empty() || !destination.starts_with('/') {
        return Err(MountSpecError::Spec(spec.to_owned()));
    }
    let kind = if source.starts_with('/') {
        MountKind::Bind
    } else {
        validate_name(source)?;
        MountKind::Volume
    };
    if destination.trim_end_matches('/').is_empty() {
        return Err(MountSpecError::RootDestination(
            spec.to_owned(),
            kind.as_str(),
        ));
    }
    let mut read_only = false;
    let mut no_copy = false;
    for option in mode.split(',').filter(|o| !o.is_empty()) {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            "nocopy" if kind == MountKind::Volume => no_copy = true,
            o if IGNORED_MODES.contains(&o) => {}
            _ => return Err(MountSpecError::Mode(mode.to_owned())),
        }
    }
    Ok(MountPoint {
        kind,
        source: source.to_owned(),
        destination: destination.to_owned(),
        read_only,
        no_copy,
        create_source: kind == MountKind::Bind,
    })
}

/// Parses a `--mount` object.
pub fn parse_mount(body: &MountBody) -> Result<MountPoint, MountSpecError> {
    let kind = match body.kind.as_str() {
        "bind" => MountKind::Bind,
        "volume" => MountKind::Volume,
        other => return Err(MountSpecError::Type(other.to_owned())),
    };
    if body.target.is_empty() {
        return Err(MountSpecError::EmptyField(body.kind.clone(), "Target"));
    }
    if !body.target.starts_with('/') {
        return Err(MountSpecError::RelativeTarget(
            body.kind.clone(),
            body.target.clone(),
        ));
    }
    match kind {
        MountKind::Bind if body.source.is_empty() => {
            return Err(MountSpecError::EmptyField(body.kind.clone(), "Source"))
        }
        MountKind::Bind if !body.source.starts_with('/') => {
            return Err(MountSpecError::RelativeTarget(
                body.kind.clone(),
                body.source.clone(),
            ))
        }
        MountKind::Volume if !body.source.is_empty() => validate_name(&body.source)?,
        _ => {}
    }
    Ok(MountPoint {
        kind,
        source: body.source.clone(),
        destination: body.target.clone(),
        read_only: body.read_only,
        no_copy: body
            .volume_options
            .as_ref()
            .is_some_and(|options| options.no_copy),
        create_source: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bind_host_path_read_only() {
        let mount = parse_bind("/home/u/src:/src:ro").unwrap();

        assert_eq!(mount.kind, MountKind::Bind);
        assert_eq!(mount.source, "/home/u/src");
        assert_eq!(mount.destination, "/src");
        assert!(mount.read_only);
    }

    #[test]
    fn parse_bind_name_is_a_volume() {
        let mount = parse_bind("data:/var/data").unwrap();

        assert_eq!(mount.kind, MountKind::Volume);
        assert!(!mount.read_only);
    }

    #[test]
    fn parse_bind_invalid_volume_name_has_dockerd_message() {
        let error = parse_bind("bad$name:/x").unwrap_err();

        assert!(
            error
                .to_string()
                .contains("includes invalid characters for a local volume name"),
            "{error}"
        );
    }

    #[test]
    fn parse_bind_relative_destination_is_invalid_spec() {
        let error = parse_bind("/a:b").unwrap_err();

        assert_eq!(error.to_string(), "invalid volume specification: '/a:b'");
    }

    #[test]
    fn parse_bind_unknown_mode_is_refused() {
        assert!(matches!(
            parse_bind("/a:/b:rx"),
            Err(MountSpecError::Mode(_))
        ));
    }

    #[test]
    fn parse_bind_root_destination_is_refused() {
        assert!(matches!(
            parse_bind("/a:/"),
            Err(MountSpecError::RootDestination(..))
        ));
    }

    #[test]
    fn parse_mount_volume_without_source_is_anonymous() {
        let body = MountBody {
            kind: "volume".into(),
            target: "/data".into(),
            ..MountBody::default()
        };

        let mount = parse_mount(&body).unwrap();

        assert_eq!(mount.source, "");
        assert_eq!(mount.kind, MountKind::Volume);
    }

    #[test]
    fn parse_mount_bind_without_source_names_the_field() {
        let body = MountBody {
            kind: "bind".into(),
            target: "/data".into(),
            ..MountBody::default()
        };

        let error = parse_mount(&body).unwrap_err();

        assert_eq!(
            error.to_string(),
            "invalid mount config for type \"bind\": field Source must not be empty"
        );
    }
}
