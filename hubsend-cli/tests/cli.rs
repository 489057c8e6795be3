//! End-to-end tests: the real `hubsend` binary against a test hub running in this process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hubsend_testhub::{HubConfig, StoredEvent, TestHub};
use serde_json::{json, Value};

mod support;
use support::{command, free_port, scratch, spawn_silent, spool_bytes};

const HUB: &str = "telemetry";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The last stdout line parsed as JSON.
    fn json(&self) -> Value {
        let last = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no stdout; stderr:\n{}", self.stderr));
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("last stdout line `{last}` is not JSON: {e}"))
    }
}

/// Runs the binary off the async runtime so the hub keeps serving meanwhile.
async fn hubsend(args: &[&str], env: &[(&str, &str)], stdin: Option<Vec<u8>>) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let output: Output = tokio::task::spawn_blocking(move || {
        let mut cmd = command(&args);
        cmd.envs(env).stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().expect("spawn hubsend");
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        child.wait_with_output().expect("wait for hubsend")
    })
    .await
    .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `hubsend send --connection-string <hub> --input <input> <extra…>`.
async fn send_file(hub: &TestHub, input: &str, extra: &[&str]) -> Run {
    let cs = hub.connection_string();
    let mut args = vec!["send", "--connection-string", &cs, "--input", input];
    args.extend_from_slice(extra);
    hubsend(&args, &[], None).await
}

/// [`send_file`] with `--rejects <dir>/rejects.jsonl --json`; also returns the rejects path.
async fn send_file_with_rejects(
    hub: &TestHub,
    dir: &std::path::Path,
    input: &str,
) -> (Run, PathBuf) {
    let rejects = dir.join("rejects.jsonl");
    let run = send_file(
        hub,
        input,
        &["--rejects", rejects.to_str().unwrap(), "--json"],
    )
    .await;
    (run, rejects)
}

/// A valid telemetry record whose `pad` field holds `pad` bytes.
fn padded_record(pad: usize) -> String {
    format!(
        r#"{{"sensor_id":"big","timestamp":"2025-08-19T08:30:00Z","value":1,"pad":"{}"}}"#,
        "x".repeat(pad)
    )
}

fn bodies(events: &[StoredEvent]) -> Vec<Value> {
    let mut out: Vec<Value> = events
        .iter()
        .map(|e| {
            assert_eq!(e.content_type.as_deref(), Some("application/json"));
            serde_json::from_slice(&e.body).expect("stored body is JSON")
        })
        .collect();
    out.sort_by_key(|v| v.to_string());
    out
}

/// Asserts that every event carries a partition key and is stored on the partition the
/// service's hash gives that key.
fn assert_on_their_keys_partitions(hub: &TestHub, events: &[StoredEvent]) {
    for e in events {
        let key = e.partition_key.as_deref().expect("keyed");
        assert_eq!(e.partition, hub.partition_for_key(HUB, key), "key {key}");
    }
}

/// [`assert_on_their_keys_partitions`], with each event's key its body's `sensor_id`.
fn assert_keyed_by_sensor_id(hub: &TestHub, events: &[StoredEvent]) {
    assert_on_their_keys_partitions(hub, events);
    for e in events {
        let body: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(e.partition_key.as_deref(), body["sensor_id"].as_str());
    }
}

/// Runs hubsend with `args` (which name `hub`), expects exit 0, and waits for `count` events
/// on the hub: the run's `--json` report and the stored events.
async fn run_to_completion(
    hub: &TestHub,
    args: &[&str],
    count: usize,
) -> (Value, Vec<StoredEvent>) {
    let run = hubsend(args, &[], None).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let events = hub
        .wait_for_events(HUB, count, Duration::from_secs(10))
        .await;
    assert_eq!(events.len(), count);
    (run.json(), events)
}

/// `send` of `input` keyed by `sensor_id` through the spool in `spool`, then `extra`.
fn keyed_spool_send<'a>(
    cs: &'a str,
    input: &'a str,
    spool: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "send",
        "--connection-string",
        cs,
        "--input",
        input,
        "--partition-key-field",
        "sensor_id",
        "--spool",
        spool,
    ];
    args.extend_from_slice(extra);
    args
}

fn sorted(mut values: Vec<Value>) -> Vec<Value> {
    values.sort_by_key(|v| v.to_string());
    values
}

fn write(dir: &std::path::Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_owned()
}

const MIXED_NDJSON: &str = r#"{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}
{"sensor_id":"pump-1:state","timestamp":"2025-08-19T10:30:00+02:00","value":"Running","site":"plant-3","tags":{"line":[1,2]}}
{"timestamp":"2025-08-19T08:30:00Z","value":1}
this is not json

{"sensor_id":"fan-2","timestamp":"2025-08-19T08:30:00.125-05:00","value":-3,"ok":true}
{"sensor_id":"fan-2","timestamp":"19/08/2025 08:30","value":1}
{"sensor_id":"fan-3","timestamp":"2025-08-19T08:30:00Z","value":true}
[1,2,3]
{"sensor_id":"","timestamp":"2025-08-19T08:30:00Z","value":1}
{"sensor_id":"fan-4","timestamp":"2025-08-19T08:30:00Z"}
{"sensor_id":"fan-5","timestamp":"2025-08-19T23:59:59.999999+00:30","value":1e3}
"#;

fn mixed_expected() -> Vec<Value> {
    sorted(vec![
        json!({"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}),
        json!({"sensor_id":"pump-1:state","timestamp":"2025-08-19T08:30:00Z","value":"Running","site":"plant-3","tags":{"line":[1,2]}}),
        json!({"sensor_id":"fan-2","timestamp":"2025-08-19T13:30:00.125Z","value":-3,"ok":true}),
        json!({"sensor_id":"fan-5","timestamp":"2025-08-19T23:29:59.999999Z","value":1000.0}),
    ])
}

/// (line, reason prefix) of every bad line in [`MIXED_NDJSON`].
const MIXED_REJECTS: &[(u64, &str)] = &[
    (3, "missing field `sensor_id`"),
    (4, "not a JSON object: "),
    (7, "`timestamp` is not RFC 3339: "),
    (8, "`value` must be a number or a string"),
    (9, "not a JSON object: found an array"),
    (10, "`sensor_id` must be a non-empty string"),
    (11, "missing field `value`"),
];

fn assert_rejects_reported(stderr: &str) {
    for (line, reason) in MIXED_REJECTS {
        let prefix = format!("line {line}: {reason}");
        assert!(
            stderr.lines().any(|l| l.starts_with(&prefix)),
            "stderr lacks `{prefix}`:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_ndjson_file_sends_good_lines_and_reports_bad_ones() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("mixed");
    let input = write(&dir, "in.ndjson", MIXED_NDJSON);
    let (run, rejects) = send_file_with_rejects(&hub, &dir, &input).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_rejects_reported(&run.stderr);

    let events = hub.wait_for_events(HUB, 4, Duration::from_secs(10)).await;
    assert_eq!(bodies(&events), mixed_expected());
    assert!(events
        .iter()
        .all(|e| e.batched && e.partition_key.is_none()));

    let summary = run.json();
    assert_eq!(summary["sent"], 4);
    assert_eq!(summary["rejected"], MIXED_REJECTS.len());
    assert_eq!(summary["failed"], 0);
    let body_bytes: usize = events.iter().map(|e| e.body.len()).sum();
    assert_eq!(summary["bytes"], body_bytes);
    for field in ["seconds", "events_per_sec"] {
        assert!(summary[field].is_number(), "{field} in {summary}");
    }

    // The rejects file: one JSON object per bad line, with number, reason and raw text.
    let written = std::fs::read_to_string(&rejects).unwrap();
    let lines: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), MIXED_REJECTS.len());
    let raw: Vec<&str> = MIXED_NDJSON.lines().collect();
    for (got, (line, reason)) in lines.iter().zip(MIXED_REJECTS) {
        assert_eq!(got["line"], *line);
        assert!(got["reason"].as_str().unwrap().starts_with(reason), "{got}");
        assert_eq!(got["raw"], raw[*line as usize - 1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_exits_3_on_invalid_lines_but_still_sends_the_good_ones() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("strict");
    let input = write(&dir, "in.ndjson", MIXED_NDJSON);
    let run = hubsend(
        &["send", "--input", &input, "--strict", "--json"],
        &[("EVENTHUB_CONNECTION_STRING", &hub.connection_string())],
        None,
    )
    .await;
    assert_eq!(run.code, 3, "stderr:\n{}", run.stderr);
    assert_rejects_reported(&run.stderr);
    assert_eq!(run.json()["sent"], 4);
    assert_eq!(bodies(&hub.events(HUB)), mixed_expected());

    // A clean file under --strict exits 0.
    let clean = write(
        &dir,
        "clean.ndjson",
        r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
    );
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--input",
            &clean,
            "--strict",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_the_default_input() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let input = (0..50)
        .map(|i| {
            format!(
                r#"{{"sensor_id":"s-{i}","timestamp":"2025-08-19T08:30:{:02}+01:00","value":{i}}}"#,
                i % 60
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--json",
        ],
        &[],
        Some(input.into_bytes()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 50);
    let expected: Vec<Value> = (0..50)
        .map(|i| json!({"sensor_id": format!("s-{i}"), "timestamp": format!("2025-08-19T07:30:{:02}Z", i % 60), "value": i}))
        .collect();
    assert_eq!(
        bodies(&hub.wait_for_events(HUB, 50, Duration::from_secs(10)).await),
        sorted(expected)
    );

    // `--input -` is the same.
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--input",
            "-",
            "--json",
        ],
        &[],
        Some(br#"{"sensor_id":"x","timestamp":"2025-08-19T08:30:00Z","value":"Idle"}"#.to_vec()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_input_types_values_and_passes_columns_through() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("csv");
    let input = write(
        &dir,
        "in.csv",
        "sensor_id,timestamp,value,unit,note\n\
         t-1,2025-08-19T08:30:00Z,21.5,C,plain\n\
         t-2,2025-08-19T10:30:00+02:00,Running,,\"with, comma\"\n\
         t-3,not a time,1,C,x\n\
         t-4,2025-08-19T08:30:00Z,7,C\n\
         t-5,2025-08-19T08:30:00Z,NaN,C,\"two\nlines\"\n\
         t-6,2025-08-19T08:30:00Z,,C,x\n\
         t-7,2025-08-19T08:30:00Z,-12,42,x\n",
    );
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--input",
            &input,
            "--format",
            "csv",
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    for expected in [
        "line 4: `timestamp` is not RFC 3339",
        "line 5: malformed CSV: the row has 4 fields but the header has 5",
        "line 8: `value` is empty",
    ] {
        assert!(
            run.stderr.contains(expected),
            "stderr lacks `{expected}`:\n{}",
            run.stderr
        );
    }
    let summary = run.json();
    assert_eq!(
        (summary["sent"].as_u64(), summary["rejected"].as_u64()),
        (Some(4), Some(3))
    );
    let events = hub.wait_for_events(HUB, 4, Duration::from_secs(10)).await;
    assert_eq!(
        bodies(&events),
        sorted(vec![
            json!({"sensor_id":"t-1","timestamp":"2025-08-19T08:30:00Z","value":21.5,"unit":"C","note":"plain"}),
            json!({"sensor_id":"t-2","timestamp":"2025-08-19T08:30:00Z","value":"Running","unit":"","note":"with, comma"}),
            json!({"sensor_id":"t-5","timestamp":"2025-08-19T08:30:00Z","value":"NaN","unit":"C","note":"two\nlines"}),
            json!({"sensor_id":"t-7","timestamp":"2025-08-19T08:30:00Z","value":-12,"unit":"42","note":"x"}),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_key_field_routes_each_record_by_its_key() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("keys");
    // 40 sensors interleaved, 400 records: more keys than one batch, order per key kept.
    let lines: Vec<String> = (0..400)
        .map(|i| {
            format!(
                r#"{{"sensor_id":"machine-{}:temp","timestamp":"2025-08-19T08:30:00Z","value":{i},"line":{}}}"#,
                i % 40,
                i % 3
            )
        })
        .collect();
    let input = write(&dir, "in.ndjson", &(lines.join("\n") + "\n"));
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--input",
            &input,
            "--partition-key-field",
            "sensor_id",
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 400);
    assert_eq!(run.json()["partition_keys"], 40);
    let events = hub.wait_for_events(HUB, 400, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 400);
    assert_keyed_by_sensor_id(&hub, &events);
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &events {
        let body: Value = serde_json::from_slice(&e.body).unwrap();
        let key = body["sensor_id"].as_str().unwrap().to_owned();
        per_key
            .entry(key)
            .or_default()
            .push(body["value"].as_i64().unwrap());
    }
    assert_eq!(per_key.len(), 40);
    for (key, values) in per_key {
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert_eq!(values, sorted, "order of {key}");
        assert_eq!(values.len(), 10);
    }
    let partitions: std::collections::BTreeSet<u32> = events.iter().map(|e| e.partition).collect();
    assert!(partitions.len() > 1, "40 keys all hashed to one partition?");

    // Through a spool the same: each record on its key's partition, the distinct keys counted.
    let spooled_hub = TestHub::start(HubConfig::new()).await.unwrap();
    let spool = dir.join("spool");
    let cs = spooled_hub.connection_string();
    let args = keyed_spool_send(&cs, &input, spool.to_str().unwrap(), &["--json"]);
    let (report, events) = run_to_completion(&spooled_hub, &args, 400).await;
    assert_eq!(report["sent"], 400);
    assert_eq!(report["partition_keys"], 40);
    assert_keyed_by_sensor_id(&spooled_hub, &events);

    // A numeric field routes by its string form; records without it are rejected.
    let hub2 = TestHub::start(HubConfig::new()).await.unwrap();
    let input = write(
        &dir,
        "numeric.ndjson",
        "{\"sensor_id\":\"a\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":1,\"line\":7}\n\
         {\"sensor_id\":\"b\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":2}\n",
    );
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub2.connection_string(),
            "--input",
            &input,
            "--partition-key-field",
            "line",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("line 2: missing partition key field `line`"),
        "{}",
        run.stderr
    );
    let events = hub2.wait_for_events(HUB, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].partition_key.as_deref(), Some("7"));
    assert_eq!(events[0].partition, hub2.partition_for_key(HUB, "7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_id_sends_everything_to_that_partition() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let input: String = (0..30)
        .map(|i| {
            format!(
                "{{\"sensor_id\":\"s{i}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n"
            )
        })
        .collect();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--partition-id",
            "2",
            "--json",
        ],
        &[],
        Some(input.into_bytes()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 30);
    let events = hub.wait_for_events(HUB, 30, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 30);
    assert!(events.iter().all(|e| e.partition == 2));

    // Key and id together are refused by the argument parser.
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--partition-id",
            "2",
            "--partition-key-field",
            "x",
        ],
        &[],
        Some(Vec::new()),
    )
    .await;
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_batches_stream_with_a_small_in_flight_bound() {
    let hub = TestHub::start(HubConfig::new().max_message_size(64 * 1024))
        .await
        .unwrap();
    let padding = "p".repeat(400);
    let input: String = (0..3000)
        .map(|i| format!("{{\"sensor_id\":\"s{}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i},\"pad\":\"{padding}\"}}\n", i % 7))
        .collect();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--max-in-flight",
            "3",
            "--json",
        ],
        &[],
        Some(input.into_bytes()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let summary = run.json();
    assert_eq!(summary["sent"], 3000);
    assert!(
        summary["batches"].as_u64().unwrap() >= 3000 * 450 / (64 * 1024),
        "{summary}"
    );
    let events = hub
        .wait_for_events(HUB, 3000, Duration::from_secs(10))
        .await;
    let mut values: Vec<i64> = events
        .iter()
        .map(|e| {
            serde_json::from_slice::<Value>(&e.body).unwrap()["value"]
                .as_i64()
                .unwrap()
        })
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..3000).collect::<Vec<i64>>(),
        "every record exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_fails_with_a_clear_message() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let good = hub.connection_string();
    let key = good
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap()
        .to_owned();
    let bad_key = "d3JvbmcgZG9lcyBub3QgbWF0dGVyIHdoYXQgaXQgaXMgYXQgYWxs";
    let bad = good.replace(&key, bad_key);
    let run = hubsend(
        &["send", "--connection-string", &bad, "--json"],
        &[],
        Some(br#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1}"#.to_vec()),
    )
    .await;
    assert_eq!(run.code, 5, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains("unauthorized"),
        "stderr:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(bad_key) && !run.stdout.contains(bad_key),
        "the key leaked"
    );
    assert!(hub.events(HUB).is_empty());

    // info fails the same way.
    let run = hubsend(&["info", "--connection-string", &bad], &[], None).await;
    assert_eq!(run.code, 5);
    assert!(
        run.stderr.to_lowercase().contains("unauthorized"),
        "stderr:\n{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_connection_string_is_a_usage_error() {
    let run = hubsend(&["send"], &[], Some(Vec::new())).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("EVENTHUB_CONNECTION_STRING"),
        "{}",
        run.stderr
    );
    let run = hubsend(&["info"], &[], None).await;
    assert_eq!(run.code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_hub_with_ca_file() {
    let hub = TestHub::start(HubConfig::new().tls(true)).await.unwrap();
    let dir = scratch("tls");
    let ca = write(&dir, "ca.pem", &hub.ca_pem().unwrap());
    let record = br#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1}"#.to_vec();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--ca-file",
            &ca,
            "--json",
        ],
        &[],
        Some(record.clone()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 1);
    assert_eq!(
        hub.wait_for_events(HUB, 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );

    // Without the CA the server is not trusted.
    let run = hubsend(
        &["send", "--connection-string", &hub.connection_string()],
        &[],
        Some(record),
    )
    .await;
    assert_eq!(run.code, 6, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("cannot connect"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_json_lists_partitions() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--partition-id",
            "1",
        ],
        &[],
        Some(
            b"{\"sensor_id\":\"a\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":1}\n\
              {\"sensor_id\":\"b\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":2}\n"
                .to_vec(),
        ),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);

    let run = hubsend(
        &[
            "info",
            "--connection-string",
            &hub.connection_string_for("manage", HUB),
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let info = run.json();
    assert_eq!(info["name"], HUB);
    assert_eq!(info["partition_ids"], json!(["0", "1", "2", "3"]));
    let parts = info["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4);
    for p in parts {
        let id = p["id"].as_str().unwrap();
        if id == "1" {
            assert_eq!(p["is_empty"], false, "{p}");
            assert_eq!(p["last_enqueued_sequence_number"], 1, "{p}");
        } else {
            assert_eq!(p["is_empty"], true, "{p}");
        }
    }

    // The human form names the hub and every partition.
    let run = hubsend(
        &[
            "info",
            "--connection-string",
            &hub.connection_string_for("manage", HUB),
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains("telemetry") && run.stdout.contains("0, 1, 2, 3"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_without_connection_string_uses_a_local_hub() {
    let run = hubsend(&["bench", "--events", "20000", "--json"], &[], None).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let b = run.json();
    assert_eq!(b["events"], 20000, "{b}");
    for field in [
        "bytes",
        "seconds",
        "events_per_sec",
        "mb_per_sec",
        "p50_ms",
        "p99_ms",
        "peak_rss_mb",
    ] {
        assert!(b[field].as_f64().is_some_and(|v| v > 0.0), "{field} in {b}");
    }
    assert!(b["p99_ms"].as_f64() >= b["p50_ms"].as_f64());
    assert_eq!(b["transport"], "amqp", "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_over_https_stores_the_records_and_reports_the_transport() {
    let hub = TestHub::start(HubConfig::new().rest(true)).await.unwrap();
    let dir = scratch("send-https");
    let lines: String = (0..300)
        .map(|i| {
            format!(
                "{{\"sensor_id\":\"pump-{}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n",
                i % 5
            )
        })
        .collect();
    let input = write(&dir, "in.ndjson", &lines);
    let url = hub.rest_url().unwrap();
    let run = send_file(
        &hub,
        &input,
        &[
            "--transport",
            "https",
            "--endpoint",
            &url,
            "--partition-key-field",
            "sensor_id",
            "--json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let report = run.json();
    assert_eq!(report["transport"], "https", "{report}");
    assert_eq!(report["sent"], 300, "{report}");
    let events = hub.events(HUB);
    assert_eq!(events.len(), 300);
    assert_keyed_by_sensor_id(&hub, &events);
    assert!(hub.rest_stats().created >= 5, "{:?}", hub.rest_stats());
    assert_eq!(hub.stats().deliveries_accepted, 0, "nothing went over AMQP");
    // The endpoint's scheme implies the transport; a different --transport is a usage error.
    let run = send_file(&hub, &input, &["--transport", "amqp", "--endpoint", &url]).await;
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("transport"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_spool_goes_the_way_transport_and_endpoint_say() {
    // The spool's drain connects with --transport and --endpoint too (it used to take only
    // the connection string, and went over AMQP).
    let hub = TestHub::start(HubConfig::new().rest(true)).await.unwrap();
    let dir = scratch("spool-https");
    let input = write(&dir, "in.ndjson", &telemetry_lines(200));
    let spool = dir.join("spool");
    let url = hub.rest_url().unwrap();
    let run = send_file(
        &hub,
        &input,
        &[
            "--transport",
            "https",
            "--endpoint",
            &url,
            "--spool",
            spool.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let report = run.json();
    assert_eq!(
        (report["sent"].as_u64(), report["spooled"].as_u64()),
        (Some(200), Some(200)),
        "{report}"
    );
    assert_eq!(hub.events(HUB).len(), 200);
    assert!(hub.rest_stats().created >= 1, "{:?}", hub.rest_stats());
    assert_eq!(hub.stats().deliveries_accepted, 0, "nothing went over AMQP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_https_against_the_local_hub() {
    let run = hubsend(
        &[
            "bench",
            "--transport",
            "https",
            "--events",
            "3000",
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let b = run.json();
    assert_eq!(b["events"], 3000, "{b}");
    assert_eq!(b["transport"], "https", "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_a_hub_with_partition_keys() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let (report, events) = run_to_completion(
        &hub,
        &[
            "bench",
            "--connection-string",
            &hub.connection_string(),
            "--events",
            "2000",
            "--payload-bytes",
            "300",
            "--partitions-key-cardinality",
            "8",
            "--json",
        ],
        2000,
    )
    .await;
    assert_eq!(report["events"], 2000);
    assert_on_their_keys_partitions(&hub, &events);
    for e in &events {
        assert!(
            (280..=320).contains(&e.body.len()),
            "body of {} bytes",
            e.body.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_exit_1_with_the_reason() {
    let hub = TestHub::start(HubConfig::new().max_message_size(4 * 1024))
        .await
        .unwrap();
    hub.faults()
        .reject_every_nth(2, "com.microsoft:argument-error");
    let input: String = (0..300)
        .map(|i| {
            format!(
                "{{\"sensor_id\":\"s{i}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n"
            )
        })
        .collect();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &hub.connection_string(),
            "--json",
        ],
        &[],
        Some(input.into_bytes()),
    )
    .await;
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let summary = run.json();
    let (sent, failed) = (
        summary["sent"].as_u64().unwrap(),
        summary["failed"].as_u64().unwrap(),
    );
    assert!(failed > 0 && sent + failed == 300, "{summary}");
    assert_eq!(sent as usize, hub.events(HUB).len());
    assert!(
        run.stderr.contains("argument-error"),
        "stderr:\n{}",
        run.stderr
    );
}

/// A `hubsend send --json` reading from a pipe that stays open, with `records` lines written.
#[cfg(unix)]
fn spawn_send_from_open_pipe(
    hub: &TestHub,
    records: u32,
) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = command(&[
        "send",
        "--connection-string",
        &hub.connection_string(),
        "--json",
    ])
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    // Keep stdin open: the input never ends on its own.
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..records {
        writeln!(
            stdin,
            r#"{{"sensor_id":"s{i}","timestamp":"2025-08-19T08:30:00Z","value":{i}}}"#
        )
        .unwrap();
    }
    stdin.flush().unwrap();
    (child, stdin)
}

#[cfg(unix)]
fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child off the runtime.
#[cfg(unix)]
async fn wait(child: std::process::Child) -> Run {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// SIGINT and SIGTERM alike: stop reading, flush, wait for the outcomes, print the summary.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_and_sigterm_stop_reading_flush_and_report() {
    for name in ["INT", "TERM"] {
        let hub = TestHub::start(HubConfig::new()).await.unwrap();
        let (child, stdin) = spawn_send_from_open_pipe(&hub, 7);
        // Idle input is flushed after a short linger, so the events arrive while reading goes on.
        assert_eq!(
            hub.wait_for_events(HUB, 7, Duration::from_secs(10))
                .await
                .len(),
            7
        );
        signal(&child, name);
        let run = wait(child).await;
        drop(stdin);
        assert_eq!(run.code, 130, "SIG{name}: stderr:\n{}", run.stderr);
        let summary = run.json();
        assert_eq!(summary["sent"], 7, "SIG{name}");
        assert_eq!(summary["interrupted"], true, "SIG{name}");
        assert!(summary.get("unknown").is_none(), "SIG{name}: {summary}");
        assert!(run.stderr.contains("stopped early"), "{}", run.stderr);
    }
}

/// With the hub holding every outcome, the first signal drains (and waits); the second stops
/// within a second, with exit status 4 and a summary that counts what has no known outcome.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_a_frozen_drain_within_a_second() {
    for (first, second) in [("TERM", "TERM"), ("INT", "INT"), ("TERM", "INT")] {
        let hub = TestHub::start(HubConfig::new()).await.unwrap();
        hub.faults().delay_dispositions(Duration::from_secs(600));
        let (mut child, stdin) = spawn_send_from_open_pipe(&hub, 9);
        // The hub stores them but answers none.
        hub.wait_for_events(HUB, 9, Duration::from_secs(10)).await;
        signal(&child, first);
        // Still draining: the outcomes are not in.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIG{first} did not drain"
        );
        let stopping = std::time::Instant::now();
        signal(&child, second);
        let run = wait(child).await;
        let took = stopping.elapsed();
        drop(stdin);
        assert!(took < Duration::from_secs(1), "SIG{second} took {took:?}");
        assert_eq!(run.code, 4, "stderr:\n{}", run.stderr);
        let summary = run.json();
        assert_eq!(summary["sent"], 0, "{summary}");
        assert_eq!(summary["failed"], 0, "{summary}");
        assert_eq!(summary["unknown"], 9, "{summary}");
        assert_eq!(summary["interrupted"], true, "{summary}");
        assert!(
            run.stderr.contains("9 event(s) have no known outcome"),
            "{}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_longer_than_the_message_limit_are_rejected_with_their_line() {
    // The record limit follows the hub's message limit: 4 KiB here.
    let hub = TestHub::start(HubConfig::new().max_message_size(4096))
        .await
        .unwrap();
    let dir = scratch("long");
    let long = padded_record(20_000);
    let input = write(
        &dir,
        "in.ndjson",
        &format!("{}{long}\n{}", telemetry_lines(1), telemetry_lines(1)),
    );
    let (run, rejects) = send_file_with_rejects(&hub, &dir, &input).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("line 2: longer than the 4096-byte record limit"),
        "stderr:\n{}",
        run.stderr
    );
    let summary = run.json();
    assert_eq!(
        (summary["sent"].as_u64(), summary["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    let written = std::fs::read_to_string(&rejects).unwrap();
    let entry: Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert_eq!(entry["line"], 2);
    assert!(entry["raw"]
        .as_str()
        .unwrap()
        .starts_with(r#"{"sensor_id":"big""#));
    assert!(
        entry["raw"].as_str().unwrap().len() < 4096,
        "the raw text is a preview"
    );

    // CSV: a quote left open swallows nothing; the error names the line it opened on.
    let input = write(
        &dir,
        "open-quote.csv",
        "sensor_id,timestamp,value,note\n\
         a,2025-08-19T08:30:00Z,1,x\n\
         b,2025-08-19T08:30:00Z,2,\"never closed\n\
         c,2025-08-19T08:30:00Z,3,y\n",
    );
    let run = send_file(&hub, &input, &["--format", "csv", "--strict", "--json"]).await;
    assert_eq!(run.code, 3, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("line 3: malformed CSV: the quoted field opened on line 3 is never closed"),
        "stderr:\n{}",
        run.stderr
    );
    assert_eq!(run.json()["sent"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_never_echo_a_secret() {
    let key = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWs=";
    let cs = format!(
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={key};EntityPath=telemetry"
    );
    let sas = format!("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig={key}&se=1&skn=send;EntityPath=t");
    let typo = format!("--conection-string={cs}");
    let cases: Vec<Vec<&str>> = vec![
        // The connection string given positionally.
        vec!["send", &cs],
        vec![&cs],
        // A bare key pasted where a value was expected: unknown positionals are never shown.
        vec!["send", key],
        vec!["send", "--json", key],
        vec!["send", &sas],
        // A misspelt flag with the secret attached, and a secret given to the wrong flag.
        vec!["send", &typo],
        vec!["send", "--max-in-flight", &cs],
        vec!["bench", "--events", &cs],
    ];
    for args in cases {
        let run = hubsend(&args, &[], Some(Vec::new())).await;
        assert_eq!(run.code, 2, "{args:?}: stderr:\n{}", run.stderr);
        assert!(!run.stderr.is_empty(), "{args:?}: no message");
        for output in [&run.stderr, &run.stdout] {
            assert!(
                !output.contains(key) && !output.contains("c2VjcmV0"),
                "{args:?} leaked the key:\n{output}"
            );
        }
        assert!(run.stderr.starts_with("error:"), "{}", run.stderr);
    }
    // What is wrong is still said.
    let run = hubsend(&["send", &cs], &[], Some(Vec::new())).await;
    assert!(
        run.stderr.contains("looks like a connection string"),
        "{}",
        run.stderr
    );
    let run = hubsend(&["send", &typo], &[], Some(Vec::new())).await;
    assert!(run.stderr.contains("--conection-string"), "{}", run.stderr);
    // Help still prints, to stdout, with status 0.
    let run = hubsend(&["send", "--help"], &[], None).await;
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("--connection-string"), "{}", run.stdout);
}

/// `hubsend send --connection-string <hub> <extra…>` reading `input` from stdin.
async fn send_stdin(hub: &TestHub, extra: &[&str], input: String) -> Run {
    let cs = hub.connection_string();
    let mut args = vec!["send", "--connection-string", &cs];
    args.extend_from_slice(extra);
    hubsend(&args, &[], Some(input.into_bytes())).await
}

/// `count` valid telemetry lines, each with its newline.
fn telemetry_lines(count: u32) -> String {
    (0..count)
        .map(|i| {
            format!(
                "{{\"sensor_id\":\"s{i}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n"
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_text_reaches_the_terminal_without_control_characters() {
    let hub = TestHub::start(HubConfig::new().max_message_size(4 * 1024))
        .await
        .unwrap();
    // A condition carrying a screen clear, a colour and a window-title escape.
    hub.faults().reject_every_nth(
        2,
        "com.microsoft:argument-error\u{1b}[2J\u{1b}[31m\u{1b}]0;pwned\u{7}",
    );
    let run = send_stdin(&hub, &["--json"], telemetry_lines(300)).await;
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("argument-error"),
        "stderr:\n{}",
        run.stderr
    );
    for output in [&run.stderr, &run.stdout] {
        assert!(
            !output.contains('\u{1b}') && !output.contains('\u{7}'),
            "raw control characters:\n{output:?}"
        );
    }
    let error = run.json()["error"].as_str().unwrap().to_owned();
    assert!(!error.contains('\u{1b}'), "{error:?}");
    assert!(error.contains("\\u{1b}[2J"), "shown, not obeyed: {error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_the_hub_is_reported_with_its_line() {
    let hub = TestHub::start(HubConfig::new().max_message_size(4096))
        .await
        .unwrap();
    let dir = scratch("too-large");
    // Under the 4096-byte record limit as text, over the hub's limit as an event.
    let big = padded_record(4000);
    assert!(big.len() < 4096);
    let input = write(
        &dir,
        "in.ndjson",
        &format!("{}{big}\n{}", telemetry_lines(1), telemetry_lines(1)),
    );
    let (run, rejects) = send_file_with_rejects(&hub, &dir, &input).await;
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("line 2: message too large"),
        "stderr:\n{}",
        run.stderr
    );
    let summary = run.json();
    assert_eq!(
        (summary["sent"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(1)),
        "{summary}"
    );
    assert_eq!(summary["error_kind"], "message too large");
    let written = std::fs::read_to_string(&rejects).unwrap();
    let entry: Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert_eq!(entry["line"], 2, "{entry}");
    assert!(entry["reason"]
        .as_str()
        .unwrap()
        .contains("4096-byte limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_printed_with_their_cause() {
    let hub = TestHub::start(HubConfig::new().tls(true)).await.unwrap();
    // No CA file: the handshake fails, and the reason is the certificate's issuer.
    let run = send_stdin(&hub, &[], telemetry_lines(1)).await;
    assert_eq!(run.code, 6, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("TLS handshake") && run.stderr.contains("UnknownIssuer"),
        "stderr:\n{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_send_stores_each_line_once_through_a_dropped_connection() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("idempotent");
    let lines: String = (0..20_000)
        .map(|i| {
            format!(
                "{{\"sensor_id\":\"compressor-{}:vibe_x\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n",
                i % 50
            )
        })
        .collect();
    let input = write(&dir, "in.ndjson", &lines);
    // Outcomes come late, and the connection drops once the hub has stored deliveries it
    // has not acknowledged: they are sent again, and the hub must drop them.
    hub.faults().delay_dispositions(Duration::from_millis(300));
    let faults = hub.faults();
    let drop_once = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while hub.stats().transfers_received < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        faults.drop_connections();
        faults.clear();
    };
    let args = [
        "--idempotent",
        "--partition-key-field",
        "sensor_id",
        "--json",
    ];
    let (run, ()) = tokio::join!(send_file(&hub, &input, &args), drop_once);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let summary = run.json();
    assert_eq!(summary["sent"], 20_000, "{summary}");
    assert!(
        summary["duplicates_avoided"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    let events = hub
        .wait_for_events(HUB, 20_000, Duration::from_secs(10))
        .await;
    let mut values: Vec<i64> = events
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_slice(&e.body).unwrap();
            v["value"].as_f64().unwrap() as i64
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(events.len(), 20_000, "no duplicates");
    assert_eq!(values.len(), 20_000);
    assert!(events.iter().all(|e| e.partition_key.is_some()));

    // Without the flag the field is not there.
    let plain = send_file(&hub, &input, &["--json"]).await;
    assert_eq!(plain.code, 0, "stderr:\n{}", plain.stderr);
    assert!(plain.json().get("duplicates_avoided").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_resumes_a_killed_run_and_sends_each_record_once() {
    const LINES: u64 = 20_000;
    const KEY: &str = "Y2xpLXNwb29sLXRlc3Qta2V5LW5vdC1hLXNlY3JldA==";
    let dir = scratch("spool");
    let spool = dir.join("spool");
    let mut text = String::new();
    for i in 0..LINES {
        text.push_str(&format!(
            "{{\"sensor_id\":\"s-{}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n",
            i % 4
        ));
    }
    let input = write(&dir, "in.ndjson", &text);
    let port = free_port();
    let cs = format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=send-only;SharedAccessKey={KEY};EntityPath={HUB};UseDevelopmentEmulator=true"
    );
    let args = keyed_spool_send(&cs, &input, spool.to_str().unwrap(), &["--json"]);

    // Run 1, hub unreachable: killed with SIGKILL once part of the input is in the spool.
    let mut first = spawn_silent(&args, &[]);
    let threshold = 4096 + u64::from(std::process::id()) % 500_000;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while spool_bytes(&spool) < threshold {
        assert!(std::time::Instant::now() < deadline, "nothing spooled");
        assert!(
            first.try_wait().unwrap().is_none(),
            "run 1 ended on its own"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill().expect("SIGKILL");
    let _ = first.wait();

    // Run 2, the same command with the hub up: resumes and finishes.
    let hub = TestHub::start(HubConfig::new().port(port).policy_key("send-only", KEY))
        .await
        .unwrap();
    let second = hubsend(&args, &[], None).await;
    assert_eq!(second.code, 0, "stderr:\n{}", second.stderr);
    let json = second.json();
    let spooled = json["spooled"].as_u64().expect("spooled");
    let resumed = json["resumed"].as_u64().expect("resumed");
    assert!(resumed > 0, "{json}");
    assert_eq!(spooled + resumed, LINES, "{json}");
    assert_eq!(json["sent"], LINES, "{json}");

    let mut seen = BTreeMap::new();
    for e in hub.events(HUB) {
        let body: Value = serde_json::from_slice(&e.body).unwrap();
        *seen.entry(body["value"].as_u64().unwrap()).or_insert(0u32) += 1;
    }
    assert_eq!(seen.len() as u64, LINES, "every record arrived");
    assert!(seen.values().all(|&c| c == 1), "each record once");

    // A third run finds nothing left and reads nothing new.
    let third = hubsend(&args, &[], None).await;
    assert_eq!(third.code, 0, "stderr:\n{}", third.stderr);
    assert_eq!(third.json()["spooled"], 0);
    assert_eq!(third.json()["resumed"], 0);
    assert_eq!(hub.events(HUB).len() as u64, LINES);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `send --spool` against a hub that refuses us for good: a wrong key (also with
/// `--idempotent`) and a policy without Send exit 5, an event hub that does not exist exits 1, each within a bounded time, with the
/// error and its kind in the JSON summary and every record left in the spool; the same spool
/// with the right credentials then stores each record exactly once.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_keeps_the_records_when_the_hub_refuses_them_for_good() {
    const LINES: u32 = 40;
    const SEND_KEY: &str = "c3Bvb2wtcmVmdXNlZC1zZW5kLWtleS1ub3QtYS1zZWNyZXQ=";
    const LISTEN_KEY: &str = "c3Bvb2wtcmVmdXNlZC1saXN0ZW4ta2V5LW5vdC1hLXNlY3JldA==";
    const WRONG_KEY: &str = "c3Bvb2wtcmVmdXNlZC13cm9uZy1rZXktbm90LWEtc2VjcmV0";
    let hub = TestHub::start(
        HubConfig::new()
            .policy("sender", SEND_KEY, &[hubsend_testhub::Right::Send])
            .policy("listener", LISTEN_KEY, &[hubsend_testhub::Right::Listen]),
    )
    .await
    .unwrap();
    let dir = scratch("spool-refused");
    let spool = dir.join("spool");
    let input = write(&dir, "in.ndjson", &telemetry_lines(LINES));
    let run = |cs: String, idempotent: bool| {
        let (input, spool) = (input.clone(), spool.clone());
        async move {
            let mut args = vec![
                "send",
                "--connection-string",
                &cs,
                "--input",
                &input,
                "--spool",
                spool.to_str().unwrap(),
                "--json",
            ];
            if idempotent {
                args.push("--idempotent");
            }
            let started = std::time::Instant::now();
            let child = command(&args)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn hubsend");
            let pid = child.id();
            // A refusal ends the run (it used to reconnect forever): SIGKILL after 30 s so
            // the test fails instead of hanging.
            match tokio::time::timeout(Duration::from_secs(30), wait(child)).await {
                Ok(run) => (run, started.elapsed()),
                Err(_) => {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    panic!("the run did not end within 30 s");
                }
            }
        }
    };
    let good = hub.connection_string_for("sender", HUB);
    let refusals = [
        (
            good.replace(SEND_KEY, WRONG_KEY),
            5,
            "unauthorized",
            "SharedAccessKey",
            false,
        ),
        (
            hub.connection_string_for("listener", HUB),
            5,
            "unauthorized",
            "may send",
            false,
        ),
        (
            good.replace(&format!("EntityPath={HUB}"), "EntityPath=no-such-hub"),
            1,
            "not found",
            "does not exist",
            false,
        ),
        // The idempotent drain connects through the same path.
        (
            good.replace(SEND_KEY, WRONG_KEY),
            5,
            "unauthorized",
            "SharedAccessKey",
            true,
        ),
    ];
    // Records in the spool so far. A refusal stops the reading too, so a run refused before
    // the reader handed over all the input spools only part of it; the next run reads on.
    let mut kept = 0u64;
    for (cs, code, kind, hint, idempotent) in refusals {
        let (r, took) = run(cs, idempotent).await;
        assert_eq!(r.code, code, "{kind}: stderr:\n{}", r.stderr);
        assert!(took < Duration::from_secs(20), "{kind}: took {took:?}");
        assert!(r.stderr.contains(hint), "{kind}: {}", r.stderr);
        for key in [SEND_KEY, LISTEN_KEY, WRONG_KEY] {
            assert!(!r.stdout.contains(key) && !r.stderr.contains(key));
        }
        let j = r.json();
        assert_eq!(j["error_kind"], kind, "{j}");
        assert!(j["error"].as_str().is_some_and(|e| e.contains(hint)), "{j}");
        // Each run resumes everything the runs before kept, and keeps what it read.
        assert_eq!(
            (
                j["resumed"].as_u64(),
                j["sent"].as_u64(),
                j["failed"].as_u64()
            ),
            (Some(kept), Some(0), Some(0)),
            "{kind}: {j}"
        );
        kept += j["spooled"].as_u64().expect("spooled");
        assert!(kept <= u64::from(LINES), "{kind}: {j}");
    }
    assert!(hub.events(HUB).is_empty());

    // The right key: everything the spool kept is stored, each record once.
    let (r, _) = run(good, false).await;
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let j = r.json();
    assert_eq!(
        (
            j["resumed"].as_u64(),
            j["spooled"].as_u64(),
            j["sent"].as_u64()
        ),
        (
            Some(kept),
            Some(u64::from(LINES) - kept),
            Some(u64::from(LINES))
        ),
        "{j}"
    );
    assert!(j["error"].is_null(), "{j}");
    let mut values: Vec<u64> = hub
        .events(HUB)
        .iter()
        .map(|e| {
            let body: Value = serde_json::from_slice(&e.body).unwrap();
            body["value"].as_u64().unwrap()
        })
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..u64::from(LINES)).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--spool --idempotent`: run 1 is killed with SIGKILL mid-drain while deliveries are in
/// flight (the hub stores each and answers 30 ms later); run 2, the same command, resends
/// what was unconfirmed with its original sequence numbers: every record stored once, and
/// `--json` reports the duplicates the hub dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_idempotent_resumes_a_run_killed_mid_drain_without_duplicates() {
    const LINES: u64 = 60_000;
    let dir = scratch("spool-idempotent");
    let spool = dir.join("spool");
    let mut text = String::new();
    for i in 0..LINES {
        text.push_str(&format!(
            "{{\"sensor_id\":\"s-{}\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{i}}}\n",
            i % 6
        ));
    }
    let input = write(&dir, "in.ndjson", &text);
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    hub.faults().delay_dispositions(Duration::from_millis(30));
    let cs = hub.connection_string();
    let args = keyed_spool_send(
        &cs,
        &input,
        spool.to_str().unwrap(),
        &["--idempotent", "--json"],
    );
    let mut first = spawn_silent(&args, &[]);
    // A random moment once the hub holds part of the input.
    let threshold = 2_000 + u64::from(std::process::id()) % 20_000;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (hub.events(HUB).len() as u64) < threshold {
        assert!(std::time::Instant::now() < deadline, "nothing stored");
        assert!(
            first.try_wait().unwrap().is_none(),
            "run 1 ended on its own"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    let at_kill = hub.events(HUB).len();
    hub.faults().clear();

    let second = hubsend(&args, &[], None).await;
    assert_eq!(second.code, 0, "stderr:\n{}", second.stderr);
    let json = second.json();
    let resumed = json["resumed"].as_u64().expect("resumed");
    assert!(resumed > 0, "{json}");
    // Deliveries stored but unconfirmed at the kill are resent, dropped by the hub, and
    // reported (the hub answers the resumed attach with its last stored number, so the
    // producer knows exactly which resends were duplicates).
    let avoided = json["duplicates_avoided"]
        .as_u64()
        .expect("duplicates_avoided");
    // Whether any resend was a duplicate depends on where the kill landed (0 when nothing
    // stored was still unconfirmed); what must hold is that every one the hub dropped is
    // reported, and below, that nothing is stored twice or lost.
    assert_eq!(avoided, hub.stats().idempotent_duplicates, "{json}");

    let mut seen = BTreeMap::new();
    for e in hub.events(HUB) {
        let body: Value = serde_json::from_slice(&e.body).unwrap();
        *seen.entry(body["value"].as_u64().unwrap()).or_insert(0u32) += 1;
    }
    let twice = seen.values().filter(|&&c| c > 1).count();
    println!(
        "killed with {at_kill} stored; run 2: {json}; hub dropped {} resent events",
        hub.stats().idempotent_duplicates
    );
    assert_eq!(seen.len() as u64, LINES, "every record arrived");
    assert_eq!(twice, 0, "no record stored twice");
    assert!(hub.events(HUB).iter().all(|e| e.partition_key.is_some()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The connection string without its `EntityPath` (a namespace-level one).
fn without_entity_path(cs: &str) -> String {
    cs.split(';')
        .filter(|p| !p.starts_with("EntityPath=") && !p.is_empty())
        .collect::<Vec<_>>()
        .join(";")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_none_sends_each_object_as_it_is() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("schema-none");
    // No telemetry field anywhere, odd spacing and key order: sent byte for byte.
    let lines = [
        r#"{"b":1,  "a":"x"}"#,
        r#"{"nested":{"k":[1,2,3]},"n":null}"#,
        r#"[1,2]"#,
        r#"{"z":true}"#,
    ];
    let input = write(&dir, "any.ndjson", &format!("{}\n", lines.join("\n")));
    let run = send_file(&hub, &input, &["--schema", "none", "--json"]).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let summary = run.json();
    assert_eq!(
        (summary["sent"].clone(), summary["rejected"].clone()),
        (json!(3), json!(1))
    );
    assert!(
        run.stderr.contains("line 3: not a JSON object"),
        "{}",
        run.stderr
    );
    let events = hub.wait_for_events(HUB, 3, Duration::from_secs(10)).await;
    let mut stored: Vec<String> = events
        .iter()
        .map(|e| String::from_utf8(e.body.clone()).unwrap())
        .collect();
    stored.sort();
    let mut expected = vec![lines[0], lines[1], lines[3]];
    expected.sort();
    assert_eq!(stored, expected);
    assert!(events
        .iter()
        .all(|e| e.content_type.as_deref() == Some("application/json")));

    // The same lines under the default schema are all invalid.
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let run = send_file(&hub, &input, &["--json"]).await;
    assert_eq!(run.json()["rejected"], 4, "{}", run.stderr);

    // CSV rows become objects of header to cell text, whatever the header.
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let csv = write(&dir, "any.csv", "host,load\nweb-1,0.75\nweb-2,\n");
    let run = send_file(&hub, &csv, &["--format", "csv", "--schema", "none"]).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let events = hub.wait_for_events(HUB, 2, Duration::from_secs(10)).await;
    assert_eq!(
        sorted(bodies(&events)),
        sorted(vec![
            json!({"host":"web-1","load":"0.75"}),
            json!({"host":"web-2","load":""})
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_content_type_reach_the_hub() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let dir = scratch("props");
    let input = write(&dir, "in.ndjson", &telemetry_lines(5));
    // The input file given as the positional argument.
    let cs = hub.connection_string();
    let args = [
        "send",
        &input,
        "--connection-string",
        &cs,
        "--content-type",
        "application/vnd.plant+json",
        "--property",
        "site=plant-7",
        "--property",
        "query=a=b",
        "--json",
    ];
    let run = hubsend(&args, &[], None).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["sent"], 5);
    let events = hub.wait_for_events(HUB, 5, Duration::from_secs(10)).await;
    for e in &events {
        assert_eq!(
            e.content_type.as_deref(),
            Some("application/vnd.plant+json")
        );
        assert_eq!(
            e.application_properties.get("site"),
            Some(&json!("plant-7"))
        );
        assert_eq!(e.application_properties.get("query"), Some(&json!("a=b")));
    }
    // A property without `=` is a usage error.
    let run = hubsend(&["send", "--property", "oops"], &[], Some(Vec::new())).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("KEY=VALUE"), "{}", run.stderr);
    // FILE and --input together are a usage error; a FILE that does not exist too.
    let run = hubsend(&["send", &input, "--input", &input], &[], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = hubsend(&["send", "no-such-file.ndjson", "--json"], &[], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("no such file"), "{}", run.stderr);
    assert_eq!(run.json()["error_kind"], "usage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_hub_names_the_hub_of_a_namespace_connection_string() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let namespace = without_entity_path(&hub.connection_string());
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &namespace,
            "--event-hub",
            HUB,
            "--json",
        ],
        &[],
        Some(telemetry_lines(3).into_bytes()),
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(
        hub.wait_for_events(HUB, 3, Duration::from_secs(10))
            .await
            .len(),
        3
    );
    // Without it there is no hub to send to: a usage error, with JSON.
    let run = hubsend(
        &["send", "--connection-string", &namespace, "--json"],
        &[],
        Some(telemetry_lines(1).into_bytes()),
    )
    .await;
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.json()["error"].as_str().is_some());
}

/// Runs `send --json` against `cs` with one telemetry line; checks the exit status, that the
/// JSON summary names the failure, and returns the run.
async fn expect_failure(cs: &str, extra: &[&str], code: i32, kind: &str) -> Run {
    let mut args = vec!["send", "--connection-string", cs, "--json"];
    args.extend_from_slice(extra);
    let run = hubsend(&args, &[], Some(telemetry_lines(1).into_bytes())).await;
    assert_eq!(run.code, code, "{args:?}: stderr:\n{}", run.stderr);
    let summary = run.json();
    assert_eq!(summary["error_kind"], kind, "{summary}");
    assert_eq!(summary["sent"], 0, "{summary}");
    assert!(
        summary["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{summary}"
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_has_its_exit_status_and_json() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let good = hub.connection_string();
    // 2: a malformed connection string.
    expect_failure("Endpoint=nonsense", &[], 2, "invalid connection string").await;
    // 5: the hub refuses the key.
    let key = good
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap();
    let wrong_key = "d3JvbmcgZG9lcyBub3QgbWF0dGVyIHdoYXQgaXQgaXMgYXQgYWxs";
    let bad = good.replace(key, wrong_key);
    let run = expect_failure(&bad, &[], 5, "unauthorized").await;
    assert!(!run.stdout.contains(wrong_key) && !run.stderr.contains(wrong_key));
    // 6: nothing listens on the port; an unknown host reads differently.
    let port = free_port();
    let on_port =
        |port: u16| good.replace(&format!(":{}/", hub.addr().port()), &format!(":{port}/"));
    let refused = on_port(port);
    let run = expect_failure(&refused, &[], 6, "connection error").await;
    assert!(
        run.stderr.contains("nothing accepts connections"),
        "{}",
        run.stderr
    );
    let unknown = good.replace("sb://127.0.0.1:", "sb://no-such-host.invalid:");
    let run = expect_failure(&unknown, &[], 6, "connection error").await;
    assert!(run.stderr.contains("does not resolve"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("nothing accepts connections"),
        "{}",
        run.stderr
    );
    // 6: a TLS failure, with its cause.
    let tls = TestHub::start(HubConfig::new().tls(true)).await.unwrap();
    let run = expect_failure(&tls.connection_string(), &[], 6, "connection error").await;
    assert!(
        run.json()["error"]
            .as_str()
            .unwrap()
            .contains("UnknownIssuer"),
        "{}",
        run.stdout
    );
    // 6: a listener that never speaks AMQP, within --connect-timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mute = on_port(port);
    let started = std::time::Instant::now();
    let run = hubsend(
        &[
            "send",
            "--connection-string",
            &mute,
            "--connect-timeout",
            "1",
            "--json",
        ],
        &[],
        Some(telemetry_lines(1).into_bytes()),
    )
    .await;
    assert_eq!(run.code, 6, "stderr:\n{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(run.json()["error"].as_str().is_some());
    drop(silent);
    // 2 with JSON for a usage error clap finds.
    let run = hubsend(&["send", "--json", "--max-in-flight", "0"], &[], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_eq!(run.json()["error_kind"], "usage");
    // 2: no connection string, with JSON.
    let run = hubsend(&["send", "--json"], &[], Some(Vec::new())).await;
    assert_eq!(run.code, 2);
    assert_eq!(run.json()["error_kind"], "usage");
    // info and bench print JSON on failure too.
    let run = hubsend(&["info", "--connection-string", &bad, "--json"], &[], None).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert_eq!(run.json()["error_kind"], "unauthorized");
    let run = hubsend(
        &[
            "bench",
            "--connection-string",
            &refused,
            "--events",
            "10",
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert_eq!(run.json()["error_kind"], "connection error");
    assert!(hub.events(HUB).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_never_loads_the_hub_of_the_environment_variable() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let cs = hub.connection_string();
    let run = hubsend(
        &["bench", "--events", "2000", "--json"],
        &[("EVENTHUB_CONNECTION_STRING", &cs)],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let b = run.json();
    assert_eq!(b["local_hub"], true, "{b}");
    assert_eq!(b["events"], 2000, "{b}");
    assert!(
        run.stderr.contains("ignores $EVENTHUB_CONNECTION_STRING"),
        "{}",
        run.stderr
    );
    assert!(hub.events(HUB).is_empty());
    // Given on the command line, it is used.
    let run = hubsend(
        &[
            "bench",
            "--events",
            "2000",
            "--json",
            "--connection-string",
            &cs,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.json()["local_hub"], false);
    assert_eq!(
        hub.wait_for_events(HUB, 2000, Duration::from_secs(10))
            .await
            .len(),
        2000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_and_verbose() {
    let hub = TestHub::start(HubConfig::new()).await.unwrap();
    let mut input = telemetry_lines(3);
    input.push_str("not json\n");
    let run = send_stdin(&hub, &["-q", "--json"], input.clone()).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stderr, "", "quiet printed something");
    assert_eq!(run.json()["sent"], 3);
    let run = send_stdin(&hub, &["-v"], input).await;
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("connected to event hub telemetry over amqp"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("line 4: not a JSON object"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("hubsend: sent 3 events"),
        "{}",
        run.stderr
    );
}

/// With `--progress always` and standard error a pipe, a plain progress line comes every few
/// seconds; without it, none.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_always_prints_plain_lines_when_not_a_terminal() {
    for always in [true, false] {
        let hub = TestHub::start(HubConfig::new()).await.unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubsend"));
        cmd.args(["send", "--connection-string", &hub.connection_string()]);
        if always {
            cmd.args(["--progress", "always"]);
        }
        let mut child = cmd
            .env_remove("EVENTHUB_CONNECTION_STRING")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(telemetry_lines(4).as_bytes()).unwrap();
        stdin.flush().unwrap();
        hub.wait_for_events(HUB, 4, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(2600)).await;
        drop(stdin);
        let run = wait(child).await;
        assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
        let lines: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("hubsend: progress: "))
            .collect();
        if always {
            assert!(lines.len() >= 2, "{}", run.stderr);
            assert!(lines.iter().any(|l| l.contains("4 sent")), "{}", run.stderr);
        } else {
            assert!(lines.is_empty(), "{}", run.stderr);
        }
        // No terminal control sequences when it is not a terminal.
        assert!(!run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    }
}

/// A tiny terminal: `cols` wide, wrapping long lines, honouring CR, LF, erase-line, cursor-up
/// and erase-below, as indicatif uses them. Returns the screen's lines and how many times a
/// line wrapped.
fn emulate_terminal(output: &str, cols: usize) -> (Vec<String>, usize) {
    let mut screen: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col, mut wraps) = (0usize, 0usize, 0usize);
    let mut chars = output.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                row += 1;
                col = 0;
                if screen.len() <= row {
                    screen.push(Vec::new());
                }
            }
            '\u{1b}' => {
                if chars.peek() != Some(&'[') {
                    continue;
                }
                chars.next();
                let mut params = String::new();
                let mut command = ' ';
                for p in chars.by_ref() {
                    if p.is_ascii_alphabetic() {
                        command = p;
                        break;
                    }
                    params.push(p);
                }
                let n: usize = params.trim_start_matches('?').parse().unwrap_or(1);
                match command {
                    'K' => screen[row].truncate(if params == "2" { 0 } else { col }),
                    'A' => row = row.saturating_sub(n),
                    'J' => {
                        screen[row].truncate(col);
                        screen.truncate(row + 1);
                    }
                    'G' => col = n.saturating_sub(1),
                    _ => {}
                }
            }
            c if c.is_control() => {}
            c => {
                if col >= cols {
                    wraps += 1;
                    row += 1;
                    col = 0;
                    if screen.len() <= row {
                        screen.push(Vec::new());
                    }
                }
                let line = &mut screen[row];
                if line.len() <= col {
                    line.resize(col, ' ');
                    line.push(c);
                } else {
                    line[col] = c;
                }
                col += 1;
            }
        }
    }
    let lines = screen
        .into_iter()
        .map(|l| l.into_iter().collect::<String>().trim_end().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    (lines, wraps)
}

/// On an 80-column terminal the bar (with total, percentage and ETA for a file) never wraps and
/// leaves no stale line: once the run ends only the summary is on the screen.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_fits_an_80_column_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` to make a terminal");
        return;
    }
    let hub = TestHub::start(HubConfig::new().max_message_size(2048))
        .await
        .unwrap();
    // Slow outcomes and one batch at a time: the run lasts seconds and the bar redraws.
    hub.faults().delay_dispositions(Duration::from_millis(300));
    let dir = scratch("tty");
    let input = write(&dir, "in.ndjson", &telemetry_lines(300));
    let command = format!(
        "stty cols 80 rows 24; {} send '{}' --connection-string '{}' --max-in-flight 1 --partition-id 0",
        env!("CARGO_BIN_EXE_hubsend"),
        input,
        hub.connection_string()
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .env_remove("EVENTHUB_CONNECTION_STRING")
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("ETA"),
        "no bar with an ETA was drawn:\n{text:?}"
    );
    assert!(text.contains('%'), "no percentage:\n{text:?}");
    // Every frame of the bar fits the width (so none wraps onto a line it cannot clear) …
    for frame in text.split(['\r', '\n']).filter(|f| f.contains("ETA")) {
        let visible = frame.replace("\u{1b}[2K", "");
        assert!(
            visible.chars().count() <= 80,
            "a {}-column frame: {visible:?}",
            visible.chars().count()
        );
    }
    // … and once the run ends, only the summary is on the screen (it may wrap: it stays).
    let (screen, _) = emulate_terminal(&text, 80);
    let shown = screen.concat();
    assert!(shown.starts_with("hubsend: sent 300 events"), "{screen:#?}");
    assert!(
        !shown.contains("ETA") && !shown.contains("ev/s"),
        "stale progress left on the screen: {screen:#?}"
    );
}
