"""REST judge: `curl` against hubsend-testhub's Event Hubs REST endpoint, with SAS tokens signed
by the few lines below (not hubsend's code), then Microsoft's azure-eventhub consumer reading
back over AMQP what the hub stored from those requests and from `hubsend send --transport https`.

Usage: rest_judge.py --rest-url URL --send-key KEY --listen-connection-string LCS --hubsend PATH
                     --max-message-size BYTES

Prints one line per check and, last, `rest-judge: N passed, M failed`; exits non-zero on failure.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

from azure.eventhub._pyamqp import _transport as _pyamqp_transport  # noqa: E402

# See interop.py: pyamqp cannot re-apply TCP_MAXSEG on a loopback with MTU 65536.
_pyamqp_transport.KNOWN_TCP_OPTS = tuple(
    o for o in _pyamqp_transport.KNOWN_TCP_OPTS if o != "TCP_MAXSEG"
)

from azure.eventhub import EventHubConsumerClient  # noqa: E402

HUB = "telemetry"
RUN = uuid.uuid4().hex[:8]
RESULTS = []


def sas(uri, key_name, key, lifetime=600):
    """An Event Hubs SAS, as Microsoft's docs sign it: HMAC-SHA256 over the URL-encoded
    resource URI, a newline and the expiry, keyed with the key's text."""
    expiry = int(time.time()) + lifetime
    encoded = urllib.parse.quote_plus(uri)
    digest = hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}&skn={key_name}"


def curl(url, token, body, headers=()):
    """POSTs `body` with curl; returns (status, response body)."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(body)
        path = f.name
    try:
        cmd = ["curl", "-sS", "-X", "POST", url, "-H", f"Authorization: {token}",
               "--data-binary", f"@{path}", "-w", "\n%{http_code}"]
        for h in headers:
            cmd += ["-H", h]
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout.decode()
        text, _, status = out.rpartition("\n")
        return int(status), text
    finally:
        os.unlink(path)


def check(name, fn):
    try:
        fn()
        RESULTS.append(True)
        print(f"PASS {name}", flush=True)
    except Exception as exc:  # noqa: BLE001
        RESULTS.append(False)
        print(f"FAIL {name}: {exc}", flush=True)


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def read_back(listen_cs, want, timeout=60):
    """Every event of this run from all partitions, with its partition, via the SDK."""
    client = EventHubConsumerClient.from_connection_string(listen_cs, consumer_group="$Default")
    got = []
    done = threading.Event()

    def on_event(ctx, ev):
        if ev is None:
            return
        props = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (ev.properties or {}).items()
        }
        if props.get("run") != RUN and RUN.encode() not in b"".join(ev.body):
            return
        got.append((ctx.partition_id, ev, props))
        if len(got) >= want:
            done.set()

    thread = threading.Thread(
        target=client.receive,
        kwargs=dict(on_event=on_event, starting_position="-1", max_wait_time=1),
        daemon=True,
    )
    thread.start()
    done.wait(timeout)
    time.sleep(1)  # anything beyond `want` (a duplicate) arrives too
    client.close()
    thread.join(15)
    return got


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rest-url", required=True)
    p.add_argument("--send-key", required=True)
    p.add_argument("--listen-connection-string", required=True)
    p.add_argument("--hubsend", required=True)
    p.add_argument("--max-message-size", type=int, required=True)
    a = p.parse_args()
    base = a.rest_url.rstrip("/")
    host = urllib.parse.urlparse(base).hostname
    token = sas(f"https://{host}/{HUB}", "send-only", a.send_key)
    query = "?timeout=60&api-version=2014-01"
    expected = {}

    def single():
        status, text = curl(
            f"{base}/{HUB}/messages{query}", token, f'{{"judge":"single","run":"{RUN}"}}'.encode(),
            ["Content-Type: application/json", 'BrokerProperties: {"PartitionKey":"judge-key"}',
             f'run: "{RUN}"', 'Color: "Red"', "count: 7"])
        expect(status == 201, f"HTTP {status}: {text}")
        expect(text == "", f"201 with a body: {text!r}")
        expected["single"] = 1

    def batch():
        items = [
            {"Body": f"batch text {i} {RUN}", "UserProperties": {"run": RUN, "i": i},
             "BrokerProperties": {"PartitionKey": "judge-key"}}
            for i in range(3)
        ]
        items.append({"Body": base64.b64encode(b"\xff\x00binary " + RUN.encode()).decode(),
                      "IsBodyBase64": True, "UserProperties": {"run": RUN, "i": 3},
                      "BrokerProperties": {"PartitionKey": "judge-key"}})
        status, text = curl(f"{base}/{HUB}/messages{query}", token, json.dumps(items).encode(),
                            ["Content-Type: application/vnd.microsoft.servicebus.json"])
        expect(status == 201, f"HTTP {status}: {text}")
        expected["batch"] = 4

    def partition():
        status, text = curl(f"{base}/{HUB}/partitions/2/messages{query}", token,
                            f"to partition 2 {RUN}".encode(), [f'run: "{RUN}"'])
        expect(status == 201, f"HTTP {status}: {text}")
        expected["partition"] = 1

    def wrong_key():
        bad = sas(f"https://{host}/{HUB}", "send-only", base64.b64encode(os.urandom(32)).decode())
        status, text = curl(f"{base}/{HUB}/messages{query}", bad, f"never {RUN}".encode(),
                            [f'run: "{RUN}"'])
        expect(status == 401, f"HTTP {status}: {text}")

    def oversize():
        body = b"x" * (a.max_message_size + 1) + RUN.encode()
        status, text = curl(f"{base}/{HUB}/messages{query}", token, body, [f'run: "{RUN}"'])
        expect(status == 413, f"HTTP {status}: {text[:200]}")
        expect("<Code>413</Code>" in text and str(a.max_message_size) in text,
               f"the 413 body is not the service's XML: {text[:200]}")

    def hubsend_cli():
        lines = "".join(
            json.dumps({"sensor_id": f"pump-{i % 3}", "timestamp": "2025-08-19T08:30:00Z",
                        "value": i, "run": RUN}) + "\n"
            for i in range(20)
        )
        cs = a.listen_connection_string
        out = subprocess.run(
            [a.hubsend, "send", "--connection-string", cs, "--transport", "https",
             "--endpoint", base, "--partition-key-field", "sensor_id", "--json"],
            input=lines.encode(), capture_output=True, timeout=60)
        expect(out.returncode == 0, f"exit {out.returncode}: {out.stderr.decode()[-400:]}")
        report = json.loads(out.stdout.decode().strip().splitlines()[-1])
        expect(report.get("transport") == "https" and report.get("sent") == 20, f"{report}")
        expected["cli"] = 20

    for name, fn in [("curl single send (201)", single), ("curl batch send (201)", batch),
                     ("curl partition send (201)", partition), ("curl wrong key (401)", wrong_key),
                     ("curl oversize (413, service XML)", oversize),
                     ("hubsend send --transport https", hubsend_cli)]:
        check(name, fn)

    def stored():
        want = sum(expected.values())
        got = read_back(a.listen_connection_string, want)
        expect(len(got) == want, f"read {len(got)} events, expected {want}")
        keyed = {}
        for part, ev, props in got:
            body = b"".join(ev.body)
            key = ev.partition_key
            if isinstance(key, bytes):
                key = key.decode()
            if key:
                keyed.setdefault(key, set()).add(part)
            if b'"judge":"single"' in body:
                expect(ev.content_type == "application/json", f"content type {ev.content_type}")
                expect(props.get("color") == "Red" and props.get("count") == 7, f"props {props}")
                expect(key == "judge-key", f"partition key {key}")
            elif body.startswith(b"\xff\x00binary"):
                expect(props.get("i") == 3 and key == "judge-key", f"binary event {props} {key}")
            elif body.startswith(b"to partition 2"):
                expect(part == "2", f"partition-2 event read from {part}")
            elif body.startswith(b"never") or len(body) > a.max_message_size:
                raise AssertionError("a refused request was stored")
        for key, parts in keyed.items():
            expect(len(parts) == 1, f"key {key} spread over partitions {parts}")
        expect(keyed.get("judge-key") and len(keyed) == 4, f"keys {sorted(keyed)}")

    check("azure-eventhub consumer reads back exactly what the REST API stored", stored)
    passed = sum(RESULTS)
    failed = len(RESULTS) - passed
    print(f"rest-judge: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
