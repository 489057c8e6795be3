"""Interop checks: Microsoft's official Python SDK (azure-eventhub) against hubsend-testhub.

Usage: interop.py --connection-string CS (--listen-connection-string LCS | --manage-key KEY)
                  --hubsend PATH

CS is the hub's first stdout line (the `send-only` policy); LCS its second (the `manage`
policy), used where the Listen right is needed; or KEY, the `manage` policy's key, to build LCS
from CS. PATH is the hubsend CLI binary, used to produce events that the SDK's consumer reads
back.

Prints one line per check and, last, `interop: N passed, M failed`; exits non-zero on failure.
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
import traceback
import uuid

# pyamqp re-applies every TCP option it reads back from the socket. On a loopback with MTU 65536
# the kernel reports TCP_MAXSEG 32768 and refuses to have it set (EINVAL, maximum 32767), so the
# connect fails before any AMQP byte is sent. The option is not needed; leave it alone.
from azure.eventhub._pyamqp import _transport as _pyamqp_transport  # noqa: E402

_pyamqp_transport.KNOWN_TCP_OPTS = tuple(
    o for o in _pyamqp_transport.KNOWN_TCP_OPTS if o != "TCP_MAXSEG"
)

from azure.eventhub import (  # noqa: E402
    EventData,
    EventHubConsumerClient,
    EventHubProducerClient,
)
from azure.eventhub.exceptions import AuthenticationError, EventHubError  # noqa: E402

RESULTS = []
RUN = uuid.uuid4().hex[:8]


def check(name):
    """Decorator: runs the check, records pass/fail, never lets an exception escape."""

    def wrap(fn):
        def run(*args, **kwargs):
            started = time.monotonic()
            try:
                fn(*args, **kwargs)
                RESULTS.append((name, True, ""))
                print(f"PASS {name} ({time.monotonic() - started:.1f}s)", flush=True)
            except Exception as exc:  # noqa: BLE001
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                RESULTS.append((name, False, detail))
                print(f"FAIL {name}: {detail}", flush=True)
                traceback.print_exc()

        return run

    return wrap


def summary(label):
    """Prints the failures and `LABEL: N passed, M failed`; returns the exit status."""
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    for name, ok, detail in RESULTS:
        if not ok:
            print(f"failed: {name}: {detail}")
    print(f"{label}: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def with_policy(cs, name, key):
    cs = re.sub(r"SharedAccessKeyName=[^;]*", f"SharedAccessKeyName={name}", cs)
    return re.sub(r"SharedAccessKey=[^;]*", f"SharedAccessKey={key}", cs)


def run_with_timeout(fn, seconds):
    """Runs fn in a thread; returns (finished, result, exception)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive(), box.get("result"), box.get("exc"))


def receive(cs, partition, starting_position, want, inclusive=False, timeout=30, settle=0.5,
            match=None, after_start=None, last_enqueued=None, client_options=None):
    """Receives from one partition until `want` matching events arrived (or timeout).

    `match(event)` filters which events count; `after_start()` runs once the receiver is up
    (used to produce events after an `@latest` attach). With a `last_enqueued` list, the
    receiver asks for last-enqueued-event properties and collects them per event.
    `client_options` are passed on to the consumer client (e.g. the transport)."""
    client = EventHubConsumerClient.from_connection_string(
        cs, consumer_group="$Default", **(client_options or {})
    )
    got, errors = [], []
    done = threading.Event()
    started = threading.Event()

    def on_event(_ctx, event):
        if event is None:
            return
        if match is None or match(event):
            got.append(event)
            if last_enqueued is not None:
                last_enqueued.append(_ctx.last_enqueued_event_properties)
            if len(got) >= want:
                done.set()

    def on_error(_ctx, err):
        errors.append(err)

    def on_partition_initialize(_ctx):
        started.set()

    thread = threading.Thread(
        target=client.receive,
        kwargs=dict(
            on_event=on_event,
            on_error=on_error,
            on_partition_initialize=on_partition_initialize,
            partition_id=partition,
            starting_position=starting_position,
            starting_position_inclusive=inclusive,
            max_wait_time=1,
            track_last_enqueued_event_properties=last_enqueued is not None,
        ),
        daemon=True,
    )
    thread.start()
    if after_start is not None:
        started.wait(timeout)
        # The link attaches after on_partition_initialize; give it a moment to be live.
        time.sleep(1.5)
        after_start()
    done.wait(timeout)
    if settle:
        time.sleep(settle)  # anything beyond `want` would show up here
    client.close()
    thread.join(15)
    if errors and len(got) < want:
        raise AssertionError(f"consumer errors: {errors!r}")
    return got


def tagged(tag):
    return lambda ev: (ev.properties or {}).get(b"tag") == tag.encode()


# ---------------------------------------------------------------------------------------------
# (a) producer


@check("producer: create_batch + send_batch, several events")
def producer_batch(send_cs, manage_cs):
    tag = f"batch-{RUN}"
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        batch = producer.create_batch()
        for i in range(5):
            ev = EventData(f"event {i}")
            ev.properties = {"tag": tag, "i": i}
            batch.add(ev)
        producer.send_batch(batch)
    # Without a key or id the service picks one partition for the whole batch.
    seen = []
    for pid in ("0", "1", "2", "3"):
        seen += receive(manage_cs, pid, "-1", 5, timeout=3, settle=0, match=tagged(tag))
    expect(len(seen) == 5, f"expected 5 events back, got {len(seen)}")
    expect(sorted(e.body_as_str() for e in seen) == [f"event {i}" for i in range(5)],
           "bodies differ")


@check("producer: create_batch(partition_key=...) routes by the service's hash")
def producer_partition_key(send_cs, manage_cs):
    # Known service placements with 4 partitions (PROTOCOL J): "7" -> 3, "FWfAT" -> 1.
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        for key, pid in (("7", "3"), ("FWfAT", "1")):
            tag = f"pk-{key}-{RUN}"
            batch = producer.create_batch(partition_key=key)
            for i in range(3):
                ev = EventData(f"{key}:{i}")
                ev.properties = {"tag": tag}
                batch.add(ev)
            producer.send_batch(batch)
            got = receive(manage_cs, pid, "-1", 3, match=tagged(tag))
            expect(len(got) == 3, f"key {key}: expected 3 events on partition {pid}, got {len(got)}")
            for ev in got:
                expect(ev.partition_key == key.encode(),
                       f"partition key {ev.partition_key!r} != {key!r}")


@check("producer: create_batch(partition_id='2')")
def producer_partition_id(send_cs, manage_cs):
    tag = f"pid-{RUN}"
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        batch = producer.create_batch(partition_id="2")
        for i in range(4):
            ev = EventData(f"p2 {i}")
            ev.properties = {"tag": tag}
            batch.add(ev)
        producer.send_batch(batch)
        props = producer.get_partition_properties("2")
    last = []
    got = receive(manage_cs, "2", "-1", 4, match=tagged(tag), last_enqueued=last)
    expect(len(got) == 4, f"expected 4 events on partition 2, got {len(got)}")
    expect(all(p and p.get("sequence_number") == props["last_enqueued_sequence_number"]
               and p.get("offset") == props["last_enqueued_offset"] for p in last),
           f"last enqueued event properties: {last!r} vs {props!r}")
    expect([e.body_as_str() for e in got] == [f"p2 {i}" for i in range(4)], "order/bodies differ")
    expect(props["last_enqueued_sequence_number"] >= 3, f"partition 2 properties: {props}")
    expect(not props["is_empty"], "partition 2 reported empty")


@check("producer: application properties, content type, message id, correlation id preserved")
def producer_properties(send_cs, manage_cs):
    tag = f"props-{RUN}"
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        batch = producer.create_batch(partition_id="0")
        ev = EventData(b"\x00\x01binary\xff")
        ev.properties = {"tag": tag, "count": 42, "ratio": 0.5, "flag": True, "name": "pump"}
        ev.content_type = "application/octet-stream"
        ev.message_id = f"mid-{RUN}"
        ev.correlation_id = f"cid-{RUN}"
        batch.add(ev)
        producer.send_batch(batch)
    got = receive(manage_cs, "0", "-1", 1, match=tagged(tag))
    expect(len(got) == 1, f"expected 1 event, got {len(got)}")
    ev = got[0]
    props = ev.properties
    expect(props[b"count"] == 42 and props[b"ratio"] == 0.5 and props[b"flag"] is True
           and props[b"name"] == b"pump", f"properties differ: {props!r}")
    expect(b"".join(ev.body) == b"\x00\x01binary\xff", f"body differs: {ev.body!r}")
    expect(ev.content_type == "application/octet-stream", f"content type {ev.content_type!r}")
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    expect(text(ev.message_id) == f"mid-{RUN}", f"message id {ev.message_id!r}")
    expect(text(ev.correlation_id) == f"cid-{RUN}", f"correlation id {ev.correlation_id!r}")
    expect(isinstance(ev.sequence_number, int) and ev.offset is not None
           and ev.enqueued_time is not None, "service annotations missing")


# ---------------------------------------------------------------------------------------------
# (b) management


@check("management: get_eventhub_properties / get_partition_properties")
def management(send_cs, _manage_cs):
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        hub = producer.get_eventhub_properties()
        expect(hub["eventhub_name"] == "telemetry", f"hub properties: {hub}")
        expect(hub["partition_ids"] == ["0", "1", "2", "3"], f"partition ids: {hub}")
        expect(isinstance(hub["created_at"], datetime.datetime), f"created_at: {hub}")
        part = producer.get_partition_properties("0")
        for key in ("eventhub_name", "id", "beginning_sequence_number",
                    "last_enqueued_sequence_number", "last_enqueued_offset",
                    "last_enqueued_time_utc", "is_empty"):
            expect(key in part, f"partition properties lack {key}: {part}")
        expect(part["id"] == "0", f"partition properties: {part}")
        expect(producer.get_partition_ids() == ["0", "1", "2", "3"], "get_partition_ids")


# ---------------------------------------------------------------------------------------------
# (c) authentication failures


@check("auth: a wrong key fails with an authentication error, promptly")
def wrong_key(send_cs, _manage_cs):
    bad = re.sub(r"SharedAccessKey=[^;]*", "SharedAccessKey=" + "A" * 43 + "=", send_cs)

    def attempt():
        with EventHubProducerClient.from_connection_string(bad, retry_total=1) as producer:
            batch = producer.create_batch()
            batch.add(EventData("never"))
            producer.send_batch(batch)

    finished, _, exc = run_with_timeout(attempt, 60)
    expect(finished, "a producer with a wrong key hung for 60 s")
    expect(exc is not None, "a producer with a wrong key succeeded")
    expect(isinstance(exc, AuthenticationError), f"expected AuthenticationError, got {exc!r}")


@check("auth: a consumer without the Listen right is refused")
def no_listen(send_cs, _manage_cs):
    errors = []
    client = EventHubConsumerClient.from_connection_string(send_cs, consumer_group="$Default",
                                                           retry_total=0)
    got_error = threading.Event()

    def on_error(_ctx, err):
        errors.append(err)
        got_error.set()

    thread = threading.Thread(
        target=client.receive,
        kwargs=dict(on_event=lambda _c, _e: None, on_error=on_error, partition_id="0",
                    starting_position="-1"),
        daemon=True,
    )
    thread.start()
    got_error.wait(30)
    client.close()
    thread.join(15)
    expect(errors, "no error reported within 30 s")
    expect(any(isinstance(e, (AuthenticationError, EventHubError)) and
               ("Listen" in str(e) or "nauthorized" in str(e)) for e in errors),
           f"unexpected errors: {errors!r}")


# ---------------------------------------------------------------------------------------------
# (d) consumer reads back what hubsend sent


SENSORS = ["7", "FWfAT", "pump-1", "valve-22", "sensor-ß"]


@check("consumer: reads back events sent by the hubsend CLI (bodies, content type, keys)")
def consume_hubsend(send_cs, manage_cs, hubsend):
    records = []
    base = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
    for i in range(20):
        records.append({
            "sensor_id": SENSORS[i % len(SENSORS)],
            "timestamp": (base + datetime.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "value": i * 1.5,
            "run": RUN,
            "seq": i,
        })
    with tempfile.NamedTemporaryFile("w", suffix=".ndjson", delete=False) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        path = f.name
    try:
        proc = subprocess.run(
            [hubsend, "send", "--connection-string", send_cs, "--input", path,
             "--partition-key-field", "sensor_id", "--json"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        os.unlink(path)
    expect(proc.returncode == 0, f"hubsend send exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  hubsend report: {json.dumps(report)[:300]}", flush=True)

    def ours(ev):
        try:
            return json.loads(ev.body_as_str()).get("run") == RUN
        except (ValueError, TypeError, AttributeError):
            return False

    by_partition = {}
    for pid in ("0", "1", "2", "3"):
        by_partition[pid] = receive(manage_cs, pid, "-1", 20, timeout=3, settle=0, match=ours)
    events = [e for evs in by_partition.values() for e in evs]
    expect(len(events) == 20, f"expected 20 events back, got {len(events)}")
    sensor_partition = {}
    for pid, evs in by_partition.items():
        last_seq = -1
        for ev in evs:
            body = json.loads(ev.body_as_str())
            rec = records[body["seq"]]
            expect(body["sensor_id"] == rec["sensor_id"] and body["value"] == rec["value"],
                   f"body differs: {body} vs {rec}")
            expect(body["timestamp"].startswith("2024-05-01T12:00:"), f"timestamp {body}")
            expect(ev.content_type == "application/json", f"content type {ev.content_type!r}")
            expect(ev.partition_key == rec["sensor_id"].encode("utf-8"),
                   f"partition key {ev.partition_key!r} != {rec['sensor_id']!r}")
            expect(ev.sequence_number > last_seq, "sequence numbers not increasing")
            last_seq = ev.sequence_number
            expect(sensor_partition.setdefault(rec["sensor_id"], pid) == pid,
                   f"sensor {rec['sensor_id']} split over partitions")
    # Per-sensor order is preserved.
    for sensor in SENSORS:
        seqs = [json.loads(e.body_as_str())["seq"] for e in by_partition[sensor_partition[sensor]]
                if json.loads(e.body_as_str())["sensor_id"] == sensor]
        expect(seqs == sorted(seqs) and len(seqs) == 4, f"sensor {sensor} order {seqs}")
    expect(sensor_partition["7"] == "3" and sensor_partition["FWfAT"] == "1",
           f"key placement differs from the service: {sensor_partition}")


@check("consumer: starting positions (offset, sequence number, inclusive, enqueued time, @latest)")
def starting_positions(send_cs, manage_cs):
    tag = f"pos-{RUN}"
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        for i in range(6):
            batch = producer.create_batch(partition_id="1")
            ev = EventData(f"pos {i}")
            ev.properties = {"tag": tag, "i": i}
            batch.add(ev)
            producer.send_batch(batch)
            if i == 2:
                time.sleep(0.05)
    everything = receive(manage_cs, "1", "-1", 6, match=tagged(tag))
    expect(len(everything) == 6, f"expected 6, got {len(everything)}")
    third = everything[2]
    idx = lambda evs: [e.properties[b"i"] for e in evs]  # noqa: E731

    got = receive(manage_cs, "1", third.sequence_number, 3, match=tagged(tag))
    expect(idx(got) == [3, 4, 5], f"after sequence number: {idx(got)}")
    got = receive(manage_cs, "1", third.sequence_number, 4, inclusive=True, match=tagged(tag))
    expect(idx(got) == [2, 3, 4, 5], f"from sequence number inclusive: {idx(got)}")
    got = receive(manage_cs, "1", third.offset, 3, match=tagged(tag))
    expect(idx(got) == [3, 4, 5], f"after offset: {idx(got)}")
    got = receive(manage_cs, "1", third.offset, 4, inclusive=True, match=tagged(tag))
    expect(idx(got) == [2, 3, 4, 5], f"from offset inclusive: {idx(got)}")
    got = receive(manage_cs, "1", third.enqueued_time, 3, match=tagged(tag))
    expect(idx(got) == [3, 4, 5], f"after enqueued time: {idx(got)}")

    def produce_late():
        with EventHubProducerClient.from_connection_string(send_cs) as producer:
            batch = producer.create_batch(partition_id="1")
            ev = EventData("late")
            ev.properties = {"tag": tag, "i": 99}
            batch.add(ev)
            producer.send_batch(batch)

    got = receive(manage_cs, "1", "@latest", 1, match=tagged(tag), after_start=produce_late)
    expect(idx(got) == [99], f"@latest: {idx(got)}")


BULK_EVENTS = 100_000
BULK_PARTITIONS = ("0", "1", "2", "3")


def bulk_record(i):
    """Record `i` of the bulk check; its body is checked field by field when read back."""
    return {
        "sensor_id": f"bulk-{i % 97}",
        "timestamp": f"2024-05-01T12:{(i // 60) % 60:02d}:{i % 60:02d}Z",
        "value": i * 0.25,
        "run": RUN,
        "seq": i,
        "pad": format(i * 2654435761 % 2**32, "08x") * 4,
    }


@check("consumer: 100,000 events over 4 partitions read back intact through one "
       "EventHubConsumerClient.receive")
def consume_bulk(send_cs, manage_cs, hubsend):
    # Sent by the hubsend CLI, a quarter per partition, in parallel. Even partitions matter: the
    # SDK's sync receive() serves its partitions round-robin, one event per partition per round,
    # and a partition with nothing left blocks each round for the socket timeout (0.2 s), so
    # once one partition is drained the others crawl at ~2.5 events/s each whatever the hub does.
    paths, procs = [], []
    try:
        for pid in BULK_PARTITIONS:
            with tempfile.NamedTemporaryFile("w", suffix=".ndjson", delete=False) as f:
                for i in range(int(pid), BULK_EVENTS, len(BULK_PARTITIONS)):
                    f.write(json.dumps(bulk_record(i)) + "\n")
                paths.append(f.name)
            procs.append(subprocess.Popen(
                [hubsend, "send", "--connection-string", send_cs, "--input", f.name,
                 "--partition-id", pid, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        sent_started = time.monotonic()
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            expect(proc.returncode == 0, f"hubsend send exited {proc.returncode}: {err[-2000:]}")
            report = json.loads(out.strip().splitlines()[-1])
            expect(report.get("sent") == BULK_EVENTS // len(BULK_PARTITIONS),
                   f"hubsend report: {json.dumps(report)[:300]}")
        print(f"  sent {BULK_EVENTS} events in {time.monotonic() - sent_started:.1f}s", flush=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for path in paths:
            os.unlink(path)

    seen = bytearray(BULK_EVENTS)
    problems = []
    state = {"count": 0, "first": None, "last": None}
    done = threading.Event()
    client = EventHubConsumerClient.from_connection_string(manage_cs, consumer_group="$Default")

    def on_event(ctx, ev):
        if ev is None:
            return
        try:
            body = json.loads(ev.body_as_str())
        except (ValueError, TypeError):
            return
        if not isinstance(body, dict) or body.get("run") != RUN or "pad" not in body:
            return
        i = body.get("seq")
        now = time.monotonic()
        state["first"] = state["first"] or now
        state["last"] = now
        if not isinstance(i, int) or not 0 <= i < BULK_EVENTS:
            problems.append(f"unexpected seq {i!r}")
        elif body != bulk_record(i):
            problems.append(f"event {i}: body differs: {body}")
        elif ctx.partition_id != BULK_PARTITIONS[i % len(BULK_PARTITIONS)]:
            problems.append(f"event {i} read from partition {ctx.partition_id}")
        elif seen[i]:
            problems.append(f"event {i} read twice")
        else:
            seen[i] = 1
            state["count"] += 1
            if state["count"] == BULK_EVENTS:
                done.set()
        if len(problems) > 20:
            done.set()

    started = time.monotonic()
    thread = threading.Thread(
        target=client.receive,
        kwargs=dict(on_event=on_event, starting_position="-1"),
        daemon=True,
    )
    thread.start()
    done.wait(150)
    client.close()
    thread.join(15)
    count, first, last = state["count"], state["first"], state["last"]
    span = (last - first) if first and last and last > first else 0
    rate = count / span if span else 0
    print(f"  read {count} of {BULK_EVENTS} events in {time.monotonic() - started:.1f}s "
          f"(first after {(first or started) - started:.1f}s): read rate {rate:,.0f} events/s",
          flush=True)
    expect(not problems, f"{len(problems)} problems, first: {problems[:5]}")
    missing = [i for i in range(BULK_EVENTS) if not seen[i]]
    expect(not missing, f"{len(missing)} events not read back, e.g. {missing[:10]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connection-string", required=True)
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--listen-connection-string")
    listen.add_argument("--manage-key")
    parser.add_argument("--hubsend", required=True)
    args = parser.parse_args()
    send_cs = args.connection_string
    manage_cs = args.listen_connection_string or with_policy(send_cs, "manage", args.manage_key)

    producer_batch(send_cs, manage_cs)
    producer_partition_key(send_cs, manage_cs)
    producer_partition_id(send_cs, manage_cs)
    producer_properties(send_cs, manage_cs)
    management(send_cs, manage_cs)
    wrong_key(send_cs, manage_cs)
    no_listen(send_cs, manage_cs)
    consume_hubsend(send_cs, manage_cs, args.hubsend)
    starting_positions(send_cs, manage_cs)
    consume_bulk(send_cs, manage_cs, args.hubsend)

    return summary("interop")


if __name__ == "__main__":
    sys.exit(main())
