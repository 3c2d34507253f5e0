// Profiles through the official libsignal client (spec §8, §7.3; issue 7): Alice derives her profile
// key with libsignal (zkgroup ProfileKey: version, commitment, access key), registers with that access
// key, encrypts her name the way Signal clients do (AES-256-GCM under the profile key, padded to 53
// bytes → 81 bytes on the wire), uploads it with `PUT /v1/profile` over her authenticated chat socket
// with an avatar UPDATE, and POSTs the avatar to the built-in store with the S3 policy form she got.
// Bob reads the profile anonymously over libsignal's unauthenticated socket with the access key,
// checks the `unidentifiedAccess` checksum, decrypts the name, and fetches the avatar from the CDN path.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import https from 'node:https';

import { ProfileKey } from '@signalapp/libsignal-client/dist/zkgroup/index.js';

import * as H from './harness.mjs';


const NUMBERS = { alice: '+15555550400', bob: '+15555550401' };
const CODE = '123456';
const NAME_PADDED = 53; // Signal pads profile names to 53 (or 257) bytes before encryption

let server;
let net;
const accounts = {};
let profileKey;

before(async () => {
  server = await H.startServer({
    testNumbers: { ...H.TEST_NUMBERS, ...Object.fromEntries(Object.values(NUMBERS).map((n) => [n, CODE])) },
  });
  net = server.makeNet();
});

after(async () => {
  await server?.stop();
});

/** One HTTPS request to the server (the CDN side: avatars, attachments), trusting the test CA. */
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

function multipart(fields, file) {
  const boundary = '----mailslot' + randomBytes(8).toString('hex');
  const parts = [];
  for (const [name, value] of Object.entries(fields)) {
    parts.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`));
  }
  parts.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="avatar"\r\n` +
    'Content-Type: application/octet-stream\r\n\r\n'), file, Buffer.from(`\r\n--${boundary}--\r\n`));
  const body = Buffer.concat(parts);
  return { body, headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'content-length': body.length } };
}

function encryptName(key, name) {
  const padded = Buffer.alloc(NAME_PADDED);
  Buffer.from(name, 'utf8').copy(padded);
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  const ciphertext = Buffer.concat([cipher.update(padded), cipher.final()]);
  return Buffer.concat([nonce, ciphertext, cipher.getAuthTag()]);
}

function decryptName(key, blob) {
  const nonce = blob.subarray(0, 12);
  const tag = blob.subarray(blob.length - 16);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAuthTag(tag);
  const plain = Buffer.concat([decipher.update(blob.subarray(12, blob.length - 16)), decipher.final()]);
  return plain.subarray(0, plain.indexOf(0) === -1 ? plain.length : plain.indexOf(0)).toString('utf8');
}

test('a libsignal client uploads its profile and avatar; another reads them with the access key', { timeout: 60_000 }, async () => {
  profileKey = new ProfileKey(new Uint8Array(randomBytes(32)));
  const material = H.makeRegistrationMaterial();
  material.unidentifiedAccessKey = profileKey.deriveAccessKey();
  accounts.alice = await H.registerTestAccount(net, NUMBERS.alice, { material, code: CODE });
  accounts.bob = await H.registerTestAccount(net, NUMBERS.bob, { code: CODE });
  const aliceAci = accounts.alice.aci;
  const aciString = aliceAci.getServiceIdString();

  const version = profileKey.getProfileKeyVersion(aliceAci).toString();
  assert.match(version, /^[0-9a-f]{64}$/);
  const commitment = profileKey.getCommitment(aliceAci).serialize();
  const keyBytes = Buffer.from(profileKey.serialize());
  const name = encryptName(keyBytes, 'Alice');
  assert.equal(name.length, 81);

  const alice = await server.connectAuthenticated(accounts.alice.username, accounts.alice.password);
  const put = await H.chatRequest(alice, 'PUT', '/v1/profile', {
    json: {
      version, commitment: H.b64(commitment), name: H.b64(name), about: null, aboutEmoji: null,
      paymentAddress: null, phoneNumberSharing: null, avatar: true, sameAvatar: false, badgeIds: [],
    },
  });
  assert.equal(put.status, 200, H.describe(put));
  const form = put.json;
  for (const field of ['key', 'credential', 'acl', 'algorithm', 'date', 'policy', 'signature']) {
    assert.equal(typeof form[field], 'string', `${field} in ${put.text}`);
  }
  const avatar = randomBytes(20_000);
  const { body, headers } = multipart({
    key: form.key, acl: form.acl, 'x-amz-credential': form.credential, 'x-amz-algorithm': form.algorithm,
    'x-amz-date': form.date, policy: form.policy, 'x-amz-signature': form.signature,
    'Content-Type': 'application/octet-stream',
  }, avatar);
  const posted = await httpsRequest('POST', '/', { headers, body });
  assert.equal(posted.status, 204, posted.body.toString());

  // Bob, anonymously, with the access key libsignal derives from Alice's profile key
  const anon = await server.connectUnauthenticated(net);
  const accessKey = profileKey.deriveAccessKey();
  const read = await H.chatRequest(anon, 'GET', `/v1/profile/${aciString}/${version}`, {
    headers: [['unidentified-access-key', H.b64(accessKey)]],
  });
  assert.equal(read.status, 200, H.describe(read));
  assert.equal(read.json.uuid, aciString);
  assert.equal(read.json.identityKey, H.b64(accounts.alice.material.aci.identityPublic.serialize()));
  const checksum = createHmac('sha256', Buffer.from(accessKey)).update(Buffer.alloc(32)).digest('base64');
  assert.equal(read.json.unidentifiedAccess, checksum);
  assert.equal(decryptName(keyBytes, Buffer.from(read.json.name, 'base64')), 'Alice');
  assert.equal(read.json.avatar, form.key);
  const fetched = await httpsRequest('GET', `/${read.json.avatar}`);
  assert.equal(fetched.status, 200);
  assert.ok(fetched.body.equals(avatar), 'the avatar comes back byte for byte');

  // without the key, or with another, anonymous reads are refused with 401
  const noKey = await H.chatRequest(anon, 'GET', `/v1/profile/${aciString}/${version}`);
  assert.equal(noKey.status, 401, H.describe(noKey));
  const wrongKey = await H.chatRequest(anon, 'GET', `/v1/profile/${aciString}`, {
    headers: [['unidentified-access-key', H.b64(randomBytes(16))]],
  });
  assert.equal(wrongKey.status, 401, H.describe(wrongKey));

  // and Bob, authenticated, reads the same
  const bob = await server.connectAuthenticated(accounts.bob.username, accounts.bob.password);
  const authed = await H.chatRequest(bob, 'GET', `/v1/profile/${aciString}/${version}`);
  assert.equal(authed.status, 200, H.describe(authed));
  assert.equal(authed.json.name, read.json.name);
});
