//! Resolving a Docker-style user (`name`, `uid`, `name:group`, `uid:gid`) against the image's
//! own `/etc/passwd` and `/etc/group`, parsed here (never through NSS, which would consult the
//! agent's files and load shared libraries into a static binary).

use std::path::Path;

use thiserror::Error;

/// Errors from resolving a user.
#[derive(Debug, Error)]
pub enum UserError {
    /// A name is not in the image's files.
    #[error("no {kind} named {name:?} in the image")]
    Unknown {
        /// `user` or `group`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The user string is malformed.
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups: the user's memberships in `/etc/group` plus any extra ones.
    pub additional_gids: Vec<u32>,
    /// The home directory, for `HOME` (`/` when unknown).
    pub home: String,
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member login names.
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` text, skipping malformed lines and comments.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text, skipping malformed lines and comments.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: fields[0].to_string(),
                gid: fields[2].parse().ok()?,
                members: fields[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` ("", "name", "uid", "name:group", "uid:gid", ...) and `extra_groups`
/// (names or numbers, Docker's `--group-add`) against the given files, as Docker does: a
/// numeric user absent from passwd is used as is with gid 0; a name must exist.
pub fn resolve_user(
    spec: &str,
    extra_groups: &[String],
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_part == Some("") {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".to_string(),
            })),
        Err(_) => passwd.iter().find(|e| e.name == user_part).cloned(),
    }
    .ok_or_else(|| UserError::Unknown {
        kind: "user",
        name: user_part.to_string(),
    })?;

    let gid = match group_part {
        None => entry.gid,
        Some(group) => lookup_group(group, groups)?,
    };
    let mut additional_gids = Vec::new();
    // Memberships only count when the primary group was not overridden, as in Docker.
    if group_part.is_none() && !entry.name.is_empty() {
        additional_gids.extend(
            groups
                .iter()
                .filter(|g| g.members.contains(&entry.name))
                .map(|g| g.gid),
        );
    }
    for group in extra_groups {
        additional_gids.push(lookup_group(group, groups)?);
    }
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        additional_gids,
        home: if entry.home.is_empty() {
            "/".to_string()
        } else {
            entry.home
        },
    })
}

fn lookup_group(group: &str, groups: &[GroupEntry]) -> Result<u32, UserError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.gid)
        .ok_or_else(|| UserError::Unknown {
            kind: "group",
            name: group.to_string(),
        })
}

/// Resolves against `<root>/etc/passwd` and `<root>/etc/group`; missing files count as empty.
pub fn resolve_in_root(
    root: &Path,
    spec: &str,
    extra_groups: &[String],
) -> Result<ResolvedUser, UserError> {
    let passwd =
        parse_passwd(&std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default());
    let groups = parse_group(&std::fs::read_to_string(root.join("etc/group")).unwrap_or_default());
    resolve_user(spec, extra_groups, &passwd, &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:root\n";

    fn resolve(spec: &str, extra: &[&str]) -> Result<ResolvedUser, UserError> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        resolve_user(spec, &extra, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn resolve_user_empty_is_root_with_memberships() {
        let user = resolve("", &[]).expect("root");

        assert_eq!((user.uid, user.gid, user.additional_gids), (0, 0, vec![10]));
        assert_eq!(user.home, "/root");
    }

    #[test]
    fn resolve_user_name_gets_primary_and_supplementary_groups() {
        let user = resolve("app", &[]).expect("app");

        assert_eq!(
            (user.uid, user.gid, user.additional_gids),
            (1000, 1000, vec![2000])
        );
    }

    #[test]
    fn resolve_user_name_and_group_name_overrides_primary() {
        let user = resolve("app:extra", &[]).expect("app:extra");

        assert_eq!((user.uid, user.gid), (1000, 2000));
        assert!(user.additional_gids.is_empty());
    }

    #[test]
    fn resolve_user_unknown_numeric_used_as_is() {
        let user = resolve("4242:4343", &[]).expect("numeric");

        assert_eq!((user.uid, user.gid, user.home.as_str()), (4242, 4343, "/"));
    }

    #[test]
    fn resolve_user_unknown_name_refused() {
        assert!(matches!(
            resolve("ghost", &[]),
            Err(UserError::Unknown { kind: "user", .. })
        ));
    }

    #[test]
    fn resolve_user_extra_groups_by_name_and_number() {
        let user = resolve("app", &["wheel", "77"]).expect("app");

        assert_eq!(user.additional_gids, vec![10, 77, 2000]);
    }

    #[test]
    fn resolve_user_empty_group_refused() {
        assert!(matches!(resolve("app:", &[]), Err(UserError::Invalid(_))));
    }
}
