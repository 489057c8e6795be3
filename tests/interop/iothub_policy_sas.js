// Judge helper: a device connection string carrying a policy-signed token, made with
// Microsoft's own SAS builder (azure-iot-common `SharedAccessSignature.create`, the one the
// Node SDKs sign with). Usage:
//   node iothub_policy_sas.js POLICY_CS DEVICE_ID [--wrong-key]
// POLICY_CS names a policy with DeviceConnect (HostName, SharedAccessKeyName,
// SharedAccessKey, optionally GatewayHostName). Prints
//   HostName=H;DeviceId=DEVICE_ID;SharedAccessSignature=SharedAccessSignature sr=…&sig=…&se=…&skn=…
// with audience H/devices/DEVICE_ID (sr URL-encoded, as the SDK encodes it), valid one hour.
// The Node device SDK takes host and device from the token's `sr` (it ignores HostName and
// GatewayHostName for such strings) and dials that host, so H is the reachable host: the
// GatewayHostName when given (the test hub's `localhost:PORT`, which it accepts as itself),
// else HostName. With --wrong-key the token is signed with a random key instead, so the hub
// must refuse it.
'use strict';
const crypto = require('crypto');
const { ConnectionString, SharedAccessSignature, encodeUriComponentStrict } = require('azure-iot-common');

const [policyCs, deviceId, flag] = process.argv.slice(2);
if (!policyCs || !deviceId) {
  console.error('usage: iothub_policy_sas.js POLICY_CS DEVICE_ID [--wrong-key]');
  process.exit(2);
}
const cn = ConnectionString.parse(policyCs, ['HostName', 'SharedAccessKeyName', 'SharedAccessKey']);
const host = cn.GatewayHostName || cn.HostName;
const key = flag === '--wrong-key' ? crypto.randomBytes(32).toString('base64') : cn.SharedAccessKey;
const expiry = Math.floor(Date.now() / 1000) + 3600;
const resource = encodeUriComponentStrict(`${host}/devices/${deviceId}`);
const sas = SharedAccessSignature.create(resource, cn.SharedAccessKeyName, key, expiry);
console.log(`HostName=${host};DeviceId=${deviceId};SharedAccessSignature=${sas.toString()}`);
