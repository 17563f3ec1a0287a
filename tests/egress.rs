//! Egress through a company's HTTP proxy (SPEC §11), against a real forward proxy the tests start
//! on loopback (Debian's `tinyproxy`): the IdP and an `http` upstream reached with absolute-form
//! requests, an `https` upstream through a `CONNECT` tunnel, the proxy's password from a file and
//! never shown, `no_proxy`, and the environment's proxies read as curl reads them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use behest_agent::config::{self, LoadOptions};
use http_body_util::BodyExt;
use secrecy::SecretString;

use crate::rig::Rig;
use crate::util::{debian_binary, eventually};

/// A `tinyproxy` on a free loopback port, its log kept to look at, killed when dropped.
struct Tinyproxy {
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Tinyproxy {
    async fn start(auth: Option<(&str, &str)>) -> Tinyproxy {
        Self::start_with(auth, "").await
    }

    /// [`Tinyproxy::start`] with more lines of configuration.
    async fn start_with(auth: Option<(&str, &str)>, more: &str) -> Tinyproxy {
        let binary = debian_binary("tinyproxy", "tinyproxy");
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut conf = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nLogLevel Info\nMaxClients 64\n"
            );
            if let Some((user, pass)) = auth {
                conf.push_str(&format!("BasicAuth {user} {pass}\n"));
            }
            conf.push_str(more);
            // A log file of its own: what it writes to stderr is buffered until it exits.
            let log = dir.path().join("tinyproxy.log");
            conf.push_str(&format!("LogFile \"{}\"\n", log.display()));
            let conf_path = dir.path().join("tinyproxy.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let child = tokio::process::Command::new(&binary)
                .arg("-d")
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("tinyproxy starts");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Tinyproxy {
                        port,
                        log,
                        _dir: dir,
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("tinyproxy did not listen on a free port in 5 tries");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn egress(url: &str, no_proxy: &str) -> behest_agent::egress::Egress {
    behest_agent::egress::Egress {
        http: Some(SecretString::from(url.to_string())),
        https: Some(SecretString::from(url.to_string())),
        no_proxy: no_proxy.into(),
        source: "egress.proxy".into(),
    }
}

#[tokio::test]
async fn the_idp_and_an_https_upstream_are_reached_through_the_proxy() {
    let tp = Tinyproxy::start(None).await;
    let via = egress(&tp.url(), "");
    let rig = Rig::builder()
        .tls(&[b"h2", b"http/1.1"])
        .proxy(move |p| p.egress = via)
        .start()
        .await;
    let resp = rig.get("/v1/models").await;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        tp.log()
    );
    let idp_port = rig
        .h
        .idp
        .base_url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let log = tp.log();
    assert!(
        log.contains(&format!("POST http://127.0.0.1:{idp_port}/oauth/token")),
        "the grant went through the proxy in absolute form:\n{log}"
    );
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", rig.up_addr().port())),
        "the https upstream through a CONNECT tunnel:\n{log}"
    );
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_is_named_in_the_502() {
    // CONNECT only to port 1: the tunnel to the upstream is refused (403); the IdP's http
    // requests still pass.
    let tp = Tinyproxy::start_with(None, "ConnectPort 1\n").await;
    let via = egress(&tp.url(), "");
    let rig = Rig::builder()
        .tls(&[b"http/1.1"])
        .proxy(move |p| p.egress = via)
        .start()
        .await;
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 502);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(&format!("through the egress proxy {}", tp.url()))
            && body.contains("error status"),
        "{body}"
    );
}

#[tokio::test]
async fn an_http_upstream_gets_absolute_form_requests_with_the_proxys_password_from_a_file() {
    let tp = Tinyproxy::start(Some(("alice", "s3cret-proxy-pw"))).await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("proxy-password");
    std::fs::write(&pw, "s3cret-proxy-pw\n").unwrap();
    crate::util::set_mode(&pw, 0o600);
    let proxy_url = format!("http://alice@127.0.0.1:{}", tp.port);
    let pw_s = pw.display().to_string();
    let env = [
        ("BEHEST_AGENT__EGRESS__PROXY", proxy_url.as_str()),
        ("BEHEST_AGENT__EGRESS__PROXY_PASSWORD_FILE", pw_s.as_str()),
        // The test's upstream is on loopback, which is otherwise reached directly.
        ("BEHEST_AGENT__EGRESS__NO_PROXY", "none.invalid"),
    ];
    let s = crate::proxy::stack_with(|_| {}, &env).await;
    s.h.remember("s3cret-proxy-pw");
    let chat = crate::node::openai_client(&s.base, "chat", &[]).await;
    assert_eq!(chat["ok"], true, "{chat}");
    let up_port = s
        .upstream
        .base_url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let log = tp.log();
    assert!(
        log.contains(&format!(
            "POST http://127.0.0.1:{up_port}/v1/chat/completions"
        )),
        "absolute form to the proxy:\n{log}"
    );
    // `status` names the proxy, never its password.
    let socket = s.h.path("stack/agent.sock").display().to_string();
    let mut env = env.to_vec();
    env.push(("BEHEST_AGENT__CONTROL__SOCKET", socket.as_str()));
    let out =
        s.h.agent(&["status", "--json"], &env)
            .output()
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "through http://127.0.0.1:{} (egress.proxy)",
            tp.port
        )),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("s3cret-proxy-pw"), "{stdout}");
    s.finish().await;
}

#[tokio::test]
async fn a_wrong_proxy_password_is_a_clear_grant_error() {
    let tp = Tinyproxy::start(Some(("alice", "right"))).await;
    let via = egress(&format!("http://alice:wrong-pw@127.0.0.1:{}", tp.port), "");
    let rig = Rig::builder().proxy(move |p| p.egress = via).start().await;
    let err = rig
        .tokens
        .get(Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    // tinyproxy answers 407 and closes on the unread form: the client sees the connection reset.
    assert!(
        err.contains("cannot reach the IdP")
            && err.contains("[egress]")
            && err.contains("password"),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
    assert_eq!(rig.h.idp.token_requests(), 0, "nothing reached the IdP");
}

/// A proxy that answers every request with `status`: for each connection, reads a head and
/// answers, closing after.
async fn answering_proxy(status: &'static str) -> String {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if crate::util::read_head(&mut s).await.is_some() {
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            });
        }
    });
    url
}

/// A proxy's refusal says what to check about the proxy: a 407 to an `http` IdP's request is not
/// the IdP's answer, and a `CONNECT` refused (which reqwest words as "unsuccessful") gets a hint.
#[tokio::test]
async fn a_proxys_refusal_says_to_check_the_proxy() {
    let proxy = answering_proxy("407 Proxy Authentication Required").await;
    let via = egress(&proxy, "");
    let rig = Rig::builder().proxy(move |p| p.egress = via).start().await;
    let err = rig
        .tokens
        .get(Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 407") && err.contains("egress.proxy_password_file"),
        "{err}"
    );
    assert!(!err.contains("names the IdP itself"), "{err}");

    let proxy = answering_proxy("403 Forbidden").await;
    let http = behest_agent::auth::http::client(Duration::from_secs(10), None, &egress(&proxy, ""))
        .unwrap();
    let err = http.get("https://idp.example/").send().await.unwrap_err();
    let message = behest_agent::auth::http::describe_reqwest(&err);
    assert!(
        message.contains("answered the CONNECT with an error status"),
        "{message}"
    );
}

#[tokio::test]
async fn no_proxy_destinations_are_reached_directly() {
    let tp = Tinyproxy::start(None).await;
    let via = egress(&tp.url(), "localhost, 127.0.0.0/8");
    let rig = Rig::builder().proxy(move |p| p.egress = via).start().await;
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the upstream saw the request",
        || rig.up.request_count() == 1,
    )
    .await;
    assert!(
        !tp.log().contains("Request"),
        "nothing through the proxy:\n{}",
        tp.log()
    );
}

fn load(env: &[(&str, &str)], toml: &str) -> Result<config::Settings, config::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!("[auth]\ndomain = \"t.eu.auth0.com\"\nclient_id = \"c\"\naudience = \"https://a\"\n{toml}"),
    )
    .unwrap();
    let mut env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("AUTH0_CLIENT_SECRET".into(), "s".into());
    config::load(&LoadOptions {
        path: Some(path),
        default_path: None,
        env,
        overrides: vec![],
    })
}

#[test]
fn the_environments_proxies_are_read_as_curl_reads_them() {
    let dst = |s: &config::Settings, url: &str| {
        s.proxy
            .egress
            .intercept(&url.parse().unwrap())
            .map(|i| i.uri().to_string())
    };
    let s = load(&[("HTTPS_PROXY", "proxy.corp:3128")], "").unwrap();
    assert_eq!(
        dst(&s, "https://t.eu.auth0.com/").as_deref(),
        Some("http://proxy.corp:3128/")
    );
    assert_eq!(
        dst(&s, "http://gw.example/"),
        None,
        "HTTPS_PROXY is for https only"
    );
    assert_eq!(
        dst(&s, "https://127.0.0.1:8443/"),
        None,
        "loopback direct without NO_PROXY"
    );
    assert!(s.proxy.egress.describe().unwrap().contains("(HTTPS_PROXY)"));

    // curl ignores an uppercase HTTP_PROXY; http_proxy counts.
    let s = load(&[("HTTP_PROXY", "http://p:1")], "").unwrap();
    assert!(s.proxy.egress.is_direct());
    let s = load(
        &[("http_proxy", "http://p:1"), ("NO_PROXY", "gw.example")],
        "",
    )
    .unwrap();
    assert_eq!(dst(&s, "http://api.gw.example/"), None);
    assert_eq!(
        dst(&s, "http://other.example/").as_deref(),
        Some("http://p:1/")
    );
    assert_eq!(
        dst(&s, "http://127.0.0.1/").as_deref(),
        Some("http://p:1/"),
        "NO_PROXY given: as it says"
    );
    // `*` is every host to curl, IP addresses too: no proxy at all.
    let s = load(&[("https_proxy", "http://p:1"), ("NO_PROXY", "*")], "").unwrap();
    assert!(s.proxy.egress.is_direct());
    assert_eq!(dst(&s, "https://10.1.2.3/"), None);
    let s = load(&[], "[egress]\nproxy = \"http://p:1\"\nno_proxy = \"*\"\n").unwrap();
    assert_eq!(dst(&s, "https://192.0.2.7/"), None);

    // [egress] wins over the environment.
    let s = load(
        &[("HTTPS_PROXY", "http://env:1")],
        "[egress]\nproxy = \"http://conf:2\"\n",
    )
    .unwrap();
    assert_eq!(
        dst(&s, "https://x.example/").as_deref(),
        Some("http://conf:2/")
    );
    // Loopback is direct there too unless egress.no_proxy says otherwise: an http IdP on it
    // would hand the proxy the client secret.
    assert_eq!(dst(&s, "http://127.0.0.1:8080/"), None);
    assert_eq!(dst(&s, "https://localhost/"), None);
}

#[test]
fn bad_egress_settings_are_refused_with_the_fix() {
    let err = |env: &[(&str, &str)], toml: &str| load(env, toml).unwrap_err().to_string();
    let e = err(&[], "[egress]\nproxy = \"http://alice:pw@p:3128\"\n");
    assert!(
        e.contains("egress.proxy") && e.contains("proxy_password_file") && !e.contains("pw@"),
        "{e}"
    );
    let e = err(&[], "[egress]\nproxy = \"socks5://p:1080\"\n");
    assert!(e.contains("only an http:// proxy"), "{e}");
    let e = err(&[("HTTPS_PROXY", "https://p:443")], "");
    assert!(
        e.contains("HTTPS_PROXY") && e.contains("only an http:// proxy"),
        "{e}"
    );
    let e = err(
        &[],
        "[egress]\nproxy = \"http://p:3128\"\nproxy_password_file = \"/nonexistent\"\n",
    );
    assert!(e.contains("user name"), "{e}");
    let e = err(&[], "[egress]\nproxy_password_file = \"/x\"\n");
    assert!(e.contains("egress.proxy is not"), "{e}");
}

/// A proxy that cannot be reached is named in the grant's error: the IdP was never tried.
#[tokio::test]
async fn a_proxy_that_cannot_be_reached_is_named_in_the_grant_error() {
    // A port nothing listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let via = egress(&format!("http://u:gone-pw@127.0.0.1:{port}"), "");
    let rig = Rig::builder().proxy(move |p| p.egress = via).start().await;
    let err = rig
        .tokens
        .get(Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("through the egress proxy http://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("gone-pw"), "{err}");
}

/// A proxy whose error page repeats the `Proxy-Authorization` it was sent never gets the password
/// repeated: not in the grant's error nor `status` (the IdP's error text was cleaned of the client
/// secret only).
#[tokio::test]
async fn a_proxy_echoing_its_credentials_never_gets_them_repeated() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Some(head) = crate::util::read_head(&mut tcp).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head);
                let creds = head
                    .lines()
                    .find_map(|l| l.strip_prefix("proxy-authorization: "))
                    .unwrap_or("none");
                let body = format!("proxy says: your credentials {creds} are not welcome");
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    let password = "EGRESS~pw+5150";
    let encoded: String = url::form_urlencoded::byte_serialize(password.as_bytes()).collect();
    let via = egress(&format!("http://bob:{encoded}@127.0.0.1:{port}"), "");
    let rig = Rig::builder().proxy(move |p| p.egress = via).start().await;
    let err = rig
        .tokens
        .get(Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy says"),
        "the proxy's page is quoted: {err}"
    );
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bob:{password}"));
    let status = serde_json::to_string(&rig.tokens.status()).unwrap();
    for text in [err, status] {
        assert!(
            !text.contains(password) && !text.contains(&basic) && !text.contains("5150"),
            "{text}"
        );
    }
}
