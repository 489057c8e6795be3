// Judge: Microsoft's JS EventHubBufferedProducerClient (@azure/event-hubs) with
// enableIdempotentRetries sends COUNT events to the test hub (Event Hubs mode, plain AMQP via
// UseDevelopmentEmulator=true), one partition per event by n % partitions; then Microsoft's
// EventHubConsumerClient reads every stored event back, up to each partition's last enqueued
// sequence number, so duplicates are seen too. Usage:
//   node eventhubs_idempotent.js SEND_CS LISTEN_CS COUNT LABEL [at-least-once]
// Exits non-zero unless every n was stored exactly once, in order within its partition. With
// `at-least-once`, duplicates are reported (NOTE) instead: the SDK renumbers a resend from the
// attach reply, so when the hub answers a resume with the last number it stored, a batch stored
// before its acknowledgement was lost is stored again under new numbers; then every n must still
// be stored, and its first copies in order.
'use strict';
const {
  EventHubBufferedProducerClient,
  EventHubConsumerClient,
  earliestEventPosition,
} = require('@azure/event-hubs');

// Workaround for a known bug of rhea-promise 3.0.3 (the newest release, used by
// @azure/event-hubs 5.12.2; amqp/rhea-promise#109, fixed upstream by PR #119): when a connection
// is lost with a send in flight, the send's timeout handler reads `address` on a link whose
// remote attach is gone, throws a TypeError in a timer (crashing the process) and never
// settles the send, so the partition hangs. Let `address` be undefined there instead, so the
// send times out as designed and the SDK retries it; count how often that happened.
let lostSends = 0;
{
  const { AwaitableSender } = require('rhea-promise');
  let proto = AwaitableSender.prototype;
  while (proto && !Object.getOwnPropertyDescriptor(proto, 'address')) proto = Object.getPrototypeOf(proto);
  if (proto) {
    Object.defineProperty(proto, 'address', {
      configurable: true,
      get() {
        if (!this.source) {
          lostSends += 1;
          return undefined;
        }
        return this.source.address;
      },
    });
  }
}

const [sendCs, listenCs, countArg, label, mode] = process.argv.slice(2);
const atLeastOnce = mode === 'at-least-once';
const count = Number(countArg);
let failed = 0;
function check(ok, what) {
  console.log(`${ok ? 'PASS' : 'FAIL'} js-idempotent ${label}: ${what}`);
  if (!ok) failed += 1;
}

// Events the SDK gave up on and told the application about (onSendEventsErrorHandler).
const reportedFailed = new Set();

async function send() {
  const sendErrors = [];
  const producer = new EventHubBufferedProducerClient(sendCs, {
    enableIdempotentRetries: true,
    // Small buffers and a short wait: many small batches, so the stream is still running when
    // the hub's fault closes the connection.
    maxEventBufferLengthPerPartition: 50,
    maxWaitTimeInMs: 10,
    // A send whose connection was lost gets no outcome and waits for this timeout before the
    // SDK retries it (see above): keep it short.
    retryOptions: { maxRetries: 10, retryDelayInMs: 100, maxRetryDelayInMs: 1000, timeoutInMs: 3000 },
    onSendEventsErrorHandler: (ctx) => {
      const ns = ctx.events.map((e) => e.properties && e.properties.n);
      for (const n of ns) reportedFailed.add(n);
      sendErrors.push(`partition ${ctx.partitionId}, ${ns.length} events n=${ns[0]}..${ns[ns.length - 1]}: ${ctx.error && ctx.error.message}`);
    },
  });
  const partitions = (await producer.getPartitionIds()).length;
  for (let n = 0; n < count; n++) {
    await producer.enqueueEvent(
      { body: { n }, properties: { n } },
      { partitionId: String(n % partitions) },
    );
  }
  await producer.flush();
  await producer.close();
  // The SDK gives up on a batch when re-creating its link races with the close ("Failed to
  // connect" is not retried) and hands its events to the error handler: the application knows
  // they may be missing, so they are excused from "every event stored" (never from "stored
  // twice").
  for (const e of sendErrors.slice(0, 5)) console.log(`NOTE js-idempotent ${label}: the SDK reported a send as failed: ${e}`);
  return partitions;
}

async function readBack(partitions) {
  const consumer = new EventHubConsumerClient('$Default', listenCs);
  const last = {};
  for (let p = 0; p < partitions; p++) {
    const props = await consumer.getPartitionProperties(String(p));
    last[p] = props.isEmpty ? -1 : props.lastEnqueuedSequenceNumber;
  }
  const got = {};
  for (let p = 0; p < partitions; p++) got[p] = [];
  const errors = [];
  await new Promise((resolve, reject) => {
    const done = () => Object.keys(last).every((p) => last[p] < 0 || (got[p].length && got[p][got[p].length - 1].seq >= last[p]));
    const timer = setTimeout(() => reject(new Error('timed out reading back')), 30000);
    const sub = consumer.subscribe(
      {
        processEvents: async (events, ctx) => {
          for (const e of events) got[ctx.partitionId].push({ seq: e.sequenceNumber, n: e.properties && e.properties.n });
          if (done()) {
            clearTimeout(timer);
            sub.close().then(resolve, reject);
          }
        },
        processError: async (err) => { errors.push(String(err && err.message)); },
      },
      { startPosition: earliestEventPosition, maxBatchSize: 500, maxWaitTimeInSeconds: 1 },
    );
    if (done()) {
      clearTimeout(timer);
      sub.close().then(resolve, reject);
    }
  });
  await consumer.close();
  const seen = new Map();
  let stored = 0;
  let outOfOrder = 0;
  for (let p = 0; p < partitions; p++) {
    let prev = -1;
    for (const { n } of got[p]) {
      stored += 1;
      const copies = (seen.get(n) || 0) + 1;
      seen.set(n, copies);
      if (atLeastOnce && copies > 1) continue;
      if (n % partitions !== p || n <= prev) outOfOrder += 1;
      prev = n;
    }
  }
  let missing = 0;
  let duplicates = 0;
  for (let n = 0; n < count; n++) {
    const c = seen.get(n) || 0;
    if (c === 0 && !reportedFailed.has(n)) missing += 1;
    if (c > 1) duplicates += c - 1;
  }
  console.log(`  js-idempotent ${label}: sent ${count}, stored ${stored}, missing ${missing}, duplicates ${duplicates}`);
  if (reportedFailed.size) console.log(`NOTE js-idempotent ${label}: ${reportedFailed.size} events reported failed by the SDK are not required to be stored`);
  check(missing === 0, `every event stored that the SDK did not report as failed (${missing} missing)`);
  if (atLeastOnce) {
    console.log(`NOTE js-idempotent ${label}: ${duplicates} events stored twice: the SDK renumbered resends of unacknowledged batches from the attach reply`);
    check(outOfOrder === 0, `first copies in order per partition (${outOfOrder} out of order)`);
  } else {
    check(duplicates === 0, `no event stored twice (${duplicates} duplicates, ${stored} stored)`);
    check(outOfOrder === 0, `order kept per partition (${outOfOrder} out of order)`);
  }
}

(async () => {
  const started = Date.now();
  const partitions = await send();
  console.log(`  js-idempotent ${label}: sent ${count} events in ${Date.now() - started} ms`);
  if (lostSends) console.log(`NOTE js-idempotent ${label}: ${lostSends} send(s) lost with the connection timed out and were retried (rhea-promise#109 worked around)`);
  await readBack(partitions);
  process.exit(failed ? 1 : 0);
})().catch((err) => {
  console.log(`FAIL js-idempotent ${label}: ${err && err.stack}`);
  process.exit(1);
});
