//! The worker endpoint: `/api/v1/worker/{worker_id}/ws`.
//!
//! [`derive_endpoint`] turns whatever an operator configured (a bare `host:port`, a base URL with
//! or without a path prefix, or a full endpoint URL that may hold a `{worker_id}` placeholder)
//! into the one URL a worker connects to. [`parse_endpoint_path`] is its strict inverse on the
//! coordinator. The pair is tested as a round trip so that two workers with different ids are
//! always two workers (the original collapsed every worker into the literal id `{worker_id}`).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::ids::{IdError, WorkerId};

/// The literal placeholder a configured endpoint URL may hold.
pub const PLACEHOLDER: &str = "{worker_id}";

/// The query a worker adds to its endpoint URL when it sends its registration without waiting
/// for the welcome (it has no secret to sign the welcome's nonce with). A coordinator that
/// asks no authentication then holds the welcome and writes it together with the
/// registration's acknowledgement: one write and one wake-up less a registration.
pub const PIPELINED_QUERY: &str = "pipelined=1";

/// Whether a `Host` header names a loopback host: `localhost` (or a name under it), an address
/// in 127.0.0.0/8 or `[::1]`, with or without a port. Loopback-only HTTP servers (the
/// coordinator without API tokens, the fault proxy's control API) answer only these, so that a
/// web page whose own name was rebound to 127.0.0.1 (DNS rebinding) is refused.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether an endpoint URL's query (the part after `?`) holds [`PIPELINED_QUERY`].
pub fn is_pipelined(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p == PIPELINED_QUERY))
}

/// Path segments before the worker id.
const PREFIX: [&str; 3] = ["api", "v1", "worker"];

/// Everything except RFC 3986 unreserved characters is percent-encoded in the id segment.
const ID_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A configured coordinator URL that cannot be turned into a worker endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("coordinator URL is empty")]
    Empty,
    #[error("coordinator URL {url:?} has scheme {scheme:?}; use ws, wss, http or https")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("coordinator URL {url:?} has no host")]
    NoHost { url: String },
    #[error(
        "coordinator URL {url:?} has a query or fragment; give only scheme, host, port and path"
    )]
    QueryOrFragment { url: String },
    #[error("coordinator URL {url:?} holds the worker endpoint more than once")]
    DuplicateEndpoint { url: String },
    #[error(
        "coordinator URL {url:?} has a malformed worker endpoint; expected .../api/v1/worker/{{worker_id}}/ws"
    )]
    MalformedEndpoint { url: String },
    #[error("coordinator URL {url:?} names worker {url_id:?}, but this worker is {configured:?}")]
    WorkerIdMismatch {
        url: String,
        url_id: String,
        configured: String,
    },
    #[error(
        "coordinator URL {url:?} has a stray brace; only a single {PLACEHOLDER} in the endpoint is allowed"
    )]
    StrayBrace { url: String },
    #[error("coordinator URL {url:?} is not a valid URL: {reason}")]
    Invalid { url: String, reason: String },
}

/// Derives the WebSocket endpoint of `worker` from a configured coordinator URL.
///
/// Rules: bare `host:port` gets `ws://`; `http` maps to `ws` and `https` to `wss` (the scheme
/// only); empty and repeated slashes in the path are ignored; a path prefix is kept; the endpoint
/// is appended unless the URL already ends in one, whose id must then be the placeholder or this
/// worker's id. The id is percent-encoded and substituted exactly once.
pub fn derive_endpoint(configured: &str, worker: &WorkerId) -> Result<String, EndpointError> {
    let raw = configured.trim();
    if raw.is_empty() {
        return Err(EndpointError::Empty);
    }
    let url = || raw.to_owned();
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, rest)) => (s.to_ascii_lowercase(), rest),
        None => ("ws".to_owned(), raw),
    };
    let scheme = match scheme.as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => {
            return Err(EndpointError::UnsupportedScheme { url: url(), scheme });
        }
    };
    if rest.contains(['?', '#']) {
        return Err(EndpointError::QueryOrFragment { url: url() });
    }
    // URL parsers read `\` as `/` in ws and http URLs: the text and the connection would differ.
    if rest.contains('\\') {
        return Err(EndpointError::Invalid {
            url: url(),
            reason: "a backslash is not allowed".into(),
        });
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(EndpointError::NoHost { url: url() });
    }
    if authority.contains(['{', '}']) {
        return Err(EndpointError::StrayBrace { url: url() });
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let starts: Vec<usize> = (0..segs.len())
        .filter(|&i| segs[i..].starts_with(&PREFIX))
        .collect();
    let prefix: &[&str] = match starts.as_slice() {
        [] => &segs,
        [i] => {
            let i = *i;
            if segs.len() != i + 5 || segs[i + 4] != "ws" {
                return Err(EndpointError::MalformedEndpoint { url: url() });
            }
            let id_seg = segs[i + 3];
            if id_seg != PLACEHOLDER {
                let url_id = decode_segment(id_seg)
                    .ok_or_else(|| EndpointError::MalformedEndpoint { url: url() })?;
                if url_id != worker.as_str() {
                    return Err(EndpointError::WorkerIdMismatch {
                        url: url(),
                        url_id,
                        configured: worker.to_string(),
                    });
                }
            }
            &segs[..i]
        }
        _ => return Err(EndpointError::DuplicateEndpoint { url: url() }),
    };
    if prefix.iter().any(|s| s.contains(['{', '}'])) {
        return Err(EndpointError::StrayBrace { url: url() });
    }
    let mut out = format!("{scheme}://{authority}/");
    for seg in prefix.iter().chain(PREFIX.iter()) {
        out.push_str(seg);
        out.push('/');
    }
    out.extend(utf8_percent_encode(worker.as_str(), ID_SEGMENT));
    out.push_str("/ws");
    let parsed = url::Url::parse(&out).map_err(|e| EndpointError::Invalid {
        url: url(),
        reason: e.to_string(),
    })?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(EndpointError::NoHost { url: url() });
    }
    // INVARIANT: what we connect to is what we built (no normalisation moved the endpoint).
    // Compared whole: dot segments (`/./`, `/a/../`, `/%2e/`) are removed by the url crate
    // but sent as they are by the WebSocket client, and the server would answer 404 for ever.
    let built = &out[scheme.len() + "://".len() + authority.len()..];
    if built != parsed.path() {
        return Err(EndpointError::Invalid {
            url: url(),
            reason: format!("it would be read as path {}", parsed.path()),
        });
    }
    Ok(out)
}

/// Derives the HTTP base URL (for the HTTP API) from the same configured URL forms.
pub fn derive_http_base(configured: &str) -> Result<String, EndpointError> {
    let raw = configured.trim();
    if raw.trim_end_matches('/').is_empty() {
        return Err(EndpointError::Empty);
    }
    // The scheme first: `http://` alone is a URL without a host, not a host named `http:`.
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, rest)) => (s.to_ascii_lowercase(), rest.trim_end_matches('/')),
        None => ("http".to_owned(), raw.trim_end_matches('/')),
    };
    let scheme = match scheme.as_str() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => {
            return Err(EndpointError::UnsupportedScheme {
                url: raw.to_owned(),
                scheme,
            });
        }
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(EndpointError::NoHost {
            url: raw.to_owned(),
        });
    }
    // A worker's endpoint URL (the form `tether worker` takes too, and `TETHER_COORDINATOR`
    // may hold for both): the API lives at what comes before its `/api/v1/worker/...`.
    let rest = match rest.find("/api/v1/worker/") {
        Some(at) if rest.ends_with("/ws") => &rest[..at],
        _ => rest,
    };
    let base = format!("{scheme}://{rest}");
    // A host an HTTP client cannot use (a space in it, a bad port) is said here, in the terms
    // of the URL given, not as the client's "builder error" later.
    match url::Url::parse(&base) {
        Err(e) => {
            return Err(EndpointError::Invalid {
                url: raw.to_owned(),
                reason: e.to_string(),
            });
        }
        // Every request appends its path to the base: a query or fragment in it would end up
        // in the middle of the request's URL (a client then read the dashboard for the API).
        Ok(u) if u.query().is_some() || u.fragment().is_some() => {
            return Err(EndpointError::Invalid {
                url: raw.to_owned(),
                reason: "a query or fragment has no place in the coordinator's URL".into(),
            });
        }
        Ok(_) => {}
    }
    Ok(base)
}

/// Why the coordinator refused an upgrade path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is not /api/v1/worker/{{worker_id}}/ws")]
    Shape(String),
    #[error("worker id in path {path:?} is not valid: {source}")]
    Id { path: String, source: IdError },
    #[error("worker id in path {0:?} is not valid percent-encoded UTF-8")]
    Encoding(String),
}

/// Strictly parses an upgrade request path: exactly `/api/v1/worker/<id>/ws`, nothing before or
/// after, no empty segments, no query; the id percent-decoded and checked against the id rules.
pub fn parse_endpoint_path(path: &str) -> Result<WorkerId, PathError> {
    let shape = || PathError::Shape(path.to_owned());
    let rest = path.strip_prefix("/api/v1/worker/").ok_or_else(shape)?;
    let id_seg = rest.strip_suffix("/ws").ok_or_else(shape)?;
    if id_seg.is_empty() || id_seg.contains(['/', '?', '#']) {
        return Err(shape());
    }
    let decoded = decode_segment(id_seg).ok_or_else(|| PathError::Encoding(path.to_owned()))?;
    WorkerId::parse(&decoded).map_err(|source| PathError::Id {
        path: path.to_owned(),
        source,
    })
}

fn decode_segment(seg: &str) -> Option<String> {
    percent_decode_str(seg)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> WorkerId {
        WorkerId::parse(s).expect("valid id")
    }

    #[test]
    fn only_the_exact_pipelined_pair_says_the_worker_registers_first() {
        assert!(is_pipelined(Some("pipelined=1")));
        assert!(is_pipelined(Some("x=2&pipelined=1")));
        for q in [
            None,
            Some(""),
            Some("pipelined=0"),
            Some("pipelined=10"),
            Some("xpipelined=1"),
        ] {
            assert!(!is_pipelined(q), "{q:?}");
        }
    }

    fn path_of(url: &str) -> String {
        let u = url::Url::parse(url).expect("url");
        u.path().to_owned()
    }

    #[test]
    fn base_url_forms_all_derive_the_same_endpoint() {
        let w = id("worker-1");
        for input in [
            "127.0.0.1:8765",
            "ws://127.0.0.1:8765",
            "ws://127.0.0.1:8765/",
            "http://127.0.0.1:8765",
            "http://127.0.0.1:8765//",
            "  ws://127.0.0.1:8765  ",
            "ws://127.0.0.1:8765/api/v1/worker/{worker_id}/ws",
            "ws://127.0.0.1:8765/api/v1/worker/{worker_id}/ws/",
            "http://127.0.0.1:8765/api/v1/worker/worker-1/ws",
        ] {
            assert_eq!(
                derive_endpoint(input, &w).as_deref(),
                Ok("ws://127.0.0.1:8765/api/v1/worker/worker-1/ws"),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn tls_schemes_map_to_wss_and_prefixes_are_kept() {
        let w = id("w");
        assert_eq!(
            derive_endpoint("https://c.example:443/tether/", &w).as_deref(),
            Ok("wss://c.example:443/tether/api/v1/worker/w/ws")
        );
        assert_eq!(
            derive_endpoint("wss://c.example/a/b/api/v1/worker/{worker_id}/ws", &w).as_deref(),
            Ok("wss://c.example/a/b/api/v1/worker/w/ws")
        );
    }

    #[test]
    fn configuration_errors_are_reported_not_passed_through() {
        let w = id("w1");
        type Check = fn(&EndpointError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, EndpointError::Empty)),
            ("ftp://h:1", |e| {
                matches!(e, EndpointError::UnsupportedScheme { .. })
            }),
            ("ws:///x", |e| matches!(e, EndpointError::NoHost { .. })),
            ("ws://h:1/?a=b", |e| {
                matches!(e, EndpointError::QueryOrFragment { .. })
            }),
            ("ws://h:1/api/v1/worker/w2/ws", |e| {
                matches!(e, EndpointError::WorkerIdMismatch { .. })
            }),
            (
                "ws://h:1/api/v1/worker/{worker_id}/ws/api/v1/worker/w1/ws",
                |e| matches!(e, EndpointError::DuplicateEndpoint { .. }),
            ),
            ("ws://h:1/api/v1/worker/{worker_id}", |e| {
                matches!(e, EndpointError::MalformedEndpoint { .. })
            }),
            ("ws://h:1/api/v1/worker/{worker_id}/ws/extra", |e| {
                matches!(e, EndpointError::MalformedEndpoint { .. })
            }),
            ("ws://h:1/{worker_id}", |e| {
                matches!(e, EndpointError::StrayBrace { .. })
            }),
            ("ws://h:1/pre{fix", |e| {
                matches!(e, EndpointError::StrayBrace { .. })
            }),
            ("ws://h:1/api/v1/worker/{worker_id}}/ws", |e| {
                matches!(e, EndpointError::WorkerIdMismatch { .. })
            }),
            ("ws://h:99999", |e| {
                matches!(e, EndpointError::Invalid { .. })
            }),
            // Dot segments: read away by URL parsers, sent as they are by the client.
            ("ws://h:1/./", |e| {
                matches!(e, EndpointError::Invalid { .. })
            }),
            ("ws://h:1/a/../", |e| {
                matches!(e, EndpointError::Invalid { .. })
            }),
            ("ws://h:1/pre/%2e%2e/api/v1/worker/w1/ws", |e| {
                matches!(e, EndpointError::Invalid { .. })
            }),
        ];
        for (input, check) in cases {
            let err = derive_endpoint(input, &w).expect_err(input);
            assert!(check(&err), "input {input:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn the_server_parses_only_the_exact_shape() {
        assert_eq!(parse_endpoint_path("/api/v1/worker/abc/ws"), Ok(id("abc")));
        for bad in [
            "/",
            "/api/v1/worker/ws",
            "/api/v1/worker//ws",
            "/api/v1/worker/abc/x/ws",
            "/api/v1/worker/abc/ws/",
            "//api/v1/worker/abc/ws",
            "/api/v2/worker/abc/ws",
            "/prefix/api/v1/worker/abc/ws",
            "/api/v1/worker/%7Bworker_id%7D/ws",
            "/api/v1/worker/a%2Fb/ws",
            "/api/v1/worker/%FF/ws",
        ] {
            assert!(parse_endpoint_path(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("/api/v1/worker/{}/ws", "a".repeat(129));
        assert!(matches!(
            parse_endpoint_path(&long),
            Err(PathError::Id { .. })
        ));
    }

    #[test]
    fn derive_then_parse_round_trips_every_id_over_every_form() {
        let ids = [
            "w",
            "worker-1",
            "worker-2",
            "gpu.box_7~x",
            "user@host:9+1",
            &"z".repeat(128),
        ];
        let forms = [
            "127.0.0.1:9",
            "ws://127.0.0.1:9",
            "http://127.0.0.1:9/",
            "https://h.example/pre/fix/",
            "wss://h.example:1/api/v1/worker/{worker_id}/ws",
        ];
        let mut seen = std::collections::HashSet::new();
        for raw in ids {
            let w = id(raw);
            for form in forms {
                let url = derive_endpoint(form, &w).expect(form);
                assert_eq!(url.matches("/api/v1/worker/").count(), 1, "{url}");
                assert!(!url.contains('{') && !url.contains('}'), "{url}");
                let mut path = path_of(&url);
                if let Some(p) = path.strip_prefix("/pre/fix") {
                    path = p.to_owned();
                }
                assert_eq!(parse_endpoint_path(&path), Ok(w.clone()), "{url}");
                seen.insert((form, parse_endpoint_path(&path).expect("parsed")));
            }
        }
        // Two workers with different ids are always two workers.
        assert_eq!(seen.len(), ids.len() * forms.len());
    }

    #[test]
    fn http_base_is_derived_from_any_form() {
        assert_eq!(
            derive_http_base("127.0.0.1:8765").as_deref(),
            Ok("http://127.0.0.1:8765")
        );
        assert_eq!(derive_http_base("ws://h:1/").as_deref(), Ok("http://h:1"));
        assert_eq!(derive_http_base("wss://h:1").as_deref(), Ok("https://h:1"));
        // A worker's endpoint URL, with or without a prefix before it.
        for (endpoint, base) in [
            ("ws://h:1/api/v1/worker/w1/ws", "http://h:1"),
            ("wss://h:1/api/v1/worker/{worker_id}/ws/", "https://h:1"),
            ("ws://h:1/tether/api/v1/worker/w1/ws", "http://h:1/tether"),
        ] {
            assert_eq!(
                derive_http_base(endpoint).as_deref(),
                Ok(base),
                "{endpoint}"
            );
        }
        assert!(derive_http_base("gopher://h").is_err());
        assert!(matches!(
            derive_http_base("http://"),
            Err(EndpointError::NoHost { .. })
        ));
        let e = derive_http_base("not a url").expect_err("a space in the host");
        assert!(matches!(e, EndpointError::Invalid { .. }), "{e}");
        assert!(
            e.to_string().contains("\"not a url\" is not a valid URL"),
            "{e}"
        );
        assert!(derive_http_base("h:99999").is_err(), "a port out of range");
        for url in ["http://h:1?x=1", "h:1/#top", "http://h:1/prefix?a"] {
            let e = derive_http_base(url).expect_err("a query or fragment");
            assert!(e.to_string().contains("query or fragment"), "{url}: {e}");
        }
        assert_eq!(
            derive_http_base("http://h:1/prefix/").as_deref(),
            Ok("http://h:1/prefix"),
            "a path prefix (a reverse proxy's) is kept"
        );
    }

    #[test]
    fn loopback_hosts_are_localhost_127_0_0_0_8_and_v6_loopback_with_or_without_a_port() {
        for host in [
            "localhost",
            "LOCALHOST:8765",
            "app.localhost:1",
            "127.0.0.1",
            "127.3.4.5:80",
            "[::1]",
            "[::1]:8765",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8765",
            "localhost.evil.example",
            "10.0.0.1:8765",
            "[::2]:1",
            "0.0.0.0",
            "[::]:8474",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
