//! The GitHub Action (`action.yml`, `ci/github/*.js`) run as a runner runs it: `node main.js`
//! and later `node post.js`, with `INPUT_*` (the runner's names: upper case, `-` kept),
//! `GITHUB_ENV`, `GITHUB_STATE` given back as `STATE_*`, `GITHUB_STEP_SUMMARY` and `RUNNER_TEMP`,
//! against the embedded IdP and the echo upstream. A job's step between them uses what main
//! exported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use devkit::upstream::{BearerKind, Upstream, UpstreamOptions};
use tempfile::TempDir;
use tokio::process::Command;
use tokio_util::sync::DropGuard;

use crate::ci::{Out, chat, exited, http, output, until_exited};
use crate::util::{AUDIENCE, Harness, Start, assert_no_secret_in, mode_of, random};

/// One job on an emulated runner: the servers, and the runner's directory (RUNNER_TEMP, HOME
/// and the files behind GITHUB_ENV, GITHUB_STATE and GITHUB_STEP_SUMMARY).
struct Job {
    h: Harness,
    upstream: Upstream,
    _upstream: DropGuard,
    runner: TempDir,
    run_id: String,
}

impl Job {
    async fn start() -> Job {
        let h = Harness::start().await;
        let (upstream, guard) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
            .await
            .unwrap();
        let runner = tempfile::tempdir().unwrap();
        for d in ["temp", "home"] {
            std::fs::create_dir(runner.path().join(d)).unwrap();
        }
        Job {
            h,
            upstream,
            _upstream: guard,
            runner,
            run_id: format!("{}", 1_000_000 + fastrand::u32(..1_000_000)),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.runner.path().join(name)
    }

    /// The session the job's variables give.
    fn session(&self) -> String {
        format!("gh-{}-1-build", self.run_id)
    }

    /// What the runner sets for every step of the job, and the step's own `env:` (here the one
    /// setting the test upstream needs, given as the README says any setting can be).
    fn job_env(&self) -> Vec<(String, String)> {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_behest-agent"))
            .parent()
            .unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        [
            ("PATH", path),
            ("HOME", self.file("home").display().to_string()),
            ("CI", "true".into()),
            ("GITHUB_ACTIONS", "true".into()),
            ("GITHUB_RUN_ID", self.run_id.clone()),
            ("GITHUB_RUN_ATTEMPT", "1".into()),
            ("GITHUB_JOB", "build".into()),
            ("RUNNER_TEMP", self.file("temp").display().to_string()),
            ("GITHUB_ENV", self.file("github_env").display().to_string()),
            (
                "GITHUB_STATE",
                self.file("github_state").display().to_string(),
            ),
            (
                "GITHUB_STEP_SUMMARY",
                self.file("step_summary").display().to_string(),
            ),
            (
                "BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM",
                "true".into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The action's inputs as the runner passes them (with the defaults action.yml declares).
    fn inputs(&self, secret: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut inputs: HashMap<String, String> = [
            ("INPUT_DOMAIN", self.h.idp.base_url()),
            ("INPUT_CLIENT-ID", self.h.client_id.clone()),
            ("INPUT_AUDIENCE", AUDIENCE.to_string()),
            ("INPUT_CLIENT-SECRET", secret.to_string()),
            ("INPUT_UPSTREAM", self.upstream.base_url()),
            ("INPUT_SESSION", String::new()),
            ("INPUT_BINARY", "behest-agent".to_string()),
            ("INPUT_TIMEOUT", "30s".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            inputs.insert(k.to_string(), v.to_string());
        }
        inputs.into_iter().collect()
    }

    /// `node ci/github/<script>` with the job's variables, `inputs` and `more`.
    async fn step(
        &self,
        script: &str,
        inputs: &[(String, String)],
        more: &[(String, String)],
    ) -> Out {
        let js = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("ci/github")
            .join(script);
        let mut c = Command::new("node");
        c.arg(js)
            .env_clear()
            .envs(self.job_env())
            .envs(inputs.iter().cloned())
            .envs(more.iter().cloned())
            .current_dir(self.runner.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        output(c).await
    }

    async fn main(&self, inputs: &[(String, String)]) -> Out {
        self.step("main.js", inputs, &[]).await
    }

    /// post.js, with what main saved in GITHUB_STATE given back as `STATE_*`.
    async fn post(&self, inputs: &[(String, String)]) -> Out {
        let state: Vec<(String, String)> = self
            .state()
            .into_iter()
            .map(|(k, v)| (format!("STATE_{k}"), v))
            .collect();
        self.step("post.js", inputs, &state).await
    }

    fn state(&self) -> HashMap<String, String> {
        read_file_command(&self.file("github_state"))
    }

    fn exported(&self) -> HashMap<String, String> {
        read_file_command(&self.file("github_env"))
    }

    fn daemon_pid(&self) -> u32 {
        self.state()["pid"]
            .parse()
            .expect("main saved the daemon's pid")
    }
}

/// A GITHUB_ENV / GITHUB_STATE file as the runner reads it: `NAME=value` lines, or
/// `NAME<<DELIMITER` then the value's lines then the delimiter.
fn read_file_command(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = HashMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        match (line.split_once('='), line.split_once("<<")) {
            (Some((name, value)), heredoc) if heredoc.is_none_or(|(n, _)| n.len() > name.len()) => {
                out.insert(name.to_string(), value.to_string());
            }
            (_, Some((name, delimiter))) => {
                let mut value = Vec::new();
                for l in lines.by_ref() {
                    if l == delimiter {
                        break;
                    }
                    value.push(l);
                }
                out.insert(name.to_string(), value.join("\n"));
            }
            _ => panic!("{}: not a file command line: {line:?}", path.display()),
        }
    }
    out
}

/// Every regular file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let (path, kind) = (entry.path(), entry.file_type().unwrap());
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .map(|b| String::from_utf8_lossy(&b).contains(needle))
                    .unwrap_or(false)
            {
                found.push(path);
            }
        }
    }
    found
}

/// main's stdout without its one `::add-mask::` command, the only line that may hold the
/// secret (the runner takes it and never shows it).
fn without_add_mask(stdout: &str, secret: &str) -> String {
    let mask = format!("::add-mask::{secret}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("::add-mask::"))
            .count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.lines().next() == Some(mask.as_str()),
        "the secret is masked first: {stdout}"
    );
    stdout
        .lines()
        .filter(|l| *l != mask)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether this build has `behest-agent usage` (SPEC §8; built separately).
#[tokio::test]
async fn main_exports_the_proxy_a_step_uses_and_post_stops_the_daemon_leaving_no_secret() {
    let job = Job::start().await;
    let secret = job.h.secret.clone();
    let inputs = job.inputs(&secret, &[]);
    let main = job.main(&inputs).await;
    assert_eq!(main.code, 0, "{}\n{}", main.stdout, main.stderr);
    let main_stdout = without_add_mask(&main.stdout, &secret);
    assert!(main_stdout.contains("behest-agent ready"), "{main_stdout}");

    let env = job.exported();
    let base = env["OPENAI_BASE_URL"].clone();
    assert!(
        base.starts_with("http://127.0.0.1:")
            && base.ends_with(&format!("/s/{}/v1", job.session())),
        "{base}"
    );
    assert!(
        !base.contains(":8711/"),
        "a free port, not the default: {base}"
    );
    assert_eq!(env["OPENAI_API_BASE"], base);
    assert_eq!(env["OPENAI_API_KEY"], "placeholder");
    let state = job.state();
    assert_eq!(state["session"], job.session());
    let dir = PathBuf::from(&state["dir"]);
    assert!(dir.starts_with(job.file("temp")), "{}", dir.display());
    assert_eq!(mode_of(&dir), 0o700);
    assert_eq!(mode_of(&dir.join("client-secret")), 0o600);
    assert_eq!(
        std::fs::read_to_string(dir.join("client-secret"))
            .unwrap()
            .trim(),
        secret
    );

    // A later step of the job: any client with the exported variables reaches Behest.
    let resp = http()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&env["OPENAI_API_KEY"])
        .json(&chat("hello from the job", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("hello from the job"));
    let seen = job.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].bearer, BearerKind::Jwt);
    assert_eq!(
        seen[0].claims.as_ref().unwrap()["uid"],
        job.h.client_id.as_str()
    );
    assert_eq!(seen[0].session_id.as_deref(), Some(job.session().as_str()));
    // …and `behest-agent token` finds the job's daemon through the exported socket.
    let mut token = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    token
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", job.file("home"))
        .envs(env.iter())
        .arg("token")
        .stdin(Stdio::null());
    let token = output(token).await;
    assert_eq!(token.code, 0, "{}", token.stderr);
    let token = token.stdout.trim().to_string();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(job.h.idp.grants(), 1, "one grant, the daemon's");

    // The secret is in the 0600 file only: not in the daemon's environment (INPUT_CLIENT-SECRET
    // is not passed on), its log, or any other file of the job.
    let pid = job.daemon_pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_no_secret_in(
        &String::from_utf8_lossy(&environ),
        std::slice::from_ref(&secret),
        "the daemon's environment",
    );
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(log.contains("behest-agent running"), "{log}");
    assert_no_secret_in(&log, &[secret.clone(), token.clone()], "the daemon's log");
    assert_eq!(
        files_containing(job.runner.path(), &secret),
        vec![dir.join("client-secret")]
    );

    // An earlier step's summary whose last line is not ended: the table still starts a heading.
    std::fs::write(job.file("step_summary"), "earlier text").unwrap();
    let post = job.post(&inputs).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(
        post.stdout.contains(&format!("pid {pid}")) && post.stdout.contains("stopped"),
        "{}",
        post.stdout
    );
    assert!(exited(pid), "post returned with the daemon still running");
    assert!(!dir.exists(), "post removes the directory with the secret");
    let summary = std::fs::read_to_string(job.file("step_summary")).unwrap_or_default();
    assert!(
        summary.starts_with("earlier text\n")
            && summary.contains(&format!("\n### Behest usage (session `{}`)", job.session())),
        "{summary}"
    );
    for (what, text) in [
        ("main's stdout", main_stdout.as_str()),
        ("main's stderr", &main.stderr),
        ("post's stdout", &post.stdout),
        ("post's stderr", &post.stderr),
    ] {
        assert_no_secret_in(text, &[secret.clone(), token.clone()], what);
    }
    assert!(files_containing(job.runner.path(), &secret).is_empty());
}

#[tokio::test]
async fn post_after_a_failed_job_ends_a_daemon_it_cannot_reach_and_exits_0() {
    let job = Job::start().await;
    // Installed under another name: the daemon is still known by its pid and start time.
    let renamed = job.file("temp/agent-bin");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_behest-agent"), &renamed).unwrap();
    let renamed = renamed.display().to_string();
    let inputs = job.inputs(
        &job.h.secret,
        &[("INPUT_SESSION", "job-42"), ("INPUT_BINARY", &renamed)],
    );
    let main = job.main(&inputs).await;
    assert_eq!(main.code, 0, "{}\n{}", main.stdout, main.stderr);
    assert!(job.exported()["OPENAI_BASE_URL"].ends_with("/s/job-42/v1"));
    assert_eq!(job.state()["session"], "job-42");
    // The failing step took the control socket with it: `stop` cannot reach the daemon.
    let pid = job.daemon_pid();
    std::fs::remove_file(&job.state()["socket"]).unwrap();

    let post = job.post(&inputs).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(
        post.stdout.contains(&format!("ending pid {pid}")),
        "{}",
        post.stdout
    );
    until_exited(pid).await;
    assert!(!Path::new(&job.state()["dir"]).exists());
    assert_no_secret_in(
        &post.stdout,
        std::slice::from_ref(&job.h.secret),
        "post's stdout",
    );
}

#[tokio::test]
async fn with_require_key_the_jobs_local_key_is_masked_and_ends_with_the_job() {
    let job = Job::start().await;
    let inputs = job.inputs(&job.h.secret, &[]);
    let step_env = [(
        "BEHEST_AGENT__PROXY__REQUIRE_KEY".to_string(),
        "true".to_string(),
    )];
    let main = job.step("main.js", &inputs, &step_env).await;
    assert_eq!(main.code, 0, "{}\n{}", main.stdout, main.stderr);
    let key = job.exported()["OPENAI_API_KEY"].clone();
    assert!(key.starts_with("bak_"), "{key}");
    assert!(
        main.stdout.contains(&format!("::add-mask::{key}")),
        "the key is masked: {}",
        main.stdout
    );
    // It works in a later step, and lives in the job's own keys file.
    let base = job.exported()["OPENAI_BASE_URL"].clone();
    let r = http()
        .get(format!("{base}/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dir = PathBuf::from(&job.state()["dir"]);
    assert!(dir.join("keys.json").exists());
    assert!(files_containing(&job.file("home"), "\"keys\"").is_empty());

    let state: Vec<(String, String)> = job
        .state()
        .into_iter()
        .map(|(k, v)| (format!("STATE_{k}"), v))
        .chain(step_env.iter().cloned())
        .collect();
    let post = job.step("post.js", &inputs, &state).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(!dir.exists(), "the keys went with the job");
}

#[tokio::test]
async fn post_after_the_daemon_died_exits_0() {
    let job = Job::start().await;
    let inputs = job.inputs(&job.h.secret, &[]);
    let main = job.main(&inputs).await;
    assert_eq!(main.code, 0, "{}\n{}", main.stdout, main.stderr);
    let pid = job.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    until_exited(pid).await;
    let post = job.post(&inputs).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(!Path::new(&job.state()["dir"]).exists());
}

#[tokio::test]
async fn main_with_a_wrong_secret_fails_saying_why_and_leaves_no_daemon() {
    let job = Job::start().await;
    let wrong = format!("wrong-{}", random(24));
    let inputs = job.inputs(&wrong, &[("INPUT_TIMEOUT", "3s")]);
    let main = job.main(&inputs).await;
    assert_eq!(main.code, 1, "{}\n{}", main.stdout, main.stderr);
    let stdout = without_add_mask(&main.stdout, &wrong);
    let error = stdout
        .lines()
        .find(|l| l.starts_with("::error::"))
        .unwrap_or_else(|| panic!("no error annotation: {stdout}"));
    assert!(
        error.starts_with("::error::behest-agent: the daemon's grant failed and will keep failing")
            && error.contains("invalid_client"),
        "{error}"
    );
    assert!(
        stdout.contains("::group::behest-agent log"),
        "the log's tail is shown: {stdout}"
    );
    assert_no_secret_in(
        &stdout,
        &[wrong.clone(), job.h.secret.clone()],
        "main's stdout",
    );
    assert_no_secret_in(&main.stderr, std::slice::from_ref(&wrong), "main's stderr");
    assert!(!job.exported().contains_key("OPENAI_BASE_URL"));
    let pid = job.daemon_pid();
    assert!(exited(pid), "main stops the daemon it could not use");

    let post = job.post(&inputs).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(
        !post.stdout.contains("usage"),
        "no usage table for a job main never got ready: {}",
        post.stdout
    );
    assert!(!Path::new(&job.state()["dir"]).exists());
}

#[tokio::test]
async fn main_missing_an_input_or_the_upstream_fails_saying_which() {
    for (missing, says) in [
        ("INPUT_DOMAIN", "`auth.domain` is missing"),
        ("INPUT_UPSTREAM", "serves no proxy"),
    ] {
        let job = Job::start().await;
        let inputs = job.inputs(&job.h.secret, &[(missing, "")]);
        let main = job.main(&inputs).await;
        assert_eq!(main.code, 1, "{missing}: {}\n{}", main.stdout, main.stderr);
        let error = main
            .stdout
            .lines()
            .find(|l| l.starts_with("::error::"))
            .unwrap_or_else(|| panic!("{missing}: no error annotation: {}", main.stdout));
        assert!(error.contains(says), "{missing}: {error}");
        assert!(!job.exported().contains_key("OPENAI_BASE_URL"), "{missing}");
        let post = job.post(&inputs).await;
        assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    }
}

#[tokio::test]
async fn main_without_the_binary_fails_saying_so_and_post_has_nothing_to_stop() {
    let job = Job::start().await;
    let inputs = job.inputs(
        &job.h.secret,
        &[("INPUT_BINARY", "/nonexistent/behest-agent")],
    );
    let main = job.main(&inputs).await;
    assert_eq!(main.code, 1, "{}\n{}", main.stdout, main.stderr);
    assert!(
        main.stdout
            .contains("::error::cannot start `/nonexistent/behest-agent run`"),
        "{}",
        main.stdout
    );
    assert!(!job.state().contains_key("pid"));
    let post = job.post(&inputs).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(post.stdout.contains("nothing to stop"), "{}", post.stdout);
    assert!(
        files_containing(&job.file("temp"), &job.h.secret).is_empty(),
        "main took the secret file away"
    );
}

#[test]
fn action_yml_declares_the_inputs_and_node20_main_and_post() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("action.yml")).unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&text).unwrap()[0];
    let runs = &doc["runs"];
    assert_eq!(runs["using"].as_str(), Some("node20"));
    assert_eq!(runs["main"].as_str(), Some("ci/github/main.js"));
    assert_eq!(runs["post"].as_str(), Some("ci/github/post.js"));
    for input in [
        "domain",
        "client-id",
        "audience",
        "client-secret",
        "upstream",
        "session",
        "binary",
    ] {
        assert!(
            doc["inputs"][input]["description"].as_str().is_some(),
            "input {input}"
        );
    }
    assert_eq!(
        doc["inputs"]["binary"]["default"].as_str(),
        Some("behest-agent")
    );
}
