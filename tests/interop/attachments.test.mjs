// Attachments through the official libsignal client's chat connection (spec §9; issue 7): Alice asks
// for an upload form over her authenticated libsignal socket (`cdn: 3`), uploads the (client-side
// encrypted: AES-256-CBC + HMAC-SHA256, as Signal clients do) attachment to the built-in tus 1.0
// endpoint in two PATCHes, resuming from the offset HEAD reports; Bob, another account, downloads
// it (whole and with Range), checks the MAC and decrypts it.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';
import https from 'node:https';

import * as H from './harness.mjs';

const NUMBERS = { alice: '+15555550410', bob: '+15555550411' };
const CODE = '123456';

let server;
let net;

before(async () => {
  server = await H.startServer({
    testNumbers: { ...H.TEST_NUMBERS, ...Object.fromEntries(Object.values(NUMBERS).map((n) => [n, CODE])) },
  });
  net = server.makeNet();
});

after(async () => {
  await server?.stop();
});

function httpsRequest(method, path, { headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1', port: server.port, servername: 'localhost', ca: server.pki.caPem, method, path, headers,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

function encryptAttachment(plaintext) {
  const aesKey = randomBytes(32);
  const macKey = randomBytes(32);
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', aesKey, iv);
  const body = Buffer.concat([iv, cipher.update(plaintext), cipher.final()]);
  const mac = createHmac('sha256', macKey).update(body).digest();
  return { keys: { aesKey, macKey }, blob: Buffer.concat([body, mac]) };
}

function decryptAttachment({ aesKey, macKey }, blob) {
  const body = blob.subarray(0, blob.length - 32);
  const mac = createHmac('sha256', macKey).update(body).digest();
  assert.ok(mac.equals(blob.subarray(blob.length - 32)), 'attachment MAC');
  const decipher = createDecipheriv('aes-256-cbc', aesKey, body.subarray(0, 16));
  return Buffer.concat([decipher.update(body.subarray(16)), decipher.final()]);
}

test('an attachment uploaded by one account over tus is downloaded by another', { timeout: 60_000 }, async () => {
  const alice = await H.registerTestAccount(net, NUMBERS.alice, { code: CODE });
  const bob = await H.registerTestAccount(net, NUMBERS.bob, { code: CODE });
  const plaintext = randomBytes(3 * 1024 * 1024 + 123);
  const { keys, blob } = encryptAttachment(plaintext);

  const aliceChat = await server.connectAuthenticated(alice.username, alice.password);
  const formResponse = await H.chatRequest(aliceChat, 'GET', `/v4/attachments/form/upload?uploadLength=${blob.length}`);
  assert.equal(formResponse.status, 200, H.describe(formResponse));
  const form = formResponse.json;
  assert.equal(form.cdn, 3);
  assert.equal(form.key.length, 20);
  const location = new URL(form.signedUploadLocation);
  assert.equal(location.pathname, '/attachments');

  const tus = { 'tus-resumable': '1.0.0', authorization: form.headers.Authorization };
  const created = await httpsRequest('POST', location.pathname, {
    headers: { ...tus, 'upload-length': String(blob.length), 'upload-metadata': form.headers['Upload-Metadata'] },
  });
  assert.equal(created.status, 201, created.body.toString());
  const uploadPath = new URL(created.headers.location).pathname;
  assert.equal(uploadPath, `/attachments/${form.key}`);

  const patch = (offset, chunk) => httpsRequest('PATCH', uploadPath, {
    headers: { ...tus, 'upload-offset': String(offset), 'content-type': 'application/offset+octet-stream',
      'content-length': String(chunk.length) },
    body: chunk,
  });
  const half = Math.floor(blob.length / 2);
  const first = await patch(0, blob.subarray(0, half));
  assert.equal(first.status, 204, first.body.toString());
  const head = await httpsRequest('HEAD', uploadPath, { headers: tus });
  assert.equal(head.status, 200);
  const offset = Number(head.headers['upload-offset']);
  assert.equal(offset, half);
  const stale = await patch(0, blob.subarray(0, 10));
  assert.equal(stale.status, 409);
  const rest = await patch(offset, blob.subarray(offset));
  assert.equal(rest.status, 204, rest.body.toString());
  assert.equal(rest.headers['upload-offset'], String(blob.length));

  // Bob downloads it: the key came to him inside an (end-to-end encrypted) message in real life
  assert.ok(bob.aci.getServiceIdString() !== alice.aci.getServiceIdString());
  const download = await httpsRequest('GET', `/attachments/${form.key}`);
  assert.equal(download.status, 200);
  assert.equal(createHash('sha256').update(download.body).digest('hex'), createHash('sha256').update(blob).digest('hex'));
  assert.ok(decryptAttachment(keys, download.body).equals(plaintext));
  const ranged = await httpsRequest('GET', `/attachments/${form.key}`, { headers: { range: 'bytes=16-31' } });
  assert.equal(ranged.status, 206);
  assert.ok(ranged.body.equals(blob.subarray(16, 32)));
});
