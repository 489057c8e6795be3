"""Many-partition-keys judge: Microsoft's Python azure-eventhub against what hubsend sent.

Usage: keys.py --connection-string CS --listen-connection-string LCS --hubsend PATH

The hubsend CLI sends one record for each of 10,000 distinct sensor ids with
`--partition-key-field sensor_id` (its buffered producer resolves each key to a partition on the
client and packs many keys into one batch per partition). Microsoft's EventHubProducerClient
sends a sample of the same keys with `create_batch(partition_key=...)`, leaving the placement to
the hub. Microsoft's EventHubConsumerClient then reads every partition back and the judge checks:

- every hubsend event arrived once, with `partition_key` equal to its sensor id, on the
  partition the service's hash gives that key, computed here independently (lookup3
  `hashlittle2` over the key's UTF-8 bytes, both halves xor-ed and folded to a signed 16-bit
  value, `abs(remainder)` over the partition count, the remainder truncated as in C#);
- this hash agrees with known service values and with Microsoft's own Python hash
  (`generate_hash_code`) for ASCII keys;
- every Microsoft event is on the same partition as hubsend's event of the same key.

Prints PASS/FAIL lines and `keys: N passed, M failed`; exits non-zero on failure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from azure.eventhub._pyamqp import _transport as _pyamqp_transport  # noqa: E402

# As interop.py: pyamqp re-applies TCP_MAXSEG, which a 65536-MTU loopback refuses.
_pyamqp_transport.KNOWN_TCP_OPTS = tuple(
    o for o in _pyamqp_transport.KNOWN_TCP_OPTS if o != "TCP_MAXSEG"
)

from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient  # noqa: E402
from azure.eventhub._buffered_producer._partition_resolver import (  # noqa: E402
    PartitionResolver,
    generate_hash_code,
)

KEYS = 10_000
SAMPLE_EVERY = 50  # Microsoft's producer sends every 50th key (200 keys)
RUN = uuid.uuid4().hex[:8]
RESULTS = []
MASK = 0xFFFFFFFF


def check(name, ok, detail=""):
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"), flush=True)


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & MASK


def _scramble(a, b, c):
    # lookup3 `mix`: six rounds of (x -= z; x ^= rotl(z, r); z += y) over a rotating triple.
    for r in (4, 6, 8, 16, 19, 4):
        a = (a - c) & MASK
        a ^= _rotl(c, r)
        c = (c + b) & MASK
        a, b, c = b, c, a
    # Six turns of a three-way rotation: the names are back where they started.
    return a, b, c


def _finish(a, b, c):
    # lookup3 `final`: seven rounds of (z ^= y; z -= rotl(y, r)), z and y moving along.
    s = [a, b, c]
    for z, y, r in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14),
                    (2, 1, 24)):
        s[z] ^= s[y]
        s[z] = (s[z] - _rotl(s[y], r)) & MASK
    return s


def service_hash(key):
    """The folded 16-bit hash the service routes `key` (a str) by: lookup3 over UTF-8 bytes."""
    data = key.encode("utf-8")
    a = b = c = (0xDEADBEEF + len(data)) & MASK
    pos = 0
    while len(data) - pos > 12:
        words = [int.from_bytes(data[pos + 4 * i:pos + 4 * i + 4], "little") for i in range(3)]
        a, b, c = (a + words[0]) & MASK, (b + words[1]) & MASK, (c + words[2]) & MASK
        a, b, c = _scramble(a, b, c)
        pos += 12
    tail = data[pos:]
    if tail:
        padded = tail + bytes(12 - len(tail))
        words = [int.from_bytes(padded[4 * i:4 * i + 4], "little") for i in range(3)]
        a, b, c = (a + words[0]) & MASK, (b + words[1]) & MASK, (c + words[2]) & MASK
        a, b, c = _finish(a, b, c)
    folded = (c ^ b) & 0xFFFF
    return folded - 0x10000 if folded >= 0x8000 else folded


def service_partition(key, count):
    h = service_hash(key)
    remainder = abs(h) % count  # C#'s remainder keeps the dividend's sign; abs() drops it
    return str(remainder)


def sensor(k):
    # One non-ASCII key: the service hashes bytes, Microsoft's Python hash characters.
    return f"sensor-ß-{k}" if k % 1000 == 7 else f"sensor-{k}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--listen-connection-string", required=True)
    parser.add_argument("--hubsend", required=True)
    args = parser.parse_args()
    send_cs, listen_cs = args.connection_string, args.listen_connection_string

    # 1. The judge's hash against known service values and Microsoft's Python hash.
    known = {"7": -15263, "FWfAT": -22341}
    got = {k: service_hash(k) for k in known}
    check("hash: known service values (\"7\" -> -15263, \"FWfAT\" -> -22341)", got == known,
          f"{got}")
    ascii_keys = [sensor(k) for k in range(KEYS) if sensor(k).isascii()]
    differ = [k for k in ascii_keys if service_hash(k) != generate_hash_code(k)]
    check("hash: equals Microsoft's Python generate_hash_code on 9,990 ASCII keys", not differ,
          f"{len(differ)} differ, e.g. {differ[:3]}")

    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        partitions = producer.get_partition_ids()
    count = len(partitions)
    # Not a check, a finding: Microsoft's Python buffered producer resolves keys with Python's
    # floored `%`, which differs from the service's truncated remainder for negative hashes.
    resolver = PartitionResolver(partitions)
    moved = sum(1 for k in range(KEYS) if sensor(k).isascii()
                and resolver.get_partition_id_by_partition_key(sensor(k))
                != service_partition(sensor(k), count))
    print(f"NOTE Microsoft's Python buffered-producer resolver places {moved} of the ASCII keys "
          f"on another partition than the service's hash over {count} partitions", flush=True)

    # 2. hubsend sends every key once.
    with tempfile.NamedTemporaryFile("w", suffix=".ndjson", delete=False, encoding="utf-8") as f:
        for k in range(KEYS):
            f.write(json.dumps({"sensor_id": sensor(k), "timestamp": "2024-05-01T12:00:00Z",
                                "value": k, "run": RUN, "k": k}, ensure_ascii=False) + "\n")
        path = f.name
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [args.hubsend, "send", "--connection-string", send_cs, "--input", path,
             "--partition-key-field", "sensor_id", "--json"],
            capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    print(f"  hubsend report: {json.dumps(report)[:300]}", flush=True)
    check("hubsend: send --partition-key-field with 10,000 keys stores them all",
          proc.returncode == 0 and report.get("sent") == KEYS
          and report.get("partition_keys") == KEYS,
          f"exit {proc.returncode}: {proc.stderr[-1000:]}")
    # A lane per key sent one event per batch; shared batches hold what one linger gathers.
    check("hubsend: keys share batches (fewer batches than half the events)",
          0 < report.get("batches", KEYS) < KEYS // 2, f"batches {report.get('batches')}")
    print(f"  sent in {time.monotonic() - started:.1f}s", flush=True)

    # 3. Microsoft's producer sends a sample of the same keys; the hub places them.
    sample = [sensor(k) for k in range(0, KEYS, SAMPLE_EVERY)] + [sensor(7)]
    with EventHubProducerClient.from_connection_string(send_cs) as producer:
        for key in sample:
            batch = producer.create_batch(partition_key=key)
            ev = EventData(json.dumps({"sensor_id": key, "run": RUN, "by": "microsoft"}))
            batch.add(ev)
            producer.send_batch(batch)

    # 4. Read every partition back with Microsoft's consumer, one client per partition.
    expected = {}
    for k in range(KEYS):
        p = service_partition(sensor(k), count)
        expected[p] = expected.get(p, 0) + 1
    for key in sample:
        p = service_partition(key, count)
        expected[p] = expected.get(p, 0) + 1
    received = {p: [] for p in partitions}
    errors = []

    def read(pid):
        client = EventHubConsumerClient.from_connection_string(listen_cs,
                                                               consumer_group="$Default")
        done = threading.Event()

        def on_batch(_ctx, events):
            for ev in events:
                try:
                    body = json.loads(ev.body_as_str())
                except (ValueError, TypeError):
                    continue
                if isinstance(body, dict) and body.get("run") == RUN:
                    received[pid].append((body, ev.partition_key))
            if len(received[pid]) >= expected.get(pid, 0):
                done.set()

        thread = threading.Thread(target=client.receive_batch, kwargs=dict(
            on_event_batch=on_batch, on_error=lambda _c, e: errors.append(e), partition_id=pid,
            starting_position="-1", max_batch_size=1000, max_wait_time=0.5), daemon=True)
        thread.start()
        done.wait(60)
        time.sleep(0.3)  # anything beyond the expected count would show here
        client.close()
        thread.join(15)

    started = time.monotonic()
    readers = [threading.Thread(target=read, args=(p,)) for p in partitions]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    total = sum(len(v) for v in received.values())
    print(f"  read {total} events from {count} partitions in {time.monotonic() - started:.1f}s",
          flush=True)

    # 5. Judge.
    problems, seen, ours_on, theirs_on = [], set(), {}, {}
    for pid, events in received.items():
        for body, pkey in events:
            key = body.get("sensor_id")
            pkey = pkey.decode("utf-8") if isinstance(pkey, bytes) else pkey
            want = service_partition(key, count)
            if pkey != key:
                problems.append(f"{key!r} read with partition_key {pkey!r}")
            if pid != want:
                problems.append(f"{key!r} on partition {pid}, its key hashes to {want}")
            if body.get("by") == "microsoft":
                theirs_on[key] = pid
            elif body.get("k") in seen:
                problems.append(f"{key!r} read twice")
            else:
                seen.add(body.get("k"))
                ours_on[key] = pid
    check("consumer: every hubsend event once, with its key, on its key's partition",
          not problems and len(seen) == KEYS,
          f"{len(seen)} of {KEYS} read; {len(problems)} problems, first {problems[:5]}")
    split = [k for k in sample if theirs_on.get(k) != ours_on.get(k)]
    check(f"consumer: Microsoft's {len(sample)} keyed events share their keys' partitions with "
          "hubsend's", len(theirs_on) == len(set(sample)) and not split,
          f"{len(theirs_on)} read; differ: {[(k, theirs_on.get(k), ours_on.get(k)) for k in split[:5]]}")
    if errors:
        print(f"  consumer errors: {errors[:3]!r}", flush=True)

    passed = sum(1 for _, ok, _ in RESULTS if ok)
    print(f"keys: {passed} passed, {len(RESULTS) - passed} failed", flush=True)
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
