// Message delivery through the official libsignal client: sends over libsignal's chat sockets
// (sealed sender over the anonymous socket with an Unidentified-Access-Key, identified over the
// authenticated socket, sealed sender v2 multi-recipient), delivery to authenticated sockets as
// server-pushed `PUT /api/v1/message` requests that libsignal surfaces as onIncomingMessage,
// acknowledgement, redelivery of unacknowledged envelopes, the queue-empty signal, server delivery
// receipts, and 409/410 device-list answers. Every ciphertext is made and opened by libsignal.
//
// Spec references: signal-server-api.md §5.1 (PUT /v1/messages/{destination}), §5.2 (multi-recipient),
// §5.3 (Envelope, server delivery receipts), §6.4 (push, ack, queue empty), §7 (sealed sender, UAK);
// issue 4.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';

import * as SignalClient from '@signalapp/libsignal-client';
// Not re-exported from the package index in 0.103.0; it is libsignal's server-side fan-out parser.
import SealedSenderMultiRecipientMessage from '@signalapp/libsignal-client/dist/SealedSenderMultiRecipientMessage.js';

import * as H from './harness.mjs';
import * as S from './signal-stores.mjs';

const {
  ProtocolAddress,
  PreKeySignalMessage,
  CiphertextMessageType,
  SenderCertificate,
  SenderKeyDistributionMessage,
  UnidentifiedSenderMessageContent,
  processPreKeyBundle,
  processSenderKeyDistributionMessage,
  signalEncrypt,
  signalDecryptPreKey,
  groupEncrypt,
  groupDecrypt,
  sealedSenderEncryptMessage,
  sealedSenderDecryptMessage,
  sealedSenderDecryptToUsmc,
  sealedSenderMultiRecipientEncrypt,
} = SignalClient;
const { PublicKey } = H;
const { utf8, fromUtf8, fromB64, bytesEqual } = S;

// Envelope types (signal-server-api.md §5.3).
const CIPHERTEXT = 1;
const PREKEY_BUNDLE = 3;
const SERVER_DELIVERY_RECEIPT = 5;
const UNIDENTIFIED_SENDER = 6;

const MRM_CONTENT_TYPE = 'application/vnd.signal-messenger.mrm';
const LIVE_DELIVERY_MS = 3000; // "at once": a connected device gets a new message within this
const WAIT_MS = 5000; // generous bound for anything the server should do promptly
const QUIET_MS = 400; // how long "nothing else arrives" is watched
const TEST_TIMEOUT_MS = 30_000; // no test may hang the file

// Own test numbers so that this file's accounts never meet another file's.
const NUMBERS = {
  alice: '+15555550200',
  bob: '+15555550201',
  carol: '+15555550202',
  dave: '+15555550203',
  erin: '+15555550204',
};
const CODE = '123456';

let server;
let net;
let trustRoot;
const accounts = {}; // name -> H.registerTestAccount result
const devices = {}; // name -> S.LocalDevice (private keys, sessions)
const sockets = {}; // name -> { conn, listener } (authenticated)
let anon; // Alice's unauthenticated socket for sealed-sender sends
let aliceCert; // SenderCertificate
let setupDone = false;

let timestampCounter = 0;
/** A distinct client timestamp per message. */
const nextTimestamp = () => Date.now() + ++timestampCounter;

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

// After a failed test, empty every queue (acknowledging whatever is left) so that one failure
// does not cascade into the following tests; Alice gets a fresh socket with nothing untaken.
afterEach(async (t) => {
  if (t.passed || !setupDone) return;
  try {
    for (const name of Object.keys(NUMBERS).filter((n) => n !== 'alice')) {
      const { listener } = await connect(name);
      await listener.waitForQueueEmpty(WAIT_MS);
      await sleep(100);
      await disconnect(name);
    }
    await sleep(QUIET_MS); // receipts for whatever was acknowledged
    const { listener } = await connect('alice');
    await listener.waitForQueueEmpty(WAIT_MS);
    await sleep(QUIET_MS);
    listener.cursor = listener.messages.length;
  } catch (e) {
    process.stderr.write(`delivery.test.mjs: clean-up after "${t.name}" failed: ${e?.message ?? e}\n`);
  }
});

// ---------------------------------------------------------------------------------------------
// Helpers

const aciOf = (name) => accounts[name].aci.getServiceIdString();
const aciBytes = (name) => accounts[name].aci.getServiceIdBinary();
const uak = (name) => accounts[name].material.unidentifiedAccessKey;
const uakHeader = (key) => ['unidentified-access-key', H.b64(key)];

function xorKeys(keys) {
  const out = new Uint8Array(16);
  for (const k of keys) for (let i = 0; i < 16; i++) out[i] ^= k[i];
  return out;
}

function requireSetup() {
  assert.ok(setupDone, 'the set-up test (registration, key upload, sender certificate) must have passed first');
}

/** (Re)connects `name`'s authenticated socket with a fresh RecordingListener. */
async function connect(name, { ack = 200 } = {}) {
  await disconnect(name);
  const listener = new H.RecordingListener({ ack, name: `${name}'s authenticated socket` });
  const account = accounts[name];
  let conn;
  try {
    conn = await server.connectAuthenticated(account.username, account.password, { net, listener });
  } catch (e) {
    assert.fail(`connectAuthenticatedChat(${name}) failed: ${H.describeLibsignalError(e)}`);
  }
  sockets[name] = { conn, listener };
  return sockets[name];
}

/**
 * Closes `name`'s authenticated socket. A request/response round trip first makes sure every
 * acknowledgement the client already sent has reached the server (frames are ordered).
 */
async function disconnect(name) {
  const s = sockets[name];
  if (!s) return;
  delete sockets[name];
  try {
    await H.chatRequest(s.conn, 'GET', '/v1/keepalive', { timeoutMillis: 3000 });
  } catch {
    // the socket may already be gone; closing it is all that matters
  }
  await server.disconnect(s.conn);
}

/** Connects, waits for the queue-empty signal, and checks that nothing was delivered. */
async function connectExpectingEmptyQueue(name, why) {
  const s = await connect(name);
  await s.listener.waitForQueueEmpty(WAIT_MS);
  await sleep(QUIET_MS);
  assert.deepEqual(s.listener.messages.map((m) => H.describeEnvelope(m.decoded)), [],
    `${name}'s queue should be empty on connect (${why})`);
  return s;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** One-message `IncomingMessageList` (spec §5.1). */
function messageList({ type, content, deviceId = 1, registrationId, timestamp, online = false, urgent = true }) {
  return {
    messages: [{ type, destinationDeviceId: deviceId, destinationRegistrationId: registrationId, content: H.b64(content) }],
    timestamp,
    online,
    urgent,
  };
}

/** Sealed-sender `PUT /v1/messages/{recipient}` over the anonymous socket. */
function sealedSend(recipient, body, { key = uak(recipient) } = {}) {
  return H.chatRequest(anon, 'PUT', `/v1/messages/${aciOf(recipient)}`, { json: body, headers: [uakHeader(key)] });
}

/** Identified `PUT /v1/messages/{recipient}` over `sender`'s authenticated socket. */
function identifiedSend(sender, recipient, body) {
  return H.chatRequest(sockets[sender].conn, 'PUT', `/v1/messages/${aciOf(recipient)}`, { json: body });
}

/** Alice's sealed-sender ciphertext of `text` for `recipient` device 1. */
function sealFor(recipient, text) {
  return sealedSenderEncryptMessage(utf8(text), devices[recipient].address, aliceCert, devices.alice.sessions,
    devices.alice.identity);
}

function assertSendOk(resp, what) {
  assert.equal(resp.status, 200, `${what} (spec §5.1): ${H.describe(resp, { bodyLimit: 300 })}`);
  assert.equal(resp.json?.needsSync, false, `${what}: 200 body should be {"needsSync": false} (single-device sender, spec §5.1): ${H.describe(resp, { bodyLimit: 300 })}`);
}

/**
 * Checks one delivered message: the push itself (X-Signal-Timestamp) and the Envelope fields every
 * delivery must have (spec §5.3, §6.4; issue 4: string and binary service-id fields both set).
 */
function checkEnvelope(message, { type, recipient, clientTimestamp, content, sentAfter, source, destination = accounts[recipient].aci }) {
  assert.ok(message.decoded, `the pushed body must be a textsecure.Envelope: ${message.decodeError}`);
  const env = message.decoded;
  const d = H.describeEnvelope(env);
  assert.equal(env.type, type, `Envelope.type: ${d}`);
  assert.equal(env.clientTimestamp, clientTimestamp, `Envelope.client_timestamp = the sender's timestamp: ${d}`);
  assert.ok(env.serverTimestamp >= sentAfter - 1000 && env.serverTimestamp <= Date.now() + 1000,
    `Envelope.server_timestamp should be when the server accepted it (≥ ${sentAfter}): ${d}`);
  assert.ok(env.destinationServiceId && bytesEqual(env.destinationServiceId, destination.getServiceIdBinary()),
    `Envelope.destination_service_id (field 20) = the addressed service id, compact binary (ACI 16 bytes, PNI 0x01 ‖ 16 bytes): ${d}`);
  assert.equal(env.destinationServiceIdString, destination.getServiceIdString(),
    `Envelope.destination_service_id string form (field 13, issue 4 "both set"): ${d}`);
  assert.ok(env.serverGuid instanceof Uint8Array && env.serverGuid.length === 16, `Envelope.server_guid (field 21) 16 bytes: ${d}`);
  if (env.serverGuidString !== undefined) {
    assert.equal(env.serverGuidString, H.uuidFromBytes(env.serverGuid), `server_guid string (9) and bytes (21) agree: ${d}`);
  }
  assert.notEqual(env.ephemeral, true, `Envelope.ephemeral must be stripped before delivery (spec §5.3): ${d}`);
  assert.ok(env.raw[18] === undefined, `Envelope.shared_mrm_key (18) must not reach clients: ${d}`);
  if (content !== undefined) {
    assert.ok(env.content && bytesEqual(env.content, content), `Envelope.content must be the sent ciphertext, unchanged: ${d}`);
  }
  if (source) {
    assert.ok(env.sourceServiceId && bytesEqual(env.sourceServiceId, aciBytes(source)),
      `Envelope.source_service_id (19) = the sender's ACI: ${d}`);
    assert.equal(env.sourceServiceIdString, aciOf(source), `Envelope.source_service_id string form (11): ${d}`);
    assert.equal(env.sourceDevice, 1, `Envelope.source_device: ${d}`);
  } else {
    assert.equal(env.sourceServiceId, undefined, `sealed sender: no source_service_id (19): ${d}`);
    assert.equal(env.sourceServiceIdString, undefined, `sealed sender: no source string (11): ${d}`);
    assert.equal(env.sourceDevice, undefined, `sealed sender: no source_device (7): ${d}`);
  }
  assert.ok(message.timestamp >= sentAfter - 60_000 && message.timestamp <= Date.now() + 60_000,
    `the push should carry X-Signal-Timestamp:<server ms> (spec §6.4); libsignal read ${message.timestamp}`);
  return env;
}

/** `recipient` opens a sealed-sender envelope from Alice with sealedSenderDecryptMessage. */
async function openSealed(recipient, content, text) {
  const dev = devices[recipient];
  const account = accounts[recipient];
  let result;
  try {
    result = await sealedSenderDecryptMessage(content, trustRoot, Date.now(), account.e164, aciOf(recipient), 1,
      dev.sessions, dev.identity, dev.preKeys, dev.signedPreKeys, dev.kyberPreKeys);
  } catch (e) {
    assert.fail(`sealedSenderDecryptMessage failed for ${recipient}: ${H.describeLibsignalError(e)}`);
  }
  assert.equal(fromUtf8(result.message()), text, 'decrypted plaintext');
  assert.equal(result.senderUuid(), aciOf('alice'), 'sender ACI from the sender certificate');
  assert.equal(result.senderE164(), accounts.alice.e164, 'sender e164 from the sender certificate');
  assert.equal(result.deviceId(), 1, 'sender device');
  return result;
}

// ---------------------------------------------------------------------------------------------
// Set-up

test('set-up: five accounts, one-time keys uploaded, Alice has a sender certificate and a session with Bob', { timeout: 90_000 }, async () => {
  const names = Object.keys(NUMBERS);
  await Promise.all(names.map(async (name) => {
    try {
      accounts[name] = await H.registerTestAccount(net, NUMBERS[name], { code: CODE });
    } catch (e) {
      assert.fail(`registration of ${name} (${NUMBERS[name]}) failed: ${H.describeLibsignalError(e)}\n` +
        `--- server log ---\n${server.logTail(30)}`);
    }
    devices[name] = new S.LocalDevice(accounts[name]);
  }));

  // Everyone uploads one-time keys over an authenticated socket; only Alice's socket stays open.
  for (const name of names) {
    const dev = devices[name];
    const keys = accounts[name].material.aci;
    const preKeys = S.makePreKeys(5);
    const pqPreKeys = S.makeKyberPreKeys(5, keys.identityPrivate, [keys.lastResortKey.id()]);
    for (const r of preKeys) await dev.preKeys.savePreKey(r.id(), r);
    for (const r of pqPreKeys) await dev.kyberPreKeys.saveKyberPreKey(r.id(), r);
    const { conn, listener } = await connect(name);
    const put = await H.chatRequest(conn, 'PUT', '/v2/keys', { json: S.setKeysJson({ preKeys, pqPreKeys }) });
    assert.equal(put.status, 204, `${name}: ${H.describe(put, { bodyLimit: 200 })}`);
    await listener.waitForQueueEmpty(WAIT_MS);
    assert.equal(listener.messages.length, 0, `${name}: a new account has no messages`);
    if (name !== 'alice') await disconnect(name);
  }

  const aliceConn = sockets.alice.conn;
  const certResp = await H.chatRequest(aliceConn, 'GET', '/v1/certificate/delivery');
  assert.equal(certResp.status, 200, H.describe(certResp));
  aliceCert = SenderCertificate.deserialize(fromB64(certResp.json.certificate));
  assert.equal(aliceCert.validate(trustRoot, Date.now()), true, 'sender certificate validates against the READY trust root');

  // Alice fetches bundles and builds sessions (processPreKeyBundle) with every other account.
  for (const name of names.filter((n) => n !== 'alice')) {
    const resp = await H.chatRequest(aliceConn, 'GET', `/v2/keys/${aciOf(name)}/*`);
    assert.equal(resp.status, 200, H.describe(resp));
    const [device] = resp.json.devices;
    assert.equal(device.deviceId, 1);
    assert.ok(device.preKey, `a one-time key was uploaded for ${name}: ${H.describe(resp)}`);
    await processPreKeyBundle(S.bundleFromJson(resp.json, device), devices[name].address, devices.alice.address,
      devices.alice.sessions, devices.alice.identity);
  }

  anon = await server.connectUnauthenticated(net);
  setupDone = true;
});

// ---------------------------------------------------------------------------------------------
// 1. Sealed sender, queued while the recipient is offline

test('sealed sender to an offline recipient: queued, delivered on connect (type 6), acked, decrypted, then gone', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  assert.equal(sockets.bob, undefined, 'Bob must not be connected');
  const text = 'hello Bob, you were offline';
  const sealed = await sealFor('bob', text);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const resp = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
  }));
  assertSendOk(resp, 'sealed-sender send with the recipient\'s access key');

  const { listener } = await connect('bob', { ack: null });
  const [message] = await listener.next(1, WAIT_MS);
  const env = checkEnvelope(message, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  message.ack(200);
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.equal(listener.queueEmpty, 1, 'queue-empty is sent once per connection');
  assert.ok(listener.queueEmptyAt[0].afterMessages >= 1, 'queue-empty comes after the queued backlog was delivered (spec §6.4)');
  await sleep(QUIET_MS);
  assert.equal(listener.untaken().length, 0, `exactly one envelope expected: ${listener.untaken().map((m) => H.describeEnvelope(m.decoded))}`);
  assert.equal(listener.queueEmpty, 1, 'queue-empty is sent once per connection');

  await openSealed('bob', env.content, text);

  await disconnect('bob');
  await connectExpectingEmptyQueue('bob', 'the envelope was acknowledged with 200 and must have been deleted');
  await disconnect('bob');
});

// ---------------------------------------------------------------------------------------------
// 2. Sealed sender, live

test('sealed sender to a connected recipient: delivered at once, acked, decrypted', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  const { listener } = await connectExpectingEmptyQueue('bob', 'nothing was sent since the last test');
  const text = 'hello Bob, live';
  const sealed = await sealFor('bob', text);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const resp = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
  }));
  assertSendOk(resp, 'sealed-sender send');
  const [message] = await listener.next(1, LIVE_DELIVERY_MS);
  const env = checkEnvelope(message, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  assert.equal(message.ackedWith, 200, 'acknowledged by the listener');
  assert.equal(listener.queueEmpty, 1, 'no second queue-empty for a live message');
  await openSealed('bob', env.content, text);

  await disconnect('bob');
  await connectExpectingEmptyQueue('bob', 'the live message was acknowledged');
  await disconnect('bob');
});

test('several live messages on one socket, each acknowledged before the next is sent: every one arrives at once', { timeout: TEST_TIMEOUT_MS }, async () => {
  // A long-lived socket that acks as it goes, as every real client does. (Regression: a new
  // envelope that reuses the queue id of one just acknowledged on this socket must not be taken
  // for a duplicate.)
  requireSetup();
  const { listener } = await connectExpectingEmptyQueue('bob', 'nothing was sent since the last test');
  for (let i = 0; i < 4; i++) {
    const text = `live #${i} on one socket`;
    const sealed = await sealFor('bob', text);
    const timestamp = nextTimestamp();
    const sentAfter = Date.now();
    const resp = await sealedSend('bob', messageList({
      type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
    }));
    assertSendOk(resp, `sealed-sender send #${i}`);
    let message;
    try {
      [message] = await listener.next(1, LIVE_DELIVERY_MS);
    } catch (e) {
      assert.fail(`message #${i} (PUT /v1/messages/${aciOf('bob')} → 200) was not pushed to Bob's connected socket ` +
        `within ${LIVE_DELIVERY_MS} ms after #${i - 1} was acknowledged on it (issue 4: new messages reach a connected ` +
        `device at once): ${e.message}`);
    }
    const env = checkEnvelope(message, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
    await openSealed('bob', env.content, text);
    // Let the acknowledgement reach the server and be processed before the next send.
    await H.chatRequest(sockets.bob.conn, 'GET', '/v1/keepalive');
    await sleep(100);
  }
  await disconnect('bob');
  await connectExpectingEmptyQueue('bob', 'all were acknowledged');
  await disconnect('bob');
});

// ---------------------------------------------------------------------------------------------
// 3. Not acknowledged → redelivered with the same GUID

test('an envelope answered with 500, or not at all, is redelivered on the next connection with the same server GUID', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  const text = 'redeliver me';
  const sealed = await sealFor('bob', text);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();

  let { listener } = await connect('bob', { ack: null });
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.equal(listener.messages.length, 0, 'Bob\'s queue should be empty before the send');
  const resp = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
  }));
  assertSendOk(resp, 'sealed-sender send');

  const [first] = await listener.next(1, LIVE_DELIVERY_MS);
  const env1 = checkEnvelope(first, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  first.ack(500);
  await disconnect('bob');

  // Second connection: the same envelope again; this time no answer at all.
  ({ listener } = await connect('bob', { ack: null }));
  const [second] = await listener.next(1, WAIT_MS);
  const env2 = checkEnvelope(second, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  assert.equal(H.uuidFromBytes(env2.serverGuid), H.uuidFromBytes(env1.serverGuid),
    'after a 500 ack the redelivered envelope has the same server_guid (issue 4)');
  assert.equal(env2.serverTimestamp, env1.serverTimestamp, 'same server_timestamp: it is the stored envelope');
  await sleep(QUIET_MS);
  assert.equal(listener.untaken().length, 0, 'the envelope is delivered once per connection');
  await disconnect('bob');

  // Third connection: same GUID again; acknowledge it properly.
  ({ listener } = await connect('bob', { ack: 200 }));
  const [third] = await listener.next(1, WAIT_MS);
  const env3 = checkEnvelope(third, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  assert.equal(H.uuidFromBytes(env3.serverGuid), H.uuidFromBytes(env1.serverGuid),
    'an unanswered envelope is redelivered with the same server_guid (issue 4)');
  await listener.waitForQueueEmpty(WAIT_MS);
  await openSealed('bob', env3.content, text);
  await disconnect('bob');

  await connectExpectingEmptyQueue('bob', 'the redelivered envelope was finally acknowledged with 200');
  await disconnect('bob');
});

// ---------------------------------------------------------------------------------------------
// 4. Identified send and the server delivery receipt

test('identified send over the authenticated socket: type 3 with source, decrypted; the ack makes a delivery receipt for the sender', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  const alice = sockets.alice;
  assert.ok(alice, 'Alice\'s authenticated socket from the set-up');
  assert.deepEqual(alice.listener.untaken().map((m) => H.describeEnvelope(m.decoded)), [],
    'sealed-sender sends must not produce delivery receipts (spec §5.3)');
  const { listener } = await connect('bob', { ack: null });
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.equal(listener.messages.length, 0, 'Bob\'s queue should be empty before the send');

  const text = 'hello Bob, identified';
  const ciphertext = await signalEncrypt(utf8(text), devices.bob.address, devices.alice.address, devices.alice.sessions,
    devices.alice.identity);
  assert.equal(ciphertext.type(), CiphertextMessageType.PreKey, 'Bob never answered, so still a PreKey message');
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const resp = await identifiedSend('alice', 'bob', messageList({
    type: PREKEY_BUNDLE, content: ciphertext.serialize(), registrationId: accounts.bob.material.registrationId, timestamp,
  }));
  assertSendOk(resp, 'identified send');

  const [message] = await listener.next(1, LIVE_DELIVERY_MS);
  const env = checkEnvelope(message, {
    type: PREKEY_BUNDLE, recipient: 'bob', clientTimestamp: timestamp, content: ciphertext.serialize(), sentAfter, source: 'alice',
  });
  let plaintext;
  try {
    plaintext = await signalDecryptPreKey(PreKeySignalMessage.deserialize(env.content), devices.alice.address,
      devices.bob.address, devices.bob.sessions, devices.bob.identity, devices.bob.preKeys, devices.bob.signedPreKeys,
      devices.bob.kyberPreKeys);
  } catch (e) {
    assert.fail(`signalDecryptPreKey failed: ${H.describeLibsignalError(e)}`);
  }
  assert.equal(fromUtf8(plaintext), text);

  await sleep(QUIET_MS);
  assert.equal(alice.listener.untaken().length, 0, 'no delivery receipt before the recipient acknowledges');
  message.ack(200);

  const [receipt] = await alice.listener.next(1, WAIT_MS);
  const r = receipt.decoded;
  const d = H.describeEnvelope(r);
  assert.equal(r.type, SERVER_DELIVERY_RECEIPT, `receipt Envelope.type (spec §5.3): ${d}`);
  assert.ok(r.sourceServiceId && bytesEqual(r.sourceServiceId, aciBytes('bob')), `receipt source_service_id = Bob's ACI: ${d}`);
  assert.equal(r.sourceServiceIdString, aciOf('bob'), `receipt source string form (11): ${d}`);
  assert.equal(r.sourceDevice, 1, `receipt source_device = the acknowledging device: ${d}`);
  assert.equal(r.clientTimestamp, timestamp, `receipt client_timestamp = the original message's timestamp: ${d}`);
  assert.ok(r.destinationServiceId && bytesEqual(r.destinationServiceId, aciBytes('alice')), `receipt destination = Alice: ${d}`);
  assert.ok(!r.content || r.content.length === 0, `a receipt has no content: ${d}`);
  assert.equal(receipt.ackedWith, 200);
  await sleep(QUIET_MS);
  assert.equal(alice.listener.untaken().length, 0, 'exactly one receipt');
  await disconnect('bob');
});

// ---------------------------------------------------------------------------------------------
// 5. Multi-recipient (sealed sender v2)

test('multi-recipient sealed sender to three accounts: 401 for a wrong XOR key, 200 {"uuids404":[]}, each recipient decrypts', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  requireSetup();
  const recipients = ['carol', 'dave', 'erin'];
  // Carol is connected during the send (live); Dave and Erin get it from their queue on connect.
  const carol = await connect('carol');
  await carol.listener.waitForQueueEmpty(WAIT_MS);

  // Group sends: the shared ciphertext is a SenderKey message, so each recipient first gets Alice's
  // sender key (SenderKeyDistributionMessage) in an ordinary sealed-sender message, through the server.
  const distributionId = randomUUID();
  const skdm = await SenderKeyDistributionMessage.create(devices.alice.address, distributionId, devices.alice.senderKeys);
  const skdmTimestamp = nextTimestamp();
  const sentAfter = Date.now();
  const sealedSkdm = {};
  for (const name of recipients) {
    sealedSkdm[name] = await sealedSenderEncryptMessage(skdm.serialize(), devices[name].address, aliceCert,
      devices.alice.sessions, devices.alice.identity);
    const resp = await sealedSend(name, messageList({
      type: UNIDENTIFIED_SENDER, content: sealedSkdm[name], registrationId: accounts[name].material.registrationId,
      timestamp: skdmTimestamp,
    }));
    assertSendOk(resp, `sealed-sender send of the sender key to ${name}`);
  }

  const text = 'hello Carol, Dave and Erin';
  const groupId = new Uint8Array(randomBytes(32));
  const groupMessage = await groupEncrypt(devices.alice.address, distributionId, devices.alice.senderKeys, utf8(text));
  const usmc = UnidentifiedSenderMessageContent.new(groupMessage, aliceCert, 0, groupId);
  const mrm = await sealedSenderMultiRecipientEncrypt({
    content: usmc,
    recipients: recipients.map((n) => devices[n].address),
    identityStore: devices.alice.identity,
    sessionStore: devices.alice.sessions,
  });
  // What each recipient should get, computed by libsignal's own server-side fan-out code.
  const parsed = new SealedSenderMultiRecipientMessage(mrm);
  const byServiceId = parsed.recipientsByServiceIdString();
  const expected = {};
  for (const name of recipients) {
    const r = byServiceId[aciOf(name)];
    assert.deepEqual(r?.deviceIds, [1], `libsignal put ${name}'s device 1 in the message`);
    expected[name] = parsed.messageForRecipient(r);
  }
  const timestamp = nextTimestamp();
  const mrmPath = `/v1/messages/multi_recipient?ts=${timestamp}&online=false&urgent=true`;
  const send = (key) => H.chatRequest(anon, 'PUT', mrmPath, {
    body: mrm, headers: [['content-type', MRM_CONTENT_TYPE], uakHeader(key)],
  });

  await t.test('XOR of only two of the three access keys → 401, nothing delivered', async () => {
    const resp = await send(xorKeys([uak('carol'), uak('dave')]));
    assert.equal(resp.status, 401, `spec §5.2: ${H.describe(resp, { bodyLimit: 300 })}`);
    const other = await send(uak('carol'));
    assert.equal(other.status, 401, `one recipient's own key is not the XOR: ${H.describe(other, { bodyLimit: 300 })}`);
  });

  await t.test('XOR of the three access keys → 200 {"uuids404":[]}; every recipient gets its own payload and decrypts it', async (st) => {
    const mrmSentAfter = Date.now();
    const resp = await send(xorKeys(recipients.map(uak)));
    assert.equal(resp.status, 200, `spec §5.2: ${H.describe(resp, { bodyLimit: 300 })}`);
    assert.deepEqual(resp.json, { uuids404: [] }, `spec §5.2 body: ${H.describe(resp, { bodyLimit: 300 })}`);

    for (const name of recipients) {
      await st.test(name, async () => {
        const { listener } = name === 'carol' ? carol : await connect(name);
        const [skdmMessage, groupMessageDelivered] = await listener.next(2, name === 'carol' ? LIVE_DELIVERY_MS : WAIT_MS);
        const skdmEnv = checkEnvelope(skdmMessage, {
          type: UNIDENTIFIED_SENDER, recipient: name, clientTimestamp: skdmTimestamp, content: sealedSkdm[name], sentAfter,
        });
        const env = checkEnvelope(groupMessageDelivered, {
          type: UNIDENTIFIED_SENDER, recipient: name, clientTimestamp: timestamp, sentAfter: mrmSentAfter,
        });
        assert.ok(env.content && bytesEqual(env.content, expected[name]),
          `Envelope.content must be ${name}'s ReceivedMessage 0x22 ‖ c ‖ at ‖ e_pub ‖ ciphertext (spec §5.2), ` +
          `as libsignal's messageForRecipient makes it: got ${env.content?.length} bytes starting ` +
          `${env.content ? Buffer.from(env.content.subarray(0, 4)).toString('hex') : '-'}, expected ${expected[name].length} bytes`);
        assert.notEqual(H.uuidFromBytes(env.serverGuid), H.uuidFromBytes(skdmEnv.serverGuid), 'distinct server GUIDs');
        await listener.waitForQueueEmpty(WAIT_MS);

        // The sender key, through sealedSenderDecryptMessage.
        const dev = devices[name];
        const result = await sealedSenderDecryptMessage(skdmEnv.content, trustRoot, Date.now(), accounts[name].e164,
          aciOf(name), 1, dev.sessions, dev.identity, dev.preKeys, dev.signedPreKeys, dev.kyberPreKeys);
        assert.equal(result.senderUuid(), aciOf('alice'));
        const sender = ProtocolAddress.new(result.senderAci(), result.deviceId());
        await processSenderKeyDistributionMessage(sender, SenderKeyDistributionMessage.deserialize(result.message()), dev.senderKeys);

        // The multi-recipient message: open the sealed-sender v2 layer, then the SenderKey message.
        // (sealedSenderDecryptMessage only handles PreKey/Whisper contents, so a group message is
        // opened the way clients do it: sealedSenderDecryptToUsmc + groupDecrypt.)
        let opened;
        try {
          opened = await sealedSenderDecryptToUsmc(env.content, dev.identity);
        } catch (e) {
          assert.fail(`sealedSenderDecryptToUsmc failed for ${name}: ${H.describeLibsignalError(e)}`);
        }
        assert.equal(opened.msgType(), CiphertextMessageType.SenderKey);
        const cert = opened.senderCertificate();
        assert.equal(cert.validate(trustRoot, Date.now()), true, 'sender certificate validates against the trust root');
        assert.equal(cert.senderUuid(), aciOf('alice'));
        assert.ok(bytesEqual(opened.groupId(), groupId), 'group id');
        const plaintext = await groupDecrypt(sender, dev.senderKeys, opened.contents());
        assert.equal(fromUtf8(plaintext), text);

        await sleep(QUIET_MS);
        assert.equal(listener.untaken().length, 0, `${name}: nothing beyond the two messages (the 401 sends delivered nothing)`);
        await disconnect(name);
      });
    }
  });

  await t.test('excluded recipient (Erin): XOR over Carol and Dave only → 200; Erin gets nothing', async () => {
    const text2 = 'not for Erin';
    const second = await groupEncrypt(devices.alice.address, distributionId, devices.alice.senderKeys, utf8(text2));
    const mrm2 = await sealedSenderMultiRecipientEncrypt({
      content: UnidentifiedSenderMessageContent.new(second, aliceCert, 0, groupId),
      recipients: [devices.carol.address, devices.dave.address],
      excludedRecipients: [accounts.erin.aci],
      identityStore: devices.alice.identity,
      sessionStore: devices.alice.sessions,
    });
    const parsed2 = new SealedSenderMultiRecipientMessage(mrm2);
    assert.deepEqual(parsed2.excludedRecipientServiceIdStrings(), [aciOf('erin')], 'libsignal encoded Erin as excluded');
    const ts2 = nextTimestamp();
    const sentAfter2 = Date.now();
    const resp = await H.chatRequest(anon, 'PUT', `/v1/messages/multi_recipient?ts=${ts2}&online=false&urgent=true`, {
      body: mrm2, headers: [['content-type', MRM_CONTENT_TYPE], uakHeader(xorKeys([uak('carol'), uak('dave')]))],
    });
    assert.equal(resp.status, 200, `spec §5.2 (excluded recipients carry no devices and no key): ${H.describe(resp, { bodyLimit: 300 })}`);
    assert.deepEqual(resp.json, { uuids404: [] }, H.describe(resp, { bodyLimit: 300 }));
    for (const name of ['carol', 'dave', 'erin']) {
      const { listener } = await connect(name);
      await listener.waitForQueueEmpty(WAIT_MS);
      await sleep(name === 'erin' ? QUIET_MS : 0);
      if (name === 'erin') {
        assert.equal(listener.untaken().length, 0, 'the excluded recipient gets nothing');
      } else {
        const [m] = await listener.next(1, WAIT_MS);
        const env = checkEnvelope(m, { type: UNIDENTIFIED_SENDER, recipient: name, clientTimestamp: ts2, sentAfter: sentAfter2 });
        assert.ok(bytesEqual(env.content, parsed2.messageForRecipient(parsed2.recipientsByServiceIdString()[aciOf(name)])),
          `${name}'s ReceivedMessage payload`);
        const opened = await sealedSenderDecryptToUsmc(env.content, devices[name].identity);
        assert.equal(fromUtf8(await groupDecrypt(devices.alice.address, devices[name].senderKeys, opened.contents())), text2);
        assert.equal(listener.untaken().length, 0);
      }
      await disconnect(name);
    }
  });

  await t.test('device-list mismatches in a multi-recipient message → 409 / 410 per recipient', async () => {
    // A scratch copy of Alice's stores, so her real sessions stay untouched.
    const scratch = new S.LocalDevice(accounts.alice);
    const bundleFor = async (name) => {
      const resp = await H.chatRequest(sockets.alice.conn, 'GET', `/v2/keys/${aciOf(name)}/1`);
      assert.equal(resp.status, 200, H.describe(resp));
      return { json: resp.json, device: resp.json.devices[0] };
    };
    const encryptTo = async (addresses) => sealedSenderMultiRecipientEncrypt({
      content: usmc, recipients: addresses, identityStore: scratch.identity, sessionStore: scratch.sessions,
    });
    const sendMrm = (body, key) => H.chatRequest(anon, 'PUT', `/v1/messages/multi_recipient?ts=${nextTimestamp()}&online=false&urgent=true`, {
      body, headers: [['content-type', MRM_CONTENT_TYPE], uakHeader(key)],
    });

    // Carol's device 1 bundle, filed under device 2 → the message lists device 2 only.
    const c = await bundleFor('carol');
    const carolDev2 = ProtocolAddress.new(accounts.carol.aci, 2);
    await processPreKeyBundle(S.bundleFromJson(c.json, c.device), carolDev2, scratch.address, scratch.sessions, scratch.identity);
    const resp409 = await sendMrm(await encryptTo([carolDev2]), uak('carol'));
    assert.equal(resp409.status, 409, `spec §5.2: ${H.describe(resp409, { bodyLimit: 300 })}`);
    assert.deepEqual(resp409.json, [{ uuid: aciOf('carol'), devices: { missingDevices: [1], extraDevices: [2] } }],
      `spec §5.2 409 body: ${H.describe(resp409, { bodyLimit: 300 })}`);

    // Dave's bundle with a wrong registration id → stale.
    const d = await bundleFor('dave');
    const wrongRegistration = { ...d.device, registrationId: (d.device.registrationId % 16000) + 1 };
    await processPreKeyBundle(S.bundleFromJson(d.json, wrongRegistration), devices.dave.address, scratch.address,
      scratch.sessions, scratch.identity);
    const resp410 = await sendMrm(await encryptTo([devices.dave.address]), uak('dave'));
    assert.equal(resp410.status, 410, `spec §5.2: ${H.describe(resp410, { bodyLimit: 300 })}`);
    assert.deepEqual(resp410.json, [{ uuid: aciOf('dave'), devices: { staleDevices: [1] } }],
      `spec §5.2 410 body: ${H.describe(resp410, { bodyLimit: 300 })}`);
  });
});

// ---------------------------------------------------------------------------------------------
// 6. Device-list mismatches and other refusals on PUT /v1/messages/{destination}

test('wrong device lists: 409 missing/extra, 410 stale; other refusals; nothing is delivered', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  requireSetup();
  const { listener } = await connect('bob');
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.equal(listener.messages.length, 0, 'Bob\'s queue should be empty');
  const registrationId = accounts.bob.material.registrationId;
  const wrongRegistrationId = (registrationId % 16000) + 1;
  const junk = new Uint8Array(randomBytes(64));

  const cases = [
    ['device 2 of a one-device account', { deviceId: 2, registrationId }, 409, { missingDevices: [1], extraDevices: [2] }],
    ['wrong registration id for device 1', { deviceId: 1, registrationId: wrongRegistrationId }, 410, { staleDevices: [1] }],
  ];
  for (const [label, dev, status, body] of cases) {
    await t.test(`sealed sender, ${label} → ${status}`, async () => {
      const resp = await sealedSend('bob', messageList({ type: UNIDENTIFIED_SENDER, content: junk, timestamp: nextTimestamp(), ...dev }));
      assert.equal(resp.status, status, `spec §5.1: ${H.describe(resp)}`);
      assert.deepEqual(resp.json, body, `spec §5.1 body: ${H.describe(resp)}`);
    });
    await t.test(`identified, ${label} → ${status}`, async () => {
      const resp = await identifiedSend('alice', 'bob', messageList({ type: CIPHERTEXT, content: junk, timestamp: nextTimestamp(), ...dev }));
      assert.equal(resp.status, status, `spec §5.1: ${H.describe(resp)}`);
      assert.deepEqual(resp.json, body, `spec §5.1 body: ${H.describe(resp)}`);
    });
  }

  await t.test('stale device 1 plus extra device 2 → 410 wins (spec §5.1: stale is checked first)', async () => {
    const resp = await identifiedSend('alice', 'bob', {
      messages: [
        { type: CIPHERTEXT, destinationDeviceId: 1, destinationRegistrationId: wrongRegistrationId, content: H.b64(junk) },
        { type: CIPHERTEXT, destinationDeviceId: 2, destinationRegistrationId: registrationId, content: H.b64(junk) },
      ],
      timestamp: nextTimestamp(),
      online: false,
      urgent: true,
    });
    assert.equal(resp.status, 410, H.describe(resp));
    assert.deepEqual(resp.json, { staleDevices: [1] }, H.describe(resp));
  });

  await t.test('sealed sender with a wrong access key → 401; to an unknown account → 401 (never 404)', async () => {
    const body = messageList({ type: UNIDENTIFIED_SENDER, content: junk, registrationId, timestamp: nextTimestamp() });
    const wrong = await sealedSend('bob', body, { key: new Uint8Array(16).fill(3) });
    assert.equal(wrong.status, 401, `spec §5.1/§7.3: ${H.describe(wrong)}`);
    const unknown = await H.chatRequest(anon, 'PUT', `/v1/messages/${randomUUID()}`, { json: body, headers: [uakHeader(uak('bob'))] });
    assert.equal(unknown.status, 401, `spec §7.3: ${H.describe(unknown)}`);
    const none = await H.chatRequest(anon, 'PUT', `/v1/messages/${aciOf('bob')}`, { json: body });
    assert.equal(none.status, 401, `no access key, no credentials (spec §5.1): ${H.describe(none)}`);
  });

  await t.test('identified send to an unknown account → 404', async () => {
    const resp = await H.chatRequest(sockets.alice.conn, 'PUT', `/v1/messages/${randomUUID()}`, {
      json: messageList({ type: CIPHERTEXT, content: junk, registrationId, timestamp: nextTimestamp() }),
    });
    assert.equal(resp.status, 404, `spec §5.1: ${H.describe(resp)}`);
  });

  await t.test('content over 96 KiB → 413; envelope type 5 (server receipt) → 422', async () => {
    const big = new Uint8Array(96 * 1024 + 1);
    const tooBig = await sealedSend('bob', messageList({ type: UNIDENTIFIED_SENDER, content: big, registrationId, timestamp: nextTimestamp() }));
    assert.equal(tooBig.status, 413, `spec §5.1 (content ≤ 96 KiB decoded): ${H.describe(tooBig, { bodyLimit: 200 })}`);
    const receipt = await identifiedSend('alice', 'bob', messageList({ type: SERVER_DELIVERY_RECEIPT, content: junk, registrationId, timestamp: nextTimestamp() }));
    assert.equal(receipt.status, 422, `spec §5.1 (type 5 is rejected): ${H.describe(receipt, { bodyLimit: 200 })}`);
  });

  await sleep(QUIET_MS);
  assert.deepEqual(listener.messages.map((m) => H.describeEnvelope(m.decoded)), [], 'refused sends must deliver nothing');
  await disconnect('bob');
});

// ---------------------------------------------------------------------------------------------
// 7. Order, ephemeral messages, one socket per device

test('five messages queued offline arrive in send order, then queue-empty; all decrypt in order', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  assert.equal(sockets.bob, undefined, 'Bob must not be connected');
  const sent = [];
  const sentAfter = Date.now();
  for (let i = 0; i < 5; i++) {
    const text = `queued #${i}`;
    const sealed = await sealFor('bob', text);
    const timestamp = nextTimestamp();
    const resp = await sealedSend('bob', messageList({
      type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
    }));
    assertSendOk(resp, `sealed-sender send #${i}`);
    sent.push({ text, sealed, timestamp });
  }
  const { listener } = await connect('bob');
  const received = await listener.next(5, WAIT_MS);
  await listener.waitForQueueEmpty(WAIT_MS);
  assert.deepEqual(received.map((m) => m.decoded?.clientTimestamp), sent.map((m) => m.timestamp),
    'queued envelopes are delivered in the order they were sent (issue 4: order is kept per sender)');
  assert.equal(listener.queueEmptyAt[0].afterMessages, 5, 'queue-empty after the whole backlog (spec §6.4)');
  const guids = new Set();
  for (let i = 0; i < 5; i++) {
    const env = checkEnvelope(received[i], {
      type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: sent[i].timestamp, content: sent[i].sealed, sentAfter,
    });
    guids.add(H.uuidFromBytes(env.serverGuid));
    await openSealed('bob', env.content, sent[i].text);
  }
  assert.equal(guids.size, 5, 'every envelope has its own server GUID');
  await disconnect('bob');
  await connectExpectingEmptyQueue('bob', 'all five were acknowledged');
  await disconnect('bob');
});

test('online=true (ephemeral): dropped for an offline device, delivered to a connected one with the flag stripped', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  assert.equal(sockets.bob, undefined, 'Bob must not be connected');
  const registrationId = accounts.bob.material.registrationId;
  const offline = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: await sealFor('bob', 'ephemeral, offline'), registrationId,
    timestamp: nextTimestamp(), online: true,
  }));
  assertSendOk(offline, 'ephemeral sealed-sender send to an offline device');
  await connectExpectingEmptyQueue('bob', 'ephemeral messages are never queued for offline devices (issue 4, spec §5.1 "online")');

  const text = 'ephemeral, live';
  const sealed = await sealFor('bob', text);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const live = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: sealed, registrationId, timestamp, online: true,
  }));
  assertSendOk(live, 'ephemeral sealed-sender send to a connected device');
  const [message] = await sockets.bob.listener.next(1, LIVE_DELIVERY_MS);
  const env = checkEnvelope(message, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  assert.equal(env.ephemeral, undefined, `Envelope.ephemeral (12) is stripped before delivery (spec §5.3, §6.4): ${H.describeEnvelope(env)}`);
  // The first ephemeral message was never decrypted, so this one is opened with a skipped message key.
  await openSealed('bob', env.content, text);
  await disconnect('bob');
});

test('a second authenticated socket for the same device displaces the first (4409 → libsignal ConnectedElsewhere); delivery follows the new one', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  const first = await connect('bob');
  await first.listener.waitForQueueEmpty(WAIT_MS);
  // Open the second socket by hand, so that connect() does not close the first one itself.
  const listener = new H.RecordingListener({ name: "bob's second authenticated socket" });
  const conn = await server.connectAuthenticated(accounts.bob.username, accounts.bob.password, { net, listener });
  await first.listener.waitUntil(() => first.listener.interrupted.length > 0, WAIT_MS,
    'the first socket to be closed (close code 4409, spec §6.5)');
  const cause = first.listener.interrupted[0];
  assert.equal(cause?.code, H.ErrorCode.ConnectedElsewhere,
    `libsignal reports close code 4409 as ConnectedElsewhere; got ${cause ? H.describeLibsignalError(cause) : cause}`);
  sockets.bob = { conn, listener };
  await listener.waitForQueueEmpty(WAIT_MS);

  const text = 'to the newest socket';
  const sealed = await sealFor('bob', text);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const resp = await sealedSend('bob', messageList({
    type: UNIDENTIFIED_SENDER, content: sealed, registrationId: accounts.bob.material.registrationId, timestamp,
  }));
  assertSendOk(resp, 'sealed-sender send');
  const [message] = await listener.next(1, LIVE_DELIVERY_MS);
  const env = checkEnvelope(message, { type: UNIDENTIFIED_SENDER, recipient: 'bob', clientTimestamp: timestamp, content: sealed, sentAfter });
  await openSealed('bob', env.content, text);
  assert.equal(first.listener.messages.length, 0, 'nothing went to the displaced socket');
  await disconnect('bob');
  try {
    await server.disconnect(first.conn);
  } catch {
    // already closed by the server
  }
});

test('identified send to a PNI: 17-byte destination_service_id, decrypted with the PNI keys; the receipt names the PNI', { timeout: TEST_TIMEOUT_MS }, async () => {
  requireSetup();
  const bob = accounts.bob;
  const pniKeys = bob.material.pni;
  const pniAddress = ProtocolAddress.new(bob.pni, 1);
  const pniIdentity = new S.InMemoryIdentityKeyStore(pniKeys.identityPrivate, bob.material.pniRegistrationId);
  const pniSignedPreKeys = new S.InMemorySignedPreKeyStore();
  pniSignedPreKeys.records.set(pniKeys.signedPreKey.id(), pniKeys.signedPreKey);
  const pniKyberPreKeys = new S.InMemoryKyberPreKeyStore();
  pniKyberPreKeys.saveLastResortKey(pniKeys.lastResortKey);
  const pniSessions = new S.InMemorySessionStore();

  // A fresh socket for Alice, so that this test does not depend on several live pushes to one socket.
  const alice = await connectExpectingEmptyQueue('alice', 'every earlier receipt was acknowledged');
  const bundle = await H.chatRequest(alice.conn, 'GET', `/v2/keys/${bob.pni.getServiceIdString()}/1`);
  assert.equal(bundle.status, 200, H.describe(bundle));
  await processPreKeyBundle(S.bundleFromJson(bundle.json, bundle.json.devices[0]), pniAddress, devices.alice.address,
    devices.alice.sessions, devices.alice.identity);

  const { listener } = await connect('bob', { ack: null });
  await listener.waitForQueueEmpty(WAIT_MS);
  const text = 'hello Bob at your PNI';
  const ciphertext = await signalEncrypt(utf8(text), pniAddress, devices.alice.address, devices.alice.sessions, devices.alice.identity);
  const timestamp = nextTimestamp();
  const sentAfter = Date.now();
  const wrongId = await H.chatRequest(alice.conn, 'PUT', `/v1/messages/${bob.pni.getServiceIdString()}`, {
    json: messageList({ type: PREKEY_BUNDLE, content: ciphertext.serialize(), registrationId: bob.material.registrationId, timestamp }),
  });
  if (bob.material.registrationId !== bob.material.pniRegistrationId) {
    assert.equal(wrongId.status, 410, `addressed by PNI, the ACI registration id is stale (spec §5.1): ${H.describe(wrongId)}`);
  }
  const resp = await H.chatRequest(alice.conn, 'PUT', `/v1/messages/${bob.pni.getServiceIdString()}`, {
    json: messageList({ type: PREKEY_BUNDLE, content: ciphertext.serialize(), registrationId: bob.material.pniRegistrationId, timestamp }),
  });
  assertSendOk(resp, 'identified send to PNI:<uuid> with the PNI registration id');
  const [message] = await listener.next(1, LIVE_DELIVERY_MS);
  const env = checkEnvelope(message, {
    type: PREKEY_BUNDLE, recipient: 'bob', destination: bob.pni, clientTimestamp: timestamp, content: ciphertext.serialize(),
    sentAfter, source: 'alice',
  });
  const plaintext = await signalDecryptPreKey(PreKeySignalMessage.deserialize(env.content), devices.alice.address, pniAddress,
    pniSessions, pniIdentity, new S.InMemoryPreKeyStore(), pniSignedPreKeys, pniKyberPreKeys);
  assert.equal(fromUtf8(plaintext), text);
  message.ack(200);

  const [receipt] = await alice.listener.next(1, WAIT_MS);
  const r = receipt.decoded;
  assert.equal(r.type, SERVER_DELIVERY_RECEIPT, H.describeEnvelope(r));
  assert.equal(r.clientTimestamp, timestamp, H.describeEnvelope(r));
  assert.ok(r.sourceServiceId && bytesEqual(r.sourceServiceId, bob.pni.getServiceIdBinary()),
    `receipt source = the service id the message was addressed to, Bob's PNI (spec §5.3): ${H.describeEnvelope(r)}`);
  await disconnect('bob');
});
