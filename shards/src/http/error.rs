//! The router's own error answers, in the shape vLLM and OpenAI use:
//! `{"error":{"message":...,"type":...,"param":null,"code":N}}`.

use super::response::write_simple;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// The OpenAI error `type` for a status, as vLLM names them.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            405 => "MethodNotAllowedError",
            408 => "RequestTimeoutError",
            413 => "RequestEntityTooLargeError",
            429 => "RateLimitError",
            431 => "RequestHeaderFieldsTooLargeError",
            501 => "NotImplementedError",
            502 => "BadGatewayError",
            503 => "ServiceUnavailableError",
            504 => "GatewayTimeoutError",
            s if s >= 500 => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + self.message.len());
        b.extend_from_slice(b"{\"error\":{\"message\":");
        write_json_string(&mut b, &self.message);
        b.extend_from_slice(b",\"type\":\"");
        b.extend_from_slice(self.error_type().as_bytes());
        b.extend_from_slice(b"\",\"param\":null,\"code\":");
        b.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        b.extend_from_slice(b"}}");
        b
    }

    /// A whole HTTP/1.1 response carrying this error.
    pub fn write_response(&self, out: &mut Vec<u8>, request_id: Option<&[u8]>, close: bool) {
        let body = self.body();
        write_simple(
            out,
            self.status,
            "application/json",
            &body,
            request_id,
            close,
            false,
        );
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut tmp = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped_json() {
        let e = ApiError::new(413, "body of 10 bytes exceeds \"max\"\n");
        let body = e.body();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"message":"body of 10 bytes exceeds \"max\"\n","type":"RequestEntityTooLargeError","param":null,"code":413}}"#
        );
        let _: sonic_rs::Value = sonic_rs::from_slice(&body).expect("valid JSON");
    }
}
