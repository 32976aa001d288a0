//! Container names: validation as dockerd does it, and random `adjective_noun` names for
//! containers created without one.

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid container name ({0}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")]
pub struct InvalidName(pub String);

/// Checks a name as the client sent it (a leading `/` is allowed, as Docker allows it) and
/// returns it without the slash.
pub fn validate(name: &str) -> Result<String, InvalidName> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    let mut chars = bare.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && bare.len() <= 253 {
        Ok(bare.to_owned())
    } else {
        Err(InvalidName(name.to_owned()))
    }
}

const ADJECTIVES: &[&str] = &[
    "agile", "bold", "brave", "bright", "calm", "clever", "cool", "eager", "fair", "fervent",
    "gentle", "happy", "jolly", "keen", "kind", "lucid", "merry", "nifty", "noble", "patient",
    "quick", "quiet", "sharp", "steady", "sturdy", "swift", "tender", "upbeat", "vivid", "witty",
    "zealous", "serene",
];

const NOUNS: &[&str] = &[
    "anchor",
    "beacon",
    "buoy",
    "capstan",
    "channel",
    "compass",
    "current",
    "dock",
    "ferry",
    "harbor",
    "hull",
    "jetty",
    "keel",
    "lantern",
    "lighthouse",
    "mast",
    "mooring",
    "oar",
    "pier",
    "quay",
    "rudder",
    "sail",
    "schooner",
    "sextant",
    "skiff",
    "sloop",
    "tide",
    "tugboat",
    "wharf",
    "wake",
    "galley",
    "helm",
];

/// A random name such as `swift_harbor`, with a number appended after `attempt` collisions.
pub fn random_name(attempt: u32) -> String {
    let mut bytes = [0u8; 2];
    // The kernel's CSPRNG does not fail once booted; a failure here is a broken host.
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    let adjective = ADJECTIVES[usize::from(bytes[0]) % ADJECTIVES.len()];
    let noun = NOUNS[usize::from(bytes[1]) % NOUNS.len()];
    if attempt == 0 {
        format!("{adjective}_{noun}")
    } else {
        format!("{adjective}_{noun}{attempt}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_leading_slash_is_stripped() {
        assert_eq!(validate("/web").unwrap(), "web");
    }

    #[test]
    fn validate_bad_characters_refused_with_docker_message() {
        let error = validate("we b").unwrap_err();

        assert_eq!(
            error.to_string(),
            "Invalid container name (we b), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        );
    }

    #[test]
    fn random_name_is_a_valid_name() {
        assert!(validate(&random_name(3)).is_ok());
    }
}
