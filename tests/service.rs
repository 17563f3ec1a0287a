//! Running as a service: sd_notify (READY after the token and the listeners, STATUS, WATCHDOG,
//! RELOADING, STOPPING) over a fake NOTIFY_SOCKET, SIGHUP reloads good and broken, Prometheus
//! metrics, and the secret-leak check over the daemon's logs in every log format.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;

use behest_agent::app::App;
use behest_agent::clock;
use devkit::idp::Fault;
use devkit::upstream::{Upstream, UpstreamFault, UpstreamOptions};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use crate::util::{
    AUDIENCE, Harness, Start, assert_no_secret_in, eventually, exits_cleanly, output, signal,
};

fn daemon(h: &Harness, upstream: &Upstream, extra: &[(&str, &str)]) -> Command {
    let mut c = h.agent_with_upstream(&upstream.base_url(), &["run"], extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

async fn stop(child: Child) -> String {
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    stop_wait(child).await
}

/// Receives notify datagrams until one satisfies `pred`.
async fn expect_notify(sock: &UnixDatagram, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no sd_notify message: {what}"))
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if pred(&msg) {
            return msg;
        }
    }
}

async fn http_get(url: &str) -> (u16, String) {
    behest_agent::tls::install_default_provider();
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn sd_notify_ready_after_token_and_listeners_then_status_watchdog_reloading_stopping() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let notify_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let proxy_sock = h.path("proxy.sock");
    let listen = format!("unix:{}", proxy_sock.display());
    let child = daemon(
        &h,
        &upstream,
        &[("BEHEST_AGENT__PROXY__LISTEN", listen.as_str())],
    )
    .env("NOTIFY_SOCKET", &notify_path)
    .env("WATCHDOG_USEC", "200000")
    .spawn()
    .unwrap();
    let ready = expect_notify(&sock, "READY=1", |m| m.contains("READY=1")).await;
    // At READY the token is held and the proxy's socket accepts connections.
    assert!(h.idp.grants() >= 1, "READY before the token");
    assert!(
        std::os::unix::net::UnixStream::connect(&proxy_sock).is_ok(),
        "READY before the listener"
    );
    assert!(ready.contains("STATUS=token valid for"), "{ready}");
    expect_notify(&sock, "WATCHDOG=1", |m| m.contains("WATCHDOG=1")).await;

    // The IdP goes down and a refresh fails: STATUS says so.
    h.idp.set_fault(Some(Fault::Status(503)));
    let refresh = h.agent(&["refresh"], &[]).output().await.unwrap();
    assert_eq!(refresh.status.code(), Some(1));
    let status = expect_notify(&sock, "STATUS about the IdP", |m| {
        m.contains("STATUS=") && m.contains("IdP failing")
    })
    .await;
    assert!(status.contains("cached token valid for"), "{status}");
    h.idp.set_fault(None);

    signal(&child, nix::sys::signal::Signal::SIGHUP);
    expect_notify(&sock, "RELOADING=1", |m| m.contains("RELOADING=1")).await;
    expect_notify(&sock, "READY=1 after reload", |m| m.contains("READY=1")).await;

    signal(&child, nix::sys::signal::Signal::SIGTERM);
    expect_notify(&sock, "STOPPING=1", |m| m.contains("STOPPING=1")).await;
    let err = stop_wait(child).await;
    assert_no_secret_in(&err, std::slice::from_ref(&h.secret), "the daemon's log");
}

#[tokio::test]
async fn a_sighup_before_the_first_token_sends_no_ready() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::Status(503)));
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let notify_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let no_cache = [("BEHEST_AGENT__TOKEN__CACHE_FILE", "")];
    let mut child = daemon(&h, &upstream, &no_cache)
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    expect_notify(&sock, "the failing IdP", |m| m.contains("no valid token")).await;
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(30), "the reload", || {
        log.lock().unwrap().contains("configuration reloaded")
    })
    .await;
    h.idp.set_fault(None);
    let ready = expect_notify(&sock, "READY=1", |m| {
        assert!(!m.contains("RELOADING=1"), "a reload while starting: {m}");
        m.contains("READY=1")
    })
    .await;
    assert!(h.idp.grants() >= 1, "READY=1 before the token: {ready}");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn a_reload_refused_for_an_address_in_use_says_so_in_status() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let notify_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let cfg = write_config(&h, &upstream.base_url(), "");
    let mut cmd = daemon(&h, &upstream, &[]);
    cmd.env_remove("BEHEST_AGENT__PROXY__LISTEN")
        .env("BEHEST_AGENT_CONFIG", &cfg)
        .env("NOTIFY_SOCKET", &notify_path);
    let mut child = cmd.spawn().unwrap();
    expect_notify(&sock, "READY=1", |m| m.contains("READY=1")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nupstream = \"{}\"\nallow_insecure_upstream = true\nlisten = \"{busy}\"\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let done = expect_notify(&sock, "READY=1 after the reload", |m| m.contains("READY=1")).await;
    assert!(done.contains("STATUS=reload refused"), "{done}");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

async fn stop_wait(mut child: Child) -> String {
    exits_cleanly(&mut child).await;
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    err
}

/// Writes a config file the daemon reads (and re-reads on SIGHUP).
fn write_config(h: &Harness, upstream: &str, extra: &str) -> std::path::PathBuf {
    let p = h.path("config.toml");
    std::fs::write(
        &p,
        format!(
            "[proxy]\nupstream = \"{upstream}\"\nallow_insecure_upstream = true\nlisten = \"unix:{}\"\n{extra}",
            h.path("proxy.sock").display()
        ),
    )
    .unwrap();
    p
}

/// A connection to the daemon's proxy on its Unix socket, open until dropped.
async fn proxy_connection(h: &Harness) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::UnixStream::connect(h.path("proxy.sock"))
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// GET through the daemon's proxy on its Unix socket.
async fn via_proxy(h: &Harness, path: &str) -> u16 {
    let mut send = proxy_connection(h).await;
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_the_old_one_when_the_new_is_broken() {
    let h = Harness::start().await;
    let (up1, _g1) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let (up2, _g2) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let cfg = write_config(&h, &up1.base_url(), "");
    let mut cmd = daemon(&h, &up1, &[]);
    cmd.env_remove("BEHEST_AGENT__PROXY__UPSTREAM")
        .env_remove("BEHEST_AGENT__PROXY__LISTEN")
        .env("BEHEST_AGENT_CONFIG", &cfg);
    let mut child = cmd.spawn().unwrap();
    let log = collect(child.stderr.take().unwrap());
    let sock = h.path("proxy.sock");
    eventually(Duration::from_secs(30), "the proxy socket", || {
        sock.exists()
    })
    .await;
    assert_eq!(via_proxy(&h, "/v1/models").await, 200);
    assert_eq!(up1.request_count(), 1);

    // A good new config: the upstream changes, the identity does not (no new grant).
    write_config(&h, &up2.base_url(), "");
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let mut n = 0;
    while up2.request_count() == 0 {
        assert!(n < 500, "the new upstream was never used");
        let _ = via_proxy(&h, "/v1/models").await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        h.idp.grants(),
        1,
        "an unchanged identity makes no new grant"
    );
    let up2_before = up2.request_count();

    // `status` counts the connections of the proxy that serves, also after the swap.
    let held = proxy_connection(&h).await;
    let cfg_env = [("BEHEST_AGENT_CONFIG", cfg.to_str().unwrap())];
    let o = output(h.agent(&["status", "--json"], &cfg_env)).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        v["proxy"]["connections"], 1,
        "the connection held open: {}",
        v["proxy"]
    );
    drop(held);

    // A broken config: logged, and the old one keeps serving.
    std::fs::write(&cfg, "[proxy\nupstream = ").unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    eventually(
        Duration::from_secs(30),
        "the refused reload is logged",
        || log.lock().unwrap().contains("reload refused"),
    )
    .await;
    assert_eq!(
        via_proxy(&h, "/v1/models").await,
        200,
        "still serving after a broken reload"
    );
    assert_eq!(
        up2.request_count(),
        up2_before + 1,
        "on the last good configuration"
    );
    // `status` says so, until a reload succeeds (asked without the broken file, which `status`
    // would refuse to read).
    let refused = |o: &crate::util::Out| {
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        v["daemon"]["reload_refused"]["error"]
            .as_str()
            .map(str::to_string)
    };
    let o = output(h.agent(&["status", "--json"], &[])).await;
    let error = refused(&o).expect("the refused reload in status");
    assert!(error.contains(cfg.to_str().unwrap()), "{error}");
    let o = output(h.agent(&["status"], &[])).await;
    assert!(
        o.stdout.contains("reload:       refused at"),
        "{}",
        o.stdout
    );

    // A changed identity forces a new grant.
    write_config(&h, &up2.base_url(), "[auth]\nscope = \"read:models\"\n");
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    eventually(
        Duration::from_secs(30),
        "a grant for the new identity",
        || h.idp.grants() == 2,
    )
    .await;
    assert_eq!(
        h.idp.last_grant().unwrap().scope.as_deref(),
        Some("read:models")
    );
    let o = output(h.agent(&["status", "--json"], &cfg_env)).await;
    assert_eq!(refused(&o), None, "{}", o.stdout);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
    let text = log.lock().unwrap().clone();
    assert!(text.contains("configuration reloaded"), "{text}");
}

/// Collects a child's stderr as it is written.
fn collect(stderr: tokio::process::ChildStderr) -> std::sync::Arc<std::sync::Mutex<String>> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let out = buf.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut b = out.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let up = upstream.base_url();
    let settings = h.settings(&[
        ("BEHEST_AGENT__PROXY__UPSTREAM", up.as_str()),
        ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
        ("BEHEST_AGENT__TELEMETRY__METRICS_LISTEN", "127.0.0.1:0"),
    ]);
    let app = App::build(settings, clock::system()).await.unwrap();
    let metrics = format!("http://{}", app.metrics_address().unwrap());
    let behest_agent::config::ListenAddr::Tcp(proxy) = app.proxy_addresses()[0] else {
        unreachable!()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run(stop.clone()));

    assert_eq!(http_get(&format!("{metrics}/healthz")).await.0, 200);
    // Reading is all the listener is for: any other method is 405 (`DELETE /metrics` was a 200).
    for method in [http::Method::POST, http::Method::DELETE, http::Method::PUT] {
        let resp = crate::ci::http()
            .request(method.clone(), format!("{metrics}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(resp.headers()["allow"], "GET, HEAD");
    }
    for _ in 0..3 {
        assert_eq!(http_get(&format!("http://{proxy}/v1/models")).await.0, 200);
    }
    upstream.fail_next(1, UpstreamFault::Unauthorized);
    assert_eq!(http_get(&format!("http://{proxy}/v1/models")).await.0, 200);
    assert_eq!(http_get(&format!("{metrics}/readyz")).await.0, 200);
    let (code, text) = http_get(&format!("{metrics}/metrics")).await;
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text);
    let get = |name: &str| samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    assert_eq!(
        get("behest_agent_grants_total{profile=\"default\",result=\"ok\",code=\"\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        get("behest_agent_proxy_requests_total{code=\"2xx\"}"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(get("behest_agent_replays_total"), Some(1.0), "{text}");
    assert_eq!(
        get("behest_agent_proxy_request_duration_seconds_count"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(get("behest_agent_in_flight_requests"), Some(0.0), "{text}");
    assert_eq!(
        get("behest_agent_token_ready{profile=\"default\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        get("behest_agent_token_expiry_timestamp_seconds{profile=\"default\"}").unwrap() > 1.7e9
    );
    assert!(get("behest_agent_token_seconds_until_expiry{profile=\"default\"}").unwrap() > 0.0);
    assert!(!text.contains(&h.secret));

    h.idp.set_fault(Some(Fault::Oauth {
        status: 401,
        error: "invalid_client".into(),
        description: "revoked".into(),
    }));
    let (code, _) = http_get(&format!("http://{proxy}/v1/models")).await;
    assert_eq!(code, 200, "the cached token is still served");
    stop.cancel();
    task.await.unwrap();
}

/// Each sample line `name{labels} value`, checked against the text format.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(name.starts_with("behest_agent_"), "{line}");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        out.push((name.to_string(), v));
    }
    out
}

#[tokio::test]
async fn no_secret_reaches_the_logs_in_any_format_through_grants_proxying_and_failures() {
    for (format, journal) in [("json", false), ("text", false), ("auto", true)] {
        let h = Harness::start().await;
        let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
            .await
            .unwrap();
        let mut cmd = daemon(
            &h,
            &upstream,
            &[
                ("BEHEST_AGENT__PROXY__LISTEN", "unix:/dev/null/x"),
                ("BEHEST_AGENT__TELEMETRY__LOG_FORMAT", format),
                ("BEHEST_AGENT__TELEMETRY__LOG_LEVEL", "trace"),
            ],
        );
        let listen = format!("unix:{}", h.path("proxy.sock").display());
        cmd.env("BEHEST_AGENT__PROXY__LISTEN", &listen);
        if journal {
            cmd.env("JOURNAL_STREAM", "8:12345");
        }
        let child = cmd.spawn().unwrap();
        let sock = h.path("proxy.sock");
        eventually(Duration::from_secs(30), "the proxy socket", || {
            sock.exists()
        })
        .await;
        assert_eq!(via_proxy(&h, "/v1/models").await, 200);
        upstream.fail_next(1, UpstreamFault::Unauthorized);
        assert_eq!(via_proxy(&h, "/v1/models?x=1").await, 200);
        // A failing grant (wrong secret) logs its error.
        std::fs::write(h.path("client-secret"), "wrong-secret-value-123\n").unwrap();
        let refresh = h.agent(&["refresh"], &[]).output().await.unwrap();
        assert_eq!(refresh.status.code(), Some(1));
        let token = h.agent(&["token"], &[]).output().await.unwrap();
        let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
        assert!(token.split('.').count() == 3, "a token is still served");
        let err = stop(child).await;
        assert!(
            err.contains("token grant failed") || err.contains("configuration error"),
            "{format}: {err}"
        );
        let mut secrets = vec![
            h.secret.clone(),
            token.clone(),
            "wrong-secret-value-123".to_string(),
        ];
        // The signature part alone must not appear either.
        secrets.push(token.rsplit('.').next().unwrap().to_string());
        assert_no_secret_in(&err, &secrets, &format!("the {format} log"));
        if format == "json" {
            for line in err.lines().filter(|l| !l.trim().is_empty()) {
                serde_json::from_str::<Value>(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            }
        }
        if journal {
            assert!(
                !err.lines().any(|l| l.starts_with("20")),
                "no timestamps under journald: {err}"
            );
        }
    }
}

#[tokio::test]
async fn socket_activation_serves_the_socket_systemd_passes_instead_of_proxy_listen() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    // systemd-socket-activate binds the port and passes it as fd 3 (LISTEN_FDS=1, LISTEN_PID).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unused = h.path("unused.sock");
    let listen = format!("unix:{}", unused.display());
    let up = upstream.base_url();
    let mut env = h.env(&[
        ("BEHEST_AGENT__PROXY__UPSTREAM", up.as_str()),
        ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ("BEHEST_AGENT__PROXY__LISTEN", listen.as_str()),
    ]);
    env.insert("HOME".into(), h.dir.path().display().to_string());
    // A config file, to change on reload.
    let config = h.path("activated.toml");
    std::fs::write(&config, "[proxy]\nshutdown_grace = \"30s\"\n").unwrap();
    env.insert("BEHEST_AGENT_CONFIG".into(), config.display().to_string());
    let log = h.path("activated.log");
    let mut c = Command::new("systemd-socket-activate");
    c.arg("-l").arg(format!("127.0.0.1:{port}"));
    for (k, v) in &env {
        c.arg(format!("--setenv={k}={v}"));
    }
    c.arg(env!("CARGO_BIN_EXE_behest-agent"))
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    let mut child = c
        .spawn()
        .expect("systemd-socket-activate (from the systemd package) runs");
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let mut status = 0;
    for _ in 0..300 {
        behest_agent::tls::install_default_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        if let Ok(r) = client.get(&url).send().await {
            status = r.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "served on the passed socket");
    assert_eq!(upstream.request_count(), 1);
    assert!(!unused.exists(), "proxy.listen was not bound");

    // A reload that starts new accept loops keeps serving the passed socket (it bound
    // proxy.listen instead, and the passed socket was closed).
    std::fs::write(&config, "[proxy]\nshutdown_grace = \"29s\"\n").unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(20), "the reload", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("configuration reloaded"))
    })
    .await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = client
        .get(&url)
        .send()
        .await
        .expect("the passed socket still serves");
    assert_eq!(r.status(), 200);
    assert!(
        !unused.exists(),
        "proxy.listen was not bound on reload either"
    );
    let _ = child.kill().await;
}

/// Names of the daemon's threads (`/proc/PID/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_daemon_returns_freed_memory_from_a_background_thread() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let mut child = daemon(&h, &upstream, &[]).spawn().unwrap();
    let pid = child.id().unwrap();
    let log = collect(child.stderr.take().unwrap());
    // jemalloc's purging thread, which gives memory freed after a burst back to the system
    // while the daemon sits idle (glibc's malloc would keep it resident).
    eventually(
        Duration::from_secs(20),
        "jemalloc's background thread",
        || thread_names(pid).iter().any(|n| n == "jemalloc_bg_thd"),
    )
    .await;
    // Stopped once it runs (its signal handlers are in place by then).
    eventually(Duration::from_secs(20), "the daemon running", || {
        log.lock().unwrap().contains("behest-agent running")
    })
    .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}
