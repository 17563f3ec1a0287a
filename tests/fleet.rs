//! The fleet (SPEC §10) against a real `redis-server` of each test's own: the lock and the shared
//! entry as the module gives them, then the token engine's one path through them — N agents with
//! empty caches make one grant, a rotated secret is one miss, Redis killed mid-run or answering
//! garbage leaves each agent on its own, a killed holder's lock expires, a tampered entry is never
//! served — and what Redis, the logs and `status` see.

use std::time::{Duration, SystemTime};

use behest_agent::app::App;
use behest_agent::clock::{self, TestClock};
use behest_agent::fleet::{Acquired, Entry, Fleet, SealKey};
use behest_agent::token::TokenSource;
use behest_agent::token::cache::Identity;
use devkit::idp::Fault;
use devkit::upstream::{Upstream, UpstreamOptions};
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::redis_server::RedisServer;
use crate::util::{FIXTURES, Harness, Start, devkit_now, eventually, logs};

/// The `[fleet]` keys of a test agent using `redis`, plus `extra`.
fn fleet_env<'a>(redis: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("BEHEST_AGENT__FLEET__REDIS_URL", redis)];
    env.extend_from_slice(extra);
    env
}

/// A fleet handle as the token engine builds one, for the harness's client.
fn fleet_of(h: &Harness, redis: &RedisServer, extra: &[(&str, &str)]) -> Fleet {
    let url = redis.url();
    let settings = h.settings(&fleet_env(&url, extra));
    let source = behest_agent::token::TokenSource::new(&settings, clock::system()).unwrap();
    let key = Identity::of(&settings.auth);
    Fleet::new(
        settings.fleet.as_ref().unwrap(),
        &key,
        source.grant().clone(),
    )
}

/// Takes whatever the entry holds.
async fn take_any(e: Entry) -> Option<String> {
    Some(e.access_token.expose_secret().to_string())
}

/// How many SETs the server has run (the lock's `SET NX` and the entry's `SET`).
async fn set_calls(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

#[tokio::test]
async fn one_agent_takes_the_lock_and_the_others_get_the_token_it_publishes() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let leader = fleet_of(&h, &redis, &[]);
    let Acquired::Leader(lease) = leader.acquire(take_any).await else {
        panic!("an empty fleet makes the first agent the one that grants");
    };
    // Two followers arrive while the grant is in flight: they wait instead of granting.
    let followers: Vec<_> = (0..2)
        .map(|_| {
            let f = fleet_of(&h, &redis, &[]);
            tokio::spawn(async move {
                match f.acquire(take_any).await {
                    Acquired::Shared(t) => t,
                    Acquired::Leader(_) => panic!("a second agent took the lock while it was held"),
                    Acquired::Alone => panic!("a follower gave up waiting"),
                }
            })
        })
        .collect();
    // Both are polling: each has tried the lock at least once besides the leader.
    let mut c = redis.connection().await;
    let mut polled = false;
    for _ in 0..500 {
        if set_calls(&mut c).await >= 3 {
            polled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(polled, "the followers try the lock");
    leader
        .publish(
            &secret("the-shared-token"),
            SystemTime::now(),
            None,
            Duration::from_secs(60),
        )
        .await;
    lease.release().await;
    for f in followers {
        assert_eq!(f.await.unwrap(), "the-shared-token");
    }
    assert_eq!(leader.status().grants, 1);
    assert_eq!(leader.status().reads.miss, 1);
    let locked: Option<String> = c.get(leader.lock_key()).await.unwrap();
    assert_eq!(locked, None, "the holder released the lock");
    let ttl: i64 = c.pttl(leader.entry_key()).await.unwrap();
    assert!(
        ttl > 50_000 && ttl <= 60_000,
        "the entry lives as long as the token: {ttl} ms"
    );
}

#[tokio::test]
async fn the_lock_is_released_only_by_its_holder() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[]);
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("the lock is free");
    };
    // A's lock expired meanwhile, and another agent holds it now.
    let mut c = redis.connection().await;
    let _: () = c.set(a.lock_key(), "another-holder").await.unwrap();
    lease.release().await;
    let holder: Option<String> = c.get(a.lock_key()).await.unwrap();
    assert_eq!(holder.as_deref(), Some("another-holder"));
}

#[tokio::test]
async fn a_dropped_lease_releases_the_lock() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[]);
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("the lock is free");
    };
    drop(lease);
    let mut c = redis.connection().await;
    let mut gone = false;
    for _ in 0..200 {
        let v: Option<String> = c.get(a.lock_key()).await.unwrap();
        if v.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gone,
        "a grant cancelled mid-way leaves no lock for the lock_timeout"
    );
}

#[tokio::test]
async fn a_stale_lock_expires_and_the_next_agent_takes_it() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let b = fleet_of(&h, &redis, &[("BEHEST_AGENT__FLEET__LOCK_TIMEOUT", "5s")]);
    // Left by a holder that died: nobody will publish or release.
    let mut c = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(b.lock_key())
        .arg("dead-holder")
        .arg("PX")
        .arg(700)
        .query_async(&mut c)
        .await
        .unwrap();
    match b.acquire(take_any).await {
        Acquired::Leader(lease) => lease.release().await,
        Acquired::Shared(_) => panic!("nothing was published"),
        Acquired::Alone => panic!("the stale lock expired within the wait: B should hold it"),
    }
}

#[tokio::test]
async fn a_holder_that_never_publishes_leaves_the_follower_alone_after_lock_timeout() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let b = fleet_of(
        &h,
        &redis,
        &[("BEHEST_AGENT__FLEET__LOCK_TIMEOUT", "300ms")],
    );
    let mut c = redis.connection().await;
    // Held far longer than B's own lock_timeout (another agent configured otherwise).
    let _: () = c.set_ex(b.lock_key(), "slow-holder", 60).await.unwrap();
    assert!(matches!(b.acquire(take_any).await, Acquired::Alone));
    assert_eq!(b.status().reads.miss, 1);
}

/// A planted value larger than any sealed entry is garbage, and is not read whole: whoever can
/// write the key cannot make every agent read megabytes.
#[tokio::test]
async fn an_oversized_entry_is_garbage_and_never_read_whole() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[]);
    let mut c = redis.connection().await;
    let mut big = vec![1u8];
    big.resize(8 << 20, b'x');
    let _: () = c.set(a.entry_key(), big).await.unwrap();
    let sent = || async {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("INFO stats has total_net_output_bytes")
    };
    let before = sent().await;
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("an oversized value is no token: the agent grants");
    };
    let read = sent().await - before;
    assert!(read < 1 << 20, "Redis sent the agent {read} bytes");
    lease.release().await;
    assert!(a.status().error.as_deref().unwrap().contains("garbage"));
}

#[tokio::test]
async fn garbage_in_the_entry_is_warned_about_once_and_replaced_by_a_grant() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[]);
    let mut c = redis.connection().await;
    let _: () = c.set(a.entry_key(), "not an entry at all").await.unwrap();
    for _ in 0..2 {
        let Acquired::Leader(lease) = a.acquire(take_any).await else {
            panic!("garbage is no token: the agent grants (and overwrites it)");
        };
        lease.release().await;
    }
    let status = a.status();
    assert_eq!(status.state, "connected");
    assert_eq!(status.reads.error, 2);
    assert!(status.error.as_deref().unwrap().contains("garbage"));
    let warnings = logs()
        .lines()
        .filter(|l| l.contains(a.entry_key()) && l.contains("WARN"))
        .count();
    assert_eq!(warnings, 1, "one warning for the same garbage");
    a.publish(
        &secret("fresh"),
        SystemTime::now(),
        None,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(a.status().error, None, "a good write clears it");
    let Acquired::Shared(t) = a.acquire(take_any).await else {
        panic!("the published token is read back");
    };
    assert_eq!(t, "fresh");

    // A value of another type: WRONGTYPE on GET, overwritten the same way.
    let _: () = c.del(a.entry_key()).await.unwrap();
    let _: () = c.rpush(a.entry_key(), "x").await.unwrap();
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("a list is no token");
    };
    a.publish(
        &secret("again"),
        SystemTime::now(),
        None,
        Duration::from_secs(60),
    )
    .await;
    lease.release().await;
    assert!(matches!(a.acquire(take_any).await, Acquired::Shared(t) if t == "again"));
}

#[tokio::test]
async fn an_unreachable_redis_is_warned_about_once_and_the_agent_goes_alone() {
    let mut redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[("BEHEST_AGENT__FLEET__TIMEOUT", "500ms")]);
    a.check().await.expect("Redis is up");
    assert_eq!(a.status().state, "connected");
    redis.kill();
    for _ in 0..3 {
        assert!(matches!(a.acquire(take_any).await, Acquired::Alone));
    }
    let status = a.status();
    assert_eq!(status.state, "unreachable");
    assert_eq!(status.reads.error, 3);
    assert!(status.error.is_some(), "{status:?}");
    let port = format!("127.0.0.1:{}", redis.port);
    let warned = |what: &str| {
        logs()
            .lines()
            .filter(|l| l.contains(&port) && l.contains(what))
            .count()
    };
    assert_eq!(
        warned("is unreachable"),
        1,
        "one warning per change of state"
    );
    assert_eq!(warned("fleet.redis_url"), 1, "it says what to check");
    // The daemon's companion reconnects with backoff once Redis is back.
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (a, stop) = (a.clone(), stop.clone());
        async move { a.run(stop).await }
    });
    redis.restart().await;
    eventually(Duration::from_secs(60), "the fleet reconnects", || {
        a.status().state == "connected"
    })
    .await;
    assert_eq!(warned("answers again"), 1);
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_slow_redis_is_given_up_on_after_fleet_timeout() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[("BEHEST_AGENT__FLEET__TIMEOUT", "300ms")]);
    a.check().await.unwrap();
    // A Redis that stops answering for a while.
    let mut c = redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(matches!(a.acquire(take_any).await, Acquired::Alone));
    let status = a.status();
    assert_eq!(status.state, "unreachable");
    assert!(
        status.error.as_deref().unwrap().contains("fleet.timeout"),
        "{status:?}"
    );
}

#[tokio::test]
async fn an_acl_user_with_its_password_from_a_file_is_enough() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let password = format!("redis-pw-{}", crate::util::random(24));
    h.remember(&password);
    let mut c = redis.connection().await;
    // Only what the agent needs, on its own keys.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "agent",
            "on",
            &format!(">{password}"),
            "~behest-agent:*",
            "+getrange",
            "+set",
            "+del",
            "+eval",
        ])
        .query_async(&mut c)
        .await
        .unwrap();
    let file = h.path("redis-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    crate::util::set_mode(&file, 0o600);
    let file = file.to_str().unwrap();
    let user = [
        ("BEHEST_AGENT__FLEET__REDIS_USERNAME", "agent"),
        ("BEHEST_AGENT__FLEET__REDIS_PASSWORD_FILE", file),
    ];
    let a = fleet_of(&h, &redis, &user);
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("the ACL user may take the lock");
    };
    a.publish(
        &secret("acl-token"),
        SystemTime::now(),
        None,
        Duration::from_secs(60),
    )
    .await;
    lease.release().await;
    assert_eq!(a.status().state, "connected");
    assert_eq!(a.status().grants, 1);
    let b = fleet_of(&h, &redis, &user);
    assert!(matches!(b.acquire(take_any).await, Acquired::Shared(t) if t == "acl-token"));

    // A wrong password: unreachable, said once, and never the password itself.
    std::fs::write(file, "wrong-password-0123456789\n").unwrap();
    let c = fleet_of(&h, &redis, &user);
    assert!(matches!(c.acquire(take_any).await, Acquired::Alone));
    let status = c.status();
    assert_eq!(status.state, "unreachable");
    let words = status.error.clone().unwrap_or_default();
    assert!(
        words.contains("WRONGPASS") || words.to_lowercase().contains("auth"),
        "{words}"
    );
    h.remember("wrong-password-0123456789");
    crate::util::assert_no_secret_in(&words, &h.secrets.lock().unwrap(), "the fleet status");

    // A user that may only PING is not connected: the check reads the entry as the fleet does.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "pinger",
            "on",
            &format!(">{password}"),
            "~*",
            "+ping",
        ])
        .query_async(&mut redis.connection().await)
        .await
        .unwrap();
    std::fs::write(file, format!("{password}\n")).unwrap();
    let pinger = [
        ("BEHEST_AGENT__FLEET__REDIS_USERNAME", "pinger"),
        ("BEHEST_AGENT__FLEET__REDIS_PASSWORD_FILE", file),
    ];
    let d = fleet_of(&h, &redis, &pinger);
    assert!(d.check().await.is_err());
    assert_eq!(d.status().state, "unreachable");
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn rediss_verifies_the_server_against_the_configured_ca() {
    let cert = format!("{FIXTURES}/upstream-cert.pem");
    let key = format!("{FIXTURES}/upstream-key.pem");
    let ca = format!("{FIXTURES}/upstream-ca.pem");
    let redis = RedisServer::start_with(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ])
    .await;
    let h = Harness::start().await;
    let url = format!("rediss://localhost:{}/0", redis.port);
    let with_ca = h.settings(&[
        ("BEHEST_AGENT__FLEET__REDIS_URL", &url),
        ("BEHEST_AGENT__FLEET__CA_FILE", &ca),
    ]);
    let source = behest_agent::token::TokenSource::new(&with_ca, clock::system()).unwrap();
    let key = Identity::of(&with_ca.auth);
    let fleet = Fleet::new(
        with_ca.fleet.as_ref().unwrap(),
        &key,
        source.grant().clone(),
    );
    fleet.check().await.expect("TLS with the fixture's CA");
    assert_eq!(fleet.status().state, "connected");

    // Without the CA the server's certificate is not trusted: unreachable, and the agent alone.
    let without = h.settings(&[("BEHEST_AGENT__FLEET__REDIS_URL", &url)]);
    let fleet = Fleet::new(
        without.fleet.as_ref().unwrap(),
        &key,
        source.grant().clone(),
    );
    assert!(fleet.check().await.is_err());
    assert!(matches!(fleet.acquire(take_any).await, Acquired::Alone));
    assert_eq!(fleet.status().state, "unreachable");
}

#[tokio::test]
async fn redis_sees_hashed_key_names_a_sealed_blob_and_a_random_lock_value() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let a = fleet_of(&h, &redis, &[]);
    let Acquired::Leader(lease) = a.acquire(take_any).await else {
        panic!("the lock is free");
    };
    let token = format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", crate::util::random(40));
    a.publish(
        &secret(&token),
        SystemTime::now(),
        None,
        Duration::from_secs(60),
    )
    .await;
    let mut c = redis.connection().await;
    let keys: Vec<String> = c.keys("*").await.unwrap();
    assert_eq!(keys.len(), 2, "the entry and the lock: {keys:?}");
    let lock: String = c.get(a.lock_key()).await.unwrap();
    assert_eq!(lock.len(), 32, "128 random bits, hex");
    lease.release().await;
    let entry: Vec<u8> = c.get(a.entry_key()).await.unwrap();
    let seen = format!("{keys:?} {lock} {}", String::from_utf8_lossy(&entry));
    for private in [
        token.as_str(),
        &token[..20],
        h.secret.as_str(),
        h.client_id.as_str(),
        crate::util::AUDIENCE,
    ] {
        assert!(!seen.contains(private), "Redis sees {private:?}");
    }
    assert!(a.entry_key().starts_with("behest-agent:token:"));
    assert!(a.lock_key().starts_with("behest-agent:lock:"));
}

// ---- the token engine's one path: every agent asks the fleet before any grant

/// The `[fleet]` and cache keys of agent `i`: its own disk cache, the shared Redis.
fn agent_env(h: &Harness, i: usize, redis: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BEHEST_AGENT__FLEET__REDIS_URL", redis.to_string()),
        (
            "BEHEST_AGENT__TOKEN__CACHE_FILE",
            h.path(&format!("agent-{i}/token.json"))
                .display()
                .to_string(),
        ),
        (
            "BEHEST_AGENT__CONTROL__SOCKET",
            h.path(&format!("agent-{i}/agent.sock"))
                .display()
                .to_string(),
        ),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Agent `i` in-process: a token source with an empty cache of its own.
fn agent(
    h: &Harness,
    i: usize,
    redis: &str,
    clock: behest_agent::clock::SharedClock,
) -> TokenSource {
    h.source(&borrowed(&agent_env(h, i, redis)), clock)
}

#[tokio::test]
async fn agents_with_empty_caches_starting_together_make_one_grant() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    // The first grant is slow, so every other agent arrives while it is in flight.
    h.idp.fail_next(1, Fault::Delay(Duration::from_millis(300)));
    let url = redis.url();
    let agents: Vec<TokenSource> = (0..8)
        .map(|i| agent(&h, i, &url, clock::system()))
        .collect();
    let tokens = futures_util::future::join_all(agents.iter().map(|a| a.get(Duration::ZERO))).await;
    let first = tokens[0]
        .as_ref()
        .expect("a token")
        .secret()
        .expose_secret()
        .to_string();
    h.remember(&first);
    for t in &tokens {
        let t = t.as_ref().expect("a token");
        assert!(
            t.secret().expose_secret() == first,
            "every agent holds the one token"
        );
    }
    assert_eq!(h.idp.grants(), 1, "one grant for the whole fleet");
    let (mut hits, mut misses) = (0, 0);
    for a in &agents {
        let f = a.status().fleet;
        assert_eq!(f.state, "connected");
        assert_eq!(f.reads.error, 0);
        hits += f.reads.hit;
        misses += f.reads.miss;
    }
    assert_eq!((hits, misses), (7, 1));
    // Each agent also keeps it on its own disk: a restart with Redis gone needs no grant.
    for i in 0..8 {
        assert!(h.path(&format!("agent-{i}/token.json")).exists());
    }
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn one_shot_token_processes_with_empty_caches_make_one_grant() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    h.idp.fail_next(1, Fault::Delay(Duration::from_millis(300)));
    let url = redis.url();
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let env = agent_env(&h, i, &url);
            h.agent(&["token"], &borrowed(&env)).output()
        })
        .collect();
    let outputs = futures_util::future::join_all(runs).await;
    let mut printed = Vec::new();
    for out in outputs {
        let out = out.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    h.remember(&printed[0]);
    assert!(
        printed.iter().all(|t| *t == printed[0]),
        "one token for all"
    );
    assert_eq!(h.idp.grants(), 1, "one grant for six processes");
}

#[tokio::test]
async fn exec_without_a_daemon_uses_the_shared_token() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let first = agent(&h, 0, &url, clock::system());
    first.get(Duration::ZERO).await.unwrap();
    assert_eq!(h.idp.grants(), 1);
    let (upstream, _stop) =
        Upstream::start(UpstreamOptions::for_idp(&h.idp, crate::util::AUDIENCE))
            .await
            .unwrap();
    let script = format!(
        "node {} \"$OPENAI_BASE_URL\" chat",
        crate::node::interop_dir()
            .join("openai-client.mjs")
            .display()
    );
    crate::node::ensure_npm_installed();
    let mut env = agent_env(&h, 1, &url);
    env.push(("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0".to_string()));
    let out = h
        .agent_with_upstream(
            &upstream.base_url(),
            &["exec", "--", "sh", "-c", &script],
            &borrowed(&env),
        )
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.idp.grants(), 1, "exec's proxy served the fleet's token");
}

#[tokio::test]
async fn a_rotated_secret_makes_the_old_entry_one_miss_then_the_new_one_is_shared() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let a = agent(&h, 0, &url, clock::system());
    a.get(Duration::ZERO).await.unwrap();
    assert_eq!(h.idp.grants(), 1);

    let rotated = format!("sec-{}", crate::util::random(32));
    h.remember(&rotated);
    h.idp.set_client_secret(&rotated);
    std::fs::write(h.path("client-secret"), format!("{rotated}\n")).unwrap();

    // The entry sealed under the old secret does not open: a miss, and one grant.
    let b = agent(&h, 1, &url, clock::system());
    b.get(Duration::ZERO)
        .await
        .expect("a grant with the new secret");
    assert_eq!(h.idp.grants(), 2);
    let f = b.status().fleet;
    assert_eq!((f.reads.hit, f.reads.miss, f.reads.error), (0, 1, 0));
    assert_eq!(f.grants, 1, "B shared its grant");

    // Sealed under the new secret now: the next agents read it.
    for i in 2..4 {
        let c = agent(&h, i, &url, clock::system());
        let t = c.get(Duration::ZERO).await.unwrap();
        assert!(t.secret().expose_secret() == b.current().unwrap().secret().expose_secret());
        assert_eq!(c.status().fleet.reads.hit, 1);
    }
    assert_eq!(h.idp.grants(), 2);
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn a_shared_token_past_its_refresh_point_is_replaced_by_one_grant() {
    let redis = RedisServer::start().await;
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(3600);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let url = redis.url();
    let a = agent(&h, 0, &url, clock.clone());
    let old = a.get(Duration::ZERO).await.unwrap();
    // Past any refresh point (at most 50 minutes into an hour), not yet expired.
    clock.jump(Duration::from_secs(55 * 60));
    let b = agent(&h, 1, &url, clock.clone());
    let new = b.get(Duration::ZERO).await.unwrap();
    assert_ne!(new.secret().expose_secret(), old.secret().expose_secret());
    assert_eq!(h.idp.grants(), 2);
    let c = agent(&h, 2, &url, clock.clone());
    let shared = c.get(Duration::ZERO).await.unwrap();
    assert_eq!(
        shared.secret().expose_secret(),
        new.secret().expose_secret()
    );
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn a_shared_token_too_short_for_min_ttl_is_not_used() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    h.idp.fail_next(1, Fault::Ttl(Duration::from_secs(600)));
    let a = agent(&h, 0, &url, clock::system());
    a.get(Duration::ZERO).await.unwrap();
    let b = agent(&h, 1, &url, clock::system());
    let t = b
        .get(Duration::from_secs(3600))
        .await
        .expect("one grant of its own");
    assert!(t.remaining(SystemTime::now()) >= Duration::from_secs(3600));
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn a_tampered_entry_is_never_served_and_a_grant_replaces_it() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let a = agent(&h, 0, &url, clock::system());
    a.get(Duration::ZERO).await.unwrap();
    let entry = a.fleet().unwrap().entry_key().to_string();
    let mut c = redis.connection().await;
    let mut sealed: Vec<u8> = c.get(&entry).await.unwrap();
    let last = sealed.len() - 20;
    sealed[last] ^= 0x40;
    let _: () = redis::cmd("SET")
        .arg(&entry)
        .arg(&sealed)
        .arg("KEEPTTL")
        .query_async(&mut c)
        .await
        .unwrap();

    // The devkit IdP issues the same token for the same second, so what tells is the grant.
    let b = agent(&h, 1, &url, clock::system());
    b.get(Duration::ZERO).await.unwrap();
    assert_eq!(
        h.idp.grants(),
        2,
        "the altered entry was not used: B granted"
    );
    assert_eq!(b.status().fleet.reads.miss, 1);
    let replaced: Vec<u8> = c.get(&entry).await.unwrap();
    assert!(replaced != sealed, "B's grant replaced the altered entry");
    let next = agent(&h, 2, &url, clock::system());
    next.get(Duration::ZERO).await.unwrap();
    assert_eq!(next.status().fleet.reads.hit, 1, "the replaced entry opens");
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn a_sealed_token_that_fails_the_checks_is_never_served() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let b = agent(&h, 0, &url, clock::system());
    // Sealed with the right credential (whoever wrote it had the secret), but another client's
    // token: the checks refuse it, as they would from the IdP.
    let foreign = h.idp.mint(serde_json::json!({"uid": "someone-else"}));
    h.remember(&foreign);
    let settings = h.settings(&borrowed(&agent_env(&h, 0, &url)));
    let key = Identity::of(&settings.auth);
    let seal = SealKey::derive(h.secret.as_bytes(), &serde_json::to_vec(&key).unwrap());
    let entry = b.fleet().unwrap().entry_key().to_string();
    let sealed = seal.seal(&entry, &secret(&foreign), SystemTime::now(), None);
    let mut c = redis.connection().await;
    let _: () = c.set_ex(&entry, sealed, 3600).await.unwrap();

    let t = b.get(Duration::ZERO).await.unwrap();
    assert!(t.secret().expose_secret() != foreign);
    assert_eq!(t.claims.view().uid.as_deref(), Some(h.client_id.as_str()));
    assert_eq!(h.idp.grants(), 1);
    assert!(logs().contains("fleet: the shared token fails the checks"));
}

#[tokio::test]
async fn redis_killed_mid_run_leaves_the_daemon_serving_alone_and_status_says_so() {
    let mut redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let mut env = agent_env(&h, 0, &url);
    env.push(("BEHEST_AGENT__FLEET__TIMEOUT", "500ms".to_string()));
    let app = App::build(h.settings(&borrowed(&env)), clock::system())
        .await
        .unwrap();
    let (tokens, metrics) = (app.tokens(), app.metrics());
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run(stop.clone()));
    eventually(Duration::from_secs(30), "the daemon's first token", || {
        tokens.is_ready()
    })
    .await;
    assert_eq!(tokens.status().fleet.state, "connected");
    assert_eq!(tokens.status().fleet.grants, 1);

    redis.kill();
    // The upstream refused the token: a new one is needed while Redis is gone.
    let held = tokens.current().unwrap();
    tokens.refresh_rejected(&held).await.expect("a grant alone");
    assert_eq!(h.idp.grants(), 2);
    let f = tokens.status().fleet;
    assert_eq!(f.state, "unreachable", "{f:?}");
    assert_eq!(f.reads.error, 1);
    let text = metrics.encode();
    assert!(
        text.contains("behest_agent_fleet_reads_total{result=\"error\"} 1"),
        "{text}"
    );
    assert!(text.contains("behest_agent_fleet_grants_total 1"), "{text}");
    // The control socket's status says so too.
    let out = h
        .agent(&["status"], &borrowed(&env))
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("fleet:        unreachable ("), "{printed}");

    // Back: the daemon reconnects by itself, with backoff from the failure on (well before its
    // 30 s check of a connection it believed good).
    redis.restart().await;
    eventually(Duration::from_secs(15), "the daemon reconnects", || {
        tokens.status().fleet.state == "connected"
    })
    .await;
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_lock_left_by_a_killed_holder_expires_and_the_next_agent_grants() {
    let redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    // The holder's grant hangs; it is killed while holding the lock.
    h.idp.fail_next(1, Fault::Delay(Duration::from_secs(60)));
    let mut env = agent_env(&h, 0, &url);
    env.push(("BEHEST_AGENT__FLEET__LOCK_TIMEOUT", "2s".to_string()));
    let mut holder = h.agent(&["token"], &borrowed(&env)).spawn().unwrap();
    let probe = agent(&h, 9, &url, clock::system());
    let lock = probe.fleet().unwrap().lock_key().to_string();
    let mut c = redis.connection().await;
    let mut held = None;
    for _ in 0..1000 {
        held = c.get::<_, Option<String>>(&lock).await.unwrap();
        if held.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = held.expect("the holder takes the lock");
    // Killed once its grant is in flight (the slow answer is its own, not the next agent's).
    eventually(
        Duration::from_secs(30),
        "the holder's grant reaches the IdP",
        || h.idp.token_requests() == 1,
    )
    .await;
    holder.kill().await.unwrap();

    let mut env = agent_env(&h, 1, &url);
    env.push(("BEHEST_AGENT__FLEET__LOCK_TIMEOUT", "10s".to_string()));
    let next = h.source(&borrowed(&env), clock::system());
    let t = next
        .get(Duration::ZERO)
        .await
        .expect("the next agent's grant");
    h.remember(t.secret().expose_secret());
    let f = next.status().fleet;
    assert_eq!((f.reads.hit, f.reads.miss, f.grants), (0, 1, 1), "{f:?}");
    let now: Option<String> = c.get(&lock).await.unwrap();
    assert_ne!(now, Some(held), "the dead holder's lock is gone");
}

#[tokio::test]
async fn without_fleet_nothing_is_shared_and_status_says_off() {
    let h = Harness::start().await;
    let a = h.source(&[], clock::system());
    assert!(a.fleet().is_none());
    a.get(Duration::ZERO).await.unwrap();
    assert_eq!(a.status().fleet.state, "off");
    let out = h.agent(&["status"], &[]).output().await.unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fleet:        off\n"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn doctor_checks_that_redis_lets_the_agent_lock_and_says_what_the_entry_holds() {
    let mut redis = RedisServer::start().await;
    let h = Harness::start().await;
    let url = redis.url();
    let env = agent_env(&h, 0, &url);
    let doctor = |env: &[(&'static str, String)]| {
        let mut c = h.agent(&["doctor"], &borrowed(env));
        c.stdout(std::process::Stdio::piped());
        c.output()
    };
    let out = doctor(&env).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "✓ fleet: Redis at {url} answers and lets this agent take and release the grant lock"
        )),
        "{text}"
    );
    assert!(text.contains("· fleet: no shared token yet"), "{text}");

    agent(&h, 1, &url, clock::system())
        .get(Duration::ZERO)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&doctor(&env).await.unwrap().stdout).into_owned();
    assert!(
        text.contains("· fleet: the shared token is sealed under this client's credential"),
        "{text}"
    );
    let mut c = redis.connection().await;
    let keys: Vec<String> = c.keys("behest-agent:probe:*").await.unwrap();
    assert!(keys.is_empty(), "the probe key is deleted: {keys:?}");

    redis.kill();
    let out = doctor(&env).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("✗ fleet: Redis at {url}: ")),
        "{text}"
    );
    assert_ne!(out.status.code(), Some(0));
}

#[tokio::test]
async fn each_profile_shares_its_own_token_under_its_own_keys() {
    let redis = RedisServer::start().await;
    let b_id = format!("team-b-{}", crate::util::random(8));
    let b_secret = format!("sec-{}", crate::util::random(32));
    let other = (b_id.clone(), SecretString::from(b_secret.clone()));
    let h = Harness::start_with(|o| o.other_clients = vec![other]).await;
    h.remember(&b_secret);
    let b_file = h.path("team-b-secret");
    std::fs::write(&b_file, format!("{b_secret}\n")).unwrap();
    crate::util::set_mode(&b_file, 0o600);
    let url = redis.url();
    let profile_env = |i: usize| {
        let mut env = agent_env(&h, i, &url);
        env.push(("BEHEST_AGENT__PROFILES__TEAMB__CLIENT_ID", b_id.clone()));
        env.push((
            "BEHEST_AGENT__PROFILES__TEAMB__CLIENT_SECRET_FILE",
            b_file.display().to_string(),
        ));
        env
    };
    let sources = |i: usize| {
        let settings = h.settings(&borrowed(&profile_env(i)));
        ["default", "teamb"].map(|name| {
            TokenSource::new(&settings.profile(name).unwrap(), clock::system()).unwrap()
        })
    };
    let [a_default, a_b] = sources(0);
    assert!(
        a_default.fleet().unwrap().entry_key() != a_b.fleet().unwrap().entry_key(),
        "one entry per profile"
    );
    let t_default = a_default.get(Duration::ZERO).await.unwrap();
    let t_b = a_b.get(Duration::ZERO).await.unwrap();
    assert_eq!(t_b.claims.view().uid.as_deref(), Some(b_id.as_str()));
    assert_eq!(h.idp.grants(), 2, "one grant per profile");

    // Another agent with empty caches: both tokens from the fleet, each its own profile's.
    let [b_default, b_b] = sources(1);
    let u_default = b_default.get(Duration::ZERO).await.unwrap();
    let u_b = b_b.get(Duration::ZERO).await.unwrap();
    assert!(u_default.secret().expose_secret() == t_default.secret().expose_secret());
    assert!(u_b.secret().expose_secret() == t_b.secret().expose_secret());
    assert_eq!(h.idp.grants(), 2);
    assert_eq!(b_b.status().fleet.reads.hit, 1);
    h.assert_no_secrets_logged();
}
