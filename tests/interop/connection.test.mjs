// Server start-up and plain chat connections, seen by the official libsignal client.
//
// Spec references: docs/API.md §2 (READY line), signal-server-api.md §6 (WebSocket at
// /v1/websocket/, GET /v1/keepalive), §2.3 (bad credentials on the upgrade -> 403).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import * as H from './harness.mjs';

let server;

before(async () => {
  server = await H.startServer();
});

after(async () => {
  await server?.stop();
});

test('READY line carries host, port, tls and a 33-byte trust root', () => {
  const { ready } = server;
  assert.equal(ready.host, '127.0.0.1', `READY host: ${JSON.stringify(ready)}`);
  assert.ok(ready.port > 0, `READY port: ${JSON.stringify(ready)}`);
  assert.ok(ready.tls === true || (typeof ready.tls === 'object' && ready.tls !== null),
    `READY tls should say TLS is on (config has [tls] cert_file/key_file): ${JSON.stringify(ready)}`);
  assert.equal(typeof ready.trustRoot, 'string',
    `READY trustRoot should be base64 of the 33-byte sealed-sender trust-root public key (API.md §2): ${JSON.stringify(ready)}`);
  const raw = Buffer.from(ready.trustRoot, 'base64');
  assert.equal(raw.length, 33, `trustRoot should be base64 of a 33-byte public key (API.md §2), got ${raw.length} bytes`);
  // libsignal must be able to parse it as a Curve25519 public key (type byte 0x05).
  const key = H.PublicKey.deserialize(new Uint8Array(raw));
  assert.deepEqual(Buffer.from(key.serialize()), raw);
});

test('unauthenticated chat connection over TLS answers GET /v1/keepalive with 200', async () => {
  const conn = await server.connectUnauthenticated();
  try {
    const resp = await H.chatRequest(conn, 'GET', '/v1/keepalive');
    assert.equal(resp.status, 200, H.describe(resp));
  } finally {
    await server.disconnect(conn);
  }
});

test('unknown path over the unauthenticated chat connection is a 4xx, not a 5xx', async () => {
  const conn = await server.connectUnauthenticated();
  try {
    const resp = await H.chatRequest(conn, 'GET', '/v1/this/does/not/exist');
    assert.ok(resp.status >= 400 && resp.status < 500, H.describe(resp));
  } finally {
    await server.disconnect(conn);
  }
});

test('authenticated chat connection with unknown credentials is refused (403 on upgrade)', async () => {
  const aci = '9d0652a3-dcc3-4d11-975f-74d61598733f';
  await assert.rejects(
    server.connectAuthenticated(`${aci}.1`, 'not-the-password'),
    (e) => {
      // libsignal maps a 403 on the WebSocket upgrade to DeviceDelinked (ConnectError::DeviceDeregistered).
      assert.equal(e.code, H.ErrorCode.DeviceDelinked,
        `expected DeviceDelinked (HTTP 403 on the upgrade, spec §2.3), got ${H.describeLibsignalError(e)}`);
      return true;
    },
  );
});
