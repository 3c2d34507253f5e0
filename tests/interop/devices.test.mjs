// Multi-device through the official libsignal client: a primary links a second device through the
// real flow (libsignal's provisioning connection receives the address and the primary's encrypted
// ProvisionEnvelope; the new device links with the provisioning code it found inside), the linked
// device connects as `<aci>.2`, a third account is taught the device list by a 409, builds sessions
// to both devices and sends to each (identified and sealed sender); both devices decrypt their copy.
// Then the primary removes the linked device: its socket is closed (4401 → libsignal
// ConnectionInvalidated), its credentials stop working (DeviceDelinked), and a send naming device 2 gets 409 extraDevices.
//
// Spec references: signal-server-api.md §3.1 (device endpoints, LinkDeviceRequest), §3.2 (provisioning
// socket), §4.1 (bundles), §5.1 (device-set validation, needsSync), §6.4/§6.5 (push, 4401); issue 5.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';

import * as SignalClient from '@signalapp/libsignal-client';

import * as H from './harness.mjs';
import * as S from './signal-stores.mjs';

const {
  ProtocolAddress,
  PreKeySignalMessage,
  CiphertextMessageType,
  SenderCertificate,
  processPreKeyBundle,
  signalEncrypt,
  signalDecryptPreKey,
  sealedSenderEncryptMessage,
  sealedSenderDecryptMessage,
} = SignalClient;
const { PrivateKey, PublicKey, ErrorCode } = H;
const { utf8, fromUtf8, fromB64, bytesEqual } = S;

// Envelope types (signal-server-api.md §5.3).
const CIPHERTEXT = 1;
const PREKEY_BUNDLE = 3;
const UNIDENTIFIED_SENDER = 6;

const WAIT_MS = 5000;
const TEST_TIMEOUT_MS = 20_000;

const NUMBERS = { alice: '+15555550300', carol: '+15555550301' };
const CODE = '123456';

let server;
let net;
let trustRoot;
const accounts = {}; // alice, carol: H.registerTestAccount results; linked: see the linking test
const devices = {}; // alice1, alice2, carol: S.LocalDevice
const sockets = {}; // alice1, alice2, carol: { conn, listener }
let anon;
let setupDone = false;
let linked = false;

let timestampCounter = 0;
const nextTimestamp = () => Date.now() + ++timestampCounter;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

before(async () => {
  server = await H.startServer({
    testNumbers: { ...H.TEST_NUMBERS, ...Object.fromEntries(Object.values(NUMBERS).map((n) => [n, CODE])) },
  });
  net = server.makeNet();
  trustRoot = PublicKey.deserialize(fromB64(server.trustRoot));
});

after(async () => {
  await server?.stop();
});

// ---------------------------------------------------------------------------------------------
// Helpers

const aliceAci = () => accounts.alice.aci.getServiceIdString();

async function connect(name, username, password) {
  const listener = new H.RecordingListener({ name: `${name}'s authenticated socket` });
  let conn;
  try {
    conn = await server.connectAuthenticated(username, password, { net, listener });
  } catch (e) {
    assert.fail(`connectAuthenticatedChat(${username}) for ${name} failed: ${H.describeLibsignalError(e)}`);
  }
  sockets[name] = { conn, listener };
  return sockets[name];
}

/** `PUT /v2/keys` with 5 one-time EC and 5 one-time Kyber keys (signed by the account identity). */
async function uploadOneTimeKeys(name, identityPrivate) {
  const dev = devices[name];
  const taken = [...dev.kyberPreKeys.records.keys(), ...dev.signedPreKeys.records.keys()];
  const preKeys = S.makePreKeys(5, taken);
  const pqPreKeys = S.makeKyberPreKeys(5, identityPrivate, taken);
  for (const r of preKeys) await dev.preKeys.savePreKey(r.id(), r);
  for (const r of pqPreKeys) await dev.kyberPreKeys.saveKyberPreKey(r.id(), r);
  const put = await H.chatRequest(sockets[name].conn, 'PUT', '/v2/keys', { json: S.setKeysJson({ preKeys, pqPreKeys }) });
  assert.equal(put.status, 204, `${name}: spec §4.1: ${H.describe(put, { bodyLimit: 200 })}`);
}

/** Raw identified `PUT /v1/messages/{destination}` (spec §5.1) over `sender`'s socket. */
function rawSend(sender, destination, entries, timestamp = nextTimestamp()) {
  return H.chatRequest(sockets[sender].conn, 'PUT', `/v1/messages/${destination}`, {
    json: {
      messages: entries.map(({ deviceId, registrationId, ciphertext }) => ({
        type: ciphertext.type() === CiphertextMessageType.PreKey ? PREKEY_BUNDLE : CIPHERTEXT,
        destinationDeviceId: deviceId,
        destinationRegistrationId: registrationId,
        content: H.b64(ciphertext.serialize()),
      })),
      timestamp,
      online: false,
      urgent: true,
    },
  });
}

/** Carol encrypts `text` for Alice's device `deviceId`; returns a `SingleOutboundUnsealedMessage`-like entry. */
async function carolEncryptTo(deviceId, text) {
  const dev = deviceId === 1 ? devices.alice1 : devices.alice2;
  const ciphertext = await signalEncrypt(utf8(text), dev.address, devices.carol.address, devices.carol.sessions, devices.carol.identity);
  return { deviceId, registrationId: dev.account.material.registrationId, ciphertext, contents: ciphertext, text };
}

/** libsignal `AuthenticatedChatConnection.sendMessage` (identified) from Carol to Alice. */
function carolTypedSend(entries, timestamp) {
  return sockets.carol.conn.sendMessage({
    destination: accounts.alice.aci,
    timestamp,
    contents: entries.map(({ deviceId, registrationId, ciphertext }) => ({ deviceId, registrationId, contents: ciphertext })),
    onlineOnly: false,
    urgent: true,
  });
}

function describeMismatch(e) {
  if (e?.code !== ErrorCode.MismatchedDevices) return H.describeLibsignalError(e);
  return `MismatchedDevices ${JSON.stringify(e.entries.map((x) => ({
    account: x.account.getServiceIdString(), missing: x.missingDevices, extra: x.extraDevices, stale: x.staleDevices,
  })))}`;
}

/** Checks one envelope pushed to one of Alice's devices. */
function checkEnvelope(message, { type, clientTimestamp, sentAfter, source }) {
  assert.ok(message.decoded, `the pushed body must be a textsecure.Envelope: ${message.decodeError}`);
  const env = message.decoded;
  const d = H.describeEnvelope(env);
  assert.equal(env.type, type, `Envelope.type: ${d}`);
  assert.equal(env.clientTimestamp, clientTimestamp, `Envelope.client_timestamp: ${d}`);
  assert.ok(env.serverTimestamp >= sentAfter - 1000, `Envelope.server_timestamp: ${d}`);
  assert.ok(env.destinationServiceId && bytesEqual(env.destinationServiceId, accounts.alice.aci.getServiceIdBinary()),
    `Envelope.destination_service_id = Alice's ACI (both devices share it): ${d}`);
  if (source) {
    assert.ok(env.sourceServiceId && bytesEqual(env.sourceServiceId, accounts[source].aci.getServiceIdBinary()),
      `Envelope.source_service_id = ${source}'s ACI: ${d}`);
    assert.equal(env.sourceDevice, 1, `Envelope.source_device: ${d}`);
  } else {
    assert.equal(env.sourceServiceId, undefined, `sealed sender: no source: ${d}`);
  }
  return env;
}

/** `name` (alice1 / alice2) opens an identified PreKey message from Carol. */
async function openFromCarol(name, content) {
  const dev = devices[name];
  const plaintext = await signalDecryptPreKey(PreKeySignalMessage.deserialize(content), devices.carol.address, dev.address,
    dev.sessions, dev.identity, dev.preKeys, dev.signedPreKeys, dev.kyberPreKeys);
  return fromUtf8(plaintext);
}

function requireSetup() {
  assert.ok(setupDone, 'the set-up test must have passed first');
}
function requireLinked() {
  requireSetup();
  assert.ok(linked, 'the linking test must have passed first');
}

// ---------------------------------------------------------------------------------------------
// Set-up

test('set-up: Alice (primary) and Carol registered and connected; Alice uploaded one-time keys', { timeout: 60_000 }, async () => {
  await Promise.all(Object.entries(NUMBERS).map(async ([name, e164]) => {
    try {
      accounts[name] = await H.registerTestAccount(net, e164, { code: CODE });
    } catch (e) {
      assert.fail(`registration of ${name} (${e164}) failed: ${H.describeLibsignalError(e)}\n--- server log ---\n${server.logTail(30)}`);
    }
  }));
  devices.alice1 = new S.LocalDevice(accounts.alice);
  devices.carol = new S.LocalDevice(accounts.carol);
  for (const [name, account] of [['alice1', accounts.alice], ['carol', accounts.carol]]) {
    const { listener } = await connect(name, account.username, account.password);
    await listener.waitForQueueEmpty(WAIT_MS);
  }
  await uploadOneTimeKeys('alice1', accounts.alice.material.aci.identityPrivate);
  anon = await server.connectUnauthenticated(net);
  setupDone = true;
});

// ---------------------------------------------------------------------------------------------
// 1. Linking

test('linking: libsignal provisioning connection gets an address and the primary\'s envelope; PUT /v1/devices/link; device 2 connects as <aci>.2', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  requireSetup();
  const alice = accounts.alice;
  const primary = sockets.alice1.conn;

  // The new device: an ephemeral key pair (its public half goes into the QR code) and a
  // provisioning socket opened by libsignal (Net.connectProvisioning).
  const ephemeral = PrivateKey.generate();
  const prov = new H.ProvisioningRecorder({ name: 'new device\'s provisioning socket' });
  let provConn;
  try {
    provConn = await server.connectProvisioning(net, prov);
  } catch (e) {
    assert.fail(`Net.connectProvisioning failed: ${H.describeLibsignalError(e)}\n--- server log ---\n${server.logTail(20)}`);
  }
  await prov.waitUntil(() => prov.addresses.length > 0, WAIT_MS, 'PUT /v1/address (spec §3.2)');
  const address = prov.addresses[0];
  assert.equal(prov.addresses.length, 1, 'one address per provisioning socket');
  assert.match(address, /^[A-Za-z0-9_-]{22}(==)?$/, `address = base64url of 16 random bytes (spec §3.2): ${address}`);

  // The primary: a link token, the long-poll for the new device, and the encrypted ProvisionMessage.
  const code = await H.chatRequest(primary, 'GET', '/v1/devices/provisioning/code');
  assert.equal(code.status, 200, `spec §3.1: ${H.describe(code)}`);
  const { verificationCode, tokenIdentifier } = code.json ?? {};
  assert.ok(typeof verificationCode === 'string' && verificationCode.length > 0, H.describe(code));
  assert.ok(typeof tokenIdentifier === 'string' && tokenIdentifier.length > 0, H.describe(code));
  const waitForLinked = H.chatRequest(primary, 'GET', `/v1/devices/wait_for_linked_device/${tokenIdentifier}?timeout=10`,
    { timeoutMillis: 14_000 });

  const profileKey = new Uint8Array(randomBytes(32));
  const envelope = S.encryptProvisionMessage(ephemeral.getPublicKey(), {
    aciIdentityKeyPublic: alice.material.aci.identityPublic.serialize(),
    aciIdentityKeyPrivate: alice.material.aci.identityPrivate.serialize(),
    pniIdentityKeyPublic: alice.material.pni.identityPublic.serialize(),
    pniIdentityKeyPrivate: alice.material.pni.identityPrivate.serialize(),
    number: alice.e164,
    aci: alice.aci.getServiceIdString(),
    pni: alice.pni.getRawUuid(),
    provisioningCode: verificationCode,
    profileKey,
    readReceipts: true,
    userAgent: 'OWD',
    provisioningVersion: 1,
  });
  const put = await H.chatRequest(primary, 'PUT', `/v1/provisioning/${address}`, { json: { body: H.b64(envelope) } });
  assert.equal(put.status, 204, `spec §3.1 PUT /v1/provisioning/{destination}: ${H.describe(put, { bodyLimit: 120 })}`);

  await prov.waitUntil(() => prov.envelopes.length > 0, WAIT_MS, 'the ProvisionEnvelope (PUT /v1/message, spec §3.2)');
  assert.ok(bytesEqual(prov.envelopes[0], envelope), 'the provisioning socket delivers the envelope bytes unchanged');
  await t.test('the provisioning socket is closed after the envelope is acknowledged (spec §3.2)', async () => {
    await prov.waitUntil(() => prov.interrupted.length > 0, WAIT_MS, 'the server to close the provisioning socket');
    // A normal close (1000) is reported without an error; 4401/4409 would come back as errors.
    const cause = prov.interrupted[0];
    assert.ok(cause === null || ![ErrorCode.ConnectionInvalidated, ErrorCode.ConnectedElsewhere].includes(cause.code),
      `closed normally: ${cause && H.describeLibsignalError(cause)}`);
  });
  try {
    await server.disconnect(provConn);
  } catch {
    // already closed by the server
  }

  // The new device opens the envelope: the account's identity keys and the provisioning code.
  const msg = S.decryptProvisionEnvelope(ephemeral, prov.envelopes[0]);
  assert.equal(msg.provisioningCode, verificationCode);
  assert.equal(msg.aci, alice.aci.getServiceIdString());
  const aciIdentity = PrivateKey.deserialize(msg.aciIdentityKeyPrivate);
  const pniIdentity = PrivateKey.deserialize(msg.pniIdentityKeyPrivate);
  assert.ok(bytesEqual(aciIdentity.getPublicKey().serialize(), msg.aciIdentityKeyPublic));

  // Its own keys, signed by the account's identity keys, and its own password / registration ids.
  const aciKeys = H.makeIdentityKeys({ signWith: aciIdentity });
  const pniKeys = H.makeIdentityKeys({ signWith: pniIdentity });
  const password = randomBytes(18).toString('base64');
  const registrationId = H.randomRegistrationId();
  const pniRegistrationId = H.randomRegistrationId();
  const deviceName = new Uint8Array(randomBytes(40)); // an encrypted device name, opaque to the server
  const link = await H.chatRequest(anon, 'PUT', '/v1/devices/link', {
    headers: [H.basicAuth(msg.number, password)],
    json: {
      verificationCode: msg.provisioningCode,
      accountAttributes: {
        fetchesMessages: true,
        registrationId,
        pniRegistrationId,
        name: H.b64(deviceName),
        capabilities: { spqr: true },
      },
      aciSignedPreKey: H.signedKeyJson(aciKeys.signedPreKey),
      aciPqLastResortPreKey: H.signedKeyJson(aciKeys.lastResortKey),
      pniSignedPreKey: H.signedKeyJson(pniKeys.signedPreKey),
      pniPqLastResortPreKey: H.signedKeyJson(pniKeys.lastResortKey),
    },
  });
  assert.equal(link.status, 200, `spec §3.1 PUT /v1/devices/link: ${H.describe(link, { bodyLimit: 300 })}`);
  assert.deepEqual(link.json, { uuid: alice.aci.getRawUuid(), pni: alice.pni.getRawUuid(), deviceId: 2 },
    `spec §3.1 link response: ${H.describe(link, { bodyLimit: 300 })}`);

  accounts.linked = {
    e164: alice.e164,
    aci: alice.aci,
    pni: alice.pni,
    deviceId: 2,
    username: `${alice.aci.getServiceIdString()}.2`,
    password,
    material: { aci: { ...aciKeys, identityPrivate: aciIdentity, identityPublic: aciIdentity.getPublicKey() }, registrationId, pniRegistrationId },
    deviceName,
  };
  devices.alice2 = new S.LocalDevice(accounts.linked);

  await t.test('the primary\'s wait_for_linked_device long-poll wakes with the new device (spec §3.1)', async () => {
    const waited = await waitForLinked;
    assert.equal(waited.status, 200, H.describe(waited));
    assert.equal(waited.json?.id, 2, H.describe(waited));
    assert.equal(waited.json?.registrationId, registrationId, H.describe(waited));
  });

  const { conn, listener } = await connect('alice2', accounts.linked.username, password);
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.equal(listener.messages.length, 0, 'a newly linked device has an empty queue');
  const whoami = await H.chatRequest(conn, 'GET', '/v1/accounts/whoami');
  assert.equal(whoami.status, 200, H.describe(whoami));
  assert.equal(whoami.json?.uuid, alice.aci.getRawUuid(), `the linked device belongs to Alice's account: ${H.describe(whoami)}`);
  await uploadOneTimeKeys('alice2', aciIdentity);
  linked = true;

  await t.test('the link token is single-use: linking again with it → 403 (spec §3.1)', async () => {
    const again = await H.chatRequest(anon, 'PUT', '/v1/devices/link', {
      headers: [H.basicAuth(msg.number, randomBytes(18).toString('base64'))],
      json: {
        verificationCode: msg.provisioningCode,
        accountAttributes: { fetchesMessages: true, registrationId: H.randomRegistrationId(), pniRegistrationId: H.randomRegistrationId(), capabilities: { spqr: true } },
        aciSignedPreKey: H.signedKeyJson(aciKeys.signedPreKey),
        aciPqLastResortPreKey: H.signedKeyJson(aciKeys.lastResortKey),
        pniSignedPreKey: H.signedKeyJson(pniKeys.signedPreKey),
        pniPqLastResortPreKey: H.signedKeyJson(pniKeys.lastResortKey),
      },
    });
    assert.equal(again.status, 403, H.describe(again, { bodyLimit: 200 }));
  });

  let removePrimary;
  await t.test('the linked device may not ask for a link token (401) nor remove the primary (spec §3.1)', async () => {
    const code2 = await H.chatRequest(conn, 'GET', '/v1/devices/provisioning/code');
    assert.equal(code2.status, 401, `primary only: ${H.describe(code2)}`);
    removePrimary = await H.chatRequest(conn, 'DELETE', '/v1/devices/1');
    // Signal-Server checks the caller before the target: a linked device removing any device but itself is 401.
    assert.equal(removePrimary.status, 401, `refused: ${H.describe(removePrimary)}`);
    const list = await H.chatRequest(primary, 'GET', '/v1/devices');
    assert.deepEqual((list.json?.devices ?? []).map((d) => d.id).sort(), [1, 2], `both devices remain: ${H.describe(list)}`);
  });
  await t.test('GET /v1/devices lists both devices (raw, spec §3.1)', async () => {
    const resp = await H.chatRequest(primary, 'GET', '/v1/devices');
    assert.equal(resp.status, 200, H.describe(resp));
    const list = [...(resp.json?.devices ?? [])].sort((a, b) => a.id - b.id);
    assert.deepEqual(list.map((d) => d.id), [1, 2], H.describe(resp));
    assert.equal(list[0].registrationId, alice.material.registrationId, H.describe(resp));
    assert.equal(list[1].registrationId, registrationId, H.describe(resp));
    assert.equal(list[1].name, H.b64(deviceName), `device 2's name as given at linking: ${H.describe(resp)}`);
    for (const d of list) assert.equal(typeof d.lastSeen, 'number', H.describe(resp));
  });

});

// ---------------------------------------------------------------------------------------------
// 2. A third account sends to both devices

test('Carol is taught device 2 by a 409, builds sessions to both devices, sends to each (identified, then sealed); both decrypt', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  requireLinked();
  const alice = accounts.alice;
  const carolConn = sockets.carol.conn;

  // Carol only knows device 1.
  const one = await H.chatRequest(carolConn, 'GET', `/v2/keys/${aliceAci()}/1`);
  assert.equal(one.status, 200, H.describe(one));
  await processPreKeyBundle(S.bundleFromJson(one.json, one.json.devices[0]), devices.alice1.address, devices.carol.address,
    devices.carol.sessions, devices.carol.identity);

  await t.test('libsignal sendMessage to device 1 only → MismatchedDevices, missing [2]', async () => {
    const entry = await carolEncryptTo(1, 'never delivered (typed)');
    await assert.rejects(carolTypedSend([entry], nextTimestamp()), (e) => {
      assert.equal(e.code, ErrorCode.MismatchedDevices, `expected a 409 (spec §5.1), got ${describeMismatch(e)}`);
      assert.equal(e.entries.length, 1, describeMismatch(e));
      assert.equal(e.entries[0].account.getServiceIdString(), aliceAci(), describeMismatch(e));
      assert.deepEqual([e.entries[0].missingDevices, e.entries[0].extraDevices, e.entries[0].staleDevices], [[2], [], []],
        describeMismatch(e));
      return true;
    });
  });
  await t.test('raw PUT /v1/messages to device 1 only → 409 {"missingDevices":[2],"extraDevices":[]}', async () => {
    const resp = await rawSend('carol', aliceAci(), [await carolEncryptTo(1, 'never delivered (raw)')]);
    assert.equal(resp.status, 409, `spec §5.1: ${H.describe(resp)}`);
    assert.deepEqual(resp.json?.missingDevices, [2], H.describe(resp));
    assert.deepEqual(resp.json?.extraDevices ?? [], [], H.describe(resp));
  });
  await sleep(200);
  assert.equal(sockets.alice1.listener.messages.length, 0, 'refused sends deliver nothing to device 1');
  assert.equal(sockets.alice2.listener.messages.length, 0, 'refused sends deliver nothing to device 2');

  // The whole bundle: both devices, each with a one-time key, one identity key.
  const all = await H.chatRequest(carolConn, 'GET', `/v2/keys/${aliceAci()}/*`);
  assert.equal(all.status, 200, H.describe(all));
  assert.ok(bytesEqual(fromB64(all.json.identityKey), alice.material.aci.identityPublic.serialize()), 'account identity key');
  const byId = Object.fromEntries(all.json.devices.map((d) => [d.deviceId, d]));
  assert.deepEqual(Object.keys(byId).map(Number).sort(), [1, 2], `GET /v2/keys/{aci}/* lists both devices (spec §4.1): ${H.describe(all)}`);
  assert.equal(byId[2].registrationId, accounts.linked.material.registrationId, H.describe(all));
  assert.ok(byId[2].preKey && devices.alice2.preKeys.records.has(byId[2].preKey.keyId),
    `device 2's bundle carries one of the one-time keys it uploaded: ${H.describe(all)}`);
  assert.ok(devices.alice2.kyberPreKeys.records.has(byId[2].pqPreKey.keyId), `device 2's Kyber key: ${H.describe(all)}`);
  await processPreKeyBundle(S.bundleFromJson(all.json, byId[2]), devices.alice2.address, devices.carol.address,
    devices.carol.sessions, devices.carol.identity);

  // Identified, with libsignal's typed sendMessage: one message per device.
  const toPhone = await carolEncryptTo(1, 'hello Alice\'s phone');
  const toDesktop = await carolEncryptTo(2, 'hello Alice\'s desktop');
  let timestamp = nextTimestamp();
  let sentAfter = Date.now();
  try {
    await carolTypedSend([toPhone, toDesktop], timestamp);
  } catch (e) {
    assert.fail(`libsignal sendMessage to devices 1 and 2 failed: ${describeMismatch(e)}`);
  }
  const [m1] = await sockets.alice1.listener.next(1, WAIT_MS);
  const [m2] = await sockets.alice2.listener.next(1, WAIT_MS);
  const e1 = checkEnvelope(m1, { type: PREKEY_BUNDLE, clientTimestamp: timestamp, sentAfter, source: 'carol' });
  const e2 = checkEnvelope(m2, { type: PREKEY_BUNDLE, clientTimestamp: timestamp, sentAfter, source: 'carol' });
  assert.ok(bytesEqual(e1.content, toPhone.ciphertext.serialize()), 'device 1 gets the copy made for device 1');
  assert.ok(bytesEqual(e2.content, toDesktop.ciphertext.serialize()), 'device 2 gets the copy made for device 2');
  assert.equal(await openFromCarol('alice1', e1.content), toPhone.text);
  assert.equal(await openFromCarol('alice2', e2.content), toDesktop.text);
  assert.ok(!bytesEqual(e1.serverGuid, e2.serverGuid), 'each device\'s envelope has its own server GUID');

  // Sealed sender over the anonymous socket, with libsignal's typed UnauthMessagesService.sendMessage.
  const certResp = await H.chatRequest(carolConn, 'GET', '/v1/certificate/delivery');
  assert.equal(certResp.status, 200, H.describe(certResp));
  const carolCert = SenderCertificate.deserialize(fromB64(certResp.json.certificate));
  const sealed = {};
  for (const [deviceId, name] of [[1, 'alice1'], [2, 'alice2']]) {
    const text = `sealed, for Alice's device ${deviceId}`;
    sealed[name] = {
      text,
      bytes: await sealedSenderEncryptMessage(utf8(text), devices[name].address, carolCert, devices.carol.sessions, devices.carol.identity),
    };
  }
  timestamp = nextTimestamp();
  sentAfter = Date.now();
  try {
    await anon.sendMessage({
      destination: alice.aci,
      timestamp,
      contents: [
        { deviceId: 1, registrationId: alice.material.registrationId, contents: sealed.alice1.bytes },
        { deviceId: 2, registrationId: accounts.linked.material.registrationId, contents: sealed.alice2.bytes },
      ],
      auth: { accessKey: alice.material.unidentifiedAccessKey },
      onlineOnly: false,
      urgent: true,
    });
  } catch (e) {
    assert.fail(`libsignal sealed-sender sendMessage to devices 1 and 2 failed: ${describeMismatch(e)}`);
  }
  for (const [deviceId, name] of [[1, 'alice1'], [2, 'alice2']]) {
    const [m] = await sockets[name].listener.next(1, WAIT_MS);
    const env = checkEnvelope(m, { type: UNIDENTIFIED_SENDER, clientTimestamp: timestamp, sentAfter });
    assert.ok(bytesEqual(env.content, sealed[name].bytes), `device ${deviceId} gets its own sealed copy`);
    const dev = devices[name];
    let result;
    try {
      result = await sealedSenderDecryptMessage(env.content, trustRoot, Date.now(), alice.e164, aliceAci(), deviceId,
        dev.sessions, dev.identity, dev.preKeys, dev.signedPreKeys, dev.kyberPreKeys);
    } catch (e) {
      assert.fail(`sealedSenderDecryptMessage on device ${deviceId}: ${H.describeLibsignalError(e)}`);
    }
    assert.equal(fromUtf8(result.message()), sealed[name].text);
    assert.equal(result.senderUuid(), accounts.carol.aci.getServiceIdString());
  }

  await t.test('Alice (now two devices) sending to Carol gets needsSync: true (spec §5.1)', async () => {
    const bundle = await H.chatRequest(sockets.alice1.conn, 'GET', `/v2/keys/${accounts.carol.aci.getServiceIdString()}/1`);
    assert.equal(bundle.status, 200, H.describe(bundle));
    await processPreKeyBundle(S.bundleFromJson(bundle.json, bundle.json.devices[0]), devices.carol.address, devices.alice1.address,
      devices.alice1.sessions, devices.alice1.identity);
    const ciphertext = await signalEncrypt(utf8('hi Carol'), devices.carol.address, devices.alice1.address,
      devices.alice1.sessions, devices.alice1.identity);
    const resp = await rawSend('alice1', accounts.carol.aci.getServiceIdString(),
      [{ deviceId: 1, registrationId: accounts.carol.material.registrationId, ciphertext }]);
    assert.equal(resp.status, 200, H.describe(resp));
    assert.equal(resp.json?.needsSync, true, `an identified send from an account with another device: ${H.describe(resp)}`);
    await sockets.carol.listener.waitUntil(
      () => sockets.carol.listener.messages.some((m) => m.decoded?.type === PREKEY_BUNDLE), WAIT_MS, 'Alice\'s message');
  });
  // Carol's socket acknowledged Alice's message: a server delivery receipt goes to every device of
  // the sending account (spec §5.3, ReceiptSender), so the linked device gets one too.
  for (const name of ['alice1', 'alice2']) {
    const [receipt] = await sockets[name].listener.next(1, WAIT_MS);
    const r = receipt.decoded;
    assert.equal(r?.type, 5, `${name}: a server delivery receipt (spec §5.3): ${H.describeEnvelope(r)}`);
    assert.ok(r.sourceServiceId && bytesEqual(r.sourceServiceId, accounts.carol.aci.getServiceIdBinary()),
      `${name}: receipt source = Carol: ${H.describeEnvelope(r)}`);
  }
  await sleep(200);
  assert.deepEqual(sockets.alice1.listener.untaken().map((m) => H.describeEnvelope(m.decoded)), [], 'nothing else for device 1');
  assert.deepEqual(sockets.alice2.listener.untaken().map((m) => H.describeEnvelope(m.decoded)), [], 'nothing else for device 2');
});


// ---------------------------------------------------------------------------------------------
// 3. Removal

test('the primary removes device 2: its socket closes (4401 → ConnectionInvalidated), its password stops working (DeviceDelinked), a send naming it gets 409 extraDevices [2]', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  requireLinked();
  const alice = accounts.alice;
  const { listener: linkedListener } = sockets.alice2;
  assert.equal(linkedListener.interrupted.length, 0, 'the linked device\'s socket is still open');

  // Raw: libsignal 0.103.0's typed removeDevice()/getDevices() are gRPC-only ("requires an H2
  // connection"), and this server speaks the HTTP/1.1 WebSocket API.
  const del = await H.chatRequest(sockets.alice1.conn, 'DELETE', '/v1/devices/2');
  assert.equal(del.status, 204, `spec §3.1: ${H.describe(del)}`);

  await linkedListener.waitUntil(() => linkedListener.interrupted.length > 0, WAIT_MS,
    'the removed device\'s socket to be closed (close code 4401, spec §6.5)');
  // libsignal-net maps close code 4401 (CONNECTION_INVALIDATED_CLOSE_CODE) on a live socket to
  // ConnectionInvalidated; DeviceDelinked is what it reports for a refused upgrade (checked below).
  const cause = linkedListener.interrupted[0];
  assert.equal(cause?.code, ErrorCode.ConnectionInvalidated,
    `libsignal reports close code 4401 as ConnectionInvalidated; got ${cause ? H.describeLibsignalError(cause) : cause}`);
  delete sockets.alice2;

  await t.test('GET /v1/devices lists device 1 only', async () => {
    const resp = await H.chatRequest(sockets.alice1.conn, 'GET', '/v1/devices');
    assert.equal(resp.status, 200, H.describe(resp));
    assert.deepEqual((resp.json?.devices ?? []).map((d) => d.id), [1], H.describe(resp));
  });

  await t.test('the removed device\'s credentials are refused (libsignal DeviceDelinked)', async () => {
    await assert.rejects(server.connectAuthenticated(accounts.linked.username, accounts.linked.password, { net }), (e) => {
      assert.equal(e.code, ErrorCode.DeviceDelinked, `expected a 401/403 on the upgrade, got ${H.describeLibsignalError(e)}`);
      return true;
    });
  });

  await t.test('GET /v2/keys/{aci}/2 → 404; /* lists device 1 only', async () => {
    const two = await H.chatRequest(sockets.carol.conn, 'GET', `/v2/keys/${aliceAci()}/2`);
    assert.equal(two.status, 404, H.describe(two));
    const all = await H.chatRequest(sockets.carol.conn, 'GET', `/v2/keys/${aliceAci()}/*`);
    assert.equal(all.status, 200, H.describe(all));
    assert.deepEqual(all.json.devices.map((d) => d.deviceId), [1], H.describe(all));
  });

  await t.test('libsignal sendMessage naming devices 1 and 2 → MismatchedDevices, extra [2]', async () => {
    const entries = [await carolEncryptTo(1, 'never delivered (typed, 1)'), await carolEncryptTo(2, 'never delivered (typed, 2)')];
    await assert.rejects(carolTypedSend(entries, nextTimestamp()), (e) => {
      assert.equal(e.code, ErrorCode.MismatchedDevices, `expected a 409 (spec §5.1), got ${describeMismatch(e)}`);
      assert.deepEqual([e.entries[0]?.missingDevices, e.entries[0]?.extraDevices, e.entries[0]?.staleDevices], [[], [2], []],
        describeMismatch(e));
      return true;
    });
  });

  await t.test('raw PUT /v1/messages naming devices 1 and 2 → 409 {"missingDevices":[],"extraDevices":[2]}', async () => {
    const entries = [await carolEncryptTo(1, 'never delivered (raw, 1)'), await carolEncryptTo(2, 'never delivered (raw, 2)')];
    const resp = await rawSend('carol', aliceAci(), entries);
    assert.equal(resp.status, 409, `spec §5.1: ${H.describe(resp)}`);
    assert.deepEqual(resp.json?.extraDevices, [2], H.describe(resp));
    assert.deepEqual(resp.json?.missingDevices ?? [], [], H.describe(resp));
  });

  await t.test('a send to device 1 only is accepted and the primary decrypts it; Alice\'s sends no longer need sync', async () => {
    const entry = await carolEncryptTo(1, 'just the phone now');
    const timestamp = nextTimestamp();
    const sentAfter = Date.now();
    const resp = await rawSend('carol', aliceAci(), [entry], timestamp);
    assert.equal(resp.status, 200, H.describe(resp));
    const [m] = await sockets.alice1.listener.next(1, WAIT_MS);
    // Carol has had no reply from Alice's phone yet, so her message is still a PreKey message (type 3).
    assert.equal(entry.ciphertext.type(), CiphertextMessageType.PreKey);
    const env = checkEnvelope(m, { type: PREKEY_BUNDLE, clientTimestamp: timestamp, sentAfter, source: 'carol' });
    assert.equal(await openFromCarol('alice1', env.content), entry.text);
    assert.equal(resp.json?.needsSync, false, `Carol has one device: ${H.describe(resp)}`);

    const ciphertext = await signalEncrypt(utf8('hi again Carol'), devices.carol.address, devices.alice1.address,
      devices.alice1.sessions, devices.alice1.identity);
    const back = await rawSend('alice1', accounts.carol.aci.getServiceIdString(),
      [{ deviceId: 1, registrationId: accounts.carol.material.registrationId, ciphertext }]);
    assert.equal(back.status, 200, H.describe(back));
    assert.equal(back.json?.needsSync, false, `Alice has one device again (spec §5.1): ${H.describe(back)}`);
  });
});
