//! Per-request behaviour: the config's knobs, overridden by `x-mock-*` request headers so one
//! mock can serve many test cases. Unparseable header values are ignored.
//!
//! | header | effect |
//! | --- | --- |
//! | `x-mock-ttft-ms: N` | time to first token |
//! | `x-mock-itl-ms: N` | inter-token delay |
//! | `x-mock-tokens: N` | tokens the "model" produces before EOS (capped by `max_tokens`) |
//! | `x-mock-fail: 1` | answer 500 with a vLLM-style error |
//! | `x-mock-status: NNN` | answer status NNN (400..=599) with a vLLM-style error |
//! | `x-mock-hang-after: N` | stream: stop sending after N tokens, keep the connection |
//! | `x-mock-drop-after: N` | stream: close the connection after N tokens |
//! | `x-mock-error-after: N` | stream: after N tokens send vLLM's in-band error event, then `[DONE]` |
//! | `x-mock-prefill-ms: N` | NIXL prefill leg duration |

use std::time::Duration;

use hyper::HeaderMap;

use crate::config::MockConfig;

#[derive(Clone, Debug)]
pub(crate) struct Knobs {
    pub ttft: Duration,
    pub itl: Duration,
    /// Natural length (EOS after this many); `None` = the config default applies only when
    /// the request has no `max_tokens`.
    pub tokens: Option<usize>,
    pub status: Option<u16>,
    pub hang_after: Option<usize>,
    pub drop_after: Option<usize>,
    pub error_after: Option<usize>,
    pub prefill_delay: Duration,
}

impl Knobs {
    pub fn new(config: &MockConfig, headers: &HeaderMap) -> Knobs {
        let mut k = Knobs {
            ttft: config.ttft,
            itl: config.itl,
            tokens: None,
            status: None,
            hang_after: config.hang_after,
            drop_after: config.drop_after,
            error_after: None,
            prefill_delay: config.prefill_delay,
        };
        // Fast path: most requests carry no x-mock-* header at all.
        if !headers
            .keys()
            .any(|name| name.as_str().starts_with("x-mock-"))
        {
            return k;
        }
        if let Some(ms) = num(headers, "x-mock-ttft-ms") {
            k.ttft = Duration::from_millis(ms);
        }
        if let Some(ms) = num(headers, "x-mock-itl-ms") {
            k.itl = Duration::from_millis(ms);
        }
        if let Some(n) = num(headers, "x-mock-tokens") {
            k.tokens = Some(n as usize);
        }
        if let Some(ms) = num(headers, "x-mock-prefill-ms") {
            k.prefill_delay = Duration::from_millis(ms);
        }
        if let Some(n) = num(headers, "x-mock-hang-after") {
            k.hang_after = Some(n as usize);
        }
        if let Some(n) = num(headers, "x-mock-drop-after") {
            k.drop_after = Some(n as usize);
        }
        if let Some(n) = num(headers, "x-mock-error-after") {
            k.error_after = Some(n as usize);
        }
        if let Some(v) = headers.get("x-mock-fail") {
            let v = v.as_bytes();
            if !(v == b"0" || v.eq_ignore_ascii_case(b"false")) {
                k.status = Some(500);
            }
        }
        if let Some(s) = num(headers, "x-mock-status") {
            if (400..=599).contains(&s) {
                k.status = Some(s as u16);
            }
        }
        k
    }
}

fn num(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}
