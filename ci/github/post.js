// The action's post step, run at the end of the job whether it passed or failed: the session's
// usage table to the job summary (best effort), then `behest-agent stop`; if that fails the
// daemon is ended by its pid (SIGTERM, then SIGKILL), and its directory (with the secret file)
// removed. It fails only when the daemon cannot be ended at all.
'use strict';

const fs = require('node:fs');
const lib = require('./lib.js');

async function post() {
  const state = (name) => (process.env[`STATE_${name}`] || '').trim();
  const pid = Number(state('pid')) || 0;
  const dir = state('dir');
  const socket = state('socket');
  const session = state('session');
  const binary = state('binary') || lib.input('binary') || 'behest-agent';
  if (!pid && !socket) {
    lib.info('behest-agent: main started no daemon; nothing to stop');
    return;
  }
  const env = lib.agentEnv({
    BEHEST_AGENT_CONFIG: state('config'),
    BEHEST_AGENT__CONTROL__SOCKET: socket,
  });

  // The session's counts: the daemon's, or the usage ledger's when it is gone. Only once main
  // got as far as the session (`session` saved), and never the whole ledger of the machine.
  const ready = process.env.STATE_session !== undefined;
  if (ready && (session || lib.alive(pid))) {
    const args = ['usage'];
    if (session) args.push('--session', session);
    args.push('--format', 'markdown');
    const usage = await lib.run(binary, args, env, 30000);
    const summary = process.env.GITHUB_STEP_SUMMARY;
    if (usage.code === 0 && usage.stdout.trim() && summary) {
      const title = session ? `Behest usage (session \`${session}\`)` : 'Behest usage';
      fs.appendFileSync(summary, `\n### ${title}\n\n${usage.stdout.trimEnd()}\n\n`);
    } else {
      lib.info(`behest-agent: no usage table (${lib.firstLine(usage.stderr) || `exit ${usage.code}`})`);
    }
  }

  const stop = await lib.run(binary, ['stop', '--timeout', '60s'], env, 70000);
  if (stop.code === 0) {
    lib.info(lib.firstLine(stop.stdout) || 'behest-agent stopped');
  } else if (lib.alive(pid)) {
    lib.info(`behest-agent stop: ${lib.firstLine(stop.stderr) || `exit ${stop.code}`}; ending pid ${pid}`);
    if (dir) {
      lib.info(`::group::behest-agent log`);
      lib.info(lib.logTail(`${dir}/agent.log`, 40, lib.input('client-secret')));
      lib.info('::endgroup::');
    }
  }
  if (!(await lib.kill(pid, state('started'), 10000))) {
    throw new Error(`behest-agent (pid ${pid}) is still running after SIGKILL`);
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
}

post().catch((e) => {
  lib.error(e.message);
  process.exitCode = 1;
});
