//! Logging flags on the real binary: `--log-json` lines, `--log-dir`'s file, vllm-router's
//! `--log-level` names, and a `--log-dir` that cannot be used failing at start.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A fresh directory path under the system temp dir (not created).
fn scratch(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "ringrouter-logging-{name}-{}-{nanos}",
        std::process::id()
    ))
}

/// Every non-empty line of `text` parsed as a JSON object; panics naming a line that is not.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "not a JSON object: {l}");
            v
        })
        .collect()
}

fn ready_event(events: &[Value]) -> Option<&Value> {
    events.iter().find(|e| e["message"] == "ringrouter ready")
}

#[test]
fn log_json_lines_parse_and_carry_the_ready_event_with_its_fields() {
    let m = mocks(1, |_| {});
    let mut args = vec!["--log-json".to_string(), "--shards".into(), "2".into()];
    args.extend(worker_args(&m));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&args);
    assert!(r.log_contains("ringrouter ready"), "log: {}", r.log());
    let events = json_lines(&r.log());
    let ready = ready_event(&events).expect("a ready event");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["target"], "ringrouter");
    assert_eq!(ready["listen"], r.addr.to_string());
    assert_eq!(ready["shards"], 2);
    assert_eq!(ready["workers"], 1);
    assert_eq!(ready["pd"], false);
    assert_eq!(ready["policy"], "cache_aware");
    assert!(ready["timestamp"].is_string(), "{ready}");
    // Per-shard events are JSON too and name their io driver.
    let started: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "shard started")
        .collect();
    assert_eq!(started.len(), 2, "{events:?}");
    assert!(
        started.iter().all(|e| e["driver"].is_string()),
        "{started:?}"
    );
}

#[test]
fn log_dir_is_created_and_gets_the_log_while_stderr_still_does() {
    let base = scratch("dir");
    let dir = base.join("nested/logs");
    let r = Router::start(&["--log-dir", dir.to_str().unwrap()]);
    assert!(r.log_contains("ringrouter ready"), "stderr: {}", r.log());
    let file = dir.join("ringrouter.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let t = std::fs::read_to_string(&file).unwrap_or_default();
        if t.contains("ringrouter ready") || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        text.contains("ringrouter ready"),
        "{}: {text}",
        file.display()
    );
    assert!(text.contains("shard started"), "{text}");
    // Never colours in the file.
    assert!(!text.contains('\u{1b}'), "{text:?}");
    drop(r);

    // With --log-json the file holds JSON lines as well; a second run appends.
    let r = Router::start(&["--log-dir", dir.to_str().unwrap(), "--log-json"]);
    assert!(r.log_contains("ringrouter ready"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let t = std::fs::read_to_string(&file).unwrap();
        if t.matches("ringrouter ready").count() == 2 || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(r);
    let first_run = text.find("ringrouter ready").unwrap();
    let second_start = first_run + text[first_run..].find('\n').unwrap() + 1;
    // The lines after the first run's are the second run's, all JSON.
    let later: String = text[second_start..]
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    let events = json_lines(&later);
    let ready = ready_event(&events).expect("the JSON ready event in the file");
    assert!(ready["listen"].is_string());
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn vllm_routers_level_names_warning_and_critical_are_accepted() {
    // No workers: the router warns that every request will get 503, then logs "ready" at info.
    let r = Router::start(&["--log-level", "warning"]);
    assert!(r.log_contains("no --worker-urls given"), "log: {}", r.log());
    assert!(
        !r.log().contains("ringrouter ready"),
        "info shown at warning: {}",
        r.log()
    );
    drop(r);
    let r = Router::start(&["--log-level", "critical"]);
    // critical is error: neither the warning nor info lines.
    std::thread::sleep(Duration::from_millis(200));
    let log = r.log();
    assert!(!log.contains("no --worker-urls given"), "{log}");
    assert!(!log.contains("ringrouter ready"), "{log}");
}

#[test]
fn rust_log_overrides_log_level() {
    let r = Router::start_env(&[("RUST_LOG", "error")], &["--log-level", "debug"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let log = r.log();
    assert!(!log.contains("ringrouter ready"), "{log}");
    assert!(!log.contains("no --worker-urls given"), "{log}");
}

/// Runs the binary with `args` until it exits (killed after 20 s); its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringrouter"))
        .args([
            "--port",
            "0",
            "--no-pin-cores",
            "--health-check-interval-secs",
            "0",
        ])
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

#[test]
fn a_log_dir_that_cannot_be_created_fails_at_start_naming_the_flag() {
    let base = scratch("bad");
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("logs");
    let (code, err) = run_to_exit(&["--log-dir", under_file.to_str().unwrap()]);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(err.contains("--log-dir"), "{err}");
    assert!(err.contains(under_file.to_str().unwrap()), "{err}");
    // The regular file itself as the directory: same.
    let (code, err) = run_to_exit(&["--log-dir", file.to_str().unwrap()]);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(err.contains("--log-dir"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn bad_log_level_is_refused_listing_the_names() {
    let (code, err) = run_to_exit(&["--log-level", "verbose"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("warning") && err.contains("critical"), "{err}");
}

#[test]
fn the_access_log_goes_to_the_log_dir_as_json_whatever_the_level() {
    let m = mocks(1, |_| {});
    let dir = scratch("access");
    let mut args: Vec<String> = [
        "--access-log",
        "--log-json",
        "--log-level",
        "critical",
        "--log-dir",
        dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(worker_args(&m));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&args);
    let resp = exchange(
        r.addr,
        &post_json(
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"hi","max_tokens":2}"#,
        ),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let id = resp.header("x-request-id").unwrap().to_string();
    let file = dir.join("ringrouter.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let events = json_lines(&text);
        if let Some(e) = events
            .into_iter()
            .find(|e| e["target"] == "ringrouter::access")
        {
            break e;
        }
        assert!(Instant::now() < deadline, "no access line in {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(line["request_id"], id.as_str(), "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["route"], "/v1/completions", "{line}");
    // critical: the rest of the info lines are not there.
    assert!(!std::fs::read_to_string(&file)
        .unwrap()
        .contains("ringrouter ready"));
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}
