//! Query-string parameters as Docker clients send them: booleans as `1`/`true`, filters as
//! JSON (`{"name":["web"]}` or the older `{"name":{"web":true}}`).

use std::collections::HashMap;

use crate::error::{ApiError, ApiResult};

/// The decoded query parameters of a request.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(key), decode(value))
            })
            .collect();
        Self { pairs }
    }

    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A boolean as Docker reads it: `1`, `true` (any case) are true; absent is `default`.
    pub fn flag(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(v) => matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"),
        }
    }

    /// An integer; absent or empty is `None`.
    pub fn int(&self, key: &str) -> ApiResult<Option<i64>> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value for {key}: {v:?} is not an integer"))
            }),
        }
    }

    /// The `filters` parameter: filter name to accepted values.
    pub fn filters(&self) -> ApiResult<HashMap<String, Vec<String>>> {
        let Some(raw) = self.get("filters").filter(|f| !f.is_empty()) else {
            return Ok(HashMap::new());
        };
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| ApiError::bad_request(format!("invalid filter: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| ApiError::bad_request("invalid filter: not a JSON object"))?;
        let mut filters = HashMap::new();
        for (name, values) in object {
            let values = match values {
                serde_json::Value::Array(items) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                serde_json::Value::Object(map) => map
                    .iter()
                    .filter(|(_, on)| on.as_bool().unwrap_or(false))
                    .map(|(k, _)| k.clone())
                    .collect(),
                _ => return Err(ApiError::bad_request(format!("invalid filter {name:?}"))),
            };
            filters.insert(name.clone(), values);
        }
        Ok(filters)
    }
}

/// Percent-decoding, with `+` as a space (form encoding, as Go's url.ParseQuery does).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|v| v as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_percent_and_plus_decode() {
        let query = Query::parse(Some("path=%2Ftmp%2Fa+b&x"));

        assert_eq!(query.get("path"), Some("/tmp/a b"));
        assert_eq!(query.get("x"), Some(""));
    }

    #[test]
    fn filters_both_json_forms_decode() {
        let new = Query::parse(Some("filters=%7B%22name%22%3A%5B%22web%22%5D%7D"));
        let old = Query::parse(Some("filters=%7B%22name%22%3A%7B%22web%22%3Atrue%7D%7D"));

        assert_eq!(new.filters().unwrap()["name"], ["web"]);
        assert_eq!(old.filters().unwrap()["name"], ["web"]);
    }

    #[test]
    fn flag_accepts_one_and_true() {
        let query = Query::parse(Some("a=1&b=true&c=0"));

        assert!(query.flag("a", false));
        assert!(query.flag("b", false));
        assert!(!query.flag("c", true));
        assert!(query.flag("d", true));
    }

    #[test]
    fn decode_truncated_percent_is_kept() {
        assert_eq!(Query::parse(Some("a=%2")).get("a"), Some("%2"));
    }
}
