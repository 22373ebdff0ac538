//! HTTP/1.x: a request line and its header section (RFC 9112 §3, §5).
//!
//! Parsed by hand, one byte at a time, so that the first byte that cannot
//! continue the grammar settles `NoMatch`: binary protocols fail on their
//! first byte, `SSH-2.0` at the digit, the HTTP/2 preface at `2.0`.
//!
//! Deliberately narrower than what servers accept, since a router must not
//! take other protocols' bytes for HTTP:
//! - the method is 1..=20 of `A-Z`, `_`, `-` (every registered method fits;
//!   lowercase is not HTTP, methods are case-sensitive);
//! - the target is 1..=8 KiB of visible ASCII; it is reported as sent, so an
//!   absolute-form target (`http://host/path`, sent to proxies) or an
//!   authority-form one (`CONNECT host:443`) lands in `path` whole;
//! - only `HTTP/1.0` and `HTTP/1.1`;
//! - lines end in CRLF or a bare LF (RFC 9112 §2.2 lets a recipient accept
//!   the latter); a CR anywhere else is a `NoMatch`;
//! - header names are tokens with no space before the colon, header values
//!   hold no control character but HTAB, and a folded line (leading
//!   whitespace, obsolete) is a `NoMatch`.
//!
//! `host` is the value of the first complete `Host` line, trimmed of spaces
//! and tabs but otherwise as sent: not lowercased, port included, lossily
//! decoded. An empty value gives `None`. The Host header is all that is
//! looked at, even when the target is in absolute form.

use super::{Cursor, Probe, Stop};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpInfo {
    pub method: String,
    pub path: String,
    /// The minor version: 0 or 1.
    pub version: u8,
    pub host: Option<String>,
}

const MAX_METHOD_LEN: usize = 20;
const MAX_TARGET_LEN: usize = 8 * 1024;

/// Matches once the header section is complete; with `last`, already once the
/// request line is, reporting only the Host line if it arrived whole.
pub fn probe(buf: &[u8], last: bool) -> Probe<HttpInfo> {
    let mut c = Cursor::open(buf);
    let (method, target, version) = match request_line(&mut c) {
        Ok(line) => line,
        Err(Stop::Short) if last => return Probe::NoMatch,
        Err(stop) => return Err(stop).into(),
    };
    let mut host = None;
    match headers(&mut c, &mut host) {
        Ok(()) => {}
        Err(Stop::Short) if last => {}
        Err(stop) => return Err(stop).into(),
    }
    Probe::Match(HttpInfo {
        method: text(method),
        path: text(target),
        version,
        host: host
            .map(<[u8]>::trim_ascii)
            .filter(|h| !h.is_empty())
            .map(text),
    })
}

/// Whether `buf` starts with a complete, valid request line: the client
/// speaks HTTP, even if what follows is malformed (it then deserves a 400
/// rather than a silent close).
pub fn has_request_line(buf: &[u8]) -> bool {
    request_line(&mut Cursor::open(buf)).is_ok()
}

fn request_line<'a>(c: &mut Cursor<'a>) -> Result<(&'a [u8], &'a [u8], u8), Stop> {
    let method = c.token(MAX_METHOD_LEN, |b| b == b' ', is_method_char)?;
    if method.is_empty() {
        return Err(Stop::Bad);
    }
    c.skip(1)?;
    let target = c.token(MAX_TARGET_LEN, |b| b == b' ', |b| b.is_ascii_graphic())?;
    if target.is_empty() {
        return Err(Stop::Bad);
    }
    c.skip(1)?;
    c.literal(b"HTTP/1.")?;
    let version = match c.u8()? {
        b'0' => 0,
        b'1' => 1,
        _ => return Err(Stop::Bad),
    };
    end_of_line(c)?;
    Ok((method, target, version))
}

/// Reads header lines through the empty line that ends them, keeping the
/// first Host value in `host` once its line is complete (so that a caller
/// cut short by `last` still has it).
fn headers<'a>(c: &mut Cursor<'a>, host: &mut Option<&'a [u8]>) -> Result<(), Stop> {
    loop {
        if matches!(c.peek()?, b'\r' | b'\n') {
            return end_of_line(c);
        }
        let name = c.token(usize::MAX, |b| b == b':', is_token_char)?;
        if name.is_empty() {
            return Err(Stop::Bad);
        }
        c.skip(1)?;
        let value = c.token(usize::MAX, |b| b == b'\r' || b == b'\n', is_value_char)?;
        end_of_line(c)?;
        if host.is_none() && name.eq_ignore_ascii_case(b"host") {
            *host = Some(value);
        }
    }
}

fn end_of_line(c: &mut Cursor) -> Result<(), Stop> {
    match c.u8()? {
        b'\n' => Ok(()),
        b'\r' if c.u8()? == b'\n' => Ok(()),
        _ => Err(Stop::Bad),
    }
}

fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'_' || b == b'-'
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field value bytes (RFC 9110 §5.5): visible ASCII, space, tab, obs-text.
fn is_value_char(b: u8) -> bool {
    matches!(b, b'\t' | b' '..=b'~' | 0x80..=0xff)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::h2c::PREFACE;
    use crate::classify::testutil::{SSH_BANNER, assert_byte_by_byte};

    fn open(buf: &[u8]) -> Probe<HttpInfo> {
        probe(buf, false)
    }

    fn info(method: &str, path: &str, version: u8, host: Option<&str>) -> Probe<HttpInfo> {
        Probe::Match(HttpInfo {
            method: method.into(),
            path: path.into(),
            version,
            host: host.map(String::from),
        })
    }

    #[test]
    fn common_methods_byte_by_byte() {
        for method in [
            "GET",
            "HEAD",
            "POST",
            "PUT",
            "DELETE",
            "OPTIONS",
            "TRACE",
            "PATCH",
            "PROPFIND",
            "MKCOL",
            "VERSION-CONTROL",
            "BASELINE_CONTROL",
        ] {
            let request = format!("{method} /x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n");
            let expected = info(method, "/x?y=1", 1, Some("example.com"));
            assert_byte_by_byte(open, request.as_bytes(), expected);
        }
    }

    #[test]
    fn options_asterisk() {
        let request = b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n";
        assert_byte_by_byte(open, request, info("OPTIONS", "*", 1, Some("example.com")));
    }

    #[test]
    fn connect_to_an_authority() {
        let request = b"CONNECT host:22 HTTP/1.1\r\nHost: host:22\r\n\r\n";
        assert_byte_by_byte(
            open,
            request,
            info("CONNECT", "host:22", 1, Some("host:22")),
        );
    }

    #[test]
    fn absolute_form_target_is_reported_as_sent() {
        let request = b"GET http://example.com/a/b HTTP/1.1\r\nHost: example.com\r\n\r\n";
        let expected = info("GET", "http://example.com/a/b", 1, Some("example.com"));
        assert_byte_by_byte(open, request, expected);
    }

    #[test]
    fn http_1_0_without_host() {
        assert_byte_by_byte(open, b"GET / HTTP/1.0\r\n\r\n", info("GET", "/", 0, None));
        let request = b"GET /index.html HTTP/1.0\r\nUser-Agent: Wget/1.21\r\n\r\n";
        assert_byte_by_byte(open, request, info("GET", "/index.html", 0, None));
    }

    #[test]
    fn host_keeps_its_port_and_case_but_not_its_padding() {
        let request = b"GET / HTTP/1.1\r\nhOsT: \t Example.COM:8080 \t\r\n\r\n";
        assert_byte_by_byte(open, request, info("GET", "/", 1, Some("Example.COM:8080")));
        let request = b"GET / HTTP/1.1\r\nHost:[::1]:443\r\n\r\n";
        assert_eq!(open(request), info("GET", "/", 1, Some("[::1]:443")));
    }

    #[test]
    fn first_host_wins_and_empty_is_none() {
        let request = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n";
        assert_eq!(open(request), info("GET", "/", 1, Some("a.example")));
        let request = b"GET / HTTP/1.1\r\nHost:  \r\n\r\n";
        assert_eq!(open(request), info("GET", "/", 1, None));
    }

    #[test]
    fn headers_arriving_slowly() {
        let request = b"GET /slow HTTP/1.1\r\n\
            User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\
            Accept: text/html,*/*;q=0.8\r\n\
            Accept-Language: en-US,en;q=0.5\r\n\
            Cookie: a=1; b=\"\xc3\xa9\"\r\n\
            Host: slow.example\r\n\
            Connection: keep-alive\r\n\
            \r\n";
        assert_byte_by_byte(open, request, info("GET", "/slow", 1, Some("slow.example")));
    }

    #[test]
    fn bare_lf_line_endings() {
        let request = b"GET / HTTP/1.1\nHost: lf.example\n\n";
        assert_byte_by_byte(open, request, info("GET", "/", 1, Some("lf.example")));
    }

    #[test]
    fn body_after_the_headers_is_not_looked_at() {
        let request =
            b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n\x00\x01\x02\x03\x04";
        assert_eq!(open(request), info("POST", "/form", 1, Some("a")));
    }

    #[test]
    fn last_with_incomplete_headers() {
        let cases = [
            (&b"GET / HTTP/1.1\r\n"[..], None),
            (b"GET / HTTP/1.1\r\nHo", None),
            (b"GET / HTTP/1.1\r\nHost: a.example", None),
            (b"GET / HTTP/1.1\r\nHost: a.example\r", None),
            (b"GET / HTTP/1.1\r\nHost: a.example\r\n", Some("a.example")),
            (
                b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */",
                Some("a.example"),
            ),
        ];
        for (request, host) in cases {
            assert_eq!(open(request), Probe::NeedMore);
            assert_eq!(
                probe(request, true),
                info("GET", "/", 1, host),
                "{request:?}"
            );
        }
    }

    #[test]
    fn last_with_incomplete_request_line() {
        for request in [&b""[..], b"GET", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r"] {
            assert_eq!(open(request), Probe::NeedMore);
            assert_eq!(probe(request, true), Probe::NoMatch);
        }
    }

    #[test]
    fn target_length() {
        let longest = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET_LEN - 1));
        assert!(matches!(open(longest.as_bytes()), Probe::Match(_)));
        let too_long = format!("GET /{}", "a".repeat(MAX_TARGET_LEN));
        assert_eq!(
            open(&too_long.as_bytes()[..too_long.len() - 1]),
            Probe::NeedMore
        );
        assert_eq!(
            open(too_long.as_bytes()),
            Probe::NoMatch,
            "rejected at the first byte too many"
        );
    }

    #[test]
    fn method_checks() {
        assert_eq!(open(b"g"), Probe::NoMatch, "lowercase");
        assert_eq!(open(b"Get / HTTP/1.1\r\n\r\n"), Probe::NoMatch);
        assert_eq!(open(b" GET"), Probe::NoMatch, "empty method");
        assert_eq!(
            open(b"\r\nGET / HTTP/1.1\r\n\r\n"),
            Probe::NoMatch,
            "leading empty line"
        );
        let longest = "A".repeat(MAX_METHOD_LEN);
        assert_eq!(open(longest.as_bytes()), Probe::NeedMore);
        assert_eq!(open(format!("{longest}A").as_bytes()), Probe::NoMatch);
    }

    #[test]
    fn other_protocols_fail_early() {
        assert_eq!(open(SSH_BANNER), Probe::NoMatch);
        assert_eq!(open(b"SSH-"), Probe::NeedMore);
        assert_eq!(open(b"SSH-2"), Probe::NoMatch);
        assert_eq!(open(PREFACE), Probe::NoMatch);
        assert_eq!(open(b"PRI * HTTP/2"), Probe::NoMatch);
        assert_eq!(open(&[0x16, 3, 1]), Probe::NoMatch);
        assert_eq!(open(&[5, 1, 0]), Probe::NoMatch);
    }

    #[test]
    fn request_line_checks() {
        for request in [
            &b"GET  / HTTP/1.1\r\n"[..],
            b"GET /\r\n",
            b"GET / HTTP/1.2\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / http/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTP/1.1\rX",
            b"GET /\x7f HTTP/1.1\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n",
            b"GET\t/ HTTP/1.1\r\n",
        ] {
            assert_eq!(
                open(request),
                Probe::NoMatch,
                "{:?}",
                request.escape_ascii().to_string()
            );
            assert_eq!(probe(request, true), Probe::NoMatch);
        }
    }

    #[test]
    fn header_garbage() {
        for headers in [
            &b"no colon\r\n"[..],
            b"nocolon\r\n",
            b"Host : a\r\n",
            b": empty name\r\n",
            b" folded: line\r\n",
            b"X-Ctl: a\x01b\r\n",
            b"X-Nul: \0\r\n",
            b"X-Cr: a\rb\r\n",
            b"\r\r\n",
            b"Host: a\r\n\x16\x03\x01",
        ] {
            let request = [&b"GET / HTTP/1.1\r\n"[..], headers].concat();
            let what = request.escape_ascii().to_string();
            assert_eq!(open(&request), Probe::NoMatch, "{what}");
            assert_eq!(probe(&request, true), Probe::NoMatch, "{what}");
        }
    }
}
