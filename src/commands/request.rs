//! Decoding and checking a command request. Any bytes give either a request or an error that
//! says what is wrong (and the id, when it could be read) — never a panic.
//!
//! ```json
//! {"id": "c-42", "name": "set_interval", "args": {"collector": "system", "interval_ms": 5000},
//!  "expires_at": 1764100000000, "sig": {"kid": "k1", "hmac": "<hex>"}}
//! ```

use serde_json::{Map, Value};

pub const MAX_ID_LEN: usize = crate::command_link::MAX_ID_LEN;
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub name: String,
    pub args: Map<String, Value>,
    /// ms since the Unix epoch after which the command must not run.
    pub expires_at: Option<u64>,
    pub sig: Option<Signature>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub kid: String,
    pub hmac: Vec<u8>,
}

/// Why a request was refused; `id` is set when the request had a readable one.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<String>,
    pub message: String,
}

fn err(id: &Option<String>, message: impl Into<String>) -> DecodeError {
    DecodeError {
        id: id.clone(),
        message: message.into(),
    }
}

/// Also used by the uplink (which may not import commands) to address a `busy` reply.
pub use crate::command_link::sniff_id;

pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
    let none = None;
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(err(
            &sniff_id(bytes),
            format!(
                "request of {} bytes is over the {MAX_REQUEST_BYTES}-byte limit",
                bytes.len()
            ),
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| err(&sniff_id(bytes), format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(err(&none, "a request must be a JSON object"));
    };
    let id = match obj.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(s),
        Some(Value::String(_)) => {
            return Err(err(
                &none,
                format!("`id` must be 1-{MAX_ID_LEN} characters"),
            ));
        }
        Some(_) => return Err(err(&none, "`id` must be a string")),
        None => return Err(err(&none, "missing `id`")),
    };
    let name = match obj.remove("name") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err(err(&id, "`name` must be a non-empty string")),
        None => return Err(err(&id, "missing `name`")),
    };
    let args = match obj.remove("args") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(err(&id, "`args` must be an object")),
    };
    let expires_at = match obj.remove("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
            err(
                &id,
                "`expires_at` must be a non-negative integer (ms since the Unix epoch)",
            )
        })?),
        Some(_) => {
            return Err(err(
                &id,
                "`expires_at` must be a number (ms since the Unix epoch)",
            ));
        }
    };
    let sig = match obj.remove("sig") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut s)) => {
            let kid = match s.remove("kid") {
                Some(Value::String(k)) => k,
                _ => return Err(err(&id, "`sig.kid` must be a string")),
            };
            let hmac = match s.remove("hmac") {
                Some(Value::String(h)) => {
                    hex::decode(&h).map_err(|_| err(&id, "`sig.hmac` must be hex"))?
                }
                _ => return Err(err(&id, "`sig.hmac` must be a hex string")),
            };
            if let Some(k) = s.keys().next() {
                return Err(err(&id, format!("unknown key `sig.{k}`")));
            }
            Some(Signature { kid, hmac })
        }
        Some(_) => return Err(err(&id, "`sig` must be an object")),
    };
    if let Some(k) = obj.keys().next() {
        return Err(err(
            &id,
            format!("unknown key `{k}`; expected id, name, args, expires_at, sig"),
        ));
    }
    Ok(Request {
        id: id.expect("id was checked"),
        name,
        args,
        expires_at,
        sig,
    })
}

/// The bytes a signature covers: `{"args":…,"expires_at":…,"id":…,"name":…}` with object keys
/// sorted at every level, no whitespace, `expires_at` only when present. Python:
/// `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`.
pub fn canonical(req: &Request) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("args".into(), Value::Object(req.args.clone()));
    if let Some(e) = req.expires_at {
        m.insert("expires_at".into(), e.into());
    }
    m.insert("id".into(), req.id.clone().into());
    m.insert("name".into(), req.name.clone().into());
    let mut out = String::new();
    write_canonical(&Value::Object(m), &mut out);
    out.into_bytes()
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_full_request() {
        let r = decode(br#"{"id":"a","name":"ping","args":{"x":1},"expires_at":5,"sig":{"kid":"k","hmac":"00ff"}}"#).unwrap();
        assert_eq!(r.id, "a");
        assert_eq!(r.expires_at, Some(5));
        assert_eq!(r.sig.unwrap().hmac, vec![0, 255]);
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let e = decode(br#"{"id":"a","name":"ping","bogus":1}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("a"));
        assert!(e.message.contains("bogus"));
        assert!(decode(b"[1,2]").unwrap_err().message.contains("object"));
        assert!(decode(b"\xff\xfe").unwrap_err().message.contains("JSON"));
        assert!(
            decode(br#"{"name":"ping"}"#)
                .unwrap_err()
                .message
                .contains("id")
        );
        assert!(decode(br#"{"id":"a","name":"p","expires_at":-1}"#).is_err());
    }

    #[test]
    fn the_id_of_an_oversize_or_broken_request_is_read_when_it_can_be() {
        let mut big = br#"{"id": "big-1", "name":"ping","args":{"x":""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES));
        big.extend(br#""}}"#);
        let e = decode(&big).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("big-1"));
        assert!(e.message.contains("limit"), "{}", e.message);
        assert_eq!(
            decode(br#"{"id":"j-2","name":"ping""#)
                .unwrap_err()
                .id
                .as_deref(),
            Some("j-2")
        );
        assert_eq!(sniff_id(br#"{"id":"a\"b"}"#), None);
        assert_eq!(sniff_id(b"\xff\"id\":\"\xff\""), None);
        assert_eq!(sniff_id(br#"{"id":""}"#), None);
    }

    #[test]
    fn canonical_form_sorts_keys_everywhere() {
        let r = decode(br#"{"name":"n","id":"i","args":{"b":[{"z":1,"a":2}],"a":"x"}}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical(&r)).unwrap(),
            r#"{"args":{"a":"x","b":[{"a":2,"z":1}]},"id":"i","name":"n"}"#
        );
    }

    // A short run of the generated inputs `benches/fuzz_commands.rs` runs a million of.
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]
        #[test]
        fn generated_requests_never_panic(
            fields in proptest::collection::vec(
                (proptest::sample::select(vec!["id", "name", "args", "expires_at", "sig", "x"]), ".{0,10}", 0u8..4),
                0..6,
            ),
            flips in proptest::collection::vec((0usize..512, proptest::prelude::any::<u8>()), 0..3),
        ) {
            let mut m = Map::new();
            for (k, text, kind) in fields {
                let v = match kind {
                    0 => Value::String(text),
                    1 => serde_json::json!({ "kid": text, "hmac": "00ff" }),
                    2 => serde_json::json!(text.len()),
                    _ => serde_json::json!([text]),
                };
                m.insert(k.to_string(), v);
            }
            let mut bytes = Value::Object(m).to_string().into_bytes();
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            let _ = sniff_id(&bytes);
            if let Ok(r) = decode(&bytes) {
                let _ = canonical(&r);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(42);
        let seeds: [&[u8]; 4] = [
            br#"{"id":"a","name":"b","args":{}}"#,
            br#"{"sig":{"kid":1}}"#,
            b"{}",
            b"null",
        ];
        for i in 0..20_000 {
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
            } else {
                seeds[rng.usize(0..seeds.len())].to_vec()
            };
            // Mutate structured inputs a little.
            for _ in 0..rng.usize(0..4) {
                if !bytes.is_empty() {
                    let at = rng.usize(0..bytes.len());
                    bytes[at] = rng.u8(..);
                }
            }
            let _ = decode(&bytes);
        }
    }
}
