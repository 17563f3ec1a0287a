//! Usage accounting and budgets (SPEC §8) through the assembled agent: the real OpenAI SDK's
//! requests counted per session and model from JSON bodies and streams, the ledger, the budgets'
//! 429s, bad upstream bodies never crashing or growing memory, and `usage` / `exec`'s summary.

use std::time::Duration;

use bytes::Bytes;
use devkit::upstream::UpstreamFault;
use serde_json::{Value, json};

use crate::node::openai_client;
use crate::proxy::{Stack, http, stack_with};
use crate::util::{assert_no_secret_in, eventually};

async fn stack_with_ledger(extra: &[(&str, &str)]) -> (Stack, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let ledger = dir.join("usage.jsonl");
    let ledger_s = ledger.display().to_string();
    let mut env = vec![("BEHEST_AGENT__USAGE__LEDGER_FILE", ledger_s.as_str())];
    env.extend_from_slice(extra);
    (stack_with(|_| {}, &env).await, ledger)
}

fn counts(s: &Stack, session: &str) -> Value {
    json!(
        s.accounting
            .report()
            .sessions
            .get(session)
            .cloned()
            .unwrap_or_default()
    )
}

#[tokio::test]
async fn json_and_streamed_responses_are_counted_per_session_and_model_and_logged() {
    let (s, ledger) = stack_with_ledger(&[]).await;
    let base = s.base.replace("/v1", "/s/job-1/v1");
    let chat = openai_client(&base, "chat", &[]).await;
    assert_eq!(chat["ok"], true, "{chat}");
    let streamed = openai_client(&base, "stream-usage", &[]).await;
    assert_eq!(streamed["ok"], true, "{streamed}");
    let emb = openai_client(&base, "embeddings", &[]).await;
    assert_eq!(emb["ok"], true, "{emb}");
    // Not accounted: a GET.
    assert_eq!(openai_client(&base, "models", &[]).await["ok"], true);

    let said = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let (chat_u, stream_u, emb_u) = (
        &chat["response"]["usage"],
        &streamed["usage"],
        &emb["response"]["usage"],
    );
    let c = counts(&s, "job-1");
    assert_eq!(c["requests"], 3, "{c}");
    assert_eq!(c["unaccounted"], 0, "{c}");
    assert_eq!(
        c["prompt_tokens"].as_u64().unwrap(),
        said(chat_u, "prompt_tokens")
            + said(stream_u, "prompt_tokens")
            + said(emb_u, "prompt_tokens")
    );
    assert_eq!(
        c["completion_tokens"].as_u64().unwrap(),
        said(chat_u, "completion_tokens") + said(stream_u, "completion_tokens")
    );
    assert_eq!(
        c["total_tokens"].as_u64().unwrap(),
        said(chat_u, "total_tokens") + said(stream_u, "total_tokens") + said(emb_u, "total_tokens")
    );
    assert_eq!(c["models"]["echo-1"]["requests"], 2, "{c}");
    assert_eq!(c["models"]["embed-1"]["requests"], 1, "{c}");

    let metrics = s.metrics.encode();
    assert!(
        metrics.contains(&format!(
            "behest_agent_usage_tokens_total{{model=\"echo-1\",kind=\"completion\"}} {}",
            said(chat_u, "completion_tokens") + said(stream_u, "completion_tokens")
        )),
        "{metrics}"
    );
    assert!(metrics.contains("behest_agent_usage_requests_total{model=\"embed-1\"} 1"));
    assert!(!metrics.contains("job-1"), "no session label");

    s.accounting.flush().await;
    let text = std::fs::read_to_string(&ledger).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let first = &lines[0];
    for key in [
        "ts",
        "session",
        "profile",
        "model",
        "path",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "duration_ms",
        "request_id",
    ] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(first["session"], "job-1");
    assert_eq!(first["path"], "/v1/chat/completions");
    assert_eq!(first["total_tokens"], chat_u["total_tokens"]);
    assert!(
        !text.contains("hello"),
        "never a prompt or a completion: {text}"
    );
    assert!(!text.contains("eyJ"), "never a token: {text}");
    assert_no_secret_in(&text, std::slice::from_ref(&s.h.secret), "the ledger");
    s.finish().await;
}

#[tokio::test]
async fn a_stream_without_include_usage_is_unaccounted_unless_the_agent_asks_for_it() {
    let s = stack_with(|_| {}, &[]).await;
    let plain = openai_client(&s.base, "stream", &[]).await;
    assert_eq!(plain["ok"], true, "{plain}");
    let c = counts(&s, "-");
    assert_eq!(
        (c["requests"].as_u64(), c["unaccounted"].as_u64()),
        (Some(1), Some(1)),
        "{c}"
    );
    assert_eq!(
        c["models"]["echo-1"]["requests"], 1,
        "the model from the stream's chunks: {c}"
    );
    s.finish().await;

    let s = stack_with(
        |_| {},
        &[("BEHEST_AGENT__USAGE__STREAM_INCLUDE_USAGE", "true")],
    )
    .await;
    let asked = openai_client(&s.base, "stream", &[]).await;
    assert_eq!(asked["ok"], true, "{asked}");
    assert_eq!(
        asked["content"], plain["content"],
        "the client sees the same stream"
    );
    let c = counts(&s, "-");
    assert_eq!(c["unaccounted"], 0, "{c}");
    assert!(c["total_tokens"].as_u64().unwrap() > 0, "{c}");
    // Asked on every path variant that is accounted as a chat or legacy completion, too.
    let body = br#"{"model":"echo-1","stream":true}"#;
    for path in [
        "chat/completions",
        "chat/completions/",
        "chat/completions;x=1",
        "chat/%63ompletions",
        // Accounted as (legacy) completions, which take stream_options too.
        "chat//completions",
        "completions",
    ] {
        http()
            .post(format!("{}/{path}", s.base))
            .header("content-type", "application/json")
            .body(&body[..])
            .send()
            .await
            .unwrap();
        let sent = s.upstream.requests().pop().unwrap();
        assert!(sent.body_len > body.len() as u64, "{path}: {sent:?}");
    }
    s.finish().await;
}

/// One POST to the chat endpoint with a raw client, so status and headers can be seen.
async fn post_chat(base: &str, session: &str) -> reqwest::Response {
    http()
        .post(format!("{base}/chat/completions"))
        .header("x-session-id", session)
        .json(&json!({"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn spent_budgets_get_429_budget_exceeded_saying_which_and_how_to_raise_it() {
    let s = stack_with(
        |_| {},
        &[
            ("BEHEST_AGENT__BUDGET__SESSION_REQUESTS", "2"),
            ("BEHEST_AGENT__BUDGET__HOURLY_TOKENS", "1000000"),
        ],
    )
    .await;
    let base = s.base.replace("/v1", "/s/loop/v1");
    for _ in 0..2 {
        assert_eq!(openai_client(&base, "chat", &[]).await["ok"], true);
    }
    // With the SDK's default retries: one try, no retry (the metric below counts one refusal).
    let refused = openai_client(&base, "chat", &[("MAX_RETRIES", "2")]).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["status"], 429, "{refused}");
    assert_eq!(refused["code"], "budget_exceeded", "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("loop")
            && message.contains("2/2")
            && message.contains("budget.session_requests"),
        "{message}"
    );
    let upstream_saw = s.upstream.request_count();
    assert_eq!(
        upstream_saw, 2,
        "a refused request never reaches the upstream"
    );
    // Another session, and GETs, are not refused.
    assert_eq!(openai_client(&s.base, "chat", &[]).await["ok"], true);
    assert_eq!(openai_client(&base, "models", &[]).await["ok"], true);
    assert!(
        s.metrics
            .encode()
            .contains("behest_agent_budget_refusals_total{budget=\"session_requests\"} 1")
    );
    s.finish().await;

    // The hourly budget: Retry-After.
    let s = stack_with(|_| {}, &[("BEHEST_AGENT__BUDGET__HOURLY_TOKENS", "1")]).await;
    assert_eq!(post_chat(&s.base, "a").await.status(), 200);
    let r = post_chat(&s.base, "b").await;
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&after), "{after}");
    assert_eq!(r.headers()["x-should-retry"], "false");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "behest_agent_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget.hourly_tokens"),
        "{body}"
    );
    // The SDK with its default retries raises at once: it slept the Retry-After (up to an hour)
    // before each of two retries.
    let sdk = tokio::time::timeout(
        Duration::from_secs(120),
        openai_client(&s.base, "chat", &[("MAX_RETRIES", "2")]),
    )
    .await
    .expect("the SDK raises the budget's 429 rather than wait an hour to retry");
    assert_eq!(sdk["status"], 429, "{sdk}");
    assert!(
        s.metrics
            .encode()
            .contains("behest_agent_budget_refusals_total{budget=\"hourly_tokens\"} 2"),
        "one refusal above, one for the SDK's single try"
    );
    s.finish().await;
}

#[tokio::test]
async fn accounted_requests_ask_the_upstream_for_a_body_it_can_read_uncompressed() {
    let s = stack_with(|_| {}, &[]).await;
    let r = http()
        .post(format!("{}/chat/completions", s.base))
        .header("accept-encoding", "gzip, deflate, br")
        .json(&json!({"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(format!("{}/models", s.base))
        .header("accept-encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.upstream.requests();
    assert_eq!(seen[0].header("accept-encoding"), Some("identity"));
    // Not accounted: as the client asked.
    assert_eq!(seen[1].header("accept-encoding"), Some("gzip, deflate, br"));
    s.finish().await;
}

#[tokio::test]
async fn the_request_budget_counts_requests_still_in_flight() {
    let s = stack_with(
        |o| o.sse_interval = Duration::from_millis(20),
        &[("BEHEST_AGENT__BUDGET__SESSION_REQUESTS", "2")],
    )
    .await;
    s.upstream
        .fail_next(2, UpstreamFault::PauseStream { after_events: 2 });
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let base = s.base.clone();
            tokio::spawn(async move { openai_client(&base, "stream-usage", &[]).await })
        })
        .collect();
    eventually(
        Duration::from_secs(20),
        "both streams are under way",
        || s.upstream.in_flight() == 2,
    )
    .await;
    // Neither has ended, so neither is in the counts yet: the third request is refused all the
    // same, and so is every one after it.
    for _ in 0..3 {
        let r = post_chat(&s.base, "-").await;
        assert_eq!(r.status(), 429);
        let body: Value = r.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("2/2 requests"), "{message}");
    }
    s.upstream.resume_stream();
    s.upstream.resume_stream();
    for stream in streams {
        let done = stream.await.unwrap();
        assert_eq!(done["ok"], true, "the streams in flight finish: {done}");
    }
    assert_eq!(s.upstream.request_count(), 2);
    s.finish().await;
}

#[tokio::test]
async fn a_stream_in_flight_when_the_budget_is_spent_finishes() {
    let s = stack_with(
        |o| o.sse_interval = Duration::from_millis(20),
        &[("BEHEST_AGENT__BUDGET__SESSION_TOKENS", "1")],
    )
    .await;
    s.upstream
        .fail_next(1, UpstreamFault::PauseStream { after_events: 2 });
    let base = s.base.clone();
    let first = tokio::spawn(async move { openai_client(&base, "stream-usage", &[]).await });
    eventually(
        Duration::from_secs(20),
        "the first stream is under way",
        || s.upstream.in_flight() == 1,
    )
    .await;
    // A second, small request spends the budget while the stream is paused.
    assert_eq!(post_chat(&s.base, "-").await.status(), 200);
    assert_eq!(post_chat(&s.base, "-").await.status(), 429);
    s.upstream.resume_stream();
    let first = first.await.unwrap();
    assert_eq!(first["ok"], true, "the stream in flight finishes: {first}");
    assert!(first["usage"]["total_tokens"].as_u64().unwrap() > 0);
    s.finish().await;
}

#[tokio::test]
async fn bad_upstream_bodies_are_unaccounted_never_a_crash_nor_more_memory() {
    let s = stack_with(|_| {}, &[]).await;
    let huge_line = {
        let mut b = b"data: {\"model\":\"m\",\"x\":\"".to_vec();
        b.resize(10 << 20, b'a');
        Bytes::from(b)
    };
    let huge_json = {
        let mut b = br#"{"model":"m","usage":{"total_tokens":5},"pad":""#.to_vec();
        b.resize(50 << 20, b' ');
        b.extend_from_slice(b"\"}");
        Bytes::from(b)
    };
    let cases: Vec<(&str, &str, Bytes)> = vec![
        (
            "strings",
            "application/json",
            Bytes::from_static(
                br#"{"model":"m","usage":{"prompt_tokens":"12","total_tokens":12}}"#,
            ),
        ),
        (
            "negative",
            "application/json",
            Bytes::from_static(br#"{"model":"m","usage":{"prompt_tokens":-3,"total_tokens":-3}}"#),
        ),
        (
            "not json",
            "application/json",
            Bytes::from_static(b"{\"model\":"),
        ),
        (
            "a 10 MB event line without a newline",
            "text/event-stream",
            huge_line,
        ),
        ("a 50 MB JSON body", "application/json", huge_json),
    ];
    for (i, (what, content_type, body)) in cases.into_iter().enumerate() {
        let len = body.len();
        s.upstream.fail_next(
            1,
            UpstreamFault::Raw {
                content_type: content_type.to_string(),
                body,
            },
        );
        let r = post_chat(&s.base, "bad").await;
        assert_eq!(r.status(), 200, "{what}");
        assert_eq!(
            r.bytes().await.unwrap().len(),
            len,
            "{what}: every byte reaches the client"
        );
        let c = counts(&s, "bad");
        assert_eq!(c["requests"], i as u64 + 1, "{what}: {c}");
        assert_eq!(c["unaccounted"], i as u64 + 1, "{what}: {c}");
        assert_eq!(c["total_tokens"], 0, "{what}: {c}");
    }
    // A stream cut short: unaccounted too.
    s.upstream
        .fail_next(1, UpstreamFault::DropStream { after_events: 2 });
    let cut = openai_client(&s.base.replace("/v1", "/s/cut/v1"), "stream-usage", &[]).await;
    assert_eq!(cut["ok"], false, "{cut}");
    eventually(Duration::from_secs(10), "the cut stream is counted", || {
        counts(&s, "cut")["requests"] == 1
    })
    .await;
    assert_eq!(counts(&s, "cut")["unaccounted"], 1);
    s.finish().await;
}

#[tokio::test]
async fn the_usage_command_reads_the_daemon_then_the_ledger_and_exec_prints_the_summary() {
    let (s, ledger) = stack_with_ledger(&[]).await;
    let base = s.base.replace("/v1", "/s/job-7/v1");
    assert_eq!(openai_client(&base, "chat", &[]).await["ok"], true);
    let socket = s.h.path("stack/agent.sock").display().to_string();
    let ledger_s = ledger.display().to_string();
    let env = [
        ("BEHEST_AGENT__CONTROL__SOCKET", socket.as_str()),
        ("BEHEST_AGENT__USAGE__LEDGER_FILE", ledger_s.as_str()),
    ];
    let h = &s.h;
    let run = |args: &'static [&'static str]| {
        let mut c = h.agent(args, &env);
        async move { c.output().await.unwrap() }
    };
    let out = run(&["usage", "--json", "--session", "job-7"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(daemon["totals"]["requests"], 1, "{daemon}");
    assert_eq!(
        daemon["sessions"]["job-7"]["models"]["echo-1"]["requests"],
        1
    );
    let md = run(&["usage", "--format", "markdown"]).await;
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(md.contains("| job-7 | echo-1 | 1 |"), "{md}");

    s.accounting.flush().await;
    let tokens = daemon["totals"]["total_tokens"].clone();
    s.stop.cancel();
    // No daemon: the ledger says the same.
    eventually(
        Duration::from_secs(20),
        "the daemon's socket is gone",
        || !std::path::Path::new(&socket).exists(),
    )
    .await;
    let out = run(&["usage", "--json", "--session", "job-7"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_ledger: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        from_ledger["totals"]["total_tokens"], tokens,
        "{from_ledger}"
    );
    // A session the ledger never saw: nothing since now, an RFC 3339 time (it was "").
    let out = run(&["usage", "--json", "--session", "never-seen"]).await;
    let unseen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let since = unseen["since"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(since).is_ok(), "{unseen}");
    s.finish().await;
}

#[tokio::test]
async fn the_usage_command_prints_a_busy_daemons_counts_past_a_mebibyte() {
    let (s, _) = stack_with_ledger(&[]).await;
    let sessions = 3_000;
    for i in 0..sessions {
        let session = format!("{i:0>120}");
        s.accounting.admit(&session).unwrap();
        s.accounting.record(behest_agent::usage::Entry {
            session,
            profile: "default".into(),
            model: Some(format!("{i:m>120}")),
            path: "/v1/chat/completions".into(),
            status: 200,
            tokens: None,
            duration: Duration::from_millis(1),
            request_id: String::new(),
        });
    }
    let socket = s.h.path("stack/agent.sock").display().to_string();
    let mut c = s.h.agent(
        &["usage", "--json"],
        &[("BEHEST_AGENT__CONTROL__SOCKET", &socket)],
    );
    let out = c.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.len() > 1 << 20, "{} bytes", out.stdout.len());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["requests"], sessions);
    s.finish().await;
}

#[tokio::test]
async fn exec_prints_the_sessions_usage_and_appends_it_to_the_step_summary() {
    let s = stack_with(|_| {}, &[]).await;
    let summary = s.h.path("step-summary.md");
    let script = format!(
        "node {} \"$OPENAI_BASE_URL\" chat >/dev/null",
        crate::node::interop_dir()
            .join("openai-client.mjs")
            .display()
    );
    let summary_s = summary.display().to_string();
    // What the job wrote before, its last line not ended: the table still starts a heading.
    std::fs::write(&summary, "earlier text").unwrap();
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--session", "job-42", "--", "sh", "-c", &script],
            &[("GITHUB_STEP_SUMMARY", summary_s.as_str())],
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("session job-42: 1 requests"), "{stderr}");
    let table = std::fs::read_to_string(&summary).unwrap();
    assert!(table.contains("| job-42 | echo-1 | 1 |"), "{table}");
    assert!(table.contains("\n### Behest usage\n"), "{table}");

    // No --session: the CI job's, in the URL and in the summary.
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "sh", "-c", &script],
            &[("CI_JOB_ID", "77")],
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("session gl-77: 1 requests"), "{stderr}");

    // No session at all: the line says whose requests it counts.
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "sh", "-c", &script],
            &[],
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("requests without a session (every client's")
            && !stderr.contains("session -:"),
        "{stderr}"
    );

    let quiet =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--no-summary", "--session", "job-43", "--", "true"],
            &[],
        )
        .output()
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("session job-43"));
    s.finish().await;
}

#[tokio::test]
async fn the_responses_api_is_counted_from_json_and_from_its_completed_event() {
    let s = stack_with(|_| {}, &[]).await;
    let base = s.base.replace("/v1", "/s/resp/v1");
    let json = openai_client(&base, "responses", &[]).await;
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["text"], "hello");
    let streamed = openai_client(&base, "responses-stream", &[]).await;
    assert_eq!(streamed["ok"], true, "{streamed}");
    assert_eq!(streamed["text"], "hello world");
    assert_eq!(
        streamed["types"].as_array().unwrap().last().unwrap(),
        "response.completed"
    );
    let c = counts(&s, "resp");
    assert_eq!(c["requests"], 2, "{c}");
    assert_eq!(c["unaccounted"], 0, "{c}");
    let input = json["response"]["usage"]["input_tokens"].as_u64().unwrap()
        + streamed["usage"]["input_tokens"].as_u64().unwrap();
    let output = json["response"]["usage"]["output_tokens"].as_u64().unwrap()
        + streamed["usage"]["output_tokens"].as_u64().unwrap();
    assert_eq!(c["prompt_tokens"].as_u64(), Some(input), "{c}");
    assert_eq!(c["completion_tokens"].as_u64(), Some(output), "{c}");
    s.finish().await;
}
