//! Per-request routing, pure: host and path in, route and rewritten path out.

use crate::route::{Backend, Glob, strip_port};

/// One HTTP route, as the HTTP layer sees it.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub name: String,
    pub host: Option<Glob>,
    /// Normalised: starts with `/`, no trailing `/` (so `/` itself is "").
    pub path_prefix: Option<String>,
    pub strip_prefix: bool,
    pub backend: Backend,
    /// A PROXY protocol header opens each connection to the backend.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Each connection to the backend comes from the client's address.
    pub transparent: bool,
}

/// Normalises a configured prefix: `/embedding-model/` and
/// `/embedding-model` mean the same, a whole path segment.
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

impl HttpRoute {
    /// Whether this route takes a request for `host` (port ignored) and
    /// `path` (without the query).
    pub fn accepts(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(glob) => host.is_some_and(|h| glob.matches(strip_port(h))),
        };
        host_ok && self.path_prefix.as_deref().is_none_or(|p| under(path, p))
    }

    /// The path and query to send to the backend: with `strip_prefix`, the
    /// prefix comes off and the rest keeps its leading `/` (Caddy's
    /// `handle_path`); the query string always stays.
    pub fn rewrite(&self, path_and_query: &str) -> String {
        let Some(prefix) = self.path_prefix.as_deref().filter(|_| self.strip_prefix) else {
            return path_and_query.to_string();
        };
        let rest = path_and_query
            .strip_prefix(prefix)
            .unwrap_or(path_and_query);
        if rest.is_empty() || rest.starts_with('?') {
            format!("/{rest}")
        } else {
            rest.to_string()
        }
    }
}

/// `path` is `prefix` itself or lies below it, at a segment boundary
/// (`/embed` does not take `/embedding`).
fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The index of the first route, in file order, that takes the request.
pub fn route_for(routes: &[HttpRoute], host: Option<&str>, path: &str) -> Option<usize> {
    routes.iter().position(|r| r.accepts(host, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, prefix: Option<&str>, strip: bool) -> HttpRoute {
        HttpRoute {
            name: name.into(),
            host: host.map(Glob::new),
            path_prefix: prefix.map(normalize_prefix),
            strip_prefix: strip,
            backend: Backend::parse("127.0.0.1:1").unwrap(),
            proxy_protocol: None,
            transparent: false,
        }
    }

    #[test]
    fn the_caddyfile_example_routes_and_strips_like_handle_path() {
        let routes = [
            route("embed", None, Some("/embedding-model/"), true),
            route("llm", None, None, false),
        ];
        let r =
            &routes[route_for(&routes, Some("box:2222"), "/embedding-model/v1/models").unwrap()];
        assert_eq!(r.name, "embed");
        assert_eq!(
            r.rewrite("/embedding-model/v1/models?x=1&y=2"),
            "/v1/models?x=1&y=2"
        );
        assert_eq!(r.rewrite("/embedding-model"), "/");
        assert_eq!(r.rewrite("/embedding-model?q"), "/?q");
        let r = &routes[route_for(&routes, Some("box"), "/v1/models").unwrap()];
        assert_eq!(r.name, "llm");
        assert_eq!(r.rewrite("/v1/models?x=1"), "/v1/models?x=1");
        // A segment boundary, not a string prefix.
        assert_eq!(
            routes[route_for(&routes, None, "/embedding-models/x").unwrap()].name,
            "llm"
        );
    }

    #[test]
    fn without_strip_the_path_is_kept() {
        let r = route("api", None, Some("/api"), false);
        assert!(r.accepts(None, "/api/v1"));
        assert!(r.accepts(None, "/api"));
        assert_eq!(r.rewrite("/api/v1?a"), "/api/v1?a");
    }

    #[test]
    fn host_globs_ignore_the_port_and_case() {
        let routes = [
            route("embed", Some("embed.*"), None, false),
            route("rest", None, None, false),
        ];
        assert_eq!(
            routes[route_for(&routes, Some("EMBED.example.com:2222"), "/").unwrap()].name,
            "embed"
        );
        assert_eq!(
            routes[route_for(&routes, Some("llm.example.com"), "/").unwrap()].name,
            "rest"
        );
        assert_eq!(routes[route_for(&routes, None, "/").unwrap()].name, "rest");
    }

    #[test]
    fn no_route_is_none() {
        let routes = [route("only", Some("a.com"), Some("/x"), false)];
        assert!(route_for(&routes, Some("a.com"), "/y").is_none());
        assert!(route_for(&routes, Some("b.com"), "/x").is_none());
    }
}
