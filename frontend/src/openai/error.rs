//! The error a client sees, in vLLM's shape: an HTTP status and the body vLLM's OpenAI server
//! writes (`{"error":{"message":..,"type":..,"param":..,"code":..}}`), or, once a stream has
//! begun, the in-band `data:` event vLLM sends instead (written by Python's `json.dumps`).

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    pub status: u16,
    pub message: String,
    /// `BadRequestError`, `NotFoundError`, `InternalServerError`, ...
    pub kind: &'static str,
    pub param: Option<String>,
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.kind, self.status, self.message)
    }
}

impl std::error::Error for OpenAiError {}

impl OpenAiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "BadRequestError",
            param: None,
        }
    }

    /// vLLM's `VLLMValidationError`: the message ends with `(parameter=.., value=..)` and
    /// `param` names the field.
    pub fn validation(
        message: impl Into<String>,
        param: &str,
        value: impl std::fmt::Display,
    ) -> Self {
        Self {
            status: 400,
            message: format!("{} (parameter={param}, value={value})", message.into()),
            kind: "BadRequestError",
            param: Some(param.to_string()),
        }
    }

    /// A `VLLMValidationError` without a value: `(parameter=..)`.
    pub fn validation_param(message: impl Into<String>, param: &str) -> Self {
        Self {
            status: 400,
            message: format!("{} (parameter={param})", message.into()),
            kind: "BadRequestError",
            param: Some(param.to_string()),
        }
    }

    /// What vLLM's request schema (pydantic) refuses: a malformed body or a field of the
    /// wrong type or missing. vLLM answers these with type `Bad Request` and `param`
    /// `body.<field>` (`body.<offset>` for JSON that does not parse).
    pub fn schema(loc: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: 400,
            message: format!("1 validation error: body.{loc}: {message}"),
            kind: "Bad Request",
            param: Some(format!("body.{loc}")),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "InternalServerError",
            param: None,
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// The response body vLLM writes with the status (pydantic's compact JSON).
    pub fn write_body(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: u16,
        }
        serde_json::to_writer(
            &mut *out,
            &Body {
                error: Inner {
                    message: &self.message,
                    kind: self.kind,
                    param: self.param.as_deref(),
                    code: self.status,
                },
            },
        )
        .expect("writing to a Vec");
    }

    /// The body as a `Vec`.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_body(&mut out);
        out
    }

    /// The SSE event vLLM sends for an error after a stream has begun
    /// (`create_streaming_error_response`: `json.dumps`, so `", "`/`": "` and ASCII only).
    pub fn write_event(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: {\"error\": {\"message\": ");
        write_py_str(&self.message, out);
        out.extend_from_slice(b", \"type\": ");
        write_py_str(self.kind, out);
        out.extend_from_slice(b", \"param\": ");
        match &self.param {
            Some(p) => write_py_str(p, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b", \"code\": ");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.extend_from_slice(b"}}\n\n");
    }
}

/// A string as Python's `json.dumps` writes it (`ensure_ascii=True`).
fn write_py_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

/// A float as Python's `repr` writes it (`-1.0`, `0.5`, `1e-05` aside).
pub(crate) fn py_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_vllms() {
        let e = OpenAiError::validation(
            "temperature must be non-negative, got -1.0.",
            "temperature",
            "-1.0",
        );
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)","type":"BadRequestError","param":"temperature","code":400}}"#
        );
        let e = OpenAiError::bad_request("n must be 1 when using greedy sampling, got 2.");
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"n must be 1 when using greedy sampling, got 2.","type":"BadRequestError","param":null,"code":400}}"#
        );
    }

    #[test]
    fn the_in_band_event_is_pythons_json_dumps() {
        let e = OpenAiError::internal("Internal \"server\" error é");
        let mut out = Vec::new();
        e.write_event(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"error\": {\"message\": \"Internal \\\"server\\\" error \\u00e9\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\n"
        );
    }

    #[test]
    fn floats_print_as_python_does() {
        assert_eq!(py_float(-1.0), "-1.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(2.5), "2.5");
    }
}
