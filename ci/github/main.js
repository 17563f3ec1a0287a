// The action's main step: a behest-agent daemon for this job only, and the job's environment
// pointed at its proxy.
//
// 1. The client secret goes to a 0600 file in a private directory under RUNNER_TEMP, masked in
//    the log first; it is never printed, and it is kept out of the daemon's environment.
// 2. `behest-agent run` starts detached, configured by BEHEST_AGENT__… variables (the step's own
//    environment is inherited, so any other setting can be given that way): its own control
//    socket and keys file in that directory, its proxy on a free loopback port, its log in
//    agent.log there.
//    What post needs is saved in GITHUB_STATE at once, so post stops it whatever happens next.
// 3. `behest-agent wait` until it holds a valid token (failing at once if the daemon exits).
// 4. `behest-agent env --format github` (with the session) goes to GITHUB_ENV, with the control
//    socket, so later steps' `behest-agent token`, `status` and `exec` find this daemon; a local
//    key in it (proxy.require_key) is masked first.
// On failure the daemon is stopped and the tail of its log printed.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const lib = require('./lib.js');

/** The daemon's pid and start time once started: stopped again if main fails after that. */
let started = { pid: 0, at: '' };
/** The job's directory (the secret file's): removed if main fails before a daemon started. */
let jobDir = '';

async function main() {
  const secret = lib.input('client-secret');
  lib.mask(secret);
  const binary = lib.input('binary') || 'behest-agent';
  const session = lib.input('session');
  const timeout = lib.input('timeout') || '30s';
  const temp = process.env.RUNNER_TEMP;
  if (!temp) throw new Error('RUNNER_TEMP is not set: this must run as a step of a GitHub Actions job');

  const dir = fs.mkdtempSync(path.join(temp, 'behest-agent-')); // mode 0700
  jobDir = dir;
  const secretFile = path.join(dir, 'client-secret');
  const socket = path.join(dir, 'agent.sock');
  const log = path.join(dir, 'agent.log');
  let config = process.env.BEHEST_AGENT_CONFIG;
  if (!config) {
    // A job-scoped daemon reads no machine-wide /etc/behest-agent/config.toml.
    config = path.join(dir, 'config.toml');
    fs.writeFileSync(config, '# behest-agent GitHub Action: settings come from the environment\n', { mode: 0o600 });
  }
  if (secret) {
    fs.writeFileSync(secretFile, secret, { mode: 0o600, flag: 'wx' });
    fs.chmodSync(secretFile, 0o600);
  }
  const env = lib.agentEnv({
    BEHEST_AGENT_CONFIG: config,
    BEHEST_AGENT__AUTH__DOMAIN: lib.input('domain'),
    BEHEST_AGENT__AUTH__CLIENT_ID: lib.input('client-id'),
    BEHEST_AGENT__AUTH__AUDIENCE: lib.input('audience'),
    BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE: secret ? secretFile : undefined,
    BEHEST_AGENT__PROXY__UPSTREAM: lib.input('upstream'),
    BEHEST_AGENT__PROXY__LISTEN: '127.0.0.1:0',
    BEHEST_AGENT__CONTROL__SOCKET: socket,
    // With proxy.require_key, the job's local keys live and die with the job, not in the
    // user's keys file that other jobs' daemons load.
    BEHEST_AGENT__PROXY__KEYS_FILE: process.env.BEHEST_AGENT__PROXY__KEYS_FILE ? undefined : path.join(dir, 'keys.json'),
  });

  const logFd = fs.openSync(log, 'a', 0o600);
  const daemon = spawn(binary, ['run'], { env, detached: true, stdio: ['ignore', logFd, logFd] });
  fs.closeSync(logFd);
  const exited = new Promise((resolve) => {
    daemon.once('exit', (code, signal) => resolve(signal ? `signal ${signal}` : `status ${code}`));
    daemon.once('error', (e) => resolve(`error: ${e.message}`));
  });
  const spawned = await Promise.race([
    new Promise((resolve) => daemon.once('spawn', () => resolve(true))),
    exited.then(() => false),
  ]);
  if (!spawned) {
    throw new Error(`cannot start \`${binary} run\` (${await exited}); install behest-agent on PATH or set the \`binary\` input`);
  }
  started = { pid: daemon.pid, at: lib.startTime(daemon.pid) };
  lib.appendLines('GITHUB_STATE', [
    ['pid', daemon.pid],
    ['started', started.at],
    ['dir', dir],
    ['socket', socket],
    ['config', config],
    ['binary', binary],
  ]);

  const fail = (message) => {
    lib.error(message);
    lib.info(`::group::behest-agent log (${log})`);
    lib.info(lib.logTail(log, 40, secret));
    lib.info('::endgroup::');
    throw Object.assign(new Error(message), { reported: true });
  };

  const abort = new AbortController();
  const waited = await Promise.race([
    lib.run(binary, ['wait', '--timeout', timeout], env, 10 * 60 * 1000, abort.signal),
    exited.then((how) => ({ exited: how })),
  ]);
  abort.abort();
  if (waited.exited) {
    // A configuration it refused: its last `error:` line says which setting (an input's).
    const why = lib
      .logTail(log, 40, secret)
      .split('\n')
      .reverse()
      .find((l) => l.startsWith('error: '));
    fail(
      why
        ? `behest-agent exited (${waited.exited}) before it was ready: ${why.slice('error: '.length)}`
        : `behest-agent exited (${waited.exited}) before it was ready; its log says why`,
    );
  }
  if (waited.code !== 0) {
    fail(`behest-agent: ${lib.firstLine(waited.stderr).replace(/^error: /, '')}`);
  }

  const args = ['env', '--format', 'github'];
  if (session) args.push('--session', session);
  const out = await lib.run(binary, args, env, 30000);
  const base = /OPENAI_BASE_URL[\s\S]*?(https?:\/\/[^\s'"]+)/.exec(out.stdout);
  if (out.code !== 0 || !base) {
    fail(`\`behest-agent env\` failed: ${lib.firstLine(out.stderr) || out.stdout}`);
  }
  const id = /\/s\/([^/]+)\//.exec(base[1]);
  // A local key (proxy.require_key) is a credential: hidden in the log before it is exported.
  const key = /^OPENAI_API_KEY=(bak_\S+)$/m.exec(out.stdout);
  if (key) lib.mask(key[1]);
  lib.appendText('GITHUB_ENV', out.stdout);
  lib.appendLines('GITHUB_ENV', [['BEHEST_AGENT__CONTROL__SOCKET', socket]]);
  lib.appendLines('GITHUB_STATE', [['session', id ? id[1] : '']]);
  daemon.unref();
  lib.info(`behest-agent ready (pid ${daemon.pid}): OPENAI_BASE_URL=${base[1]}`);
}

main().catch(async (e) => {
  if (!e.reported) lib.error(e.message);
  process.exitCode = 1;
  if (started.pid) await lib.kill(started.pid, started.at, 10000);
  else if (jobDir) fs.rmSync(jobDir, { recursive: true, force: true });
});
