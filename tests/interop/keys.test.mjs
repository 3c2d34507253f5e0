// Pre-keys and sealed sender through the official libsignal client: key upload, bundle fetch
// (authenticated and anonymous with an Unidentified-Access-Key), session set-up with the fetched
// bundle, one-time key consumption, sender certificates against the READY trust root, a sealed-sender
// round trip, and refused uploads of badly signed keys.
//
// The server has no message transport yet, so ciphertexts are handed from sender to recipient
// in-process; everything the server hands out (bundles, certificates) comes over libsignal's chat
// connections.
//
// Spec references: signal-server-api.md §0.2 (key encodings), §4.1 (key endpoints, access rules),
// §4.2 (one-time key consumption), §4.3 (signature checks), §7.1–7.3 (sender certificates, UAK);
// docs/API.md §2 (READY trustRoot); issue 3.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomInt, randomUUID } from 'node:crypto';

import * as SignalClient from '@signalapp/libsignal-client';

import * as H from './harness.mjs';

const {
  PreKeyRecord,
  PreKeyBundle,
  KEMPublicKey,
  ProtocolAddress,
  SessionRecord,
  SessionStore,
  IdentityKeyStore,
  PreKeyStore,
  SignedPreKeyStore,
  KyberPreKeyStore,
  IdentityChange,
  PreKeySignalMessage,
  CiphertextMessageType,
  SenderCertificate,
  processPreKeyBundle,
  signalEncrypt,
  signalDecryptPreKey,
  sealedSenderEncryptMessage,
  sealedSenderDecryptMessage,
  sealedSenderDecryptToUsmc,
} = SignalClient;
const { PrivateKey, PublicKey, KEMKeyPair, SignedPreKeyRecord, KyberPreKeyRecord } = H;

const DAY_MS = 24 * 60 * 60 * 1000;
const CERTIFICATE_DAYS = 7; // [sealed_sender] certificate_days default (README); the harness does not set it

// ---------------------------------------------------------------------------------------------
// Minimal in-memory libsignal stores

const bytesEqual = (a, b) => Buffer.from(a).equals(Buffer.from(b));
const fromB64 = (s) => new Uint8Array(Buffer.from(s, 'base64'));
const utf8 = (s) => new TextEncoder().encode(s);
const fromUtf8 = (b) => new TextDecoder().decode(b);

class InMemorySessionStore extends SessionStore {
  #sessions = new Map();
  async saveSession(address, record) {
    this.#sessions.set(address.toString(), record.serialize());
  }
  async getSession(address) {
    const bytes = this.#sessions.get(address.toString());
    return bytes ? SessionRecord.deserialize(bytes) : null;
  }
  async getExistingSessions(addresses) {
    return Promise.all(addresses.map(async (address) => {
      const record = await this.getSession(address);
      if (!record) throw new Error(`no session for ${address}`);
      return record;
    }));
  }
}

class InMemoryIdentityKeyStore extends IdentityKeyStore {
  #known = new Map();
  constructor(identityPrivate, registrationId) {
    super();
    this.identityPrivate = identityPrivate;
    this.registrationId = registrationId;
  }
  async getIdentityKey() {
    return this.identityPrivate;
  }
  async getLocalRegistrationId() {
    return this.registrationId;
  }
  async saveIdentity(address, key) {
    const name = address.toString();
    const previous = this.#known.get(name);
    this.#known.set(name, key.serialize());
    return previous && !bytesEqual(previous, key.serialize())
      ? IdentityChange.ReplacedExisting
      : IdentityChange.NewOrUnchanged;
  }
  async isTrustedIdentity(address, key, _direction) {
    // Trust on first use.
    const previous = this.#known.get(address.toString());
    return !previous || bytesEqual(previous, key.serialize());
  }
  async getIdentity(address) {
    const bytes = this.#known.get(address.toString());
    return bytes ? PublicKey.deserialize(bytes) : null;
  }
}

class InMemoryPreKeyStore extends PreKeyStore {
  records = new Map();
  removed = [];
  async savePreKey(id, record) {
    this.records.set(id, record);
  }
  async getPreKey(id) {
    const record = this.records.get(id);
    if (!record) throw new Error(`no one-time pre-key ${id}`);
    return record;
  }
  async removePreKey(id) {
    this.records.delete(id);
    this.removed.push(id);
  }
}

class InMemorySignedPreKeyStore extends SignedPreKeyStore {
  records = new Map();
  async saveSignedPreKey(id, record) {
    this.records.set(id, record);
  }
  async getSignedPreKey(id) {
    const record = this.records.get(id);
    if (!record) throw new Error(`no signed pre-key ${id}`);
    return record;
  }
}

class InMemoryKyberPreKeyStore extends KyberPreKeyStore {
  records = new Map();
  lastResortIds = new Set();
  used = [];
  async saveKyberPreKey(id, record) {
    this.records.set(id, record);
  }
  saveLastResortKey(record) {
    this.records.set(record.id(), record);
    this.lastResortIds.add(record.id());
  }
  async getKyberPreKey(id) {
    const record = this.records.get(id);
    if (!record) throw new Error(`no Kyber pre-key ${id}`);
    return record;
  }
  async markKyberPreKeyUsed(id, _signedPreKeyId, _baseKey) {
    this.used.push(id);
    if (!this.lastResortIds.has(id)) this.records.delete(id);
  }
}

/** One device of a registered account, with the private halves of everything it uploaded. */
class LocalDevice {
  constructor(account) {
    const keys = account.material.aci;
    this.account = account;
    this.address = ProtocolAddress.new(account.aci, account.deviceId);
    this.sessions = new InMemorySessionStore();
    this.identity = new InMemoryIdentityKeyStore(keys.identityPrivate, account.material.registrationId);
    this.preKeys = new InMemoryPreKeyStore();
    this.signedPreKeys = new InMemorySignedPreKeyStore();
    this.kyberPreKeys = new InMemoryKyberPreKeyStore();
    this.signedPreKeys.records.set(keys.signedPreKey.id(), keys.signedPreKey);
    this.kyberPreKeys.saveLastResortKey(keys.lastResortKey);
  }
}

// ---------------------------------------------------------------------------------------------
// Key material and JSON

/** `count` distinct random key ids in 1..2^24-1 that avoid `taken`. */
function freshIds(count, taken = []) {
  const ids = new Set();
  const avoid = new Set(taken);
  while (ids.size < count) {
    const id = randomInt(1, 0xffffff);
    if (!avoid.has(id)) ids.add(id);
  }
  return [...ids];
}

function makePreKeys(count, taken) {
  return freshIds(count, taken).map((id) => {
    const priv = PrivateKey.generate();
    return PreKeyRecord.new(id, priv.getPublicKey(), priv);
  });
}

function makeKyberPreKeys(count, signer, taken) {
  return freshIds(count, taken).map((id) => {
    const kem = KEMKeyPair.generate();
    return KyberPreKeyRecord.new(id, Date.now(), kem, signer.sign(kem.getPublicKey().serialize()));
  });
}

function makeSignedPreKey(signer, id = randomInt(1, 0xffffff)) {
  const priv = PrivateKey.generate();
  const pub = priv.getPublicKey();
  return SignedPreKeyRecord.new(id, Date.now(), pub, priv, signer.sign(pub.serialize()));
}

const preKeyJson = (record) => ({ keyId: record.id(), publicKey: H.b64(record.publicKey().serialize()) });

function setKeysJson({ preKeys, signedPreKey, pqPreKeys, pqLastResortPreKey }) {
  const body = {};
  if (preKeys) body.preKeys = preKeys.map(preKeyJson);
  if (signedPreKey) body.signedPreKey = H.signedKeyJson(signedPreKey);
  if (pqPreKeys) body.pqPreKeys = pqPreKeys.map(H.signedKeyJson);
  if (pqLastResortPreKey) body.pqLastResortPreKey = H.signedKeyJson(pqLastResortPreKey);
  return body;
}

/** `POST /v2/keys/check` digest (spec §4.1). */
function keysDigest(identityPublic, signedPreKey, lastResortKey) {
  const id8 = (n) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(n));
    return b;
  };
  return createHash('sha256')
    .update(identityPublic.serialize())
    .update(id8(signedPreKey.id()))
    .update(signedPreKey.publicKey().serialize())
    .update(id8(lastResortKey.id()))
    .update(lastResortKey.publicKey().serialize())
    .digest();
}

/** A copy of `record` whose signature has one byte changed (`xor` applied at `index`). */
function withTamperedSignature(record, { index, xor }) {
  const sig = Uint8Array.from(record.signature());
  sig[index < 0 ? sig.length + index : index] ^= xor;
  if (record instanceof SignedPreKeyRecord) {
    return SignedPreKeyRecord.new(record.id(), record.timestamp(), record.publicKey(), record.privateKey(), sig);
  }
  return KyberPreKeyRecord.new(record.id(), record.timestamp(), record.keyPair(), sig);
}

/** PreKeyBundle from one `devices[]` entry of a `PreKeyResponse` (spec §4.1). */
function bundleFromJson(response, device) {
  return PreKeyBundle.new(
    device.registrationId,
    device.deviceId,
    device.preKey ? device.preKey.keyId : null,
    device.preKey ? PublicKey.deserialize(fromB64(device.preKey.publicKey)) : null,
    device.signedPreKey.keyId,
    PublicKey.deserialize(fromB64(device.signedPreKey.publicKey)),
    fromB64(device.signedPreKey.signature),
    PublicKey.deserialize(fromB64(response.identityKey)),
    device.pqPreKey.keyId,
    KEMPublicKey.deserialize(fromB64(device.pqPreKey.publicKey)),
    fromB64(device.pqPreKey.signature),
  );
}

// ---------------------------------------------------------------------------------------------
// Server plumbing

let server;
let net;
const accounts = {}; // alice (key owner / recipient), bob (fetcher / sender)
const conns = {}; // authenticated chat connections by account name

before(async () => {
  server = await H.startServer();
  net = server.makeNet();
});

after(async () => {
  await server?.stop();
});

async function authConn(name) {
  if (!conns[name]) {
    const account = accounts[name];
    assert.ok(account, `account ${name} must have been registered first`);
    conns[name] = await server.connectAuthenticated(account.username, account.password, { net });
  }
  return conns[name];
}

async function putKeys(conn, body, identity = 'aci') {
  return H.chatRequest(conn, 'PUT', identity === 'aci' ? '/v2/keys' : `/v2/keys?identity=${identity}`, { json: body });
}

async function getCounts(conn, identity = 'aci') {
  const resp = await H.chatRequest(conn, 'GET', identity === 'aci' ? '/v2/keys' : `/v2/keys?identity=${identity}`);
  assert.equal(resp.status, 200, H.describe(resp));
  assert.equal(typeof resp.json?.count, 'number', `GET /v2/keys count: ${H.describe(resp)}`);
  assert.equal(typeof resp.json?.pqCount, 'number', `GET /v2/keys pqCount: ${H.describe(resp)}`);
  return { count: resp.json.count, pqCount: resp.json.pqCount };
}

function uakHeader(account) {
  return ['unidentified-access-key', H.b64(account.material.unidentifiedAccessKey)];
}

/** GET /v2/keys/{serviceId}/{device}, 200 expected; returns the parsed PreKeyResponse. */
async function fetchBundle(conn, serviceId, device = '*', headers = []) {
  const resp = await H.chatRequest(conn, 'GET', `/v2/keys/${serviceId}/${device}`, { headers });
  assert.equal(resp.status, 200, H.describe(resp));
  const json = resp.json;
  assert.ok(json && typeof json.identityKey === 'string' && Array.isArray(json.devices),
    `PreKeyResponse shape (spec §4.1): ${H.describe(resp)}`);
  return { json, resp };
}

/** Checks a one-device PreKeyResponse for `account`'s ACI identity; returns its device entry. */
function checkAciBundle(json, account, describeText) {
  const keys = account.material.aci;
  assert.equal(json.identityKey, H.b64(keys.identityPublic.serialize()), `identityKey: ${describeText}`);
  assert.equal(json.devices.length, 1, `one device expected: ${describeText}`);
  const [device] = json.devices;
  assert.equal(device.deviceId, 1, `deviceId: ${describeText}`);
  assert.equal(device.registrationId, account.material.registrationId, `registrationId: ${describeText}`);
  assert.equal(device.signedPreKey?.keyId, keys.signedPreKey.id(), `signedPreKey.keyId: ${describeText}`);
  assert.equal(device.signedPreKey.publicKey, H.b64(keys.signedPreKey.publicKey().serialize()),
    `signedPreKey.publicKey: ${describeText}`);
  assert.ok(bytesEqual(fromB64(device.signedPreKey.signature), keys.signedPreKey.signature()),
    `signedPreKey.signature: ${describeText}`);
  assert.ok(device.pqPreKey && typeof device.pqPreKey.keyId === 'number', `pqPreKey: ${describeText}`);
  return device;
}

/**
 * `sender` builds a session from the fetched bundle (processPreKeyBundle), encrypts with
 * signalEncrypt, and `recipient` decrypts with signalDecryptPreKey using the private keys it
 * uploaded. Returns the PreKeySignalMessage.
 */
async function sessionRoundTrip(sender, recipient, json, device, text) {
  const bundle = bundleFromJson(json, device);
  await processPreKeyBundle(bundle, recipient.address, sender.address, sender.sessions, sender.identity);
  const session = await sender.sessions.getSession(recipient.address);
  assert.ok(session?.hasCurrentState(), 'processPreKeyBundle should leave a usable session');
  assert.equal(session.remoteRegistrationId(), device.registrationId);

  const ciphertext = await signalEncrypt(utf8(text), recipient.address, sender.address, sender.sessions, sender.identity);
  assert.equal(ciphertext.type(), CiphertextMessageType.PreKey, 'first message of a new session is a PreKey message');
  const message = PreKeySignalMessage.deserialize(ciphertext.serialize());
  assert.equal(message.preKeyId(), device.preKey ? device.preKey.keyId : null, 'PreKeySignalMessage.preKeyId');
  assert.equal(message.signedPreKeyId(), device.signedPreKey.keyId, 'PreKeySignalMessage.signedPreKeyId');

  const plaintext = await signalDecryptPreKey(message, sender.address, recipient.address, recipient.sessions,
    recipient.identity, recipient.preKeys, recipient.signedPreKeys, recipient.kyberPreKeys);
  assert.equal(fromUtf8(plaintext), text);
  return message;
}

// ---------------------------------------------------------------------------------------------
// Tests

test('register two accounts with libsignal (key owner and fetcher)', async () => {
  for (const [name, e164] of [['alice', '+15555550100'], ['bob', '+15555550101']]) {
    try {
      accounts[name] = await H.registerTestAccount(net, e164);
    } catch (e) {
      assert.fail(`registration of ${e164} failed: ${H.describeLibsignalError(e)}\n` +
        `--- server log ---\n${server.logTail(30)}`);
    }
  }
});

test('one-time pre-keys: upload, fetch a bundle, build a libsignal session, consumption', async (t) => {
  const { alice, bob } = accounts;
  assert.ok(alice && bob, 'both registrations must have succeeded first');
  const aliceDevice = new LocalDevice(alice);
  const aliceAci = alice.aci.getServiceIdString();
  const aliceConn = await authConn('alice');
  const bobConn = await authConn('bob');
  const anonConn = await server.connectUnauthenticated(net);

  const identityPrivate = alice.material.aci.identityPrivate;
  const preKeys = makePreKeys(3);
  const pqPreKeys = makeKyberPreKeys(3, identityPrivate, [alice.material.aci.lastResortKey.id()]);
  for (const r of preKeys) await aliceDevice.preKeys.savePreKey(r.id(), r);
  for (const r of pqPreKeys) await aliceDevice.kyberPreKeys.saveKyberPreKey(r.id(), r);
  const ecIds = new Set(preKeys.map((r) => r.id()));
  const pqIds = new Set(pqPreKeys.map((r) => r.id()));
  const lastResortId = alice.material.aci.lastResortKey.id();

  await t.test('PUT /v2/keys with 3 EC and 3 Kyber one-time keys → 204; GET /v2/keys counts them', async () => {
    assert.deepEqual(await getCounts(aliceConn), { count: 0, pqCount: 0 }, 'a new account has no one-time keys');
    const resp = await putKeys(aliceConn, setKeysJson({ preKeys, pqPreKeys }));
    assert.equal(resp.status, 204, H.describe(resp, { bodyLimit: 300 }));
    assert.deepEqual(await getCounts(aliceConn), { count: 3, pqCount: 3 });
    assert.deepEqual(await getCounts(aliceConn, 'pni'), { count: 0, pqCount: 0 }, 'PNI keys are separate');
  });

  const seenEc = [];
  const seenPq = [];

  await t.test('authenticated GET /v2/keys/{aci}/* → bundle; processPreKeyBundle + signalEncrypt/signalDecryptPreKey', async () => {
    const { json, resp } = await fetchBundle(bobConn, aliceAci, '*');
    const device = checkAciBundle(json, alice, H.describe(resp));
    assert.ok(device.preKey && ecIds.has(device.preKey.keyId), `preKey should be one of the uploaded ids: ${H.describe(resp)}`);
    assert.equal(device.preKey.publicKey,
      H.b64(preKeys.find((r) => r.id() === device.preKey.keyId).publicKey().serialize()), 'preKey.publicKey');
    assert.ok(pqIds.has(device.pqPreKey.keyId), `pqPreKey should be a one-time Kyber key: ${H.describe(resp)}`);
    seenEc.push(device.preKey.keyId);
    seenPq.push(device.pqPreKey.keyId);

    await sessionRoundTrip(new LocalDevice(bob), aliceDevice, json, device, 'hello alice, from an authenticated fetch');
    assert.deepEqual(aliceDevice.preKeys.removed, [device.preKey.keyId], 'libsignal used the fetched one-time EC key');
    assert.deepEqual(aliceDevice.kyberPreKeys.used, [device.pqPreKey.keyId], 'libsignal used the fetched Kyber key');
    assert.deepEqual(await getCounts(aliceConn), { count: 2, pqCount: 2 }, 'the fetch consumed one key of each kind');
  });

  await t.test('anonymous GET /v2/keys/{aci}/* with the Unidentified-Access-Key → a different one-time key', async () => {
    const { json, resp } = await fetchBundle(anonConn, aliceAci, '*', [uakHeader(alice)]);
    const device = checkAciBundle(json, alice, H.describe(resp));
    assert.ok(device.preKey && ecIds.has(device.preKey.keyId), `preKey: ${H.describe(resp)}`);
    assert.ok(!seenEc.includes(device.preKey.keyId), `one-time EC key ${device.preKey.keyId} was handed out twice`);
    assert.ok(pqIds.has(device.pqPreKey.keyId) && !seenPq.includes(device.pqPreKey.keyId),
      `one-time Kyber key handed out twice or unknown: ${H.describe(resp)}`);
    seenEc.push(device.preKey.keyId);
    seenPq.push(device.pqPreKey.keyId);

    await sessionRoundTrip(new LocalDevice(bob), aliceDevice, json, device, 'hello alice, from an anonymous fetch');
    assert.deepEqual(await getCounts(aliceConn), { count: 1, pqCount: 1 });
  });

  await t.test('anonymous GET /v2/keys/{aci}/1 takes the last one-time keys', async () => {
    const { json, resp } = await fetchBundle(anonConn, aliceAci, '1', [uakHeader(alice)]);
    const device = checkAciBundle(json, alice, H.describe(resp));
    assert.ok(device.preKey && ecIds.has(device.preKey.keyId) && !seenEc.includes(device.preKey.keyId),
      `preKey should be the remaining one: ${H.describe(resp)}`);
    assert.ok(pqIds.has(device.pqPreKey.keyId) && !seenPq.includes(device.pqPreKey.keyId), `pqPreKey: ${H.describe(resp)}`);
    await sessionRoundTrip(new LocalDevice(bob), aliceDevice, json, device, 'third');
    assert.deepEqual(await getCounts(aliceConn), { count: 0, pqCount: 0 });
  });

  await t.test('with the one-time keys gone: preKey null, last-resort Kyber key, kept; session still works', async () => {
    for (const [conn, headers, label] of [[bobConn, [], 'authenticated'], [anonConn, [uakHeader(alice)], 'anonymous']]) {
      const { json, resp } = await fetchBundle(conn, aliceAci, '1', headers);
      const device = checkAciBundle(json, alice, `${label}: ${H.describe(resp)}`);
      assert.equal(device.preKey ?? null, null, `no one-time EC key left (${label}): ${H.describe(resp)}`);
      assert.equal(device.pqPreKey.keyId, lastResortId, `last-resort Kyber key expected (${label}, spec §4.2): ${H.describe(resp)}`);
      assert.equal(device.pqPreKey.publicKey, H.b64(alice.material.aci.lastResortKey.publicKey().serialize()));
      await sessionRoundTrip(new LocalDevice(bob), aliceDevice, json, device, `last resort (${label})`);
    }
    assert.deepEqual(await getCounts(aliceConn), { count: 0, pqCount: 0 });
  });

  await t.test('authenticated GET /v2/keys/PNI:{pni}/1 → PNI identity key and PNI registration id', async () => {
    const { json, resp } = await fetchBundle(bobConn, alice.pni.getServiceIdString(), '1');
    assert.equal(json.identityKey, H.b64(alice.material.pni.identityPublic.serialize()), H.describe(resp));
    const [device] = json.devices;
    assert.equal(device.registrationId, alice.material.pniRegistrationId, H.describe(resp));
    assert.equal(device.signedPreKey.keyId, alice.material.pni.signedPreKey.id(), H.describe(resp));
    assert.equal(device.pqPreKey.keyId, alice.material.pni.lastResortKey.id(), H.describe(resp));
    // libsignal accepts the bundle (it checks both signatures against the PNI identity key).
    const bobDevice = new LocalDevice(bob);
    await processPreKeyBundle(bundleFromJson(json, device), ProtocolAddress.new(alice.pni, 1), bobDevice.address,
      bobDevice.sessions, bobDevice.identity);
  });

  await t.test('access rules: anonymous failures are 401 (never 404), authenticated unknown account is 404', async () => {
    const unknownAci = randomUUID();
    const wrongUak = ['unidentified-access-key', H.b64(new Uint8Array(16).fill(7))];
    const cases = [
      [anonConn, `/v2/keys/${aliceAci}/*`, [wrongUak], 401, 'wrong UAK'],
      [anonConn, `/v2/keys/${aliceAci}/*`, [], 401, 'no UAK'],
      [anonConn, `/v2/keys/${unknownAci}/*`, [uakHeader(alice)], 401, 'unknown account, anonymous'],
      [anonConn, `/v2/keys/${alice.pni.getServiceIdString()}/*`, [uakHeader(alice)], 401, 'PNI target, anonymous'],
      [anonConn, `/v2/keys/${aliceAci}/7`, [uakHeader(alice)], 401, 'unknown device, anonymous'],
      [bobConn, `/v2/keys/${unknownAci}/*`, [], 404, 'unknown account, authenticated'],
    ];
    for (const [conn, p, headers, expected, label] of cases) {
      const resp = await H.chatRequest(conn, 'GET', p, { headers });
      assert.equal(resp.status, expected, `${label}: ${H.describe(resp)}`);
    }
  });

  // Signal-Server decodes the header with java.util.Base64.getDecoder(), which does not require
  // padding (S/auth/Anonymous.java; signal-server-api.md §0.2 "a compatible server should accept
  // both on input").
  await t.test('anonymous fetch with the access key in unpadded base64 is accepted', async () => {
    const unpadded = H.b64(alice.material.unidentifiedAccessKey).replace(/=+$/, '');
    const resp = await H.chatRequest(anonConn, 'GET', `/v2/keys/${aliceAci}/1`, {
      headers: [['unidentified-access-key', unpadded]],
    });
    assert.equal(resp.status, 200, H.describe(resp, { bodyLimit: 200 }));
  });

  await server.disconnect(anonConn);
});

test('sender certificate: GET /v1/certificate/delivery validates against the READY trust root', async (t) => {
  const { alice, bob } = accounts;
  assert.ok(alice && bob, 'both registrations must have succeeded first');
  const trustRoot = PublicKey.deserialize(fromB64(server.trustRoot));
  const bobConn = await authConn('bob');
  const aliceConn = await authConn('alice');

  async function getCertificate(conn, query = '') {
    const resp = await H.chatRequest(conn, 'GET', `/v1/certificate/delivery${query}`);
    assert.equal(resp.status, 200, H.describe(resp));
    assert.equal(typeof resp.json?.certificate, 'string', `{"certificate": base64} expected (spec §7.1): ${H.describe(resp)}`);
    let cert;
    try {
      cert = SenderCertificate.deserialize(fromB64(resp.json.certificate));
    } catch (e) {
      assert.fail(`SenderCertificate.deserialize failed: ${H.describeLibsignalError(e)}\n${H.describe(resp)}`);
    }
    return cert;
  }

  let bobCert;
  await t.test('default (includeE164=true): validates, carries UUID, device, e164 and identity key', async () => {
    const now = Date.now();
    const cert = await getCertificate(bobConn);
    bobCert = cert;
    assert.equal(cert.validate(trustRoot, now), true, 'validate(trustRoot from READY, now)');
    assert.equal(cert.validate(PrivateKey.generate().getPublicKey(), now), false, 'validate(another root) must fail');
    assert.equal(cert.senderUuid(), bob.aci.getServiceIdString(), 'senderUuid');
    assert.ok(cert.senderAci()?.isEqual(bob.aci), 'senderAci');
    assert.equal(cert.senderDeviceId(), 1, 'senderDeviceId');
    assert.equal(cert.senderE164(), bob.e164, 'senderE164');
    assert.ok(cert.key().equals(bob.material.aci.identityPublic), 'certificate key = the ACI identity key');
    const expected = now + CERTIFICATE_DAYS * DAY_MS;
    assert.ok(Math.abs(cert.expiration() - expected) < 10 * 60 * 1000,
      `expiration ${new Date(cert.expiration()).toISOString()} should be about now + ${CERTIFICATE_DAYS} days`);
    assert.equal(cert.validate(trustRoot, cert.expiration() + 1), false, 'expired certificate must not validate');
    const signer = cert.serverCertificate();
    assert.notEqual(signer.keyId(), 0xdeadc357, 'server certificate id 0xDEADC357 is revoked in libsignal');
    assert.ok(trustRoot.verify(signer.certificateData(), signer.signature()), 'server certificate signed by the trust root');
  });

  await t.test('includeE164=false: senderE164() is null, still valid', async () => {
    const cert = await getCertificate(bobConn, '?includeE164=false');
    assert.equal(cert.senderE164(), null);
    assert.equal(cert.senderUuid(), bob.aci.getServiceIdString());
    assert.equal(cert.validate(trustRoot, Date.now()), true);
  });

  await t.test('the certificate of the other account names that account', async () => {
    const cert = await getCertificate(aliceConn);
    assert.equal(cert.senderUuid(), alice.aci.getServiceIdString());
    assert.equal(cert.senderE164(), alice.e164);
    assert.equal(cert.validate(trustRoot, Date.now()), true);
  });

  await t.test('sealed-sender round trip with the certificate (sealedSenderEncryptMessage → sealedSenderDecryptMessage)', async () => {
    assert.ok(bobCert, 'needs the certificate from the first subtest');
    const aliceDevice = new LocalDevice(alice);
    const bobDevice = new LocalDevice(bob);
    // A fresh bundle, fetched anonymously as a sealed-sender client would.
    const anonConn = await server.connectUnauthenticated(net);
    let json;
    let device;
    try {
      ({ json } = await fetchBundle(anonConn, alice.aci.getServiceIdString(), '*', [uakHeader(alice)]));
      [device] = json.devices;
    } finally {
      await server.disconnect(anonConn);
    }
    await processPreKeyBundle(bundleFromJson(json, device), aliceDevice.address, bobDevice.address,
      bobDevice.sessions, bobDevice.identity);
    const text = 'sealed hello';
    const sealed = await sealedSenderEncryptMessage(utf8(text), aliceDevice.address, bobCert, bobDevice.sessions,
      bobDevice.identity);

    // The recipient can open the envelope and sees who sent it.
    const usmc = await sealedSenderDecryptToUsmc(sealed, aliceDevice.identity);
    assert.equal(usmc.msgType(), CiphertextMessageType.PreKey);
    assert.equal(usmc.senderCertificate().senderUuid(), bob.aci.getServiceIdString());

    // Against another trust root the certificate is refused.
    await assert.rejects(sealedSenderDecryptMessage(sealed, PrivateKey.generate().getPublicKey(), Date.now(),
      alice.e164, alice.aci.getServiceIdString(), 1, aliceDevice.sessions, aliceDevice.identity,
      aliceDevice.preKeys, aliceDevice.signedPreKeys, aliceDevice.kyberPreKeys));

    const result = await sealedSenderDecryptMessage(sealed, trustRoot, Date.now(), alice.e164,
      alice.aci.getServiceIdString(), 1, aliceDevice.sessions, aliceDevice.identity, aliceDevice.preKeys,
      aliceDevice.signedPreKeys, aliceDevice.kyberPreKeys);
    assert.equal(fromUtf8(result.message()), text);
    assert.equal(result.senderUuid(), bob.aci.getServiceIdString());
    assert.equal(result.senderE164(), bob.e164);
    assert.equal(result.deviceId(), 1);
  });
});

test('PUT /v2/keys with a badly signed key is refused with 422 and stores nothing', async (t) => {
  let carol;
  try {
    carol = await H.registerTestAccount(net, '+15555550102');
  } catch (e) {
    assert.fail(`registration of +15555550102 failed: ${H.describeLibsignalError(e)}`);
  }
  const conn = await server.connectAuthenticated(carol.username, carol.password, { net });
  const aci = carol.material.aci;
  const pni = carol.material.pni;
  try {
    // Baseline: a valid upload, so "unchanged" is not just "still zero".
    const baseline = setKeysJson({
      preKeys: makePreKeys(2),
      pqPreKeys: makeKyberPreKeys(2, aci.identityPrivate, [aci.lastResortKey.id()]),
    });
    const ok = await putKeys(conn, baseline);
    assert.equal(ok.status, 204, H.describe(ok, { bodyLimit: 300 }));
    const before = await getCounts(conn);
    assert.deepEqual(before, { count: 2, pqCount: 2 });
    const digest = keysDigest(aci.identityPublic, aci.signedPreKey, aci.lastResortKey);

    async function checkDigest(d, expected, label) {
      const resp = await H.chatRequest(conn, 'POST', '/v2/keys/check', { json: { identityType: 'aci', digest: H.b64(d) } });
      assert.equal(resp.status, expected, `${label}: ${H.describe(resp)}`);
    }
    await checkDigest(digest, 200, 'POST /v2/keys/check with the registered keys');
    await checkDigest(createHash('sha256').update('something else').digest(), 409, 'POST /v2/keys/check with a wrong digest');

    /** A full upload (5 EC, 3 Kyber, signed key, last resort), all validly signed by `signer`. */
    const fullUpload = (signer = aci.identityPrivate) => ({
      preKeys: makePreKeys(5),
      pqPreKeys: makeKyberPreKeys(3, signer),
      signedPreKey: makeSignedPreKey(signer),
      pqLastResortPreKey: makeKyberPreKeys(1, signer)[0],
    });
    const tamperings = {
      'one signature byte flipped': (r) => withTamperedSignature(r, { index: 17, xor: 0x01 }),
      'sign bit (top bit of the last byte) flipped': (r) => withTamperedSignature(r, { index: -1, xor: 0x80 }),
      'signed by an unrelated key': (r) => {
        const other = PrivateKey.generate();
        if (r instanceof SignedPreKeyRecord) return makeSignedPreKey(other, r.id());
        const kem = KEMKeyPair.generate();
        return KyberPreKeyRecord.new(r.id(), Date.now(), kem, other.sign(kem.getPublicKey().serialize()));
      },
      "signed by the account's PNI identity key": (r) => {
        if (r instanceof SignedPreKeyRecord) return makeSignedPreKey(pni.identityPrivate, r.id());
        const kem = KEMKeyPair.generate();
        return KyberPreKeyRecord.new(r.id(), Date.now(), kem, pni.identityPrivate.sign(kem.getPublicKey().serialize()));
      },
    };
    const targets = {
      signedPreKey: (u, tamper) => ({ ...u, signedPreKey: tamper(u.signedPreKey) }),
      'pqPreKeys[1]': (u, tamper) => ({ ...u, pqPreKeys: u.pqPreKeys.map((r, i) => (i === 1 ? tamper(r) : r)) }),
      pqLastResortPreKey: (u, tamper) => ({ ...u, pqLastResortPreKey: tamper(u.pqLastResortPreKey) }),
    };
    for (const [target, apply] of Object.entries(targets)) {
      for (const [how, tamper] of Object.entries(tamperings)) {
        await t.test(`${target}: ${how} → 422, counts and repeated-use keys unchanged`, async () => {
          const upload = apply(fullUpload(), tamper);
          const resp = await putKeys(conn, setKeysJson(upload));
          assert.equal(resp.status, 422, `spec §4.1/§4.3: ${H.describe(resp, { bodyLimit: 200 })}`);
          assert.deepEqual(await getCounts(conn), before, 'a refused upload must not store its (valid) one-time keys');
          await checkDigest(digest, 200, 'signed pre-key / last-resort key must be unchanged after a refused upload');
        });
      }
    }

    await t.test('PUT /v2/keys?identity=pni with keys signed by the ACI identity key → 422', async () => {
      const pniBefore = await getCounts(conn, 'pni');
      const resp = await putKeys(conn, setKeysJson(fullUpload(aci.identityPrivate)), 'pni');
      assert.equal(resp.status, 422, H.describe(resp, { bodyLimit: 200 }));
      assert.deepEqual(await getCounts(conn, 'pni'), pniBefore);
    });

    await t.test('control: the same upload correctly signed → 204, everything replaced', async () => {
      const upload = fullUpload();
      const resp = await putKeys(conn, setKeysJson(upload));
      assert.equal(resp.status, 204, H.describe(resp, { bodyLimit: 200 }));
      assert.deepEqual(await getCounts(conn), { count: 5, pqCount: 3 }, 'non-empty lists replace the stored keys (spec §4.1)');
      await checkDigest(keysDigest(aci.identityPublic, upload.signedPreKey, upload.pqLastResortPreKey), 200,
        'the new signed pre-key and last-resort key are stored');
      await checkDigest(digest, 409, 'the old repeated-use keys are gone');

      const pniUpload = fullUpload(pni.identityPrivate);
      const pniResp = await putKeys(conn, setKeysJson(pniUpload), 'pni');
      assert.equal(pniResp.status, 204, H.describe(pniResp, { bodyLimit: 200 }));
      assert.deepEqual(await getCounts(conn, 'pni'), { count: 5, pqCount: 3 });
    });

    await t.test('more than 100 keys in a list → 422', async () => {
      const resp = await putKeys(conn, setKeysJson({ preKeys: makePreKeys(101) }));
      assert.equal(resp.status, 422, H.describe(resp, { bodyLimit: 200 }));
      assert.deepEqual(await getCounts(conn), { count: 5, pqCount: 3 });
    });
  } finally {
    await server.disconnect(conn);
  }
});

test('concurrent bundle fetches never hand out a one-time key twice (100-key upload)', async () => {
  let dave;
  try {
    dave = await H.registerTestAccount(net, '+15555550103');
  } catch (e) {
    assert.fail(`registration of +15555550103 failed: ${H.describeLibsignalError(e)}`);
  }
  const aci = dave.material.aci;
  const conn = await server.connectAuthenticated(dave.username, dave.password, { net });
  const anon = await Promise.all([0, 1, 2, 3].map(() => server.connectUnauthenticated(net)));
  try {
    // What a real client uploads: 100 of each (spec §4.2 "uploading 100").
    const preKeys = makePreKeys(100);
    const pqPreKeys = makeKyberPreKeys(100, aci.identityPrivate, [aci.lastResortKey.id()]);
    const resp = await putKeys(conn, setKeysJson({ preKeys, pqPreKeys }));
    assert.equal(resp.status, 204, H.describe(resp, { bodyLimit: 200 }));
    assert.deepEqual(await getCounts(conn), { count: 100, pqCount: 100 });

    const N = 40;
    const results = await Promise.all(Array.from({ length: N }, (_, i) =>
      H.chatRequest(anon[i % anon.length], 'GET', `/v2/keys/${dave.aci.getServiceIdString()}/*`, { headers: [uakHeader(dave)] })));
    const ec = [];
    const pq = [];
    for (const r of results) {
      assert.equal(r.status, 200, H.describe(r));
      const [device] = r.json.devices;
      ec.push(device.preKey?.keyId);
      pq.push(device.pqPreKey?.keyId);
    }
    const ecIds = new Set(preKeys.map((r) => r.id()));
    const pqIds = new Set(pqPreKeys.map((r) => r.id()));
    assert.ok(ec.every((id) => ecIds.has(id)), `every fetch got an uploaded EC key: ${ec}`);
    assert.ok(pq.every((id) => pqIds.has(id)), `every fetch got an uploaded Kyber key: ${pq}`);
    assert.equal(new Set(ec).size, N, `EC one-time keys handed out twice: ${ec}`);
    assert.equal(new Set(pq).size, N, `Kyber one-time keys handed out twice: ${pq}`);
    assert.deepEqual(await getCounts(conn), { count: 100 - N, pqCount: 100 - N });
  } finally {
    for (const c of anon) await server.disconnect(c);
    await server.disconnect(conn);
  }
});

// libsignal 0.103.0's typed *authenticated* key calls (AuthKeysService: getPreKeyCount,
// setOneTimeEcPreKeys, ...) panic with "requires an H2 connection": they are gRPC-only, and this
// harness (like the server) speaks the HTTP/1.1 WebSocket. The typed *anonymous* bundle fetch
// (UnauthKeysService.getPreKeys) does go over the WebSocket, so it is used here.
test("libsignal's typed anonymous bundle fetch: UnauthKeysService.getPreKeys", async (t) => {
  const { alice, bob } = accounts;
  assert.ok(alice && bob, 'both registrations must have succeeded first');
  const aliceConn = await authConn('alice');
  const anonConn = await server.connectUnauthenticated(net);
  const keys = alice.material.aci;
  const aliceDevice = new LocalDevice(alice);
  try {
    // Fresh keys, including a new signed pre-key and last-resort key, uploaded in one PUT /v2/keys.
    const preKeys = makePreKeys(4);
    const pqPreKeys = makeKyberPreKeys(4, keys.identityPrivate, [keys.lastResortKey.id()]);
    const signedPreKey = makeSignedPreKey(keys.identityPrivate);
    const lastResort = makeKyberPreKeys(1, keys.identityPrivate, pqPreKeys.map((r) => r.id()))[0];
    for (const r of preKeys) await aliceDevice.preKeys.savePreKey(r.id(), r);
    for (const r of pqPreKeys) await aliceDevice.kyberPreKeys.saveKyberPreKey(r.id(), r);
    await aliceDevice.signedPreKeys.saveSignedPreKey(signedPreKey.id(), signedPreKey);
    aliceDevice.kyberPreKeys.saveLastResortKey(lastResort);
    const put = await putKeys(aliceConn, setKeysJson({ preKeys, pqPreKeys, signedPreKey, pqLastResortPreKey: lastResort }));
    assert.equal(put.status, 204, H.describe(put, { bodyLimit: 200 }));
    assert.deepEqual(await getCounts(aliceConn), { count: 4, pqCount: 4 });

    await t.test('getPreKeys with the access key → PreKeyBundle; processPreKeyBundle + decrypt', async () => {
      let result;
      try {
        result = await anonConn.getPreKeys({
          target: alice.aci, device: 'all', auth: { accessKey: alice.material.unidentifiedAccessKey },
        });
      } catch (e) {
        assert.fail(`getPreKeys failed: ${H.describeLibsignalError(e)}\n--- server log ---\n${server.logTail(15)}`);
      }
      assert.ok(result.identityKey.equals(keys.identityPublic), 'identityKey');
      assert.equal(result.preKeyBundles.length, 1);
      const [bundle] = result.preKeyBundles;
      assert.equal(bundle.deviceId(), 1);
      assert.equal(bundle.registrationId(), alice.material.registrationId);
      assert.ok(preKeys.some((r) => r.id() === bundle.preKeyId()), `preKeyId ${bundle.preKeyId()}`);
      assert.equal(bundle.signedPreKeyId(), signedPreKey.id(), 'the newly uploaded signed pre-key');
      assert.ok(pqPreKeys.some((r) => r.id() === bundle.kyberPreKeyId()), `kyberPreKeyId ${bundle.kyberPreKeyId()}`);

      const bobDevice = new LocalDevice(bob);
      await processPreKeyBundle(bundle, aliceDevice.address, bobDevice.address, bobDevice.sessions, bobDevice.identity);
      const ct = await signalEncrypt(utf8('typed'), aliceDevice.address, bobDevice.address, bobDevice.sessions, bobDevice.identity);
      const plaintext = await signalDecryptPreKey(PreKeySignalMessage.deserialize(ct.serialize()), bobDevice.address,
        aliceDevice.address, aliceDevice.sessions, aliceDevice.identity, aliceDevice.preKeys, aliceDevice.signedPreKeys,
        aliceDevice.kyberPreKeys);
      assert.equal(fromUtf8(plaintext), 'typed');
      assert.deepEqual(await getCounts(aliceConn), { count: 3, pqCount: 3 });
    });

    await t.test('getPreKeys for device 1 → the same device, another one-time key', async () => {
      const result = await anonConn.getPreKeys({
        target: alice.aci, device: { deviceId: 1 }, auth: { accessKey: alice.material.unidentifiedAccessKey },
      });
      assert.equal(result.preKeyBundles.length, 1);
      assert.equal(result.preKeyBundles[0].deviceId(), 1);
      assert.deepEqual(await getCounts(aliceConn), { count: 2, pqCount: 2 });
    });

    await t.test('getPreKeys: wrong access key, unknown account → RequestUnauthorized; unknown device → error', async () => {
      const wrongKey = new Uint8Array(16).fill(9);
      for (const [target, accessKey, label] of [
        [alice.aci, wrongKey, 'wrong access key'],
        [H.Aci.fromUuid(randomUUID()), alice.material.unidentifiedAccessKey, 'unknown account'],
      ]) {
        await assert.rejects(anonConn.getPreKeys({ target, device: 'all', auth: { accessKey } }), (e) => {
          assert.equal(e.code, H.ErrorCode.RequestUnauthorized, `${label}: ${H.describeLibsignalError(e)}`);
          return true;
        });
      }
      await assert.rejects(anonConn.getPreKeys({
        target: alice.aci, device: { deviceId: 5 }, auth: { accessKey: alice.material.unidentifiedAccessKey },
      }), (e) => {
        assert.ok([H.ErrorCode.RequestUnauthorized, H.ErrorCode.ServiceIdNotFound].includes(e.code),
          `unknown device: ${H.describeLibsignalError(e)}`);
        return true;
      });
      assert.deepEqual(await getCounts(aliceConn), { count: 2, pqCount: 2 }, 'refused fetches consume nothing');
    });
  } finally {
    await server.disconnect(anonConn);
  }
});
