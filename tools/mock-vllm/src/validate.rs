//! What vLLM 0.32 refuses in a completion or chat request, in the order it checks, with its
//! messages (seen on the real server: `tests/real_vllm/test_real_mock.py` holds the mock
//! against it):
//!
//! 1. `stream_options` without a truthy `stream` (a pydantic "before" validator: first);
//! 2. field types, pydantic's lax mode (`"5"` is an int, `"yes"` a bool, `2.0` an int; `1.5`
//!    is not): every error at once, "N validation errors", `type` "Bad Request", `param`
//!    the first error's location; chat's missing `messages` is one of them;
//! 3. (in the handler) a completion without a prompt, then an unknown model (404);
//! 4. `max_tokens` above max_model_len, a prompt longer than max_model_len (by the mock's
//!    estimate), then the sampling parameters: `n`, `temperature`, `top_p`, `max_tokens`,
//!    `logprobs`, and `n` > 1 with greedy sampling.

use hyper::Response;
use serde_json::Value;

use crate::errors;
use crate::stream::{Api, MockBody};

/// How vLLM's request models declare a field the mock checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Float,
    Bool,
}

/// The checked fields, in the order the request models declare them (pydantic reports
/// errors in that order).
const COMPLETION_FIELDS: &[(&str, Kind)] = &[
    ("logprobs", Kind::Int),
    ("max_tokens", Kind::Int),
    ("n", Kind::Int),
    ("stream", Kind::Bool),
    ("temperature", Kind::Float),
    ("top_p", Kind::Float),
];
const CHAT_FIELDS: &[(&str, Kind)] = &[
    ("logprobs", Kind::Bool),
    ("top_logprobs", Kind::Int),
    ("max_tokens", Kind::Int),
    ("max_completion_tokens", Kind::Int),
    ("n", Kind::Int),
    ("stream", Kind::Bool),
    ("temperature", Kind::Float),
    ("top_p", Kind::Float),
];

/// vLLM's most sample logprobs per token.
const MAX_LOGPROBS: i64 = 20;

type Refusal = Box<Response<MockBody>>;

/// Steps 1 and 2 on the parsed body; lax values are rewritten to their strict form (`"5"`
/// becomes 5) so that the typed request reads them.
pub(crate) fn check_fields(body: &mut Value, api: Api) -> Result<(), Refusal> {
    let Value::Object(map) = body else {
        return Ok(()); // not an object: the typed read reports it
    };
    let truthy_stream = map.get("stream").is_some_and(truthy);
    if map.get("stream_options").is_some_and(truthy) && !truthy_stream {
        return Err(Box::new(bad_request(
            "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
            Some("stream_options"),
        )));
    }
    let mut details = Vec::new();
    let mut first_loc = None;
    if api == Api::Chat && map.get("messages").is_none() {
        let loc = "body.messages".to_string();
        details.push(format!(
            "{{'type': 'missing', 'loc': '{loc}', 'msg': 'Field required', 'input': '<dict of {} items>'}}",
            map.len()
        ));
        first_loc.get_or_insert(loc);
    }
    let fields = match api {
        Api::Completion => COMPLETION_FIELDS,
        Api::Chat => CHAT_FIELDS,
    };
    for &(name, kind) in fields {
        let Some(v) = map.get(name) else { continue };
        match lax(kind, v) {
            Ok(Some(strict)) => {
                map.insert(name.to_string(), strict);
            }
            Ok(None) => {}
            Err((err_type, msg)) => {
                let loc = format!("body.{name}");
                details.push(format!(
                    "{{'type': '{err_type}', 'loc': '{loc}', 'msg': '{msg}', 'input': '{}'}}",
                    python_str(v)
                ));
                first_loc.get_or_insert(loc);
            }
        }
    }
    if details.is_empty() {
        Ok(())
    } else {
        Err(Box::new(errors::validation_errors(
            &details,
            first_loc.as_deref(),
        )))
    }
}

/// Python truthiness of a JSON value (what `data.get("stream")` means to vLLM).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// pydantic's lax reading of `v` as `kind`: `Ok(Some(strict))` when it must be rewritten,
/// `Ok(None)` when it is fine as it is, or the error type and message.
fn lax(kind: Kind, v: &Value) -> Result<Option<Value>, (&'static str, &'static str)> {
    if v.is_null() {
        return Ok(None);
    }
    match kind {
        Kind::Int => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(None),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Ok(Some(Value::from(f as i64)))
                } else {
                    Err((
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    ))
                }
            }
            Value::String(s) => match s.trim().parse::<i64>() {
                Ok(i) => Ok(Some(Value::from(i))),
                Err(_) => Err((
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                )),
            },
            Value::Bool(b) => Ok(Some(Value::from(*b as i64))),
            _ => Err(("int_type", "Input should be a valid integer")),
        },
        Kind::Float => match v {
            Value::Number(_) => Ok(None),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Some(Value::from(f))),
                _ => Err((
                    "float_parsing",
                    "Input should be a valid number, unable to parse string as a number",
                )),
            },
            Value::Bool(b) => Ok(Some(Value::from(*b as i64 as f64))),
            _ => Err(("float_type", "Input should be a valid number")),
        },
        Kind::Bool => match v {
            Value::Bool(_) => Ok(None),
            Value::Number(n) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
                Ok(Some(Value::Bool(n.as_i64() == Some(1))))
            }
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "1" | "on" | "t" | "true" | "y" | "yes" => Ok(Some(Value::Bool(true))),
                "0" | "off" | "f" | "false" | "n" | "no" => Ok(Some(Value::Bool(false))),
                _ => Err((
                    "bool_parsing",
                    "Input should be a valid boolean, unable to interpret input",
                )),
            },
            Value::Number(_) => Err((
                "bool_parsing",
                "Input should be a valid boolean, unable to interpret input",
            )),
            _ => Err(("bool_type", "Input should be a valid boolean")),
        },
    }
}

/// How vLLM prints a bad input in a validation message (the value as text).
fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The numbers of step 4, as the typed request read them.
pub(crate) struct Limits {
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Sample logprobs asked for (completions' `logprobs`, chat's `top_logprobs`).
    pub logprobs: Option<i64>,
}

/// Step 4. `prompts`: the mock's token estimate of each prompt.
pub(crate) fn check_limits(
    limits: &Limits,
    prompts: &[usize],
    max_model_len: usize,
) -> Result<(), Refusal> {
    if let Some(m) = limits.max_tokens {
        if m > max_model_len as i64 {
            return Err(Box::new(bad_request(
                &format!(
                    "max_tokens={m} cannot be greater than max_model_len={max_model_len}. Please \
                     request fewer output tokens. (parameter=max_tokens, value={m})"
                ),
                Some("max_tokens"),
            )));
        }
    }
    if prompts.iter().any(|&p| p > max_model_len) {
        // vLLM stops counting one token past the limit.
        let at_least = max_model_len + 1;
        return Err(Box::new(bad_request(
            &format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 prompt contains at least {at_least} input tokens, which exceeds this limit even \
                 without any output tokens. Please reduce the length of the input prompt. \
                 (parameter=input_tokens, value={at_least})"
            ),
            Some("input_tokens"),
        )));
    }
    if let Some(n) = limits.n {
        if n < 1 {
            return Err(Box::new(bad_request(
                &format!("n must be at least 1, got {n}."),
                None,
            )));
        }
    }
    if let Some(t) = limits.temperature {
        if t < 0.0 {
            let t = py_float(t);
            return Err(Box::new(bad_request(
                &format!(
                    "temperature must be non-negative, got {t}. (parameter=temperature, value={t})"
                ),
                Some("temperature"),
            )));
        }
    }
    if let Some(p) = limits.top_p {
        if !(p > 0.0 && p <= 1.0) {
            let p = py_float(p);
            return Err(Box::new(bad_request(
                &format!("top_p must be in (0, 1], got {p}. (parameter=top_p, value={p})"),
                Some("top_p"),
            )));
        }
    }
    if let Some(m) = limits.max_tokens {
        if m < 1 {
            return Err(Box::new(bad_request(
                &format!(
                    "max_tokens must be at least 1, got {m}. (parameter=max_tokens, value={m})"
                ),
                Some("max_tokens"),
            )));
        }
    }
    if let Some(l) = limits.logprobs {
        if l > MAX_LOGPROBS {
            return Err(Box::new(bad_request(
                &format!(
                    "Requested sample logprobs of {l}, which is greater than max allowed: \
                     {MAX_LOGPROBS} (parameter=logprobs, value={l})"
                ),
                Some("logprobs"),
            )));
        }
    }
    // Several samples of a greedy (temperature 0) request would all be the same.
    if let (Some(n), Some(t)) = (limits.n, limits.temperature) {
        if n > 1 && t < 1e-5 {
            return Err(Box::new(bad_request(
                &format!("n must be 1 when using greedy sampling, got {n}."),
                None,
            )));
        }
    }
    Ok(())
}

/// Python's `repr` of a float: always a decimal point.
fn py_float(x: f64) -> String {
    format!("{x:?}")
}

fn bad_request(message: &str, param: Option<&str>) -> Response<MockBody> {
    errors::error(400, message, "BadRequestError", param)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lax_types_as_pydantic_reads_them() {
        assert_eq!(lax(Kind::Int, &json!("5")), Ok(Some(json!(5))));
        assert_eq!(lax(Kind::Int, &json!(2.0)), Ok(Some(json!(2))));
        assert_eq!(lax(Kind::Int, &json!(-1)), Ok(None));
        assert_eq!(lax(Kind::Int, &json!(1.5)).unwrap_err().0, "int_from_float");
        assert_eq!(lax(Kind::Int, &json!("many")).unwrap_err().0, "int_parsing");
        assert_eq!(lax(Kind::Float, &json!("0.5")), Ok(Some(json!(0.5))));
        assert_eq!(
            lax(Kind::Float, &json!("hot")).unwrap_err().0,
            "float_parsing"
        );
        assert_eq!(lax(Kind::Bool, &json!("yes")), Ok(Some(json!(true))));
        assert_eq!(lax(Kind::Bool, &json!(0)), Ok(Some(json!(false))));
        assert_eq!(lax(Kind::Bool, &json!(2)).unwrap_err().0, "bool_parsing");
        assert_eq!(
            lax(Kind::Bool, &json!("maybe")).unwrap_err().0,
            "bool_parsing"
        );
        assert_eq!(lax(Kind::Bool, &json!(null)), Ok(None));
    }

    #[test]
    fn every_type_error_at_once_param_is_the_first() {
        let mut body = json!({"model": "m", "max_tokens": "many", "n": "a"});
        let resp = check_fields(&mut body, Api::Chat).unwrap_err();
        assert_eq!(resp.status(), 400);
        let mut body = json!({"prompt": "x", "max_tokens": "7", "stream": "yes", "stream_options": {"include_usage": true}});
        assert!(check_fields(&mut body, Api::Completion).is_ok());
        assert_eq!(body["max_tokens"], json!(7));
        assert_eq!(body["stream"], json!(true));
        let mut body =
            json!({"prompt": "x", "stream_options": {"include_usage": true}, "max_tokens": "many"});
        assert_eq!(
            check_fields(&mut body, Api::Completion)
                .unwrap_err()
                .status(),
            400,
            "stream_options first"
        );
    }

    #[test]
    fn limits_in_vllms_order() {
        let l = Limits {
            max_tokens: Some(-1),
            n: Some(0),
            temperature: Some(-1.0),
            top_p: Some(0.0),
            logprobs: Some(50),
        };
        assert!(check_limits(&l, &[3], 8192).is_err());
        let ok = Limits {
            max_tokens: Some(8192),
            n: Some(2),
            temperature: Some(0.7),
            top_p: Some(1.0),
            logprobs: Some(20),
        };
        assert!(check_limits(&ok, &[8192], 8192).is_ok());
        assert!(check_limits(&ok, &[8193], 8192).is_err());
        assert_eq!(py_float(-1.0), "-1.0");
        assert_eq!(py_float(0.5), "0.5");
    }
}
