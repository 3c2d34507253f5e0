// Registration through the official libsignal client (RegistrationService over the
// unauthenticated chat WebSocket), then an authenticated chat connection.
//
// Spec references: signal-server-api.md §1.1 (verification sessions), §1.2 (POST /v1/registration,
// 422 on a bad signature), §1.3 (account attributes), §2.1 (Basic `aci[.device]:password`),
// §6 (WebSocket), §10 (whoami), §15.1.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import * as H from './harness.mjs';

let server;
let net;
const accounts = new Map(); // e164 -> { material, aci, pni }

before(async () => {
  server = await H.startServer();
  net = server.makeNet();
});

after(async () => {
  await server?.stop();
});

async function registerWithLibsignal(e164) {
  const material = H.makeRegistrationMaterial();
  // createRegistrationSession -> requestVerification(sms) -> verifySession(code)
  const service = await H.verifyNumber(net, e164);
  // POST /v1/registration, built and sent by libsignal (Basic e164:password, fetchesMessages=true).
  const response = await service.registerAccount(H.registerAccountArgs(material));
  return { material, response, sessionId: service.sessionId };
}

for (const e164 of ['+15555550100', '+15555550101']) {
  test(`register ${e164} with libsignal's RegistrationService (verification session + POST /v1/registration)`, async () => {
    let result;
    try {
      result = await registerWithLibsignal(e164);
    } catch (e) {
      assert.fail(`registration of ${e164} failed: ${H.describeLibsignalError(e)}\n` +
        'libsignal hides the response body; the test "raw POST /v1/registration in libsignal\'s wire ' +
        'shape" below sends the same request and shows the status and body.\n' +
        `--- libsignal log ---\n${H.libsignalLogTail(15)}\n--- server log ---\n${server.logTail(30)}`);
    }
    const { response, material } = result;
    assert.equal(response.number, e164, 'AccountCreationResponse.number');
    assert.ok(response.aci instanceof H.Aci, 'uuid parses as an ACI');
    assert.ok(response.pni instanceof H.Pni, 'pni parses as a PNI');
    assert.notEqual(response.aci.getRawUuid(), response.pni.getRawUuid(), 'ACI and PNI must differ');
    assert.equal(response.reregistration, false, 'first registration of the number is not a re-registration');
    assert.equal(response.storageCapable, false, 'storageCapable for a new account');
    assert.deepEqual(response.entitlementBadges, [], 'no badges for a new account');
    assert.equal(response.backupEntitlement, null, 'no backup entitlement for a new account');
    assert.equal(response.usernameHash, null, 'no username hash for a new account');
    for (const other of accounts.values()) {
      assert.notEqual(other.aci.getRawUuid(), response.aci.getRawUuid(), 'two numbers got the same ACI');
      assert.notEqual(other.pni.getRawUuid(), response.pni.getRawUuid(), 'two numbers got the same PNI');
    }
    accounts.set(e164, { material, aci: response.aci, pni: response.pni });
  });
}

test("raw POST /v1/registration in libsignal's wire shape over the unauthenticated socket", async () => {
  // What libsignal's registerAccount sends, sent by hand so that a failure shows status and body:
  // the request is tunnelled over the *unauthenticated* chat WebSocket and carries its own
  // `Authorization: Basic <e164>:<new password>` header (rust/net/chat/src/ws/registration/request.rs).
  const e164 = '+15555550103';
  const material = H.makeRegistrationMaterial();
  const session = await H.verifyNumber(net, e164);
  const conn = await server.connectUnauthenticated(net);
  try {
    const resp = await H.chatRequest(conn, 'POST', '/v1/registration', {
      json: H.registrationJson(material, session.sessionId, { libsignalShape: true }),
      headers: [H.basicAuth(e164, material.password)],
    });
    assert.equal(resp.status, 200, H.describe(resp, { bodyLimit: 400 }));
    assert.equal(resp.headers['content-type'], 'application/json', H.describe(resp));
    assert.equal(resp.json?.number, e164, H.describe(resp));
  } finally {
    await server.disconnect(conn);
  }
});

test('registration whose signed pre-key signature was made by the wrong key is refused with 422', async (t) => {
  const e164 = '+15555550102';
  const forged = H.makeRegistrationMaterial({ forgeAciSignedPreKey: true });
  const service = await H.verifyNumber(net, e164);
  const sessionId = service.sessionId;

  await t.test('through libsignal registerAccount', async () => {
    await assert.rejects(service.registerAccount(H.registerAccountArgs(forged)), (e) => {
      // libsignal reports a 422 as "the request did not pass server validation"
      // (rust/net/chat/src/ws.rs, ResponseError::UnrecognizedStatus with status 422).
      assert.match(String(e.message), /did not pass server validation/,
        `expected libsignal's rendering of HTTP 422, got ${H.describeLibsignalError(e)}`);
      return true;
    });
  });

  // The same request, raw, to see the exact status and body, and each signed key in turn.
  const conn = await server.connectUnauthenticated(net);
  try {
    const cases = {
      aciSignedPreKey: forged,
      aciPqLastResortPreKey: (() => {
        const m = H.makeRegistrationMaterial();
        m.aci.lastResortKey = H.makeIdentityKeys({ signWith: H.PrivateKey.generate() }).lastResortKey;
        return m;
      })(),
      pniSignedPreKey: (() => {
        const m = H.makeRegistrationMaterial();
        m.pni.signedPreKey = H.makeIdentityKeys({ signWith: H.PrivateKey.generate() }).signedPreKey;
        return m;
      })(),
      pniPqLastResortPreKey: (() => {
        const m = H.makeRegistrationMaterial();
        m.pni.lastResortKey = H.makeIdentityKeys({ signWith: H.PrivateKey.generate() }).lastResortKey;
        return m;
      })(),
    };
    for (const [field, material] of Object.entries(cases)) {
      await t.test(`raw POST /v1/registration with a forged ${field}`, async () => {
        const resp = await H.chatRequest(conn, 'POST', '/v1/registration', {
          json: H.registrationJson(material, sessionId),
          headers: [H.basicAuth(e164, material.password)],
        });
        assert.equal(resp.status, 422, H.describe(resp, { bodyLimit: 300 }));
      });
    }
  } finally {
    await server.disconnect(conn);
  }
});

test('authenticated chat connection answers GET /v1/accounts/whoami with the registered ACI and number', async (t) => {
  assert.equal(accounts.size, 2, 'both registrations must have succeeded first');
  const usernames = [
    ['+15555550100', (aci) => `${aci}.1`],
    ['+15555550101', (aci) => `${aci}`],
  ];
  for (const [e164, username] of usernames) {
    const { material, aci, pni } = accounts.get(e164);
    const user = username(aci.getServiceIdString());
    await t.test(`username ${user.includes('.') ? '<aci>.1' : '<aci>'} (${e164})`, async () => {
      let conn;
      try {
        conn = await server.connectAuthenticated(user, material.password, { net });
      } catch (e) {
        assert.fail(`connectAuthenticatedChat(${user}) failed: ${H.describeLibsignalError(e)}`);
      }
      try {
        const resp = await H.chatRequest(conn, 'GET', '/v1/accounts/whoami');
        assert.equal(resp.status, 200, H.describe(resp));
        assert.ok(resp.json, `whoami body should be JSON: ${H.describe(resp)}`);
        assert.equal(resp.json.uuid, aci.getRawUuid(), `whoami uuid: ${H.describe(resp)}`);
        assert.equal(resp.json.number, e164, `whoami number: ${H.describe(resp)}`);
        assert.equal(resp.json.pni, pni.getRawUuid(), `whoami pni (plain UUID, §10): ${H.describe(resp)}`);
        // libsignal's typed APIs require exactly "application/json" (rust/net/chat/src/ws.rs).
        assert.equal(resp.headers['content-type'], 'application/json', `content-type: ${H.describe(resp)}`);
      } finally {
        await server.disconnect(conn);
      }
    });
  }
});

test('authenticated chat connection with a wrong password is refused', async () => {
  const { aci } = accounts.get('+15555550100') ?? {};
  assert.ok(aci, 'registration of +15555550100 must have succeeded first');
  await assert.rejects(server.connectAuthenticated(`${aci.getServiceIdString()}.1`, 'wrong-password', { net }), (e) => {
    assert.equal(e.code, H.ErrorCode.DeviceDelinked,
      `expected a 403 on the upgrade (libsignal DeviceDelinked, spec §2.3), got ${H.describeLibsignalError(e)}`);
    return true;
  });
});
