//! The web console's files, embedded in the binary: the HTTP server asks
//! [`asset`] for a request path and serves the bytes with the content type
//! given. Plain HTML, CSS and ES modules (no build step, nothing fetched from
//! another origin), so what is in `shards/console/` is exactly what is served.

/// Content type of the page.
const HTML: &str = "text/html; charset=utf-8";
/// Content type of the ES modules.
const JS: &str = "text/javascript; charset=utf-8";
/// Content type of the style sheet.
const CSS: &str = "text/css; charset=utf-8";

/// Every file of the console: request path, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("/index.html", HTML, include_bytes!("../console/index.html")),
    ("/style.css", CSS, include_bytes!("../console/style.css")),
    ("/app.js", JS, include_bytes!("../console/app.js")),
    ("/api.js", JS, include_bytes!("../console/api.js")),
    ("/live.js", JS, include_bytes!("../console/live.js")),
    ("/dom.js", JS, include_bytes!("../console/dom.js")),
    ("/stats.js", JS, include_bytes!("../console/stats.js")),
    ("/signin.js", JS, include_bytes!("../console/signin.js")),
    ("/fleet.js", JS, include_bytes!("../console/fleet.js")),
    ("/device.js", JS, include_bytes!("../console/device.js")),
    ("/alarms.js", JS, include_bytes!("../console/alarms.js")),
    (
        "/notifications.js",
        JS,
        include_bytes!("../console/notifications.js"),
    ),
    ("/chart.js", JS, include_bytes!("../console/chart.js")),
];

/// The `Content-Security-Policy` the console works under: everything from the
/// relay itself (the API with `fetch`, the live link on `/ws`), nothing inline
/// and nothing from elsewhere. Send it with every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The console file for a request path (`/` is the page itself), with its
/// content type, or `None` when there is no such file. A query string or
/// fragment on the path is ignored.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ct, bytes)| (*ct, *bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        let (_, bytes) = asset(path).unwrap_or_else(|| panic!("{path} is served"));
        std::str::from_utf8(bytes).expect("assets are UTF-8")
    }

    #[test]
    fn root_is_the_page() {
        let (ct, bytes) = asset("/").expect("/ is served");
        assert_eq!(ct, HTML);
        assert_eq!(Some((ct, bytes)), asset("/index.html"));
        assert!(text("/").starts_with("<!doctype html>"));
        assert_eq!(asset("/?x=1"), asset("/"));
    }

    #[test]
    fn types_follow_the_extension() {
        assert_eq!(asset("/app.js").map(|a| a.0), Some(JS));
        assert_eq!(asset("/style.css").map(|a| a.0), Some(CSS));
        for (path, ct, _) in ASSETS {
            let want = match path.rsplit('.').next() {
                Some("html") => HTML,
                Some("js") => JS,
                Some("css") => CSS,
                other => panic!("unexpected extension {other:?}"),
            };
            assert_eq!(*ct, want, "{path}");
        }
    }

    #[test]
    fn unknown_paths_are_none() {
        for p in [
            "",
            "/nope.js",
            "/../Cargo.toml",
            "/api/v1/stats",
            "/ws",
            "app.js",
            "/APP.JS",
        ] {
            assert_eq!(asset(p), None, "{p}");
        }
    }

    /// Paths a file refers to with `from "./x.js"`, `src="x"` or `href="x"`.
    fn references(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        for pat in ["from \"./", "src=\"", "href=\""] {
            for (i, _) in src.match_indices(pat) {
                let rest = &src[i + pat.len()..];
                let end = rest.find('"').expect("closing quote");
                out.push(rest[..end].to_string());
            }
        }
        out
    }

    /// Every module import, script and style sheet the page loads is embedded,
    /// so the page never asks the relay for a file it does not have.
    #[test]
    fn every_reference_is_served() {
        let mut checked = 0;
        for (path, _, _) in ASSETS {
            if path.ends_with(".css") {
                continue;
            }
            for r in references(text(path)) {
                if r.starts_with('#') || r.starts_with("data:") {
                    continue;
                }
                assert!(!r.contains("//"), "{path} loads {r} from another origin");
                let p = format!("/{}", r.trim_start_matches("./"));
                assert!(
                    asset(&p).is_some(),
                    "{path} refers to {r}, which is not embedded"
                );
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} references found");
    }

    /// Every file of the console folder is embedded (a new module cannot be
    /// forgotten), and nothing else is.
    #[test]
    fn the_folder_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("console folder")
            .map(|e| format!("/{}", e.expect("entry").file_name().to_string_lossy()))
            .collect();
        files.sort();
        let mut served: Vec<String> = ASSETS.iter().map(|a| a.0.to_string()).collect();
        served.sort();
        assert_eq!(files, served);
    }

    /// Device data is shown as text: the page never parses strings as HTML.
    #[test]
    fn no_html_sinks() {
        for (path, _, _) in ASSETS.iter().filter(|a| a.0.ends_with(".js")) {
            let src = text(path);
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
            ] {
                assert!(!src.contains(sink), "{path} uses {sink}");
            }
        }
    }

    /// The token lives in sessionStorage only.
    #[test]
    fn token_is_not_persisted() {
        for (path, _, _) in ASSETS.iter().filter(|a| a.0.ends_with(".js")) {
            assert!(
                !text(path).contains("localStorage"),
                "{path} uses localStorage"
            );
            assert!(
                !text(path).contains("document.cookie"),
                "{path} uses cookies"
            );
        }
        assert!(text("/app.js").contains("sessionStorage"));
    }
}
