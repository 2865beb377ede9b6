//! The API's HTTP/1.1: one request parsed from the front of a connection's buffer
//! (httparse for the head, `Content-Length` bodies only), routed to what it asks for,
//! and the bodies of the operations decoded (serde_json, unknown fields refused). Pure:
//! no I/O, so the fuzz target drives it on arbitrary bytes.

use serde::Deserialize;

use super::{Op, Response};

/// The largest request head accepted (431 beyond).
pub const MAX_HEAD: usize = 8 * 1024;
/// The largest body accepted (413 beyond, answered before the body is read).
pub const MAX_BODY: usize = 64 * 1024;
/// Headers per request.
const MAX_HEADERS: usize = 32;
/// The longest shutdown wait a client may ask for.
pub const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// Every path the API serves and its one method (api/openapi.yaml lists the same).
pub const ROUTES: &[(&str, &str)] = &[
    ("/api/v1/vm.info", "GET"),
    ("/api/v1/vm.counters", "GET"),
    ("/api/v1/vm.jobs", "GET"),
    ("/api/v1/vm.jobs.cancel", "PUT"),
    ("/api/v1/vm.pause", "PUT"),
    ("/api/v1/vm.resume", "PUT"),
    ("/api/v1/vm.power-button", "PUT"),
    ("/api/v1/vm.shutdown", "PUT"),
    ("/api/v1/vm.reboot", "PUT"),
    ("/api/v1/vm.snapshot", "PUT"),
    ("/metrics", "GET"),
];

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Info,
    Counters,
    Jobs,
    Metrics,
    /// An operation for the main loop.
    Op(Op),
    /// An answer known from the request alone (404, 405, a bad body); the connection
    /// stays usable.
    Respond(Response),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// One whole request: `consumed` bytes of the buffer; `close` when the client asked
    /// for the connection to end after the answer.
    Request {
        action: Action,
        consumed: usize,
        close: bool,
    },
    /// A request that cannot be framed or is too large: answer and close.
    Reject(Response),
}

/// Parses the request at the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        Ok(_) => {
            return Parsed::Reject(Response::error(
                431,
                &format!("request head: larger than {MAX_HEAD} bytes"),
            ))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(Response::error(
                431,
                &format!("request head: more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Parsed::Reject(Response::error(400, &format!("request head: {e}"))),
    };
    let (method, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
    // HTTP/1.0 closes unless asked to keep alive; 1.1 keeps alive unless asked to close.
    let mut close = req.version != Some(1);
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = match value.parse::<usize>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Parsed::Reject(Response::error(
                        400,
                        "content-length: not a decimal number",
                    ))
                }
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Reject(Response::error(
                    400,
                    "content-length: given twice with different values",
                ));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject(Response::error(
                501,
                "transfer-encoding: not supported (bodies carry a Content-Length)",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Parsed::Reject(Response::error(
            413,
            &format!("body: {length} bytes, more than {MAX_BODY}"),
        ));
    }
    let Some(body) = buf.get(head_len..head_len + length) else {
        return Parsed::Partial;
    };
    Parsed::Request {
        action: route(method, path, body),
        consumed: head_len + length,
        close,
    }
}

/// What `method path` with `body` asks for: an endpoint, or the error that says why
/// not (404 unknown path, 405 wrong method, 400 bad body).
pub fn route(method: &str, path: &str, body: &[u8]) -> Action {
    // No endpoint takes a query: it is ignored.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some((known, allowed)) = ROUTES.iter().find(|(p, _)| *p == path) else {
        let shown: String = path.chars().take(200).collect();
        return Action::Respond(Response::error(
            404,
            &format!("path: no endpoint {shown:?}"),
        ));
    };
    if method != *allowed {
        let shown: String = method.chars().take(20).collect();
        let mut r = Response::error(
            405,
            &format!("method: {shown} is not allowed on {known} (allowed: {allowed})"),
        );
        r.allow = Some(allowed);
        return Action::Respond(r);
    }
    action(known, body).unwrap_or_else(Action::Respond)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    incremental: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    id: u64,
}

/// A body error: `field: message` where the message names one.
fn body_error(e: serde_json::Error, field: Option<&str>) -> Response {
    let text = e.to_string();
    let message = match field {
        Some(f) if !text.starts_with("unknown field") && e.is_data() => format!("{f}: {text}"),
        _ => format!("body: {text}"),
    };
    Response::error(400, &message)
}

/// An empty body, or a JSON object with `T`'s fields.
fn decode<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    field: Option<&str>,
) -> Result<Option<T>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| body_error(e, None))?;
    if !value.is_object() {
        return Err(Response::error(400, "body: expected a JSON object"));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| body_error(e, field))
}

fn action(path: &str, body: &[u8]) -> Result<Action, Response> {
    let none = |body: &[u8]| decode::<NoFields>(body, None).map(|_| ());
    Ok(match path {
        "/api/v1/vm.info" => Action::Info,
        "/api/v1/vm.counters" => Action::Counters,
        "/api/v1/vm.jobs" => Action::Jobs,
        "/metrics" => Action::Metrics,
        "/api/v1/vm.pause" => none(body).map(|_| Action::Op(Op::Pause))?,
        "/api/v1/vm.resume" => none(body).map(|_| Action::Op(Op::Resume))?,
        "/api/v1/vm.power-button" => none(body).map(|_| Action::Op(Op::PowerButton))?,
        "/api/v1/vm.reboot" => none(body).map(|_| Action::Op(Op::Reboot))?,
        "/api/v1/vm.snapshot" => {
            let b = decode::<SnapshotBody>(body, Some("incremental"))?;
            Action::Op(Op::Snapshot {
                incremental: b.and_then(|b| b.incremental).unwrap_or(false),
            })
        }
        "/api/v1/vm.jobs.cancel" => match decode::<CancelBody>(body, Some("id"))? {
            Some(b) => Action::Op(Op::Cancel { job: b.id }),
            None => return Err(Response::error(400, "id: the job to cancel is required")),
        },
        "/api/v1/vm.shutdown" => {
            let b = decode::<ShutdownBody>(body, Some("timeout_ms"))?;
            let timeout_ms = b
                .and_then(|b| b.timeout_ms)
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS);
            if !(1..=MAX_SHUTDOWN_TIMEOUT_MS).contains(&timeout_ms) {
                return Err(Response::error(
                    400,
                    &format!("timeout_ms: {timeout_ms}: expected 1 to {MAX_SHUTDOWN_TIMEOUT_MS}"),
                ));
            }
            Action::Op(Op::Shutdown { timeout_ms })
        }
        other => {
            return Err(Response::error(
                404,
                &format!("path: no endpoint {other:?}"),
            ))
        }
    })
}
