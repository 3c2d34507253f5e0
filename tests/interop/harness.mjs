// Interop test harness: starts a real Mailslot server behind TLS and connects to it with the
// official libsignal client library (@signalapp/libsignal-client) in its `localTestServer` mode.
//
// What it does:
//   1. makes a throwaway test CA and a server certificate for localhost / 127.0.0.1 signed by it
//      (openssl CLI if present, else a small Python script using the `cryptography` package);
//   2. writes a TOML config into a temp dir and runs `mailslot serve --config <file>`;
//   3. reads the server's stdout until the line `READY {json}` and returns its port etc.;
//   4. builds libsignal `Net` objects pointed at that port, trusting the test CA (DER bytes);
//   5. stops the server and removes the temp dir afterwards.
//
// Environment knobs (all optional):
//   MAILSLOT_CMD          command that runs the server CLI, as a JSON array, e.g.
//                         '["/path/to/python","-m","mailslot"]' (default: the repo's .venv)
//   MAILSLOT_INTEROP_VERBOSE=1   echo server output and libsignal logs to stderr
//   MAILSLOT_INTEROP_KEEP=1      keep the temp dir (config, certs, database) after the run
//   MAILSLOT_READY_TIMEOUT_MS    how long to wait for READY (default 60000)

import { spawn, execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, writeFile, readFile, rm, access } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import { X509Certificate, randomBytes, randomInt } from 'node:crypto';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import v8 from 'node:v8';
import vm from 'node:vm';

import * as SignalClient from '@signalapp/libsignal-client';

const execFileAsync = promisify(execFile);

export const { Net: NetNS } = SignalClient;
export const { Net, AccountAttributes } = NetNS;
export const {
  PrivateKey,
  PublicKey,
  KEMKeyPair,
  SignedPreKeyRecord,
  KyberPreKeyRecord,
  Aci,
  Pni,
  ErrorCode,
  LibSignalErrorBase,
} = SignalClient;

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, '..', '..');

const VERBOSE = process.env.MAILSLOT_INTEROP_VERBOSE === '1';
const KEEP = process.env.MAILSLOT_INTEROP_KEEP === '1';

// Phone numbers with fixed verification codes, written into [registration].test_numbers.
export const TEST_NUMBERS = Object.freeze({
  '+15555550100': '123456',
  '+15555550101': '123456',
  // Used by the negative registration test so that it cannot disturb the two accounts above.
  '+15555550102': '123456',
  // Used by the raw "libsignal wire shape" registration test.
  '+15555550103': '123456',
});

// ---------------------------------------------------------------------------------------------
// libsignal logs: kept in memory (shown on failure), echoed when verbose.

const libsignalLog = [];
let loggerInstalled = false;
function installLibsignalLogger() {
  if (loggerInstalled) return;
  loggerInstalled = true;
  try {
    SignalClient.initLogger(SignalClient.LogLevel.Info, (level, target, file, line, message) => {
      const entry = `[libsignal ${SignalClient.LogLevel[level] ?? level}] ${target}: ${message}`;
      libsignalLog.push(entry);
      if (libsignalLog.length > 400) libsignalLog.shift();
      if (VERBOSE) process.stderr.write(entry + '\n');
    });
  } catch (e) {
    // initLogger may only be called once per process; a second call throws. Not fatal.
    if (VERBOSE) process.stderr.write(`libsignal initLogger: ${e}\n`);
  }
}

export function libsignalLogTail(n = 40) {
  return libsignalLog.slice(-n).join('\n');
}

// ---------------------------------------------------------------------------------------------
// Native object clean-up.
//
// libsignal 0.103.0's RegistrationService holds a JS channel; if it is still alive when Node tears
// down its environment, its Rust destructor sends on that closed channel and the process aborts
// ("failed to initiate panic", exit 134) after all tests have passed. Collecting garbage while the
// environment is alive finalizes such objects properly, so stop() does that before returning.
// Tests can keep references to the RegistrationSession wrappers (below); releasing them here makes
// the native services unreachable however long node:test keeps the test closures.

const liveRegistrationSessions = new Set();
let gcFn;
export async function releaseNativeObjects(rounds = 3) {
  for (const session of [...liveRegistrationSessions]) session.release();
  if (!gcFn) {
    v8.setFlagsFromString('--expose_gc');
    gcFn = vm.runInNewContext('gc');
  }
  for (let i = 0; i < rounds; i++) {
    gcFn();
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// ---------------------------------------------------------------------------------------------
// Test PKI

async function haveExecutable(name) {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    try {
      await access(path.join(dir, name), fsConstants.X_OK);
      return true;
    } catch {
      // keep looking
    }
  }
  return false;
}

async function makePkiWithOpenssl(dir) {
  const f = (name) => path.join(dir, name);
  const run = (args) => execFileAsync('openssl', args, { cwd: dir });
  // CA: EC P-256, self-signed, CA:TRUE.
  await run([
    'req', '-x509', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2',
    '-subj', '/CN=Mailslot interop test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    '-addext', 'subjectKeyIdentifier=hash',
  ]);
  // Server key + CSR.
  await run([
    'req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', f('server.key'), '-out', f('server.csr'),
    '-subj', '/CN=localhost',
  ]);
  await writeFile(
    f('server.ext'),
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyAgreement',
      'extendedKeyUsage=serverAuth',
      'subjectAltName=DNS:localhost,IP:127.0.0.1',
      'subjectKeyIdentifier=hash',
      'authorityKeyIdentifier=keyid',
      '',
    ].join('\n'),
  );
  await run([
    'x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'),
    '-set_serial', '0x' + randomBytes(8).toString('hex'), '-days', '2', '-sha256',
    '-extfile', f('server.ext'), '-out', f('server.pem'),
  ]);
}

const PYTHON_PKI_SCRIPT = String.raw`
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

out = sys.argv[1]
now = datetime.datetime.now(datetime.timezone.utc)
def pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
ca_key = ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailslot interop test CA")])
ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
      .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=2))
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
      .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                   key_encipherment=False, data_encipherment=False,
                                   key_agreement=False, key_cert_sign=True, crl_sign=True,
                                   encipher_only=False, decipher_only=False), critical=True)
      .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
      .sign(ca_key, hashes.SHA256()))
key = ec.generate_private_key(ec.SECP256R1())
cert = (x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
open(out + "/ca.key", "wb").write(pem_key(ca_key))
open(out + "/ca.pem", "wb").write(ca.public_bytes(serialization.Encoding.PEM))
open(out + "/server.key", "wb").write(pem_key(key))
open(out + "/server.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
`;

async function makePkiWithPython(dir, python) {
  const script = path.join(dir, 'make_pki.py');
  await writeFile(script, PYTHON_PKI_SCRIPT);
  await execFileAsync(python, [script, dir]);
}

/**
 * Creates a throwaway CA and a `localhost`/127.0.0.1 server certificate signed by it in `dir`.
 * Returns file paths plus the CA certificate as PEM text and as DER bytes (what libsignal wants).
 */
export async function makeTestPki(dir) {
  if (await haveExecutable('openssl')) {
    await makePkiWithOpenssl(dir);
  } else {
    await makePkiWithPython(dir, resolveServerCommand().python ?? 'python3');
  }
  const caPem = await readFile(path.join(dir, 'ca.pem'), 'utf8');
  const ca = new X509Certificate(caPem);
  const server = new X509Certificate(await readFile(path.join(dir, 'server.pem')));
  if (!server.checkIssued(ca) || !server.verify(ca.publicKey)) {
    throw new Error('test PKI: server certificate is not signed by the test CA');
  }
  return {
    caPem,
    caDer: new Uint8Array(ca.raw),
    caFile: path.join(dir, 'ca.pem'),
    certFile: path.join(dir, 'server.pem'),
    keyFile: path.join(dir, 'server.key'),
  };
}

// ---------------------------------------------------------------------------------------------
// Server process

/** How to run `mailslot`: [executable, ...leading args], plus the Python interpreter if known. */
export function resolveServerCommand() {
  if (process.env.MAILSLOT_CMD) {
    const cmd = JSON.parse(process.env.MAILSLOT_CMD);
    if (!Array.isArray(cmd) || cmd.length === 0) throw new Error('MAILSLOT_CMD must be a JSON array');
    return { argv: cmd, python: undefined, env: {} };
  }
  const venvBin = path.join(REPO_ROOT, '.venv', 'bin');
  const venvPython = path.join(venvBin, 'python');
  if (existsSync(path.join(venvBin, 'mailslot'))) {
    return { argv: [path.join(venvBin, 'mailslot')], python: venvPython, env: {} };
  }
  // `python -m mailslot` from the source tree, in case the package is not installed.
  const src = path.join(REPO_ROOT, 'src');
  const env = { PYTHONPATH: [src, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
  if (existsSync(venvPython)) {
    return { argv: [venvPython, '-m', 'mailslot'], python: venvPython, env };
  }
  return { argv: ['python3', '-m', 'mailslot'], python: 'python3', env };
}

/** TOML basic string (JSON string escapes are valid TOML basic-string escapes). */
const tomlString = (s) => JSON.stringify(String(s));

export function renderConfig({ dir, certFile, keyFile, testNumbers = TEST_NUMBERS, port = 0 }) {
  const numbers = Object.entries(testNumbers)
    .map(([number, code]) => `${tomlString(number)} = ${tomlString(code)}`)
    .join(', ');
  return [
    '[server]',
    'host = "127.0.0.1"',
    `port = ${port}            # 0 = pick a free port; the READY line reports the real one`,
    '',
    '[tls]',
    `cert_file = ${tomlString(certFile)}`,
    `key_file = ${tomlString(keyFile)}`,
    '',
    '[storage]',
    `url = ${tomlString('sqlite:///' + path.join(dir, 'mailslot.db'))}`,
    `data_dir = ${tomlString(dir)}`,
    '',
    '[registration]',
    'sms_provider = "console"',
    `test_numbers = { ${numbers} }`,
    '',
  ].join('\n');
}

class OutputBuffer {
  constructor(limit = 2000) {
    this.lines = [];
    this.limit = limit;
  }
  push(line) {
    this.lines.push(line);
    if (this.lines.length > this.limit) this.lines.shift();
  }
  tail(n = 60) {
    return this.lines.slice(-n).join('\n');
  }
}

const liveServers = new Set();
process.on('exit', () => {
  for (const child of liveServers) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

/**
 * Starts `mailslot serve --config <file>` with TLS and waits for its READY line.
 *
 * Resolves to an object with: host, port, tls, trustRoot (base64), ready (the whole READY json),
 * pki (see makeTestPki), dir, configFile, logTail(n), makeNet(), stop().
 */
export async function startServer({ testNumbers = TEST_NUMBERS, extraEnv = {} } = {}) {
  installLibsignalLogger();
  const dir = await mkdtemp(path.join(tmpdir(), 'mailslot-interop-'));
  const pki = await makeTestPki(dir);
  const configFile = path.join(dir, 'mailslot.toml');
  await writeFile(configFile, renderConfig({ dir, certFile: pki.certFile, keyFile: pki.keyFile, testNumbers }));

  const { argv, env: commandEnv } = resolveServerCommand();
  const [exe, ...lead] = argv;
  const args = [...lead, 'serve', '--config', configFile];
  const output = new OutputBuffer();
  const child = spawn(exe, args, {
    cwd: dir,
    env: { ...process.env, PYTHONUNBUFFERED: '1', ...commandEnv, ...extraEnv },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  liveServers.add(child);
  const commandLine = [exe, ...args].join(' ');

  let exited = null;
  const exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      liveServers.delete(child);
      resolve(exited);
    });
  });

  const stderrLines = createInterface({ input: child.stderr });
  stderrLines.on('line', (line) => {
    output.push(`[server stderr] ${line}`);
    if (VERBOSE) process.stderr.write(`[server stderr] ${line}\n`);
  });

  const timeoutMs = Number(process.env.MAILSLOT_READY_TIMEOUT_MS ?? 60000);
  const ready = await new Promise((resolve, reject) => {
    let done = false;
    const finish = (fn, value) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      fn(value);
    };
    const timer = setTimeout(() => {
      finish(reject, new Error(`server did not print READY within ${timeoutMs} ms\n` +
        `command: ${commandLine}\n--- server output ---\n${output.tail()}`));
    }, timeoutMs);
    const stdoutLines = createInterface({ input: child.stdout });
    stdoutLines.on('line', (line) => {
      output.push(`[server stdout] ${line}`);
      if (VERBOSE) process.stderr.write(`[server stdout] ${line}\n`);
      const m = /^READY (\{.*\})\s*$/.exec(line);
      if (m && !done) {
        try {
          finish(resolve, JSON.parse(m[1]));
        } catch (e) {
          finish(reject, new Error(`READY line is not valid JSON: ${line} (${e.message})`));
        }
      }
    });
    child.on('error', (e) => finish(reject, new Error(`cannot start ${commandLine}: ${e.message}`)));
    exitPromise.then(({ code, signal }) => {
      // Give the stdout/stderr readers a moment to flush the last lines.
      setTimeout(() => finish(reject, new Error(
        `server exited (code ${code}, signal ${signal}) before printing READY\n` +
        `command: ${commandLine}\n--- server output ---\n${output.tail()}`)), 100);
    });
  }).catch(async (e) => {
    if (!exited) child.kill('SIGKILL');
    if (!KEEP) await rm(dir, { recursive: true, force: true });
    throw e;
  });

  for (const key of ['host', 'port', 'tls', 'trustRoot']) {
    if (!(key in ready)) {
      child.kill('SIGKILL');
      throw new Error(`READY json lacks "${key}": ${JSON.stringify(ready)} (docs/API.md §2 requires host, port, tls, trustRoot)`);
    }
  }
  const port = Number(ready.port);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) {
    child.kill('SIGKILL');
    throw new Error(`READY json has an unusable port: ${JSON.stringify(ready)}`);
  }

  const connections = new Set();
  const server = {
    host: ready.host,
    port,
    tls: ready.tls,
    trustRoot: ready.trustRoot,
    ready,
    pki,
    dir,
    configFile,
    commandLine,
    logTail: (n) => output.tail(n),
    get exited() {
      return exited;
    },
    /** A libsignal Net in localTestServer mode pointed at this server. */
    makeNet(userAgent = 'mailslot-interop-tests') {
      return makeLocalNet({ port, caDer: pki.caDer, userAgent });
    },
    /** libsignal `Net.connectUnauthenticatedChat`, closed again by stop(). */
    async connectUnauthenticated(net = server.makeNet(), listener = quietListener()) {
      const conn = await net.connectUnauthenticatedChat(listener);
      connections.add(conn);
      return conn;
    },
    /** libsignal `Net.connectAuthenticatedChat`, closed again by stop(). */
    async connectAuthenticated(username, password, { net = server.makeNet(), listener = quietListener(), receiveStories = false } = {}) {
      const conn = await net.connectAuthenticatedChat(username, password, receiveStories, listener);
      connections.add(conn);
      return conn;
    },
    /**
     * libsignal `Net.connectProvisioning` (the anonymous provisioning socket,
     * /v1/websocket/provisioning/), closed again by stop(). `listener`: see ProvisioningRecorder.
     */
    async connectProvisioning(net = server.makeNet(), listener = new ProvisioningRecorder()) {
      const conn = await net.connectProvisioning(listener);
      connections.add(conn);
      return conn;
    },
    async disconnect(conn) {
      connections.delete(conn);
      await conn.disconnect();
    },
    async stop() {
      for (const conn of connections) {
        try {
          await conn.disconnect();
        } catch {
          // the server may already be gone
        }
      }
      connections.clear();
      if (!exited) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => {
          if (!exited) child.kill('SIGKILL');
        }, 5000);
        await exitPromise;
        clearTimeout(timer);
      }
      await releaseNativeObjects();
      if (KEEP) {
        process.stderr.write(`mailslot interop: kept ${dir}\n`);
      } else {
        await rm(dir, { recursive: true, force: true });
      }
    },
  };
  return server;
}

/**
 * libsignal `Net` in local-test-server mode. libsignal then connects to 127.0.0.1:<port> over
 * TLS, sends SNI / checks the certificate for the name `localhost`, and trusts exactly the given
 * root certificate (DER). httpVersion 1 = plain HTTP/1.1 WebSocket upgrade at /v1/websocket/.
 * The CDSI/SVR2/SVR-B ports must be non-zero; they are never used by these tests.
 */
export function makeLocalNet({ port, caDer, userAgent = 'mailslot-interop-tests' }) {
  return new Net({
    localTestServer: true,
    userAgent,
    TESTING_localServer_chatPort: port,
    TESTING_localServer_cdsiPort: port,
    TESTING_localServer_svr2Port: port,
    TESTING_localServer_svrBPort: port,
    TESTING_localServer_rootCertificateDer: caDer,
    TESTING_localServer_httpVersion: 1,
  });
}

// ---------------------------------------------------------------------------------------------
// Chat connections and raw requests

export function quietListener(events = {}) {
  return {
    interrupted: [],
    incoming: [],
    queueEmpty: 0,
    alerts: [],
    onConnectionInterrupted(cause) {
      this.interrupted.push(cause);
      events.onConnectionInterrupted?.(cause);
    },
    onIncomingMessage(envelope, timestamp, ack) {
      this.incoming.push({ envelope, timestamp });
      ack.send(200);
      events.onIncomingMessage?.(envelope, timestamp);
    },
    onQueueEmpty() {
      this.queueEmpty += 1;
      events.onQueueEmpty?.();
    },
    onReceivedAlerts(alerts) {
      this.alerts.push(...alerts);
    },
  };
}

const textDecoder = new TextDecoder();
const textEncoder = new TextEncoder();

/**
 * Sends one request over a libsignal chat connection (`UnauthenticatedChatConnection.fetch` /
 * `AuthenticatedChatConnection.fetch`) and decodes the answer.
 * Returns { status, message, headers (lower-cased names, object), text, json, request }.
 */
export async function chatRequest(conn, verb, pathAndQuery, { json, headers = [], body, timeoutMillis = 15000 } = {}) {
  const hdrs = [...headers];
  let payload = body;
  if (json !== undefined) {
    payload = textEncoder.encode(JSON.stringify(json));
    hdrs.push(['content-type', 'application/json']);
  }
  const request = { verb, path: pathAndQuery, headers: hdrs, ...(payload ? { body: payload } : {}), timeoutMillis };
  const resp = await conn.fetch(request);
  const headerObj = {};
  for (const [k, v] of resp.headers ?? []) headerObj[k.toLowerCase()] = v;
  const text = resp.body ? textDecoder.decode(resp.body) : '';
  let parsed;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  return {
    status: resp.status,
    message: resp.message,
    headers: headerObj,
    text,
    json: parsed,
    request: { verb, path: pathAndQuery, body: json },
  };
}

/** A human-readable account of an exchange, for assertion messages. */
export function describe(resp, { bodyLimit = 800 } = {}) {
  const req = resp.request ?? {};
  let reqBody = req.body === undefined ? '' : JSON.stringify(req.body);
  if (reqBody.length > bodyLimit) reqBody = reqBody.slice(0, bodyLimit) + '…';
  let respBody = resp.text ?? '';
  if (respBody.length > bodyLimit) respBody = respBody.slice(0, bodyLimit) + '…';
  return `${req.verb} ${req.path}${reqBody ? ' ' + reqBody : ''}\n  -> ${resp.status} ${resp.message ?? ''} ` +
    `headers=${JSON.stringify(resp.headers)} body=${respBody}`;
}

export function basicAuth(username, password) {
  return ['authorization', 'Basic ' + Buffer.from(`${username}:${password}`, 'utf8').toString('base64')];
}

// ---------------------------------------------------------------------------------------------
// Account key material, made and signed by libsignal

export const b64 = (bytes) => Buffer.from(bytes).toString('base64');

export function randomRegistrationId() {
  return randomInt(1, 16384); // 1..16383 (0x3FFF)
}

/** Identity key pair + signed EC pre-key + signed Kyber last-resort pre-key for one identity. */
export function makeIdentityKeys({ signedPreKeyId = randomInt(1, 0xffffff), kyberPreKeyId = randomInt(1, 0xffffff), signWith } = {}) {
  const identityPrivate = PrivateKey.generate();
  const identityPublic = identityPrivate.getPublicKey();
  // Whoever signs the pre-keys: normally the identity key; tests pass another key to forge.
  const signer = signWith ?? identityPrivate;

  const spkPrivate = PrivateKey.generate();
  const spkPublic = spkPrivate.getPublicKey();
  const spkSignature = signer.sign(spkPublic.serialize());
  const signedPreKey = SignedPreKeyRecord.new(signedPreKeyId, Date.now(), spkPublic, spkPrivate, spkSignature);

  const kem = KEMKeyPair.generate();
  const kemSignature = signer.sign(kem.getPublicKey().serialize());
  const lastResortKey = KyberPreKeyRecord.new(kyberPreKeyId, Date.now(), kem, kemSignature);

  return { identityPrivate, identityPublic, signedPreKey, lastResortKey };
}

/** Everything a new primary device needs to register. */
export function makeRegistrationMaterial({ forgeAciSignedPreKey = false } = {}) {
  const aci = makeIdentityKeys();
  if (forgeAciSignedPreKey) {
    // Re-sign the ACI signed EC pre-key with an unrelated key: the server must refuse (422).
    const wrong = PrivateKey.generate();
    const spkPrivate = PrivateKey.generate();
    const spkPublic = spkPrivate.getPublicKey();
    aci.signedPreKey = SignedPreKeyRecord.new(aci.signedPreKey.id(), Date.now(), spkPublic, spkPrivate,
      wrong.sign(spkPublic.serialize()));
  }
  const pni = makeIdentityKeys();
  return {
    aci,
    pni,
    password: randomBytes(18).toString('base64'),
    registrationId: randomRegistrationId(),
    pniRegistrationId: randomRegistrationId(),
    unidentifiedAccessKey: new Uint8Array(randomBytes(16)),
    recoveryPassword: new Uint8Array(randomBytes(32)),
  };
}

/** Arguments for libsignal's `RegistrationService.registerAccount`. */
export function registerAccountArgs(m) {
  return {
    accountPassword: m.password,
    skipDeviceTransfer: true,
    accountAttributes: new AccountAttributes({
      recoveryPassword: m.recoveryPassword,
      aciRegistrationId: m.registrationId,
      pniRegistrationId: m.pniRegistrationId,
      registrationLock: null,
      unidentifiedAccessKey: m.unidentifiedAccessKey,
      unrestrictedUnidentifiedAccess: false,
      capabilities: new Set(['spqr']),
      discoverableByPhoneNumber: true,
    }),
    aciPublicKey: m.aci.identityPublic,
    aciSignedPreKey: m.aci.signedPreKey,
    aciPqLastResortPreKey: m.aci.lastResortKey,
    pniPublicKey: m.pni.identityPublic,
    pniSignedPreKey: m.pni.signedPreKey,
    pniPqLastResortPreKey: m.pni.lastResortKey,
  };
}

/** `ECSignedPreKey` / `KEMSignedPreKey` JSON (spec §4) for a libsignal signed pre-key record. */
export const signedKeyJson = (record) => ({
  keyId: record.id(),
  publicKey: b64(record.publicKey().serialize()),
  signature: b64(record.signature()),
});

/**
 * The same registration as JSON for a raw `POST /v1/registration` (spec §1.2).
 *
 * With `libsignalShape: true` it is byte-for-byte the shape libsignal 0.103.0 itself sends (seen on
 * the wire): `accountAttributes.unidentifiedAccessKey` as a JSON array of 16 integers (serde's
 * default for a byte array; Jackson's default byte[] deserializer on Signal-Server accepts it),
 * no `name`/`registrationLock` keys, padded base64 everywhere else. Without it, the UAK is
 * base64 as in the digest's table, so a failure points at the field under test only.
 */
export function registrationJson(m, sessionId, { libsignalShape = false } = {}) {
  return {
    sessionId,
    accountAttributes: {
      fetchesMessages: true,
      pniRegistrationId: m.pniRegistrationId,
      recoveryPassword: b64(m.recoveryPassword),
      registrationId: m.registrationId,
      unidentifiedAccessKey: libsignalShape ? Array.from(m.unidentifiedAccessKey) : b64(m.unidentifiedAccessKey),
      unrestrictedUnidentifiedAccess: false,
      capabilities: { spqr: true },
      discoverableByPhoneNumber: true,
    },
    skipDeviceTransfer: true,
    aciIdentityKey: b64(m.aci.identityPublic.serialize()),
    pniIdentityKey: b64(m.pni.identityPublic.serialize()),
    aciSignedPreKey: signedKeyJson(m.aci.signedPreKey),
    pniSignedPreKey: signedKeyJson(m.pni.signedPreKey),
    aciPqLastResortPreKey: signedKeyJson(m.aci.lastResortKey),
    pniPqLastResortPreKey: signedKeyJson(m.pni.lastResortKey),
  };
}

/**
 * Wraps libsignal's `RegistrationService` so that the harness can drop the native object before
 * Node shuts down (see releaseNativeObjects): tests keep the wrapper, never the service itself.
 */
export class RegistrationSession {
  #service;
  constructor(service) {
    this.#service = service;
    this.sessionId = service.sessionId;
    liveRegistrationSessions.add(this);
  }
  get service() {
    if (!this.#service) throw new Error('RegistrationSession already released');
    return this.#service;
  }
  get sessionState() {
    return this.service.sessionState;
  }
  requestVerification(args) {
    return this.service.requestVerification(args);
  }
  verifySession(code) {
    return this.service.verifySession(code);
  }
  submitCaptcha(captcha) {
    return this.service.submitCaptcha(captcha);
  }
  registerAccount(args) {
    return this.service.registerAccount(args);
  }
  release() {
    this.#service = undefined;
    liveRegistrationSessions.delete(this);
  }
}

const stateForHumans = (state) => JSON.stringify({ ...state, requestedInformation: [...state.requestedInformation] });

/**
 * libsignal `Net.createRegistrationSession({ e164 })` (POST /v1/verification/session over an
 * unauthenticated chat connection that libsignal opens itself), wrapped.
 */
export async function createRegistrationSession(net, e164) {
  return new RegistrationSession(await net.createRegistrationSession({ e164 }));
}

/**
 * Runs the whole verification flow with libsignal's RegistrationService:
 * createRegistrationSession → (session must allow a code) → requestVerification(sms) →
 * verifySession(code). Returns the verified session (a RegistrationSession wrapper).
 */
export async function verifyNumber(net, e164, code = TEST_NUMBERS[e164]) {
  const session = await createRegistrationSession(net, e164);
  const state = session.sessionState;
  if (!state.allowedToRequestCode) {
    throw new Error(
      `POST /v1/verification/session for test number ${e164} gave a session that does not allow ` +
      `requesting a code: ${stateForHumans(state)}. A test number should get ` +
      'allowedToRequestCode=true and requestedInformation=[] (digest §15.1 dev mode; ' +
      'libsignal can only answer captcha challenges).');
  }
  await session.requestVerification({ transport: 'sms', client: 'mailslot-interop', languages: [] });
  const verified = await session.verifySession(code);
  if (!verified) {
    throw new Error(`PUT /v1/verification/session/${session.sessionId}/code with the fixed test code ` +
      `left the session unverified: ${stateForHumans(session.sessionState)}`);
  }
  return session;
}

/**
 * Verifies `e164` and registers it with libsignal's RegistrationService (as in
 * registration.test.mjs). Returns { e164, material, aci, pni, deviceId, username, password }, where
 * `username` is `<aci>.1` for Basic auth on the authenticated chat connection.
 */
export async function registerTestAccount(net, e164, { material = makeRegistrationMaterial(), code } = {}) {
  const session = await verifyNumber(net, e164, code ?? TEST_NUMBERS[e164]);
  try {
    const response = await session.registerAccount(registerAccountArgs(material));
    return {
      e164,
      material,
      aci: response.aci,
      pni: response.pni,
      deviceId: 1,
      username: `${response.aci.getServiceIdString()}.1`,
      password: material.password,
    };
  } finally {
    session.release();
  }
}

/** Describes a libsignal error thrown by a network call (code name, operation, message). */
export function describeLibsignalError(e) {
  if (e instanceof LibSignalErrorBase) {
    return `${ErrorCode[e.code] ?? e.code} in ${e.operation}: ${e.message}`;
  }
  return String(e?.stack ?? e);
}

// ---------------------------------------------------------------------------------------------
// Message delivery: a listener that records server pushes, and a minimal Envelope decoder

/**
 * A `ChatServiceListener` for authenticated connections that records what the server pushes
 * (`PUT /api/v1/message` → onIncomingMessage, `PUT /api/v1/queue/empty` → onQueueEmpty) and lets
 * a test wait for it.
 *
 * `ack`: a status code sent back at once for every message (default 200), or null to leave each
 * message unanswered until the test calls `message.ack(status)` itself (or never does).
 * Each recorded message: { envelope (bytes), decoded (see decodeEnvelope), timestamp (the
 * X-Signal-Timestamp libsignal read, ms), receivedAt (Date.now()), ack(status), ackedWith }.
 */
export class RecordingListener {
  constructor({ ack = 200, name = 'listener' } = {}) {
    this.autoAck = ack;
    this.name = name;
    this.messages = [];
    this.queueEmpty = 0;
    this.queueEmptyAt = [];
    this.interrupted = [];
    this.alerts = [];
    this.serverTimestamps = [];
    this.cursor = 0; // index of the first message not yet taken by next()
    this.waiters = new Set();
  }
  #notify() {
    for (const w of [...this.waiters]) w();
  }
  onIncomingMessage(envelope, timestamp, ack) {
    let decoded;
    let decodeError;
    try {
      decoded = decodeEnvelope(envelope);
    } catch (e) {
      decodeError = e;
    }
    const message = {
      envelope: new Uint8Array(envelope),
      decoded,
      decodeError,
      timestamp,
      receivedAt: Date.now(),
      ackedWith: undefined,
      ack(status = 200) {
        if (this.ackedWith !== undefined) throw new Error(`message already answered with ${this.ackedWith}`);
        this.ackedWith = status;
        ack.send(status);
      },
    };
    this.messages.push(message);
    if (VERBOSE) {
      process.stderr.write(`[${this.name}] PUT /api/v1/message X-Signal-Timestamp=${timestamp} ` +
        `${decoded ? describeEnvelope(decoded) : `undecodable: ${decodeError}`}\n`);
    }
    if (this.autoAck != null) message.ack(this.autoAck);
    this.#notify();
  }
  onQueueEmpty() {
    if (VERBOSE) process.stderr.write(`[${this.name}] PUT /api/v1/queue/empty\n`);
    this.queueEmpty += 1;
    this.queueEmptyAt.push({ at: Date.now(), afterMessages: this.messages.length });
    this.#notify();
  }
  onConnectionInterrupted(cause) {
    this.interrupted.push(cause);
    this.#notify();
  }
  onReceivedAlerts(alerts) {
    this.alerts.push(...alerts);
  }
  onServerTimestamp(timestamp) {
    this.serverTimestamps.push(timestamp);
  }
  /** Resolves once `predicate()` is true; rejects with `what` after `timeoutMs`. */
  waitUntil(predicate, timeoutMs, what) {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = () => {
        if (predicate()) {
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`${this.name}: timed out after ${timeoutMs} ms waiting for ${what} ` +
          `(messages so far: ${this.messages.length}, queue-empty signals: ${this.queueEmpty}, ` +
          `interrupted: ${this.interrupted.length ? this.interrupted.map(String).join('; ') : 'no'})`));
      }, timeoutMs);
      this.waiters.add(check);
    });
  }
  /** The next `n` messages not yet taken (waits for them). */
  async next(n = 1, timeoutMs = 5000) {
    await this.waitUntil(() => this.messages.length >= this.cursor + n, timeoutMs,
      `${n} more incoming message(s) (PUT /api/v1/message)`);
    const taken = this.messages.slice(this.cursor, this.cursor + n);
    this.cursor += n;
    return taken;
  }
  /** Waits for the `count`-th queue-empty signal (PUT /api/v1/queue/empty). */
  waitForQueueEmpty(timeoutMs = 5000, count = 1) {
    return this.waitUntil(() => this.queueEmpty >= count, timeoutMs, 'the queue-empty signal (PUT /api/v1/queue/empty)');
  }
  /** Messages that arrived and were not taken by next(). */
  untaken() {
    return this.messages.slice(this.cursor);
  }
}

/**
 * A `ProvisioningConnectionListener` that records what the provisioning socket delivers
 * (`PUT /v1/address` → onReceivedAddress, `PUT /v1/message` → onReceivedEnvelope) and lets a test
 * wait for it. Both are acknowledged with `ack` (default 200) at once.
 */
export class ProvisioningRecorder {
  constructor({ ack = 200, name = 'provisioning socket' } = {}) {
    this.autoAck = ack;
    this.name = name;
    this.addresses = [];
    this.envelopes = [];
    this.interrupted = [];
    this.waiters = new Set();
  }
  #notify() {
    for (const w of [...this.waiters]) w();
  }
  onReceivedAddress(address, ack) {
    if (VERBOSE) process.stderr.write(`[${this.name}] PUT /v1/address ${address}\n`);
    this.addresses.push(address);
    if (this.autoAck != null) ack.send(this.autoAck);
    this.#notify();
  }
  onReceivedEnvelope(envelope, ack) {
    if (VERBOSE) process.stderr.write(`[${this.name}] PUT /v1/message (${envelope.length} bytes)\n`);
    this.envelopes.push(new Uint8Array(envelope));
    if (this.autoAck != null) ack.send(this.autoAck);
    this.#notify();
  }
  onConnectionInterrupted(cause) {
    this.interrupted.push(cause);
    this.#notify();
  }
  waitUntil(predicate, timeoutMs, what) {
    return RecordingListener.prototype.waitUntil.call(this, predicate, timeoutMs, what);
  }
  get messages() {
    return this.envelopes;
  }
  get queueEmpty() {
    return 'n/a';
  }
}

/**
 * Encodes a protobuf message from [fieldNumber, value] pairs: string / Uint8Array → length-delimited,
 * number / bigint / boolean → varint. Undefined / null values are skipped.
 */
export function encodeProtobuf(fields) {
  const out = [];
  const varint = (v) => {
    let n = BigInt(v);
    do {
      let b = Number(n & 0x7fn);
      n >>= 7n;
      if (n > 0n) b |= 0x80;
      out.push(b);
    } while (n > 0n);
  };
  for (const [field, value] of fields) {
    if (value === undefined || value === null) continue;
    if (typeof value === 'string' || value instanceof Uint8Array) {
      const bytes = typeof value === 'string' ? textEncoder.encode(value) : value;
      varint((field << 3) | 2);
      varint(bytes.length);
      out.push(...bytes);
    } else {
      varint(field << 3);
      varint(typeof value === 'boolean' ? (value ? 1 : 0) : value);
    }
  }
  return new Uint8Array(out);
}

/** `xxxxxxxx-xxxx-…` from 16 bytes. */
export function uuidFromBytes(bytes) {
  const h = Buffer.from(bytes).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Decodes a protobuf message into { fieldNumber: [values] } (varint → BigInt, bytes → Uint8Array). */
export function decodeProtobuf(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  let pos = 0;
  const varint = () => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (pos >= buf.length) throw new Error('protobuf: truncated varint');
      const b = buf[pos++];
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result;
      shift += 7n;
      if (shift > 63n) throw new Error('protobuf: varint too long');
    }
  };
  const fields = {};
  while (pos < buf.length) {
    const key = varint();
    const field = Number(key >> 3n);
    const wire = Number(key & 7n);
    let value;
    if (wire === 0) value = varint();
    else if (wire === 1) {
      if (pos + 8 > buf.length) throw new Error('protobuf: truncated fixed64');
      value = Buffer.from(buf.subarray(pos, pos + 8)).readBigUInt64LE();
      pos += 8;
    } else if (wire === 2) {
      const len = Number(varint());
      if (pos + len > buf.length) throw new Error(`protobuf: field ${field} length ${len} overruns the buffer`);
      value = buf.slice(pos, pos + len);
      pos += len;
    } else if (wire === 5) {
      if (pos + 4 > buf.length) throw new Error('protobuf: truncated fixed32');
      value = BigInt(Buffer.from(buf.subarray(pos, pos + 4)).readUInt32LE());
      pos += 4;
    } else {
      throw new Error(`protobuf: unsupported wire type ${wire} (field ${field})`);
    }
    (fields[field] ??= []).push({ wire, value });
  }
  return fields;
}

/**
 * `textsecure.Envelope` (signal-server-api.md §5.3), decoded minimally. Numbers come back as JS
 * numbers, bytes as Uint8Array, the retired string forms as strings; absent fields are undefined.
 * `raw` keeps every field (last value wins for the named ones, as in proto2).
 */
export function decodeEnvelope(bytes) {
  const raw = decodeProtobuf(bytes);
  const last = (n, wire) => {
    const list = raw[n];
    if (!list) return undefined;
    const v = list[list.length - 1];
    if (wire !== undefined && v.wire !== wire) throw new Error(`Envelope field ${n}: wire type ${v.wire}, expected ${wire}`);
    return v.value;
  };
  const num = (n) => {
    const v = last(n, 0);
    return v === undefined ? undefined : Number(v);
  };
  const str = (n) => {
    const v = last(n, 2);
    return v === undefined ? undefined : new TextDecoder().decode(v);
  };
  const flag = (n) => {
    const v = last(n, 0);
    return v === undefined ? undefined : v !== 0n;
  };
  return {
    type: num(1),
    clientTimestamp: num(5),
    sourceDevice: num(7),
    content: last(8, 2),
    serverGuidString: str(9),
    serverTimestamp: num(10),
    sourceServiceIdString: str(11),
    ephemeral: flag(12),
    destinationServiceIdString: str(13),
    urgent: flag(14),
    story: flag(16),
    sourceServiceId: last(19, 2),
    destinationServiceId: last(20, 2),
    serverGuid: last(21, 2),
    updatedPni: last(22, 2),
    raw,
  };
}

/** Envelope fields for an assertion message (bytes as hex/base64, content shortened). */
export function describeEnvelope(env) {
  if (!env) return String(env);
  const out = {};
  for (const [k, v] of Object.entries(env)) {
    if (k === 'raw' || v === undefined) continue;
    if (v instanceof Uint8Array) {
      out[k] = k === 'content' ? `${v.length} bytes` : Buffer.from(v).toString('hex');
    } else {
      out[k] = v;
    }
  }
  out.fields = Object.keys(env.raw ?? {}).map(Number);
  return JSON.stringify(out);
}
