//! The session `env` and `exec` put in the base URL (`/s/ID/v1`) when the command line gives
//! none: `proxy.session_id` when configured (the proxy sends it itself, so the URL carries none),
//! else — unless `proxy.session_from_ci = false` — one derived from the CI job's variables, so
//! each job's cost is attributed to it with no flag at all.
//!
//! The derivation is a pure function of the environment (a map), first CI found wins:
//! GitHub Actions `gh-$GITHUB_RUN_ID-$GITHUB_RUN_ATTEMPT-$GITHUB_JOB`, GitLab `gl-$CI_JOB_ID`,
//! Buildkite `bk-$BUILDKITE_JOB_ID`, CircleCI `cci-$CIRCLE_WORKFLOW_JOB_ID`, Jenkins
//! `jk-$BUILD_TAG`. A CI counts as found when all of its variables are set and not blank.
//! Characters outside `[A-Za-z0-9._-]` become `-`; an id longer than the proxy's limit
//! ([`MAX_SESSION_ID`]) keeps its first characters and ends with `-` and 16 hex digits of the
//! SHA-256 of the whole id, so two long ids that differ only at the end stay apart.

use std::collections::HashMap;

use super::{Global, process_env};
use crate::config;
use crate::proxy::MAX_SESSION_ID;

/// The CIs known, in the order they are tried: the id's prefix and the variables it is made of.
const CIS: &[(&str, &[&str])] = &[
    ("gh", &["GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_JOB"]),
    ("gl", &["CI_JOB_ID"]),
    ("bk", &["BUILDKITE_JOB_ID"]),
    ("cci", &["CIRCLE_WORKFLOW_JOB_ID"]),
    ("jk", &["BUILD_TAG"]),
];

/// Hex digits of the hash that ends an id cut to [`MAX_SESSION_ID`].
const HASH_DIGITS: usize = 16;

/// The session the job's variables name, if any CI is found.
pub fn from_ci(env: &HashMap<String, String>) -> Option<String> {
    CIS.iter().find_map(|(prefix, vars)| {
        let values: Option<Vec<&str>> = vars
            .iter()
            .map(|v| {
                env.get(*v)
                    .map(String::as_str)
                    .filter(|s| !s.trim().is_empty())
            })
            .collect();
        values.map(|values| sanitize(&format!("{prefix}-{}", values.join("-"))))
    })
}

/// `raw` made a valid session id: outside `[A-Za-z0-9._-]` a character becomes `-`, and an id
/// longer than [`MAX_SESSION_ID`] is cut and ends with a hash of the whole.
pub fn sanitize(raw: &str) -> String {
    let id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.len() <= MAX_SESSION_ID {
        return id;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let keep = MAX_SESSION_ID - HASH_DIGITS - 1;
    format!("{}-{}", &id[..keep], &hash[..HASH_DIGITS])
}

/// The session for the base URL: `given` (`--session`), else none when `proxy.session_id` is
/// configured, else the CI's when `session_from_ci`.
pub fn resolve(
    given: Option<&str>,
    configured: Option<&str>,
    session_from_ci: bool,
    env: &HashMap<String, String>,
) -> Option<String> {
    match (given, configured) {
        (Some(s), _) => Some(s.to_string()),
        (None, Some(_)) => None,
        (None, None) if session_from_ci => from_ci(env),
        (None, None) => None,
    }
}

/// The session for `env` or `exec`: `--session`, else what [`resolve`] makes of the
/// configuration (read without validating the rest) and the process environment. A
/// configuration this user cannot read counts as setting neither key: talking to a running
/// daemon never needed it (without a daemon, `env` and `exec` have already failed on it).
pub fn for_command(g: &Global, given: Option<&str>) -> Option<String> {
    if let Some(s) = given {
        return Some(s.to_string());
    }
    let (configured, session_from_ci) =
        config::session_keys(&g.load_options()).unwrap_or((None, true));
    resolve(None, configured.as_deref(), session_from_ci, &process_env())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::valid_session;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_ci_gives_its_prefixed_id() {
        let cases = [
            (
                env(&[
                    ("GITHUB_RUN_ID", "9876543210"),
                    ("GITHUB_RUN_ATTEMPT", "2"),
                    ("GITHUB_JOB", "build_and_test"),
                ]),
                "gh-9876543210-2-build_and_test",
            ),
            (env(&[("CI_JOB_ID", "4242")]), "gl-4242"),
            (
                env(&[("BUILDKITE_JOB_ID", "0190f1c4-1234-4cde-9f00-aa55aa55aa55")]),
                "bk-0190f1c4-1234-4cde-9f00-aa55aa55aa55",
            ),
            (env(&[("CIRCLE_WORKFLOW_JOB_ID", "abc-123")]), "cci-abc-123"),
            (
                env(&[("BUILD_TAG", "jenkins-folder/my job-17")]),
                "jk-jenkins-folder-my-job-17",
            ),
        ];
        for (env, want) in cases {
            assert_eq!(from_ci(&env).as_deref(), Some(want), "{env:?}");
        }
    }

    #[test]
    fn the_first_ci_found_wins_and_an_incomplete_one_is_skipped() {
        let both = env(&[
            ("GITHUB_RUN_ID", "1"),
            ("GITHUB_RUN_ATTEMPT", "1"),
            ("GITHUB_JOB", "j"),
            ("CI_JOB_ID", "7"),
        ]);
        assert_eq!(from_ci(&both).as_deref(), Some("gh-1-1-j"));
        // GitHub's variables without the job: not GitHub; an empty one counts as unset.
        let partial = env(&[
            ("GITHUB_RUN_ID", "1"),
            ("GITHUB_RUN_ATTEMPT", "1"),
            ("GITHUB_JOB", ""),
            ("BUILD_TAG", "jenkins-x-1"),
        ]);
        assert_eq!(from_ci(&partial).as_deref(), Some("jk-jenkins-x-1"));
        assert_eq!(from_ci(&env(&[("CI", "true"), ("HOME", "/root")])), None);
    }

    #[test]
    fn characters_outside_the_safe_set_become_dashes() {
        assert_eq!(sanitize("jk-a/b c%2F~é:ü"), "jk-a-b-c-2F----");
        assert_eq!(sanitize("gh-1-1-job.name_x"), "gh-1-1-job.name_x");
    }

    #[test]
    fn a_long_id_is_cut_to_the_proxys_limit_and_ends_with_a_hash_of_the_whole() {
        let long_a = format!("jk-{}-1", "x".repeat(300));
        let long_b = format!("jk-{}-2", "x".repeat(300));
        let (a, b) = (sanitize(&long_a), sanitize(&long_b));
        assert_eq!(a.len(), MAX_SESSION_ID);
        assert!(a.starts_with("jk-xxxx"), "{a}");
        assert_ne!(a, b, "ids differing only past the cut stay apart");
        assert_eq!(a, sanitize(&long_a), "the same id gives the same session");
        let exact = format!("jk-{}", "y".repeat(MAX_SESSION_ID - 3));
        assert_eq!(sanitize(&exact), exact, "an id at the limit is kept whole");
    }

    #[test]
    fn every_derived_id_passes_the_proxys_session_rule() {
        for raw in [
            "gl-1",
            "jk-\u{1F600}\u{0}\n\t\"'\\/?#[]@!$&()*+,;=%",
            &"é".repeat(200),
            &format!("gh-{}", "-".repeat(500)),
        ] {
            let id = sanitize(raw);
            assert!(valid_session(id.as_bytes()), "{raw:?} -> {id:?}");
            // And `env`'s stricter rule for a URL path segment.
            assert!(
                crate::cli::env::base_url("127.0.0.1:1", Some(&id)).is_ok(),
                "{id}"
            );
        }
    }

    #[test]
    fn a_given_or_configured_session_comes_before_the_cis() {
        let gl = env(&[("CI_JOB_ID", "7")]);
        assert_eq!(
            resolve(Some("mine"), None, true, &gl).as_deref(),
            Some("mine")
        );
        assert_eq!(
            resolve(Some("mine"), Some("conf"), true, &gl).as_deref(),
            Some("mine")
        );
        assert_eq!(resolve(None, Some("conf"), true, &gl), None);
        assert_eq!(resolve(None, None, true, &gl).as_deref(), Some("gl-7"));
        assert_eq!(resolve(None, None, false, &gl), None);
    }
}
