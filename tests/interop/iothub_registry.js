// Judge: Microsoft's Node azure-iothub `Registry` against the test hub's registry and twin REST.
//
// Usage: node iothub_registry.js OWNER_CS (NODE_EXTRA_CA_CERTS names the test hub's CA,
// NODE_PATH the node_modules holding azure-iothub). Creates a device, reads it, creates it
// again (409 DeviceAlreadyExists), reads and updates its twin (desired deviceName and a tag,
// then a stale etag refused), deletes it and finds it gone. Prints PASS/FAIL lines and
// `iothub-registry-node: N passed, M failed` last; exits 1 on any failure.
'use strict';

const crypto = require('crypto');
const https = require('https');
const { Registry } = require('azure-iothub');

const ownerCs = process.argv[2];
if (!ownerCs) {
  console.error('usage: iothub_registry.js OWNER_CS');
  process.exit(2);
}
const registry = Registry.fromConnectionString(ownerCs);
// The SDK always dials port 443 of `HostName`; the test hub's HostName is `localhost:PORT`
// (the SAS audience and Host header keep it). Its documented `http.agent` option takes an
// agent that dials that port instead; requests, tokens and parsing stay the SDK's own.
const hostPort = /HostName=[^;:]*:(\d+)/.exec(ownerCs);
if (hostPort) {
  const port = Number(hostPort[1]);
  class PortAgent extends https.Agent {
    createConnection(options, cb) {
      return super.createConnection({ ...options, host: '127.0.0.1', port, servername: 'localhost' }, cb);
    }
  }
  registry._restApiClient.setOptions({ http: { agent: new PortAgent({ keepAlive: true }) } });
}
const deviceId = 'node-judge-' + crypto.randomBytes(4).toString('hex') + '#1';
const results = [];

function assert(cond, what) {
  if (!cond) throw new Error(what);
}

// The HTTP status of a failed SDK call (azure-iot-common errors carry the response).
function statusOf(err) {
  return (err && err.response && err.response.statusCode) ||
    (err && err.responseBody && err.responseBody.statusCode) || undefined;
}

async function expectFailure(call, status, name, what) {
  let err = null;
  try {
    await call();
  } catch (e) {
    err = e;
  }
  assert(err, what);
  assert(statusOf(err) === status, `status ${statusOf(err)}, expected ${status}: ${err}`);
  if (name) assert(err.name === name, `error ${err.name}, expected ${name}: ${err.message}`);
}

async function check(name, fn) {
  try {
    await fn();
    results.push(true);
    console.log(`PASS ${name}`);
  } catch (e) {
    results.push(false);
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

let created = null;

async function create() {
  const res = await registry.create({ deviceId, status: 'enabled' });
  const d = res.responseBody;
  assert(res.httpResponse.statusCode === 200, `status ${res.httpResponse.statusCode}`);
  assert(d.deviceId === deviceId, `deviceId ${d.deviceId}`);
  assert(d.authentication && d.authentication.symmetricKey &&
    d.authentication.symmetricKey.primaryKey, 'no generated key');
  assert(d.etag && d.generationId, 'no etag or generationId');
  created = d;
}

async function get() {
  const d = (await registry.get(deviceId)).responseBody;
  assert(d.deviceId === deviceId && d.status === 'enabled', JSON.stringify(d));
  assert(d.authentication.symmetricKey.primaryKey === created.authentication.symmetricKey.primaryKey,
    'the key read back differs from the one created');
}

async function recreate() {
  await expectFailure(() => registry.create({ deviceId, status: 'enabled' }), 409,
    'DeviceAlreadyExistsError', 're-creating succeeded');
}

async function getUnknown() {
  await expectFailure(() => registry.get('nobody-' + crypto.randomBytes(6).toString('hex')), 404,
    'DeviceNotFoundError', 'an unknown device was found');
}

async function twin() {
  const first = (await registry.getTwin(deviceId)).responseBody;
  assert(first.deviceId === deviceId, `twin deviceId ${first.deviceId}`);
  const patch = { tags: { site: 'plant-7' }, properties: { desired: { deviceName: 'Kitchen' } } };
  const updated = (await registry.updateTwin(deviceId, patch, first.etag)).responseBody;
  assert(updated.properties.desired.deviceName === 'Kitchen', JSON.stringify(updated.properties));
  const again = (await registry.getTwin(deviceId)).responseBody;
  assert(again.properties.desired.deviceName === 'Kitchen', JSON.stringify(again.properties));
  assert(again.tags && again.tags.site === 'plant-7', JSON.stringify(again.tags));
  assert(again.etag !== first.etag, 'the twin etag did not change');
  // The Twin object's own update (the SDK's other path: PATCH with its etag).
  const obj = (await registry.getTwin(deviceId)).responseBody;
  const res = await obj.update({ properties: { desired: { interval: 30 } } });
  const patched = res.responseBody || obj;
  assert(patched.properties.desired.interval === 30, JSON.stringify(patched.properties));
  assert(patched.properties.desired.deviceName === 'Kitchen', 'a patch dropped deviceName');
  await expectFailure(() => registry.updateTwin(deviceId, { properties: { desired: { a: 1 } } },
    first.etag), 412, null, 'a stale etag was accepted');
}

async function remove() {
  await registry.delete(deviceId);
  await expectFailure(() => registry.get(deviceId), 404, 'DeviceNotFoundError',
    'the deleted device is still there');
  await expectFailure(() => registry.getTwin(deviceId), 404, null,
    'the deleted device still has a twin');
}

(async () => {
  await check('Registry.create', create);
  await check('Registry.get', get);
  await check('Registry.create again is 409 DeviceAlreadyExists', recreate);
  await check('Registry.get of an unknown device is 404', getUnknown);
  await check('Registry.getTwin, updateTwin, Twin.update, stale etag 412', twin);
  await check('Registry.delete', remove);
  const passed = results.filter(Boolean).length;
  console.log(`iothub-registry-node: ${passed} passed, ${results.length - passed} failed`);
  process.exit(passed === results.length ? 0 : 1);
})();
