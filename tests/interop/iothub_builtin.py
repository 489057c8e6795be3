"""Judge: Microsoft's Python EventHubConsumerClient reads the test hub's built-in Event
Hubs-compatible endpoint (IoT Hub mode) and checks that every device-to-cloud message is there,
as the device sent it, with the system properties IoT Hub stamps.

Usage: iothub_builtin.py BUILTIN_CS [--ca PEM] [--node DEVICE_ID [--node-count K]]
                         [--hubsend BIN --policy-cs CS [--registry-url URL]
                          [--endpoint URL] --devices N --per-device M]

BUILTIN_CS is the hub's `Built-in endpoint:` line. With --node, the messages Microsoft's Node
device SDK judge (iothub_device.js) sent as DEVICE_ID are expected (K messages, ids node-0..,
properties site=plant-3 and n, body value 40+i, auth scope `device`). With --hubsend, the
judge writes N*M NDJSON records for N devices, sends them with `hubsend iot send
--device-field device --create-devices --device-name-field name` through the gateway with the
policy string CS (and --registry-url, --endpoint, --ca as given; devices created on the way,
auth scope `hub`), and expects each record once on the endpoint under its device. With --ca,
the PEM may hold both the AMQP and the registry CA.
Prints PASS/FAIL lines; exits 1 on any failure.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

# See interop.py: the loopback's TCP_MAXSEG cannot be set back.
from azure.eventhub._pyamqp import _transport as _pyamqp_transport  # noqa: E402

_pyamqp_transport.KNOWN_TCP_OPTS = tuple(
    o for o in _pyamqp_transport.KNOWN_TCP_OPTS if o != "TCP_MAXSEG"
)

from azure.eventhub import EventHubConsumerClient  # noqa: E402

FAILED = []


def verdict(name, problems):
    if problems:
        FAILED.append(name)
        print(f"FAIL {name}: " + "; ".join(problems[:8]), flush=True)
    else:
        print(f"PASS {name}", flush=True)


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def read_all(cs, ca, want, match, timeout=30):
    """Every event on every partition from the start, until `want` events pass `match`."""
    opts = {"connection_verify": ca} if ca else {}
    # Over TLS the SDK dials port 5671 whatever the Endpoint says; the test hub's port is
    # given as a custom endpoint address, as a private endpoint would be.
    endpoint = re.search(r"Endpoint=sb://([^/;]+)", cs).group(1)
    if ":" in endpoint and "UseDevelopmentEmulator=true" not in cs:
        opts["custom_endpoint_address"] = f"sb://{endpoint}"
    client = EventHubConsumerClient.from_connection_string(cs, consumer_group="$Default", **opts)
    got, errors = [], []
    done = threading.Event()

    def on_event(ctx, event):
        if event is None:
            return
        if match(event):
            got.append((ctx.partition_id, event))
            if len(got) >= want:
                done.set()

    thread = threading.Thread(
        target=client.receive,
        kwargs=dict(on_event=on_event, on_error=lambda _c, e: errors.append(e),
                    starting_position="-1", max_wait_time=1),
        daemon=True,
    )
    thread.start()
    done.wait(timeout)
    time.sleep(0.5)  # anything sent twice would arrive now
    client.close()
    thread.join(5)
    return got, errors


def sys_prop(event, name):
    return text(event.system_properties.get(name.encode()))


def props(event):
    return {text(k): text(v) for k, v in (event.properties or {}).items()}


def common_checks(problems, got, scope):
    """System properties every D2C event carries; each device on one partition."""
    partitions = {}
    now = datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000
    for partition, ev in got:
        device = sys_prop(ev, "iothub-connection-device-id")
        partitions.setdefault(device, set()).add(partition)
        enq = ev.system_properties.get(b"iothub-enqueuedtime")
        if isinstance(enq, datetime.datetime):
            enq = enq.timestamp() * 1000
        if not isinstance(enq, (int, float)) or abs(now - enq) > 600_000:
            problems.append(f"{device}: iothub-enqueuedtime {enq!r}")
        try:
            method = json.loads(sys_prop(ev, "iothub-connection-auth-method") or "null")
        except ValueError:
            method = None
        if not isinstance(method, dict) or method.get("scope") != scope or method.get("type") != "sas":
            problems.append(f"{device}: iothub-connection-auth-method {method!r}")
        if not sys_prop(ev, "iothub-connection-auth-generation-id"):
            problems.append(f"{device}: no iothub-connection-auth-generation-id")
        if sys_prop(ev, "iothub-message-source") != "Telemetry":
            problems.append(f"{device}: iothub-message-source {sys_prop(ev, 'iothub-message-source')!r}")
        if ev.sequence_number is None or ev.offset is None:
            problems.append(f"{device}: no sequence number or offset")
    for device, parts in partitions.items():
        if len(parts) != 1:
            problems.append(f"{device} spread over partitions {sorted(parts)}")


def judge_node(cs, ca, device, want):
    got, errors = read_all(cs, ca, want,
                           lambda e: sys_prop(e, "iothub-connection-device-id") == device)
    problems = [f"consumer error {e!r}" for e in errors]
    if len(got) != want:
        problems.append(f"read {len(got)} events of {device}, the Node SDK sent {want}")
    got.sort(key=lambda pe: pe[1].sequence_number)
    for i, (_p, ev) in enumerate(got):
        body = json.loads(ev.body_as_str())
        if body.get("value") != 40 + i:
            problems.append(f"event {i}: body {ev.body_as_str()}")
        if text(ev.message_id) != f"node-{i}":
            problems.append(f"event {i}: message-id {ev.message_id!r}")
        if text(ev.correlation_id) != f"corr-{i}":
            problems.append(f"event {i}: correlation-id {ev.correlation_id!r}")
        if text(ev.content_type) != "application/json":
            problems.append(f"event {i}: content-type {ev.content_type!r}")
        if props(ev) != {"site": "plant-3", "n": str(i)}:
            problems.append(f"event {i}: properties {props(ev)}")
    common_checks(problems, got, "device")
    verdict(f"azure-eventhub consumer reads Node device SDK's {want} D2C messages from the "
            "built-in endpoint (device id, properties, bodies, iothub-* system properties)",
            problems)


def judge_hubsend(cs, ca, hubsend, policy_cs, ca_file, registry_url, endpoint, devices, per_device):
    run = os.urandom(4).hex()
    ids = [f"gw-{run}-{d}" for d in range(devices)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.ndjson")
        with open(path, "w") as f:
            for i in range(per_device):
                for d, device in enumerate(ids):
                    f.write(json.dumps({"sensor_id": f"{device}:temp", "device": device,
                                        "name": f"Sensor {d}", "seq": i,
                                        "timestamp": "2026-01-01T00:00:00Z",
                                        "value": 20 + i}) + "\n")
        cmd = [hubsend, "iot", "send", "--input", path, "--device-field", "device",
               "--create-devices", "--device-name-field", "name", "--json"]
        if ca_file:
            cmd += ["--ca-file", ca_file]
        if registry_url:
            cmd += ["--registry-url", registry_url]
        if endpoint:
            cmd += ["--endpoint", endpoint]
        env = dict(os.environ, IOTHUB_CONNECTION_STRING=policy_cs)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    problems = []
    summary = {}
    try:
        summary = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        problems.append(f"hubsend exited {out.returncode} without a JSON summary: {out.stderr[-400:]}")
    total = devices * per_device
    if out.returncode != 0 or summary.get("sent") != total:
        problems.append(f"hubsend exited {out.returncode}, summary {summary}")
    got, errors = read_all(cs, ca, total,
                           lambda e: (sys_prop(e, "iothub-connection-device-id") or "").startswith(f"gw-{run}-"))
    problems += [f"consumer error {e!r}" for e in errors]
    seen = {}
    for _p, ev in got:
        device = sys_prop(ev, "iothub-connection-device-id")
        body = json.loads(ev.body_as_str())
        if body.get("device") != device:
            problems.append(f"event of {device} carries the record of {body.get('device')}")
        seen.setdefault(device, []).append(body.get("seq"))
    for device in ids:
        seqs = sorted(seen.get(device, []))
        if seqs != list(range(per_device)):
            problems.append(f"{device}: read seq {seqs[:10]}..., sent 0..{per_device - 1} once each")
    common_checks(problems, got, "hub")
    verdict(f"azure-eventhub consumer reads hubsend iot send's {total} D2C messages "
            f"({devices} devices via one gateway) from the built-in endpoint, each once under its device",
            problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("builtin_cs")
    ap.add_argument("--ca")
    ap.add_argument("--node")
    ap.add_argument("--node-count", type=int, default=10)
    ap.add_argument("--hubsend")
    ap.add_argument("--policy-cs")
    ap.add_argument("--registry-url")
    ap.add_argument("--endpoint")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-device", type=int, default=5)
    args = ap.parse_args()
    if args.node:
        judge_node(args.builtin_cs, args.ca, args.node, args.node_count)
    if args.hubsend:
        judge_hubsend(args.builtin_cs, args.ca, args.hubsend, args.policy_cs, args.ca,
                      args.registry_url, args.endpoint, args.devices, args.per_device)
    print(f"iothub-builtin: {'FAILED ' + str(len(FAILED)) if FAILED else 'all passed'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
