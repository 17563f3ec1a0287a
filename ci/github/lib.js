// What main.js and post.js share: the runner's inputs, workflow commands and files, running
// behest-agent with a bounded time, and finding out whether the daemon's process still runs.
// Node's standard library only: nothing is installed or vendored.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');

/** Bound on what is kept of a command's output. */
const MAX_OUTPUT = 1 << 20;

/** An input as the runner passes it: `INPUT_<NAME>`, upper case, spaces as `_`, `-` kept. */
function input(name) {
  const value = process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`];
  return (value || '').trim();
}

/** A workflow command's data, escaped as the runner unescapes it. */
function escapeData(text) {
  return String(text).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function command(name, data) {
  process.stdout.write(`::${name}::${escapeData(data)}\n`);
}

/** Asks the runner to hide `secret` in every later line of the job's log. */
function mask(secret) {
  if (secret) command('add-mask', secret);
}

function info(line) {
  process.stdout.write(`${line}\n`);
}

function error(message) {
  command('error', message);
}

/** Appends `text` to the runner's file named by the variable `fileVar`. */
function appendText(fileVar, text) {
  const file = process.env[fileVar];
  if (!file) throw new Error(`${fileVar} is not set: this must run as a step of a GitHub Actions job`);
  fs.appendFileSync(file, text.endsWith('\n') ? text : `${text}\n`);
}

/** Appends `name=value` lines to the runner's file named by the variable `fileVar`. */
function appendLines(fileVar, pairs) {
  let text = '';
  for (const [name, value] of pairs) {
    if (/[\r\n]/.test(String(value))) throw new Error(`${name}: a value cannot span lines`);
    text += `${name}=${value}\n`;
  }
  appendText(fileVar, text);
}

/** Runs `binary args…` with `env`, no stdin; resolves to { code, stdout, stderr } (code null when
 * it could not run, was killed at `timeoutMs` or by `signal` (an AbortSignal), with the reason in
 * `stderr`). */
function run(binary, args, env, timeoutMs, signal) {
  return new Promise((resolve) => {
    let stdout = '';
    let stderr = '';
    let settled = false;
    const finish = (code, extra) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ code, stdout, stderr: stderr + (extra || '') });
    };
    const child = spawn(binary, args, { env, signal, stdio: ['ignore', 'pipe', 'pipe'] });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      finish(null, `\n\`${path.basename(binary)} ${args[0]}\` did not finish within ${timeoutMs / 1000} s`);
    }, timeoutMs);
    child.stdout.on('data', (d) => {
      if (stdout.length < MAX_OUTPUT) stdout += d;
    });
    child.stderr.on('data', (d) => {
      if (stderr.length < MAX_OUTPUT) stderr += d;
    });
    child.on('error', (e) => finish(null, `cannot run ${binary}: ${e.message}`));
    child.on('close', (code) => finish(code));
  });
}

/** The environment behest-agent commands of this job run with: the step's, without the
 * action's inputs (one of them is the client secret), plus `settings`. */
function agentEnv(settings) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('INPUT_') && !k.startsWith('STATE_')) env[k] = v;
  }
  for (const [k, v] of Object.entries(settings)) {
    if (v !== undefined && v !== '') env[k] = v;
  }
  return env;
}

/** Whether `pid` still runs: not gone, and not a zombie waiting for its parent. */
function alive(pid) {
  if (!(pid > 0)) return false;
  try {
    process.kill(pid, 0);
  } catch (e) {
    if (e.code === 'ESRCH') return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    // No /proc (macOS) or it just went: kill(0) said it was there.
    return fs.existsSync('/proc') ? false : true;
  }
}

/** When `pid` started (/proc/PID/stat's 22nd field, clock ticks since boot): with the pid, it
 * names one process, so a reused pid is never taken for the daemon. '' where /proc cannot tell. */
function startTime(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] || '';
  } catch {
    return '';
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** SIGTERM to the daemon (the process `pid` that started at `started`, from startTime), SIGKILL
 * after `graceMs`; resolves to whether it is gone. */
async function kill(pid, started, graceMs) {
  if (!alive(pid)) return true;
  if (started && startTime(pid) !== started) return true; // the pid names another process now
  for (const [signal, wait] of [['SIGTERM', graceMs], ['SIGKILL', 5000]]) {
    try {
      process.kill(pid, signal);
    } catch {
      // gone meanwhile
    }
    const deadline = Date.now() + wait;
    while (alive(pid) && Date.now() < deadline) await sleep(50);
    if (!alive(pid)) return true;
  }
  return !alive(pid);
}

/** The last `lines` lines of the daemon's log, with `secret` blanked out should it be there. */
function logTail(file, lines, secret) {
  let text;
  try {
    const fd = fs.openSync(file, 'r');
    const size = fs.fstatSync(fd).size;
    const length = Math.min(size, 64 * 1024);
    const buffer = Buffer.alloc(length);
    fs.readSync(fd, buffer, 0, length, size - length);
    fs.closeSync(fd);
    text = buffer.toString('utf8');
  } catch (e) {
    return `(no daemon log: ${e.message})`;
  }
  if (secret) text = text.split(secret).join('***');
  return text.split('\n').slice(-lines - 1).join('\n').trimEnd();
}

/** The first non-empty line of `text`. */
function firstLine(text) {
  return (
    String(text)
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l) || ''
  );
}

module.exports = {
  input,
  mask,
  info,
  error,
  appendText,
  appendLines,
  run,
  agentEnv,
  alive,
  startTime,
  kill,
  logTail,
  firstLine,
  sleep,
};
