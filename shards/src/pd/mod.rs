//! Prefill/decode disaggregation (vLLM with the NIXL connector): a client request becomes a
//! prefill leg (the prompt only, one token, not streamed, with the NIXL request for a remote
//! decode) and a decode leg (the client's request plus the `kv_transfer_params` the prefill
//! answered with), whose response goes to the client.
//!
//! - [`splice`]: the two legs' request bodies, edited into the client's bytes without
//!   re-serialising the prompt, and the `kv_transfer_params` read out of a prefill response.
//!
//! The legs' exchange with the workers (choosing them, retries, reading the prefill answer,
//! relaying the decode answer) is a phase of the proxy: `proxy/disagg.rs`.

pub mod splice;
