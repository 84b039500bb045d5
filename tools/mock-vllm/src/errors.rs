//! Error responses in vLLM's shapes: OpenAI-style `{"error":{message,type,param,code}}` from
//! the serving layer, and FastAPI's `{"detail":...}` for unknown paths and wrong methods.

use std::io::Write;

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::stream::MockBody;
use crate::wire::push_str;

pub(crate) fn application_json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// A response with a JSON body.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, application_json());
    resp
}

/// `{"error":{"message":..,"type":..,"param":..,"code":..}}`
pub(crate) fn error_body(message: &str, err_type: &str, param: Option<&str>, code: u16) -> Vec<u8> {
    let mut buf = Vec::with_capacity(96 + message.len());
    buf.extend_from_slice(b"{\"error\":{\"message\":");
    push_str(&mut buf, message);
    buf.extend_from_slice(b",\"type\":");
    push_str(&mut buf, err_type);
    buf.extend_from_slice(b",\"param\":");
    match param {
        Some(p) => push_str(&mut buf, p),
        None => buf.extend_from_slice(b"null"),
    }
    let _ = write!(buf, ",\"code\":{code}}}}}");
    buf
}

pub(crate) fn error(
    status: u16,
    message: &str,
    err_type: &str,
    param: Option<&str>,
) -> Response<MockBody> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(code, error_body(message, err_type, param, code.as_u16()))
}

/// The `type` vLLM puts on an error of this status (`create_error_response`).
pub(crate) fn type_for_status(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        404 => "NotFoundError",
        422 => "UnprocessableEntityError",
        500 => "InternalServerError",
        501 => "NotImplementedError",
        503 => "ServiceUnavailableError",
        // GracefulHTTPError: the status phrase.
        s => StatusCode::from_u16(s)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("InternalServerError"),
    }
}

/// An error injected by `fail_rate`, `x-mock-fail` or `x-mock-status`.
pub(crate) fn injected(status: u16) -> Response<MockBody> {
    let message = format!("mock-vllm injected failure (status {status})");
    error(status, &message, type_for_status(status), None)
}

/// vLLM 0.32's 404 for a model it does not serve.
pub(crate) fn unknown_model(requested: &str, served: &str) -> Response<MockBody> {
    let message = format!("The model `{requested}` does not exist. Valid aliases: {served}.");
    error(404, &message, "NotFoundError", Some("model"))
}

/// FastAPI request-validation failure as vLLM reshapes it (`type` "Bad Request").
pub(crate) fn validation(detail: &str, param: Option<&str>) -> Response<MockBody> {
    validation_errors(&[detail.to_string()], param)
}

/// Several at once: "N validation errors", one line each; `param` is the first's location.
pub(crate) fn validation_errors(details: &[String], param: Option<&str>) -> Response<MockBody> {
    let head = match details.len() {
        1 => "1 validation error".to_string(),
        n => format!("{n} validation errors"),
    };
    let mut message = format!("{head}:");
    for d in details {
        message.push_str("\n  ");
        message.push_str(d);
    }
    error(400, &message, "Bad Request", param)
}

/// Invalid JSON body: vLLM reports pydantic's `json_invalid` at a character offset (and
/// no body at all as a missing one).
pub(crate) fn invalid_json(e: &serde_json::Error, body: &[u8]) -> Response<MockBody> {
    if body.is_empty() {
        return validation(
            "{'type': 'missing', 'loc': 'body', 'msg': 'Field required', 'input': 'None'}",
            Some("body"),
        );
    }
    if !e.is_syntax() && !e.is_eof() {
        // Well-formed JSON of the wrong shape (e.g. a string where a number belongs).
        let msg = e.to_string().replace('\'', "\"");
        let detail =
            format!("{{'type': 'value_error', 'loc': 'body', 'msg': '{msg}', 'input': '<body>'}}");
        return validation(&detail, Some("body"));
    }
    let (cause, offset) = python_json_error(e, body);
    let loc = format!("body.{offset}");
    // Python quotes a message holding a single quote with double quotes.
    let cause = if cause.contains('\'') {
        format!("\"{cause}\"")
    } else {
        format!("'{cause}'")
    };
    let detail = format!(
        "{{'type': 'json_invalid', 'loc': '{loc}', 'msg': 'JSON decode error', \
         'input': '<dict of 0 items>', 'ctx': {{'error': {cause}}}}}"
    );
    validation(&detail, Some(&loc))
}

/// serde_json's syntax error as Python's `json` module words it (vLLM decodes bodies with
/// it), and the character offset Python gives: where the bad token starts (serde points at
/// the character after it, except at the end of the input).
fn python_json_error(e: &serde_json::Error, body: &[u8]) -> (String, usize) {
    let msg = e.to_string();
    let end = offset_of(body, e.line(), e.column());
    let at = if e.is_eof() {
        end
    } else {
        end.saturating_sub(1)
    };
    let cause = msg.split(" at line").next().unwrap_or("");
    let python = if cause.starts_with("EOF while parsing a string") {
        // Python points at the opening quote.
        let open = body[..at.min(body.len())]
            .iter()
            .rposition(|&b| b == b'"')
            .unwrap_or(0);
        return ("Unterminated string starting at".to_string(), open);
    } else if cause.starts_with("EOF while parsing an object")
        || cause == "key must be a string"
        || cause.starts_with("trailing comma")
    {
        "Expecting property name enclosed in double quotes"
    } else if cause == "expected `:`" {
        "Expecting ':' delimiter"
    } else if cause.starts_with("expected `,` or") {
        "Expecting ',' delimiter"
    } else if cause == "trailing characters" {
        "Extra data"
    } else if cause.starts_with("EOF while parsing a list")
        && body[..at.min(body.len())]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b != b'[' && b != b',')
    {
        "Expecting ',' delimiter"
    } else if cause.starts_with("EOF while parsing") || cause.starts_with("expected value") {
        "Expecting value"
    } else {
        return (cause.replace('\'', "\""), at);
    };
    (python.to_string(), at)
}

fn offset_of(body: &[u8], line: usize, column: usize) -> usize {
    let line_start: usize = body
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    line_start + column
}

/// A required top-level field is absent (FastAPI's `missing` error).
pub(crate) fn missing_field(field: &str, body_keys: usize) -> Response<MockBody> {
    let loc = format!("body.{field}");
    let detail = format!(
        "{{'type': 'missing', 'loc': '{loc}', 'msg': 'Field required', \
         'input': '<dict of {body_keys} items>'}}"
    );
    validation(&detail, Some(&loc))
}

/// Request without `content-type: application/json`.
pub(crate) fn unsupported_media_type() -> Response<MockBody> {
    validation(
        "Unsupported Media Type: Only 'application/json' is allowed",
        None,
    )
}

/// FastAPI's `{"detail":"Not Found"}`.
pub(crate) fn not_found() -> Response<MockBody> {
    json(StatusCode::NOT_FOUND, &b"{\"detail\":\"Not Found\"}"[..])
}

/// FastAPI's 405 with the `allow` header.
pub(crate) fn method_not_allowed(allow: &'static str) -> Response<MockBody> {
    let mut resp = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &b"{\"detail\":\"Method Not Allowed\"}"[..],
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}
