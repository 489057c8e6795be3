// Judge: Microsoft's Node IoT device SDK (azure-iot-device + azure-iot-device-amqp) sends
// device-to-cloud messages over AMQPS to the test hub in IoT Hub mode. Usage:
//   node iothub_device.js DEVICE_CONNECTION_STRING DUMP_FILE [--refused WHY [ERROR] | --websockets]
// With --websockets it uses the SDK's AMQP-over-WebSockets transport (AmqpWs), which always
// dials wss://GATEWAY:443/$iothub/websocket.
// Exits non-zero unless the hub stored exactly what was sent (read back from DUMP_FILE, which
// the test hub rewrites with every stored message). With --refused, exits non-zero unless the
// hub refuses the device (a disabled, deleted or unknown one, or a wrong key) and stores
// nothing from it; with ERROR, also unless the SDK's error is of that class (e.g.
// UnauthorizedError, DeviceNotFoundError), so a refusal for another reason (an unreachable
// host, say) does not pass. The connection string may carry a SharedAccessSignature instead of
// a key (see iothub_policy_sas.js).
'use strict';
const fs = require('fs');
const { Client, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');

const [connectionString, dumpFile, mode, why, expectedError] = process.argv.slice(2);
const transport = mode === '--websockets' ? AmqpWs : Amqp;
const judge = mode === '--websockets' ? 'iothub node device SDK (AmqpWs)'
  : /SharedAccessSignature=/.test(connectionString) ? 'iothub node device SDK (policy-signed token)'
    : 'iothub node device SDK';
const deviceId = /DeviceId=([^;]+)/.exec(connectionString)[1];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function message(i) {
  const m = new Message(JSON.stringify({ sensor_id: `compressor-7:vibe_x`, value: 40 + i }));
  m.messageId = `node-${i}`;
  m.correlationId = `corr-${i}`;
  m.contentType = 'application/json';
  m.contentEncoding = 'utf-8';
  m.properties.add('site', 'plant-3');
  m.properties.add('n', String(i));
  return m;
}

function storedOf(deviceId) {
  try {
    return JSON.parse(fs.readFileSync(dumpFile, 'utf8')).filter((m) => m.device === deviceId);
  } catch (_) {
    return [];
  }
}

async function refused() {
  const before = storedOf(deviceId).length;
  const client = Client.fromConnectionString(connectionString, Amqp);
  try {
    await client.open();
    await client.sendEvent(new Message('must not be stored'));
  } catch (e) {
    await client.close().catch(() => {});
    await sleep(300);
    // More than before, or the refused body itself: a device deleted meanwhile may have had
    // its earlier messages dropped, so fewer is no sign of a stored refusal.
    const after = storedOf(deviceId);
    if (after.length > before || after.some((m) => m.body === 'must not be stored')) {
      console.log(`FAIL iothub node device SDK (${why}): refused, yet a message was stored`);
      process.exit(1);
    }
    if (expectedError && e.constructor.name !== expectedError) {
      console.log(`FAIL iothub node device SDK (${why}): refused with ${e.constructor.name} (${e.message}), expected ${expectedError}`);
      process.exit(1);
    }
    console.log(`PASS iothub node device SDK: ${why} refused (${e.constructor.name})`);
    return;
  }
  await client.close().catch(() => {});
  console.log(`FAIL iothub node device SDK: ${why} was not refused`);
  process.exit(1);
}

async function main() {
  if (mode === '--refused') return refused();
  const client = Client.fromConnectionString(connectionString, transport);
  await client.open();
  const singles = 5;
  for (let i = 0; i < singles; i++) {
    await client.sendEvent(message(i));
  }
  const batch = [];
  for (let i = singles; i < singles + 5; i++) batch.push(message(i));
  let batched = 0;
  try {
    await client.sendEventBatch(batch);
    batched = batch.length;
  } catch (e) {
    console.log(`NOTE sendEventBatch is not supported over this transport: ${e.message}`);
  }
  await client.close();
  const expected = singles + batched;
  let stored = [];
  for (let t = 0; t < 50; t++) {
    try {
      stored = JSON.parse(fs.readFileSync(dumpFile, 'utf8')).filter((m) => m.device === deviceId);
    } catch (_) { /* not written yet */ }
    if (stored.length >= expected) break;
    await sleep(100);
  }
  const problems = [];
  if (stored.length !== expected) problems.push(`stored ${stored.length} messages, sent ${expected}`);
  stored.forEach((m, i) => {
    const body = JSON.parse(m.body);
    if (body.value !== 40 + i) problems.push(`message ${i}: body ${m.body}`);
    if (m.message_id !== `node-${i}`) problems.push(`message ${i}: message-id ${m.message_id}`);
    if (m.correlation_id !== `corr-${i}`) problems.push(`message ${i}: correlation-id ${m.correlation_id}`);
    if (m.content_type !== 'application/json') problems.push(`message ${i}: content-type ${m.content_type}`);
    if (m.properties.site !== 'plant-3' || m.properties.n !== String(i)) {
      problems.push(`message ${i}: properties ${JSON.stringify(m.properties)}`);
    }
  });
  if (problems.length) {
    console.log(`FAIL ${judge}: ${problems.join('; ')}`);
    process.exit(1);
  }
  console.log(`PASS ${judge}: ${singles} sendEvent + ${batched} sendEventBatch messages stored intact`);
}

main().catch((e) => {
  console.log(`FAIL ${judge}: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
