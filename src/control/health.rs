//! Active health checks: `GET <worker><--health-check-endpoint>` with a timeout; any 2xx
//! is healthy. The registry turns results into states (thresholds) and epochs.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(3))
        .build_http()
}

/// One check of `url`.
pub async fn check(
    client: &HttpClient,
    url: &str,
    endpoint: &str,
    timeout: Duration,
) -> Result<(), String> {
    let uri: hyper::Uri = format!("{url}{endpoint}")
        .parse()
        .map_err(|e| format!("bad health URL: {e}"))?;
    let probe = async {
        let resp = client.get(uri).await.map_err(|e| {
            // hyper's error chain holds the useful part (connection refused, ...).
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        })?;
        let status = resp.status();
        // Read the body so the connection can be reused.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{endpoint} answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}
