//! The GitLab CI template (`ci/gitlab/behest-agent.yml`), parsed as YAML and run as GitLab runs
//! a job that `extends: .behest-agent`: `before_script` and the job's `script` in one `bash`
//! (`set -eo pipefail`, as the runner's bash script does), `after_script` in another, with the
//! CI/CD variables set and `behest-agent` on PATH, against the embedded IdP and echo upstream.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use devkit::upstream::{BearerKind, Upstream, UpstreamOptions};
use tempfile::TempDir;
use tokio::process::Command;
use tokio_util::sync::DropGuard;
use yaml_rust2::{Yaml, YamlLoader};

use crate::ci::{Out, chat, exited, http, output, until_exited};
use crate::util::{AUDIENCE, Harness, Start, assert_no_secret_in};

/// The template's `.behest-agent` job: its before_script and after_script lines.
fn template() -> (Vec<String>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/gitlab/behest-agent.yml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let job = &docs[0][".behest-agent"];
    let lines = |key: &str| -> Vec<String> {
        match &job[key] {
            Yaml::Array(items) => items
                .iter()
                .map(|i| {
                    // As GitLab requires; an unquoted `: ` would make a line a mapping.
                    i.as_str()
                        .unwrap_or_else(|| panic!("{key}: a line is not a string: {i:?}"))
                        .to_string()
                })
                .collect(),
            other => panic!("{key} is not a list: {other:?}"),
        }
    };
    (lines("before_script"), lines("after_script"))
}

struct GitlabJob {
    h: Harness,
    upstream: Upstream,
    _upstream: DropGuard,
    builds: TempDir,
    job_id: String,
}

impl GitlabJob {
    async fn start() -> GitlabJob {
        let h = Harness::start().await;
        let (upstream, guard) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
            .await
            .unwrap();
        let builds = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(builds.path().join("group/project")).unwrap();
        std::fs::create_dir_all(builds.path().join("home")).unwrap();
        GitlabJob {
            h,
            upstream,
            _upstream: guard,
            builds,
            job_id: format!("{}", 100_000 + fastrand::u32(..1_000_000)),
        }
    }

    fn project_dir(&self) -> PathBuf {
        self.builds.path().join("group/project")
    }

    /// Where the template keeps the daemon's socket, log and pid.
    fn agent_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.tmp/behest-agent", self.project_dir().display()))
    }

    /// `lines` in a fresh `bash`, as the runner runs a script, with the job's variables.
    async fn shell(&self, lines: &[String], extra: &[(&str, &str)]) -> Out {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_behest-agent"))
            .parent()
            .unwrap();
        let script = format!("set -eo pipefail\n{}\n", lines.join("\n"));
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(script)
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("HOME", self.builds.path().join("home"))
            .env("CI", "true")
            .env("GITLAB_CI", "true")
            .env("CI_JOB_ID", &self.job_id)
            .env("CI_BUILDS_DIR", self.builds.path())
            .env("CI_PROJECT_DIR", self.project_dir())
            .env("AUTH0_DOMAIN", self.h.idp.base_url())
            .env("AUTH0_CLIENT_ID", &self.h.client_id)
            .env("AUTH0_AUDIENCE", AUDIENCE)
            .env("AUTH0_CLIENT_SECRET", &self.h.secret)
            .env("BEHEST_BASE_URL", self.upstream.base_url())
            // The test upstream is plain http on loopback: a CI/CD variable allows it.
            .env("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true")
            .envs(extra.iter().copied())
            .current_dir(self.project_dir())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        output(c).await
    }
}

#[tokio::test]
async fn before_script_serves_the_job_and_after_script_in_its_own_shell_stops_the_agent() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    // The job's own script, after before_script in the same shell: what it was given, and the
    // CLI finding the job's daemon.
    let mut script = before.clone();
    script.push(
        r#"printf '%s\n' "$OPENAI_BASE_URL" "$OPENAI_API_BASE" "$OPENAI_API_KEY" >"$CI_PROJECT_DIR/job-env""#
            .to_string(),
    );
    script.push("behest-agent token >/dev/null".to_string());
    let run = job.shell(&script, &[]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(job.h.idp.grants(), 1, "one grant, the daemon's");

    let seen = std::fs::read_to_string(job.project_dir().join("job-env")).unwrap();
    let vars: Vec<&str> = seen.lines().collect();
    let base = vars[0].to_string();
    assert!(
        base.starts_with("http://127.0.0.1:")
            && base.ends_with(&format!("/s/gl-{}/v1", job.job_id))
            && !base.contains(":8711/"),
        "{base}"
    );
    assert_eq!(vars[1], base);
    assert_eq!(vars[2], "placeholder");

    // The daemon outlives the script's shell, as GitLab's before_script/script shell ends.
    let pid: u32 = std::fs::read_to_string(job.agent_dir().join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!exited(pid));
    let resp = http()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(vars[2])
        .json(&chat("hello from gitlab", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = job.upstream.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].bearer, BearerKind::Jwt);
    assert_eq!(r[0].session_id, Some(format!("gl-{}", job.job_id)));
    let log = std::fs::read_to_string(job.agent_dir().join("agent.log")).unwrap();

    // after_script: a new shell, with only the CI variables to find the daemon by.
    let post = job.shell(&after, &[]).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(
        post.stdout.contains(&format!("pid {pid}")) && post.stdout.contains("stopped"),
        "{}",
        post.stdout
    );
    assert!(exited(pid), "after_script left the daemon running");
    assert!(
        !job.agent_dir().exists(),
        "after_script removes the agent's directory"
    );
    for (what, text) in [
        ("the job's output", run.stdout + &run.stderr),
        ("after_script's output", post.stdout + &post.stderr),
        ("the daemon's log", log),
    ] {
        assert_no_secret_in(&text, std::slice::from_ref(&job.h.secret), what);
    }
}

#[tokio::test]
async fn with_require_key_the_jobs_local_key_lives_in_the_jobs_own_keys_file() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let mut script = before.clone();
    script.push(
        r#"printf '%s\n' "$OPENAI_BASE_URL" "$OPENAI_API_KEY" >"$CI_PROJECT_DIR/job-env""#
            .to_string(),
    );
    let require = [("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true")];
    let run = job.shell(&script, &require).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let seen = std::fs::read_to_string(job.project_dir().join("job-env")).unwrap();
    let vars: Vec<&str> = seen.lines().collect();
    assert!(vars[1].starts_with("bak_"), "{seen}");
    let resp = http()
        .get(format!("{}/models", vars[0]))
        .bearer_auth(vars[1])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(job.agent_dir().join("keys.json").exists());
    assert!(
        !job.builds
            .path()
            .join("home/.local/state/behest-agent/keys.json")
            .exists(),
        "nothing in the user's keys file"
    );
    let post = job.shell(&after, &require).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(!job.agent_dir().exists(), "the keys went with the job");
}

#[tokio::test]
async fn a_wrong_secret_fails_before_script_with_the_reason_and_after_script_still_cleans_up() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let wrong = "wrong-secret-for-gitlab";
    let vars = [
        ("AUTH0_CLIENT_SECRET", wrong),
        ("BEHEST_AGENT_WAIT_TIMEOUT", "3s"),
    ];
    let mut script = before.clone();
    script.push("touch \"$CI_PROJECT_DIR/script-ran\"".to_string());
    let run = job.shell(&script, &vars).await;
    assert_ne!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let said = run.stdout.clone() + &run.stderr;
    assert!(said.contains("invalid_client"), "{said}");
    assert!(
        !job.project_dir().join("script-ran").exists(),
        "the job's script does not run"
    );
    assert_no_secret_in(
        &said,
        &[wrong.to_string(), job.h.secret.clone()],
        "the job's output",
    );
    let pid: u32 = std::fs::read_to_string(job.agent_dir().join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let post = job.shell(&after, &vars).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    until_exited(pid).await;
    assert!(!job.agent_dir().exists());
}

/// An agent that exits at start (here: no secret) fails before_script at once with `wait --pid`,
/// not at the wait's timeout (every such job waited its whole `BEHEST_AGENT_WAIT_TIMEOUT`).
#[tokio::test]
async fn an_agent_that_exits_at_start_fails_before_script_without_waiting_out_the_timeout() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let vars = [
        ("AUTH0_CLIENT_SECRET", ""),
        ("BEHEST_AGENT_WAIT_TIMEOUT", "60s"),
    ];
    let run = job.shell(&before, &vars).await;
    assert_ne!(run.code, 0);
    let said = run.stdout.clone() + &run.stderr;
    assert!(
        said.contains("has exited before it was ready") && said.contains("client_secret"),
        "{said}"
    );
    let post = job.shell(&after, &vars).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(!job.agent_dir().exists());
}

/// An agent that does not answer (stopped, hung) is still gone after after_script: SIGTERM by the
/// pid file, then SIGKILL (a stopped one outlived SIGTERM, and the job).
#[tokio::test]
async fn after_script_kills_an_agent_that_does_not_answer() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let mut script = before.clone();
    script.push(r#"kill -STOP "$(cat "$BEHEST_AGENT_JOB_DIR/agent.pid")""#.to_string());
    let run = job.shell(&script, &[]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let pid: u32 = std::fs::read_to_string(job.agent_dir().join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let post = job.shell(&after, &[]).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    until_exited(pid).await;
    assert!(!job.agent_dir().exists());
}

/// A project directory too deep for a socket path: BEHEST_AGENT_JOB_DIR moves the job's
/// directory, and after_script finds it there too.
#[tokio::test]
async fn a_job_dir_variable_moves_the_agents_directory() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let moved = job.builds.path().join("b");
    let var = [("BEHEST_AGENT_JOB_DIR", moved.to_str().unwrap())];
    let mut script = before.clone();
    script.push(r#"curl -sf "$OPENAI_BASE_URL/models" >/dev/null"#.to_string());
    let run = job.shell(&script, &var).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(moved.join("agent.sock").exists());
    assert!(!job.agent_dir().exists());
    let post = job.shell(&after, &var).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    assert!(!moved.exists());
}

/// A pid file whose agent is gone and whose pid another process took, here one the job started
/// (it has the job's environment): after_script leaves that process alone.
#[tokio::test]
async fn after_script_never_kills_a_process_that_reused_the_agents_pid() {
    let job = GitlabJob::start().await;
    let (before, after) = template();
    let mut script = before.clone();
    let victim = job.builds.path().join("victim.pid");
    script.push(format!(
        "sleep 300 >/dev/null 2>&1 & echo $! >{}",
        victim.display()
    ));
    script.push("behest-agent stop".to_string());
    let run = job.shell(&script, &[]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let pid: i32 = std::fs::read_to_string(&victim)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(job.agent_dir().join("agent.pid"), format!("{pid}\n")).unwrap();
    let post = job.shell(&after, &[]).await;
    assert_eq!(post.code, 0, "{}\n{}", post.stdout, post.stderr);
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(alive, "the job's own process was killed");
}

#[test]
fn the_template_is_one_hidden_job_to_extend() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/gitlab/behest-agent.yml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let keys: Vec<&str> = docs[0]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [".behest-agent"],
        "a hidden job only: including it adds no job"
    );
}
