// In-memory libsignal protocol stores and key helpers shared by the interop tests that run real
// Signal sessions (same behaviour as the copies in keys.test.mjs, plus a SenderKeyStore).

import {
  createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes, randomInt, timingSafeEqual,
} from 'node:crypto';

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
  SenderKeyStore,
  SenderKeyRecord,
  IdentityChange,
} = SignalClient;
const { PrivateKey, PublicKey, KEMKeyPair, KyberPreKeyRecord } = H;

export const bytesEqual = (a, b) => Buffer.from(a).equals(Buffer.from(b));
export const fromB64 = (s) => new Uint8Array(Buffer.from(s, 'base64'));
export const utf8 = (s) => new TextEncoder().encode(s);
export const fromUtf8 = (b) => new TextDecoder().decode(b);

export class InMemorySessionStore extends SessionStore {
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

export class InMemoryIdentityKeyStore extends IdentityKeyStore {
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
    const previous = this.#known.get(address.toString());
    return !previous || bytesEqual(previous, key.serialize());
  }
  async getIdentity(address) {
    const bytes = this.#known.get(address.toString());
    return bytes ? PublicKey.deserialize(bytes) : null;
  }
}

export class InMemoryPreKeyStore extends PreKeyStore {
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

export class InMemorySignedPreKeyStore extends SignedPreKeyStore {
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

export class InMemoryKyberPreKeyStore extends KyberPreKeyStore {
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

export class InMemorySenderKeyStore extends SenderKeyStore {
  #keys = new Map();
  async saveSenderKey(sender, distributionId, record) {
    this.#keys.set(`${sender.toString()}::${distributionId}`, record.serialize());
  }
  async getSenderKey(sender, distributionId) {
    const bytes = this.#keys.get(`${sender.toString()}::${distributionId}`);
    return bytes ? SenderKeyRecord.deserialize(bytes) : null;
  }
}

/** One device of a registered account (H.registerTestAccount result), with its private keys. */
export class LocalDevice {
  constructor(account) {
    const keys = account.material.aci;
    this.account = account;
    this.address = ProtocolAddress.new(account.aci, account.deviceId);
    this.sessions = new InMemorySessionStore();
    this.identity = new InMemoryIdentityKeyStore(keys.identityPrivate, account.material.registrationId);
    this.preKeys = new InMemoryPreKeyStore();
    this.signedPreKeys = new InMemorySignedPreKeyStore();
    this.kyberPreKeys = new InMemoryKyberPreKeyStore();
    this.senderKeys = new InMemorySenderKeyStore();
    this.signedPreKeys.records.set(keys.signedPreKey.id(), keys.signedPreKey);
    this.kyberPreKeys.saveLastResortKey(keys.lastResortKey);
  }
}

/** `count` distinct random key ids in 1..2^24-1 that avoid `taken`. */
export function freshIds(count, taken = []) {
  const ids = new Set();
  const avoid = new Set(taken);
  while (ids.size < count) {
    const id = randomInt(1, 0xffffff);
    if (!avoid.has(id)) ids.add(id);
  }
  return [...ids];
}

export function makePreKeys(count, taken) {
  return freshIds(count, taken).map((id) => {
    const priv = PrivateKey.generate();
    return PreKeyRecord.new(id, priv.getPublicKey(), priv);
  });
}

export function makeKyberPreKeys(count, signer, taken) {
  return freshIds(count, taken).map((id) => {
    const kem = KEMKeyPair.generate();
    return KyberPreKeyRecord.new(id, Date.now(), kem, signer.sign(kem.getPublicKey().serialize()));
  });
}

const preKeyJson = (record) => ({ keyId: record.id(), publicKey: H.b64(record.publicKey().serialize()) });

/** `PUT /v2/keys` body (spec §4.1). */
export function setKeysJson({ preKeys, signedPreKey, pqPreKeys, pqLastResortPreKey }) {
  const body = {};
  if (preKeys) body.preKeys = preKeys.map(preKeyJson);
  if (signedPreKey) body.signedPreKey = H.signedKeyJson(signedPreKey);
  if (pqPreKeys) body.pqPreKeys = pqPreKeys.map(H.signedKeyJson);
  if (pqLastResortPreKey) body.pqLastResortPreKey = H.signedKeyJson(pqLastResortPreKey);
  return body;
}

/** PreKeyBundle from one `devices[]` entry of a `PreKeyResponse` (spec §4.1). */
export function bundleFromJson(response, device) {
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
// Device provisioning (client convention, opaque to the server; spec §3.2): the primary encrypts a
// `ProvisionMessage` to the new device's ephemeral public key and wraps it in a `ProvisionEnvelope`
// { publicKey = 1, body = 2 }. body = 0x01 ‖ iv(16) ‖ AES-256-CBC(ProvisionMessage) ‖
// HMAC-SHA256(0x01 ‖ iv ‖ ciphertext); keys = HKDF-SHA256(ECDH, salt 32×0,
// "TextSecure Provisioning Message") split 32/32 (Signal-Android PrimaryProvisioningCipher,
// Signal-Desktop ProvisioningCipher).

const PROVISIONING_INFO = 'TextSecure Provisioning Message';

function provisioningKeys(sharedSecret) {
  const okm = Buffer.from(hkdfSync('sha256', sharedSecret, Buffer.alloc(32), PROVISIONING_INFO, 64));
  return { cipherKey: okm.subarray(0, 32), macKey: okm.subarray(32, 64) };
}

/** ProvisionMessage fields (Signal-Android Provisioning.proto), by number. */
export const PROVISION_MESSAGE_FIELDS = Object.freeze({
  aciIdentityKeyPublic: 1,
  aciIdentityKeyPrivate: 2,
  number: 3,
  provisioningCode: 4,
  userAgent: 5,
  profileKey: 6,
  readReceipts: 7,
  aci: 8,
  provisioningVersion: 9,
  pni: 10,
  pniIdentityKeyPublic: 11,
  pniIdentityKeyPrivate: 12,
  masterKey: 13,
});

/** The primary's side: `ProvisionEnvelope` bytes carrying `message` (field name → value) for `theirPublicKey`. */
export function encryptProvisionMessage(theirPublicKey, message) {
  const plaintext = H.encodeProtobuf(Object.entries(message).map(([name, value]) => {
    const number = PROVISION_MESSAGE_FIELDS[name];
    if (!number) throw new Error(`unknown ProvisionMessage field ${name}`);
    return [number, value];
  }));
  const ours = PrivateKey.generate();
  const { cipherKey, macKey } = provisioningKeys(ours.agree(theirPublicKey));
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', cipherKey, iv);
  const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  const signed = Buffer.concat([Buffer.from([1]), iv, ciphertext]);
  const mac = createHmac('sha256', macKey).update(signed).digest();
  return H.encodeProtobuf([[1, ours.getPublicKey().serialize()], [2, new Uint8Array(Buffer.concat([signed, mac]))]]);
}

/**
 * The new device's side: opens a `ProvisionEnvelope` with its ephemeral private key. Returns the
 * ProvisionMessage as { fieldName: value } (bytes as Uint8Array, strings decoded, varints as numbers).
 */
export function decryptProvisionEnvelope(ourPrivateKey, envelopeBytes) {
  const envelope = H.decodeProtobuf(envelopeBytes);
  const publicKey = envelope[1]?.[0]?.value;
  const body = envelope[2]?.[0]?.value;
  if (!publicKey || !body) throw new Error('ProvisionEnvelope lacks publicKey (1) or body (2)');
  if (body[0] !== 1) throw new Error(`ProvisionEnvelope body version ${body[0]}, expected 1`);
  const { cipherKey, macKey } = provisioningKeys(ourPrivateKey.agree(PublicKey.deserialize(publicKey)));
  const signed = body.subarray(0, body.length - 32);
  const mac = createHmac('sha256', macKey).update(signed).digest();
  if (!timingSafeEqual(mac, Buffer.from(body.subarray(body.length - 32)))) throw new Error('ProvisionEnvelope MAC mismatch');
  const decipher = createDecipheriv('aes-256-cbc', cipherKey, signed.subarray(1, 17));
  const plaintext = Buffer.concat([decipher.update(signed.subarray(17)), decipher.final()]);
  const raw = H.decodeProtobuf(plaintext);
  const stringFields = new Set(['number', 'provisioningCode', 'userAgent', 'aci', 'pni']);
  const out = {};
  for (const [name, number] of Object.entries(PROVISION_MESSAGE_FIELDS)) {
    const v = raw[number]?.at(-1)?.value;
    if (v === undefined) continue;
    out[name] = stringFields.has(name) ? fromUtf8(v) : typeof v === 'bigint' ? Number(v) : v;
  }
  return out;
}
