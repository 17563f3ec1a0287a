#!/usr/bin/env node
// The benchmark's streaming upstream: OpenAI-style server-sent events at a fixed pace. nginx
// cannot pace events, hence this. Any method and path; the query chooses the stream:
//
//   ?n=EVENTS&ms=INTERVAL   (defaults 20 events, 20 ms apart)
//
// The first event is written as soon as the head is; every event carries "t", the wall-clock
// time (ms, sub-ms precision) at which it was written, so a client on the same machine measures
// each event's delivery delay. A request without an Authorization header gets 401, like Behest.
//
//   node bench/sse.js --port P
'use strict';
const http = require('http');
const { performance } = require('perf_hooks');

const i = process.argv.indexOf('--port');
const port = Number(i >= 0 ? process.argv[i + 1] : 0);
const now = () => performance.timeOrigin + performance.now();

let open = 0;

const server = http.createServer((req, res) => {
  req.resume();
  if (!req.headers.authorization) {
    const body = '{"error":{"message":"missing bearer","type":"invalid_request_error","code":"invalid_api_key"}}';
    res.writeHead(401, { 'content-type': 'application/json', 'content-length': body.length });
    return res.end(body);
  }
  const url = new URL(req.url, 'http://x');
  const n = Math.min(Number(url.searchParams.get('n') || 20), 100000);
  const ms = Number(url.searchParams.get('ms') || 20);
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  open += 1;
  let sent = 0;
  let timer = null;
  const send = () => {
    if (sent >= n) {
      clearInterval(timer);
      res.end('data: [DONE]\n\n');
      return;
    }
    res.write(
      `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"echo-1",` +
        `"choices":[{"index":0,"delta":{"content":"tok${sent} "},"finish_reason":null}],"t":${now().toFixed(3)}}\n\n`,
    );
    sent += 1;
  };
  send();
  timer = setInterval(send, ms);
  res.on('close', () => {
    clearInterval(timer);
    open -= 1;
  });
});
server.keepAliveTimeout = 120000;
server.headersTimeout = 130000;
server.maxHeadersCount = 0;
server.listen(port, '127.0.0.1', () => process.stdout.write(`sse listening on ${server.address().port}\n`));
process.on('SIGTERM', () => process.exit(0));
