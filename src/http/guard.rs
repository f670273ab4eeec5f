//! Who may talk to the HTTP front end. A browser on the same machine is an attacker too: a
//! page it shows can send requests to 127.0.0.1 (cross-site requests) and can point a name
//! it controls at 127.0.0.1 (DNS rebinding). One policy covers every endpoint:
//!
//! - without a token, the `Host` header must name loopback (`localhost`, `127.x.x.x`,
//!   `[::1]`), so a rebound name is refused before any handler runs;
//! - a browser request (one that carries `Origin`) must come from a loopback origin or from
//!   the origin sbmon is being reached at; `Origin: null` and `Sec-Fetch-Site: cross-site`
//!   are refused;
//! - with a token, every endpoint but `/health/live` (and its alias `/monitoring/live`) needs
//!   `Authorization: Bearer TOKEN` (the scheme in any case, as RFC 9110 says); so do the web
//!   console's data endpoints, but not its pages and assets, which hold no data and ask the
//!   person for the token (`console::is_public`).
//!
//! `/rpc` additionally takes only `application/json` bodies (in `http.rs`), which a browser
//! cannot send cross-origin without a preflight that sbmon never approves.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The path that answers without a token (orchestrators probe it before they know one).
pub const LIVENESS: &str = "/health/live";

pub struct Policy {
    token: Option<String>,
}

impl Policy {
    pub fn new(token: Option<String>) -> Arc<Policy> {
        Arc::new(Policy { token })
    }
}

/// Axum middleware: refuse what the policy refuses, pass everything else on.
pub async fn admit(State(policy): State<Arc<Policy>>, request: Request, next: Next) -> Response {
    match policy.check(request.headers(), request.uri().path()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Why a request was turned away.
#[derive(Debug)]
enum Refusal {
    Forbidden(String),
    Unauthorized,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Forbidden(reason) => {
                (StatusCode::FORBIDDEN, format!("{reason}\n")).into_response()
            }
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this sbmon requires Authorization: Bearer TOKEN\n",
            )
                .into_response(),
        }
    }
}

impl Policy {
    fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), Refusal> {
        // Two Host headers, or one that is not text, must not pass as "no Host at all".
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (None, _) => None,
            (Some(host), None) => Some(host.to_str().map_err(|_| {
                Refusal::Forbidden("the Host header is not visible ASCII text".to_string())
            })?),
            (Some(_), Some(_)) => {
                return Err(Refusal::Forbidden(
                    "more than one Host header (RFC 9112 allows one)".to_string(),
                ));
            }
        };
        if self.token.is_none()
            && let Some(host) = host
            && !is_loopback_authority(host)
        {
            return Err(Refusal::Forbidden(format!(
                "Host {:?} is not a loopback name: an sbmon without a token answers only \
                 requests for localhost, 127.0.0.1 or [::1] (DNS rebinding protection)",
                crate::echo::clip(host)
            )));
        }
        if headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
        {
            return Err(Refusal::Forbidden(
                "cross-site browser requests are refused".to_string(),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !origin_allowed(origin, host) {
                return Err(Refusal::Forbidden(format!(
                    "Origin {:?} is refused: browsers may reach sbmon only from a loopback \
                     origin or from the address sbmon is served at",
                    crate::echo::clip(origin)
                )));
            }
        }
        if let Some(token) = &self.token
            && path != LIVENESS
            && path != super::monitoring::LIVENESS
            && !super::console::is_public(path)
            && !bearer_matches(headers, token)
        {
            return Err(Refusal::Unauthorized);
        }
        Ok(())
    }
}

fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && same(given.trim().as_bytes(), token.as_bytes())
}

/// Equality whose time does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The host part of an authority (`name`, `name:port`, `[v6]`, `[v6]:port`), lower-cased.
fn host_of(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        inside
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// `localhost`, `127.0.0.0/8` or `::1`, with or without a port.
pub fn is_loopback_authority(authority: &str) -> bool {
    match host_of(authority) {
        Some(host) if host == "localhost" => true,
        Some(host) => host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// A browser origin (`scheme://authority`) that may call: loopback, or the very authority
/// the request was sent to (sbmon's own pages, when served beyond loopback with a token).
fn origin_allowed(origin: &str, host: Option<&str>) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" (sandboxed frames, file: pages) and anything malformed
    };
    if !matches!(scheme, "http" | "https") || authority.contains('/') {
        return false;
    }
    is_loopback_authority(authority)
        || host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    fn status(policy: &Policy, pairs: &[(&'static str, &'static str)], path: &str) -> u16 {
        match policy.check(&headers(pairs), path) {
            Ok(()) => 200,
            Err(r) => r.into_response().status().as_u16(),
        }
    }

    #[test]
    fn loopback_authorities() {
        for ok in [
            "localhost",
            "LOCALHOST:9405",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:9405",
        ] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:9405",
            "localhost.evil.com",
            "127.0.0.1.nip.io",
            "10.0.0.1:9405",
            "[::2]:1",
            "[::1]x",
            "",
            "localhost:port",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }

    #[test]
    fn without_a_token_only_loopback_hosts_and_origins_pass() {
        let open = Policy { token: None };
        assert_eq!(status(&open, &[("host", "127.0.0.1:9405")], "/rpc"), 200);
        assert_eq!(status(&open, &[], "/rpc"), 200);
        assert_eq!(status(&open, &[("host", "evil.com:9405")], "/metrics"), 403);
        assert_eq!(status(&open, &[("host", "evil.com")], LIVENESS), 403);
        let from = |origin| {
            status(
                &open,
                &[("host", "localhost:9405"), ("origin", origin)],
                "/",
            )
        };
        assert_eq!(from("http://localhost:9405"), 200);
        assert_eq!(from("http://127.0.0.1:3000"), 200);
        assert_eq!(from("http://evil.com"), 403);
        assert_eq!(from("null"), 403);
        assert_eq!(from("file://"), 403);
        assert_eq!(
            status(
                &open,
                &[("host", "localhost"), ("sec-fetch-site", "cross-site")],
                "/events"
            ),
            403
        );
    }

    #[test]
    fn with_a_token_bearer_is_required_and_its_scheme_is_case_insensitive() {
        let guarded = Policy {
            token: Some("0123456789abcdef".into()),
        };
        let host = ("host", "sbmon.example:9405");
        assert_eq!(status(&guarded, &[host], "/metrics"), 401);
        assert_eq!(status(&guarded, &[host], LIVENESS), 200);
        assert_eq!(status(&guarded, &[host], "/monitoring/live"), 200);
        assert_eq!(status(&guarded, &[host], "/monitoring/health"), 401);
        assert_eq!(status(&guarded, &[host], "/monitoring/reset"), 401);
        // The console's pages and assets hold no data and ask for the token; its data does not
        // answer without it.
        assert_eq!(status(&guarded, &[host], "/"), 200);
        assert_eq!(status(&guarded, &[host], "/targets/app"), 200);
        assert_eq!(status(&guarded, &[host], "/console/assets/console.js"), 200);
        assert_eq!(status(&guarded, &[host], "/console/api/fleet"), 401);
        assert_eq!(status(&guarded, &[host], "/console/api/overview"), 401);
        for auth in [
            "Bearer 0123456789abcdef",
            "bearer 0123456789abcdef",
            "BEARER  0123456789abcdef ",
        ] {
            let mut h = headers(&[host]);
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(auth));
            assert!(guarded.check(&h, "/metrics").is_ok(), "{auth}");
        }
        let mut wrong = headers(&[host]);
        wrong.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 0123456789abcdeX"),
        );
        assert!(guarded.check(&wrong, "/metrics").is_err());
        // Same-origin pages of a served-beyond-loopback sbmon pass; other sites do not.
        assert_eq!(
            status(&guarded, &[host, ("origin", "http://evil.com")], LIVENESS),
            403
        );
        assert_eq!(
            status(
                &guarded,
                &[host, ("origin", "https://sbmon.example:9405")],
                LIVENESS
            ),
            200
        );
    }
}
