//! Local trust: whom the CLI believes on the control socket, and what the daemon does to the files
//! at its socket paths. Over real sockets and processes: a second local user (created with
//! `useradd` when the tests run as root; those tests say they were skipped otherwise) plants
//! sockets and races for them, daemons replace and drain, a stopped daemon never answers.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use behest_agent::config::{self, LoadOptions};
use behest_agent::control::{self, ControlState, Identity};
use devkit::upstream::{Upstream, UpstreamFault, UpstreamOptions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::util::{AUDIENCE, Harness, Start, eventually, exits_cleanly, output, random, signal};

/// A local user for the tests that need another one.
#[derive(Debug, Clone)]
struct LocalUser {
    uid: u32,
    gid: u32,
}

/// The user `name`, created (with its own group) when missing. Only root can: otherwise `None`,
/// and the test prints that it was skipped.
fn local_user(name: &str, test: &str) -> Option<LocalUser> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED {test}: it needs a second local user `{name}`, which only root can create (run the tests as root)"
        );
        return None;
    }
    static USERADD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    let lookup = || nix::unistd::User::from_name(name).unwrap();
    // /etc/passwd may be locked by another process's useradd for a moment.
    for _ in 0..100 {
        if lookup().is_some() {
            break;
        }
        let _ = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("useradd runs");
        if lookup().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let u = lookup().unwrap_or_else(|| panic!("useradd could not create `{name}`"));
    Some(LocalUser {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// A directory owned by `user` with `mode`.
fn dir_of(user: &LocalUser, mode: u32) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(d.path(), Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

/// The real binary with only `PATH` of the test's environment, then `env`; as `user` when given.
fn agent_as(user: Option<&LocalUser>, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid);
    }
    c
}

/// The CLI environment of the harness's identity with the secret in a variable (another user
/// cannot read the harness's files), its cache in `home`, and the control socket `socket`.
fn identity_env(h: &Harness, home: &Path, socket: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", home.display().to_string()),
        ("BEHEST_AGENT__AUTH__DOMAIN", h.idp.base_url()),
        ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("BEHEST_AGENT__AUTH__CLIENT_ID", h.client_id.clone()),
        ("BEHEST_AGENT_CLIENT_SECRET", h.secret.clone()),
        (
            "BEHEST_AGENT__TOKEN__CACHE_FILE",
            home.join("token.json").display().to_string(),
        ),
        (
            "BEHEST_AGENT__CONTROL__SOCKET",
            socket.display().to_string(),
        ),
    ]
}

/// Starts the impostor (tests/fixtures/impostor.mjs) as `user` on `socket`, answering `/v1/status`
/// with `listen` as its proxy address, the harness's identity, and `/v1/token` with `token`.
async fn impostor(
    user: &LocalUser,
    h: &Harness,
    socket: &Path,
    listen: &str,
    token: &str,
) -> Child {
    let identity = Identity::of(&h.settings(&[]).auth);
    let status = json!({
        "token": {"state": "valid", "ready": true, "expires_in": 3600,
                  "claims": {"uid": h.client_id}, "client_id": h.client_id},
        "daemon": {"pid": 4242, "version": env!("CARGO_PKG_VERSION"), "config": null,
                   "listen": [listen], "identity": identity},
    });
    let answers = json!({
        "/v1/status": status,
        "/v1/refresh": status,
        "/v1/token": {"access_token": token, "token_type": "Bearer",
                      "expires_at": "2099-01-01T00:00:00Z", "expires_in": 3600,
                      "claims": {"uid": h.client_id}},
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/impostor.mjs");
    let mut c = Command::new("node");
    c.arg(script)
        .arg(socket)
        .arg(answers.to_string())
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().expect("node runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the impostor starts within 30 s")
        .unwrap();
    assert_eq!(line.as_deref(), Some("listening"));
    child
}

#[tokio::test]
async fn a_socket_another_user_serves_is_refused_by_every_command() {
    let test = "a_socket_another_user_serves_is_refused_by_every_command";
    let (Some(victim), Some(intruder)) = (
        local_user("bhst-victim", test),
        local_user("bhst-intruder", test),
    ) else {
        return;
    };
    let h = Harness::start().await;
    let home = dir_of(&victim, 0o700);
    // A directory the intruder may write and the victim may enter: the socket the victim's
    // configuration names is the intruder's.
    let shared = dir_of(&intruder, 0o755);
    let socket = shared.path().join("agent.sock");
    let marker = home.path().join("ran");
    let stolen = format!("impostor-token-{}", random(16));
    let listen = format!("127.0.0.1:1'; touch {}; '", marker.display());
    let _impostor = impostor(&intruder, &h, &socket, &listen, &stolen).await;
    let env = identity_env(&h, home.path(), &socket);

    for args in [
        &["token"][..],
        &["status", "--json"],
        &["refresh"],
        &["env"],
        &["exec", "--", "true"],
        // Time does not change who serves the socket: `wait` says so at once, not in an hour.
        &["wait", "--timeout", "1h"],
    ] {
        let o = output(agent_as(Some(&victim), &env, args)).await;
        assert_eq!(o.code, 1, "{args:?}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.is_empty(), "{args:?}: {}", o.stdout);
        assert!(
            o.stderr.contains("user `bhst-intruder`")
                && o.stderr
                    .contains("not by this user, root or the service's user"),
            "{args:?}: {}",
            o.stderr
        );
    }
    let o = output(agent_as(Some(&victim), &env, &["doctor"])).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(
        o.stdout.contains("✗ daemon: ") && o.stdout.contains("user `bhst-intruder`"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("the running daemon's"), "{}", o.stdout);

    // README's GitLab recipe, in the victim's shell.
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "eval \"$({} env)\"",
            env!("CARGO_BIN_EXE_behest-agent")
        ))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .uid(victim.uid)
        .gid(victim.gid)
        .kill_on_drop(true);
    let o = output(sh).await;
    assert!(!marker.exists(), "the impostor's address ran in the shell");
    assert!(!o.stdout.contains(&stolen));
}

#[tokio::test]
async fn a_socket_planted_at_the_old_tmp_default_is_not_where_the_cli_looks() {
    let test = "a_socket_planted_at_the_old_tmp_default_is_not_where_the_cli_looks";
    let (Some(victim), Some(intruder)) = (
        local_user("bhst-victim2", test),
        local_user("bhst-intruder2", test),
    ) else {
        return;
    };
    let h = Harness::start().await;
    let home = dir_of(&victim, 0o700);
    // Where the CLI looked without control.socket, RUNTIME_DIRECTORY or XDG_RUNTIME_DIR (cron,
    // `su`, runner services): a name in /tmp any user can take first.
    let planted = PathBuf::from(format!("/tmp/behest-agent-{}.sock", victim.uid));
    let _ = std::fs::remove_file(&planted);
    let marker = home.path().join("ran");
    let stolen = format!("impostor-token-{}", random(16));
    let listen = format!("127.0.0.1:1'; touch {}; '", marker.display());
    let _impostor = impostor(&intruder, &h, &planted, &listen, &stolen).await;
    let env = vec![("HOME", home.path().display().to_string())];

    let o = output(agent_as(Some(&victim), &env, &["token"])).await;
    assert!(!o.stdout.contains(&stolen), "the planted socket's token");
    assert_ne!(o.code, 0, "{}", o.stderr);
    let o = output(agent_as(Some(&victim), &env, &["env"])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.lines().next(),
        Some("export OPENAI_BASE_URL='http://127.0.0.1:8711/v1'"),
        "{}",
        o.stdout
    );
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "eval \"$({} env)\"",
            env!("CARGO_BIN_EXE_behest-agent")
        ))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .uid(victim.uid)
        .gid(victim.gid)
        .kill_on_drop(true);
    output(sh).await;
    assert!(!marker.exists(), "the planted socket's address ran");
    let _ = std::fs::remove_file(&planted);
}

#[test]
fn the_default_control_socket_is_in_the_users_private_directory_never_in_tmp() {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let default = config::default_socket(&env(&[("HOME", "/home/ci")]));
    assert_eq!(
        default,
        Path::new("/home/ci/.local/state/behest-agent/agent.sock")
    );
    let default = config::default_socket(&env(&[("XDG_STATE_HOME", "/srv/state")]));
    assert_eq!(default, Path::new("/srv/state/behest-agent/agent.sock"));
    // No HOME at all (a bare service): the user's home from the password database.
    let default = config::default_socket(&env(&[]));
    assert!(!default.starts_with("/tmp"), "{}", default.display());
    // The runtime directories still come first.
    let default = config::default_socket(&env(&[
        ("HOME", "/home/ci"),
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
    ]));
    assert_eq!(default, Path::new("/run/user/1000/behest-agent.sock"));
}

#[tokio::test]
async fn the_default_directory_is_created_private_and_a_world_writable_one_is_refused() {
    let h = Harness::start().await;
    let home = h.path("home");
    std::fs::create_dir(&home).unwrap();
    let mut env = h.env(&[]);
    env.remove("BEHEST_AGENT__CONTROL__SOCKET");
    env.insert("HOME".into(), home.display().to_string());
    let settings = config::load(&LoadOptions {
        env,
        ..LoadOptions::default()
    })
    .unwrap();
    let socket = home.join(".local/state/behest-agent/agent.sock");
    assert_eq!(settings.control.socket, socket);
    let c = &settings.control;
    let listener = control::bind(&c.socket, c.socket_mode, c.dir_mode)
        .await
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o660);
    drop(listener);
    assert!(!socket.exists(), "removed with its listener");

    let open = h.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let e = control::bind(&open.join("agent.sock"), 0o660, 0o750)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("writable by every user"), "{e}");
    assert!(!open.join("agent.sock").exists());

    // A private directory below one every user may write (and no sticky bit): any user could
    // move it away and put theirs in its place.
    let wide = h.path("wide");
    std::fs::create_dir(&wide).unwrap();
    std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o777)).unwrap();
    let below = wide.join("private");
    std::fs::create_dir(&below).unwrap();
    std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o750)).unwrap();
    let e = control::bind(&below.join("agent.sock"), 0o660, 0o750)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("without the sticky bit"), "{e}");
    assert!(!below.join("agent.sock").exists());

    // A directory another user owns: they could move the socket away and put theirs there.
    if nix::unistd::geteuid().is_root() {
        let theirs = h.path("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = control::bind(&theirs.join("agent.sock"), 0o660, 0o750)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        assert!(!theirs.join("agent.sock").exists());
    } else {
        eprintln!("SKIPPED its other-owner half: only root can give a directory to another user");
    }
}

#[test]
fn the_packaged_config_names_the_socket_the_service_binds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/behest-agent.service")).unwrap();
    let runtime = unit
        .lines()
        .find_map(|l| l.strip_prefix("RuntimeDirectory="))
        .expect("the unit has a RuntimeDirectory");
    let service_socket = Path::new("/run").join(runtime).join("agent.sock");
    let packaged = |env: &[(&str, &str)]| {
        config::control_socket(&LoadOptions {
            path: Some(root.join("config/behest-agent.toml")),
            default_path: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: vec![],
        })
        .expect("the packaged config loads")
    };
    // The service (systemd sets RUNTIME_DIRECTORY) and a runner's CLI (cron: not even HOME).
    let runtime_dir = format!("/run/{runtime}");
    assert_eq!(
        packaged(&[("RUNTIME_DIRECTORY", runtime_dir.as_str())]),
        service_socket
    );
    assert_eq!(packaged(&[]), service_socket);
    assert_eq!(
        packaged(&[
            ("HOME", "/home/gitlab-runner"),
            ("XDG_RUNTIME_DIR", "/run/user/999")
        ]),
        service_socket
    );
}

#[tokio::test]
async fn a_socket_the_service_user_serves_is_trusted() {
    let test = "a_socket_the_service_user_serves_is_trusted";
    let (Some(service), Some(runner)) = (
        local_user(behest_agent::control::client::SERVICE_USER, test),
        local_user("bhst-runner", test),
    ) else {
        return;
    };
    let h = Harness::start().await;
    // Like /run/behest-agent: the service's, 0750, its group the runner's way in.
    let run = dir_of(&service, 0o750);
    let state = dir_of(&service, 0o700);
    let socket = run.path().join("agent.sock");
    let daemon_env = identity_env(&h, state.path(), &socket);
    let mut daemon = agent_as(Some(&service), &daemon_env, &["run"]);
    daemon.stderr(Stdio::piped());
    let mut child = daemon.spawn().unwrap();
    eventually(Duration::from_secs(30), "the service's socket", || {
        socket.exists()
    })
    .await;

    let home = dir_of(&runner, 0o700);
    let in_group = LocalUser {
        gid: service.gid,
        ..runner.clone()
    };
    let o = output(agent_as(
        Some(&in_group),
        &identity_env(&h, home.path(), &socket),
        &["token"],
    ))
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim().split('.').count(), 3, "{}", o.stdout);
    assert_eq!(
        h.idp.grants(),
        1,
        "the service's token, not a grant of its own"
    );
    assert!(!home.path().join("token.json").exists());
    signal(&child, Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

/// A config file for the harness's IdP, with `client_id`, `audience`, its own cache file, and the
/// harness's control socket.
fn config_file(h: &Harness, name: &str, client_id: &str, audience: &str) -> PathBuf {
    let p = h.path(name);
    std::fs::write(
        &p,
        format!(
            "[auth]\ndomain = \"{}\"\nclient_id = \"{client_id}\"\naudience = \"{audience}\"\nclient_secret_file = \"{}\"\n\n[token]\ncache_file = \"{}\"\n\n[control]\nsocket = \"{}\"\n\n[proxy]\nupstream = \"http://127.0.0.1:9\"\nallow_insecure_upstream = true\nlisten = \"127.0.0.1:0\"\n",
            h.idp.base_url(),
            h.path("client-secret").display(),
            h.path(&format!("{name}.token.json")).display(),
            h.path("run/agent.sock").display(),
        ),
    )
    .unwrap();
    p
}

#[tokio::test]
async fn a_daemon_serving_another_identity_is_refused_with_the_fix() {
    let h = Harness::start().await;
    let home = h.path("");
    let env = vec![("HOME", home.display().to_string())];
    let a = config_file(&h, "a.toml", &h.client_id, AUDIENCE);
    let a_arg = a.display().to_string();
    let mut daemon = agent_as(None, &env, &["run", "--config", &a_arg]);
    daemon.stderr(Stdio::null());
    let mut child = daemon.spawn().unwrap();
    let cli = |config: &Path, args: &[&str]| {
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        output(agent_as(None, &env, &all))
    };
    let mut ready = false;
    for _ in 0..600 {
        if cli(&a, &["status"]).await.code == 0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the daemon answers with a valid token");
    let o = cli(&a, &["token"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let token_a = o.stdout.trim().to_string();

    // Another client's configuration, and A's edited without a reload.
    let b = config_file(&h, "b.toml", "client-b", AUDIENCE);
    let edited = config_file(&h, "a-edited.toml", &h.client_id, "https://other.api.test");
    for (config, differs) in [
        (
            &b,
            format!("client_id `{}` there, `client-b` here", h.client_id),
        ),
        (
            &edited,
            format!("audience `{AUDIENCE}` there, `https://other.api.test` here"),
        ),
    ] {
        for args in [
            &["token"][..],
            &["status"],
            &["refresh"],
            &["env"],
            &["exec", "--", "true"],
        ] {
            let o = cli(config, args).await;
            assert_eq!(o.code, 1, "{args:?} {}: {}", config.display(), o.stderr);
            assert!(!o.stdout.contains(&token_a), "{args:?}");
            assert!(o.stdout.is_empty(), "{args:?}: {}", o.stdout);
            assert!(
                o.stderr.contains(&differs)
                    && o.stderr.contains(&format!(
                        "if {} is what the daemon should serve, reload it",
                        config.display()
                    ))
                    && o.stderr.contains(&format!(
                        "point --config at the daemon's configuration ({a_arg})"
                    )),
                "{args:?}: {}",
                o.stderr
            );
        }
    }
    // A command under `exec --config A` reads A too, so the CLI inside finds the same agent.
    let o = cli(
        &a,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "printf %s \"$BEHEST_AGENT_CONFIG\"",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, a_arg);

    // doctor names the daemon's identity as the problem, with the same fix, and does not check
    // the daemon's token against this configuration (the uid "mismatch" and its Auth0 fix).
    let o = cli(&b, &["doctor"]).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(
        o.stdout.contains("✗ daemon: the daemon on")
            && o.stdout
                .contains("reload it (`systemctl reload behest-agent`"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("the running daemon's"), "{}", o.stdout);
    assert!(!o.stdout.contains("✗ uid"), "{}", o.stdout);
    signal(&child, Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn env_refuses_a_proxy_address_that_is_not_loopback_or_not_an_address() {
    let h = Harness::start().await;
    let listen = Arc::new(Mutex::new(json!([])));
    let identity = Arc::new(Mutex::new(Value::Null));
    let tokens = h.source(&[], behest_agent::clock::system());
    let state = ControlState {
        tokens: Arc::new(move || tokens.clone()),
        profiles: None,
        daemon: Arc::new({
            let (listen, identity) = (listen.clone(), identity.clone());
            move || {
                json!({"pid": 1, "version": "x", "listen": listen.lock().unwrap().clone(),
                       "identity": identity.lock().unwrap().clone()})
            }
        }),
        live: None,
        keys: None,
        usage: None,
        shutdown: CancellationToken::new(),
    };
    let socket = h.path("fake.sock");
    let listener = control::bind(&socket, 0o600, 0o700).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(control::serve(listener, state, stop.clone()));
    let _stop = stop.drop_guard();
    let env = vec![
        ("HOME", h.path("").display().to_string()),
        (
            "BEHEST_AGENT__CONTROL__SOCKET",
            socket.display().to_string(),
        ),
    ];
    let env_of = |format: &'static str| output(agent_as(None, &env, &["env", "--format", format]));

    for bad in [
        "10.1.2.3:8711",
        "127.0.0.1:1\nOPENAI_API_KEY=stolen",
        "127.0.0.1:1'; touch /tmp/x; '",
        "evil.example:80",
    ] {
        *listen.lock().unwrap() = json!([bad]);
        for format in ["sh", "fish", "dotenv", "github"] {
            let o = env_of(format).await;
            assert_eq!(o.code, 1, "{bad:?} {format}: {}", o.stdout);
            assert!(o.stdout.is_empty(), "{bad:?} {format}: {}", o.stdout);
            assert!(
                o.stderr.contains("not a loopback address"),
                "{bad:?}: {}",
                o.stderr
            );
        }
    }
    for (good, url) in [
        (json!(["0.0.0.0:8711"]), "http://127.0.0.1:8711/v1"),
        (
            json!(["unix:/run/x.sock", "[::1]:9000"]),
            "http://[::1]:9000/v1",
        ),
    ] {
        *listen.lock().unwrap() = good;
        let o = env_of("dotenv").await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(
            o.stdout.starts_with(&format!("OPENAI_BASE_URL={url}\n")),
            "{}",
            o.stdout
        );
    }

    // With a configuration of its own, the CLI wants the daemon's identity: one that says none
    // (an older daemon) is refused too.
    let mut with_identity: Vec<(&str, String)> =
        h.env(&[]).into_iter().map(|(k, v)| (leak(k), v)).collect();
    with_identity.push((
        "BEHEST_AGENT__CONTROL__SOCKET",
        socket.display().to_string(),
    ));
    let o = output(agent_as(None, &with_identity, &["token"])).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(
        o.stderr.contains("does not say which identity it serves"),
        "{}",
        o.stderr
    );
    *identity.lock().unwrap() = serde_json::to_value(Identity::of(&h.settings(&[]).auth)).unwrap();
    let o = output(agent_as(None, &with_identity, &["env"])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[tokio::test]
async fn every_command_gives_up_on_a_stopped_daemon_with_a_message() {
    let h = Harness::start().await;
    let mut child = h.agent(&["run"], &[]).spawn().unwrap();
    let mut ready = false;
    for _ in 0..600 {
        if output(h.agent(&["status"], &[])).await.code == 0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the daemon answers with a valid token");
    signal(&child, Signal::SIGSTOP);
    let mut runs = Vec::new();
    for args in [
        &["token"][..],
        &["status"],
        &["env"],
        &["refresh"],
        &["exec", "--", "true"],
        &["doctor"],
    ] {
        let c = h.agent(args, &[]);
        runs.push((args, tokio::spawn(output(c))));
    }
    for (args, run) in runs {
        let o = run.await.expect("the command finishes within 60 s");
        if args == ["token"] {
            // `token` does not stop there: a daemon that does not answer counts as none, and the
            // disk cache serves (tests/outage.rs).
            assert_eq!(o.code, 0, "{}", o.stderr);
            assert!(o.stdout.starts_with("eyJ"), "a token on stdout");
            continue;
        }
        assert_eq!(o.code, 1, "{args:?}: {}{}", o.stdout, o.stderr);
        let said = format!("{}{}", o.stdout, o.stderr);
        assert!(
            said.contains("no daemon answered in time")
                && said.contains("did not answer within 5s"),
            "{args:?}: {said}"
        );
    }
    signal(&child, Signal::SIGCONT);
    signal(&child, Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

/// Returns once a daemon answers its control API on `socket` (its signal handlers are installed
/// by then; a socket that merely exists may not be served yet).
async fn serving(socket: &Path) {
    for _ in 0..600 {
        if let Ok(Some(_)) = control::Daemon::connect(socket, None).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no daemon answers on {}", socket.display());
}

/// Waits until `child` exits, failing the test if `path` becomes a socket first (the daemon
/// replaced what was there and runs).
async fn exits_without_replacing(child: &mut Child, path: &Path) -> i32 {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        let replaced = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        assert!(!replaced, "{} was replaced by a socket", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_file_or_symlink_at_a_socket_path_is_left_alone_and_the_daemon_refuses_to_start() {
    let h = Harness::start().await;
    std::fs::create_dir(h.path("run")).unwrap();
    let socket = h.path("run/agent.sock");
    let proxy = h.path("proxy.sock");
    let target = h.path("precious");
    std::fs::write(&target, "precious").unwrap();
    let listen = format!("unix:{}", proxy.display());
    for (path, symlink) in [(&socket, false), (&socket, true), (&proxy, false)] {
        if symlink {
            std::os::unix::fs::symlink(&target, path).unwrap();
        } else {
            std::fs::write(path, "precious").unwrap();
        }
        let mut c = h.agent_with_upstream(
            "http://127.0.0.1:9/",
            &["run"],
            &[("BEHEST_AGENT__PROXY__LISTEN", listen.as_str())],
        );
        c.stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let code = exits_without_replacing(&mut child, path).await;
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
            .await
            .unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&path.display().to_string())
                && stderr.contains("exists and is not a socket"),
            "{stderr}"
        );
        assert_eq!(std::fs::read_to_string(path).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(
            std::fs::symlink_metadata(path)
                .unwrap()
                .file_type()
                .is_symlink(),
            symlink
        );
        std::fs::remove_file(path).unwrap();
        assert!(!socket.exists() && !proxy.exists(), "nothing left behind");
    }
}

#[tokio::test]
async fn a_draining_daemon_leaves_the_socket_of_the_daemon_that_replaced_it() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    upstream.set_fault(Some(UpstreamFault::PauseStream { after_events: 1 }));
    let socket = h.path("run/agent.sock");
    let daemon = |proxy: &str| {
        let listen = format!("unix:{}", h.path(proxy).display());
        let mut c = h.agent_with_upstream(
            &upstream.base_url(),
            &["run"],
            &[
                ("BEHEST_AGENT__PROXY__LISTEN", listen.as_str()),
                ("BEHEST_AGENT__PROXY__SHUTDOWN_GRACE", "2m"),
            ],
        );
        c.stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let answers = || async { output(h.agent(&["status"], &[])).await.code == 0 };

    let mut old = daemon("old.sock");
    let mut up = false;
    for _ in 0..600 {
        if answers().await && h.path("old.sock").exists() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the old daemon answers");
    // A stream in flight keeps the old daemon draining after SIGTERM.
    let stream = tokio::net::UnixStream::connect(h.path("old.sock"))
        .await
        .unwrap();
    let streaming = tokio::spawn(async move {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let body =
            r#"{"model":"echo-1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = http::Request::post("/v1/chat/completions")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|_| ())
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        upstream.wait_for(|u| u.in_flight() >= 1),
    )
    .await
    .expect("the stream reaches the upstream");
    signal(&old, Signal::SIGTERM);
    eventually(
        Duration::from_secs(30),
        "the old daemon's socket goes",
        || !socket.exists(),
    )
    .await;
    assert!(
        old.try_wait().unwrap().is_none(),
        "the old daemon is draining"
    );

    let mut new = daemon("new.sock");
    let mut up = false;
    for _ in 0..600 {
        if answers().await {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the new daemon answers");
    // The stream ends; the old daemon finishes draining and exits.
    upstream.resume_stream();
    exits_cleanly(&mut old).await;
    let _ = streaming.await;
    assert!(socket.exists(), "the new daemon's socket is still there");
    assert_eq!(output(h.agent(&["status"], &[])).await.code, 0);
    signal(&new, Signal::SIGTERM);
    exits_cleanly(&mut new).await;
    assert!(!socket.exists(), "the new daemon removed its own socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_several_binders_racing_for_a_stale_socket_exactly_one_gets_it() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // A stale socket: bound, never removed, nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let mut binders = Vec::new();
        for _ in 0..8 {
            let (path, start) = (path.clone(), start.clone());
            binders.push(tokio::spawn(async move {
                start.wait().await;
                behest_agent::server::bind_unix(&path, 0o600).await
            }));
        }
        let mut bound = Vec::new();
        for b in binders {
            match b.await.unwrap() {
                Ok(l) => bound.push(l),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}"),
            }
        }
        assert_eq!(
            bound.len(),
            1,
            "round {round}: {} binders got the socket",
            bound.len()
        );
        assert!(tokio::net::UnixStream::connect(&path).await.is_ok());
    }
}

#[tokio::test]
async fn a_listener_removes_its_socket_file_only_while_it_is_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let first = behest_agent::server::bind_unix(&path, 0o600).await.unwrap();
    // Someone else's socket now at the path (the first listener's file was removed).
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(first);
    assert!(path.exists(), "the other socket stays");
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
}

#[tokio::test]
async fn socket_activation_refuses_a_socket_that_is_not_loopback_unless_allowed() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    // Serving needs both proxy.allow_remote and proxy.require_key.
    for (allow_remote, require_key) in [(false, false), (true, false), (true, true)] {
        // `ListenStream=8711`: every interface.
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let up = upstream.base_url();
        let unused = h.path("unused.sock");
        let listen = format!("unix:{}", unused.display());
        let allow = allow_remote.to_string();
        let require = require_key.to_string();
        let mut env = h.env(&[
            ("BEHEST_AGENT__PROXY__REQUIRE_KEY", require.as_str()),
            ("BEHEST_AGENT__PROXY__UPSTREAM", up.as_str()),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
            ("BEHEST_AGENT__PROXY__LISTEN", listen.as_str()),
            ("BEHEST_AGENT__PROXY__ALLOW_REMOTE", allow.as_str()),
        ]);
        env.insert("HOME".into(), h.dir.path().display().to_string());
        let mut c = Command::new("systemd-socket-activate");
        c.arg("-l").arg(format!("0.0.0.0:{port}"));
        for (k, v) in &env {
            c.arg(format!("--setenv={k}={v}"));
        }
        c.arg(env!("CARGO_BIN_EXE_behest-agent"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c
            .spawn()
            .expect("systemd-socket-activate (from the systemd package) runs");
        behest_agent::tls::install_default_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/v1/models");
        let mut served = None;
        let mut exited = None;
        for _ in 0..600 {
            // The first connection starts the agent.
            if let Ok(r) = client.get(&url).send().await {
                served = Some(r.status().as_u16());
                break;
            }
            if let Some(s) = child.try_wait().unwrap() {
                exited = s.code();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if allow_remote && require_key {
            // Served on the passed socket, and a request without a key is refused.
            assert_eq!(served, Some(401), "served on the passed socket");
            let _ = child.kill().await;
            continue;
        }
        assert_eq!(
            served, None,
            "served on 0.0.0.0 without proxy.allow_remote and proxy.require_key"
        );
        let code = match exited {
            Some(c) => c,
            None => tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .expect("the agent exits")
                .unwrap()
                .code()
                .unwrap_or(-1),
        };
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
            .await
            .unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "systemd passed a socket on 0.0.0.0:{port}, which is not a loopback address"
            )) && stderr.contains("proxy.allow_remote")
                && stderr.contains("proxy.require_key"),
            "{stderr}"
        );
    }
}

#[test]
fn a_socket_mode_wider_than_0660_is_warned_about() {
    let warnings = |mode: &str| {
        let mut env: std::collections::HashMap<String, String> = [
            ("BEHEST_AGENT__AUTH__DOMAIN", "http://127.0.0.1:9"),
            ("BEHEST_AGENT__AUTH__CLIENT_ID", "c"),
            ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE),
            ("BEHEST_AGENT_CLIENT_SECRET", "s3cret-value"),
            ("BEHEST_AGENT__CONTROL__SOCKET", "/run/x/agent.sock"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.insert("BEHEST_AGENT__CONTROL__SOCKET_MODE".into(), mode.into());
        config::load(&LoadOptions {
            env,
            ..LoadOptions::default()
        })
        .unwrap()
        .warnings
    };
    for wide in ["0666", "0777", "0662"] {
        let w = warnings(wide);
        assert!(
            w.iter()
                .any(|w| w.contains(&format!("control.socket_mode {wide} is wider than 0660"))),
            "{wide}: {w:?}"
        );
    }
    for fine in ["0660", "0600"] {
        assert!(
            warnings(fine).iter().all(|w| !w.contains("socket_mode")),
            "{fine}"
        );
    }
}

#[tokio::test]
async fn a_socket_group_shared_with_other_users_is_warned_about() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED a_socket_group_shared_with_other_users_is_warned_about: it runs the daemon with the group `users`, which needs root"
        );
        return;
    }
    let users = nix::unistd::Group::from_name("users")
        .unwrap()
        .expect("the group `users` exists");
    let h = Harness::start().await;
    for (gid, warned) in [(0, false), (users.gid.as_raw(), true)] {
        let socket = h.path(&format!("run-{gid}/agent.sock"));
        let s = socket.display().to_string();
        let mut c = h.agent(&["run"], &[("BEHEST_AGENT__CONTROL__SOCKET", s.as_str())]);
        c.gid(gid).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        serving(&socket).await;
        signal(&child, Signal::SIGTERM);
        exits_cleanly(&mut child).await;
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
            .await
            .unwrap();
        assert_eq!(
            stderr.contains("belongs to group `users`")
                && stderr.contains("every member of `users` can connect and take the token"),
            warned,
            "gid {gid}: {stderr}"
        );
    }
}

/// Run as another user by the test below (never on its own: without `BEHEST_TEST_PROBE_DIR` it
/// returns at once). Tries, as fast as it can, to connect to every socket that appears in the
/// directory, and to the temporary name the daemon whose pid is in `DIR/pid` would bind, until
/// `DIR/stop` appears; prints `probe: connected PATH` for each connection that succeeded.
#[test]
#[ignore = "a helper the socket-permission test runs as another user"]
fn connect_probe() {
    let Ok(dir) = std::env::var("BEHEST_TEST_PROBE_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut predicted: Option<PathBuf> = None;
    let mut hits = std::collections::BTreeSet::new();
    println!("probe: ready");
    for n in 0u64.. {
        if n % 64 == 0 {
            if dir.join("stop").exists() {
                break;
            }
            if predicted.is_none()
                && let Ok(pid) = std::fs::read_to_string(dir.join("pid"))
                && !pid.trim().is_empty()
            {
                predicted = Some(dir.join(format!("agent.sock.{}.tmp", pid.trim())));
            }
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                for p in [entry.path(), entry.path().join("s")] {
                    if std::os::unix::net::UnixStream::connect(&p).is_ok() {
                        hits.insert(p);
                    }
                }
            }
        }
        if let Some(p) = &predicted
            && std::os::unix::net::UnixStream::connect(p).is_ok()
        {
            hits.insert(p.clone());
        }
    }
    for h in hits {
        println!("probe: connected {}", h.display());
    }
}

#[tokio::test]
async fn no_other_user_connects_to_a_socket_before_it_has_its_mode() {
    let test = "no_other_user_connects_to_a_socket_before_it_has_its_mode";
    let Some(intruder) = local_user("bhst-prober", test) else {
        return;
    };
    let h = Harness::start().await;
    // A race: binding under a temporary name in the same directory, then `chmod`, let the probe
    // in about one round in twelve; 60 rounds miss that with a chance of about 1 in 200. Binding
    // inside a private directory lets it in never.
    for round in 0..60 {
        // A directory others may enter and list, as a runtime directory of 0755 is.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut probe = Command::new(std::env::current_exe().unwrap());
        probe
            .args([
                "--exact",
                "trust::connect_probe",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads=1"])
            .env_clear()
            .env("BEHEST_TEST_PROBE_DIR", dir.path())
            .uid(intruder.uid)
            .gid(intruder.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut probe = probe.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(probe.stdout.take().unwrap()).lines();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("the probe starts")
                .unwrap()
                .expect("the probe runs");
            // libtest writes the test's name on the same line.
            if line.ends_with("probe: ready") {
                break;
            }
        }
        // The daemon under umask 000: whatever it creates is open to all until it says otherwise.
        let socket = dir.path().join("agent.sock");
        let s = socket.display().to_string();
        let env = h.env(&[
            ("BEHEST_AGENT__CONTROL__SOCKET", s.as_str()),
            ("BEHEST_AGENT__CONTROL__SOCKET_MODE", "0600"),
        ]);
        let mut daemon = Command::new("sh");
        daemon
            .arg("-c")
            .arg("umask 000; exec \"$0\" run")
            .arg(env!("CARGO_BIN_EXE_behest-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut daemon = daemon.spawn().unwrap();
        let pid = dir.path().join("pid");
        std::fs::write(&pid, daemon.id().unwrap().to_string()).unwrap();
        std::fs::set_permissions(&pid, std::fs::Permissions::from_mode(0o644)).unwrap();
        serving(&socket).await;
        signal(&daemon, Signal::SIGTERM);
        exits_cleanly(&mut daemon).await;
        std::fs::write(dir.path().join("stop"), "").unwrap();
        let mut hits = Vec::new();
        while let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the probe stops")
            .unwrap()
        {
            if let Some((_, hit)) = line.split_once("probe: connected ") {
                hits.push(hit.to_string());
            }
        }
        let _ = probe.wait().await;
        assert!(
            hits.is_empty(),
            "round {round}: another user connected to {hits:?}"
        );
    }
}

/// The service's secret file, which this user may not read: the error says whose it is to read,
/// not to correct the path.
#[tokio::test]
async fn a_secret_file_this_user_may_not_read_says_whom_to_run_as() {
    let test = "a_secret_file_this_user_may_not_read_says_whom_to_run_as";
    let Some(user) = local_user("bhst-victim", test) else {
        return;
    };
    let h = Harness::start().await;
    let home = dir_of(&user, 0o700);
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), format!("{}\n", h.secret)).unwrap();
    std::fs::set_permissions(secret.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut env = identity_env(&h, home.path(), &home.path().join("agent.sock"));
    env.retain(|(k, _)| *k != "BEHEST_AGENT_CLIENT_SECRET");
    env.push((
        "BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE",
        secret.path().display().to_string(),
    ));
    let o = output(agent_as(Some(&user), &env, &["token"])).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("auth.client_secret_file")
            && o.stderr.contains("may not read it")
            && o.stderr.contains("sudo -u behest-agent"),
        "{}",
        o.stderr
    );
}
