//! Reading `usage` out of a response body as its bytes pass (SPEC §8). The meter sees each frame
//! after it has gone to the client's side of the body and holds nothing back: a JSON body of at
//! most [`MAX_JSON`] bytes is copied aside and parsed at its end (a larger one is not parsed); a
//! `text/event-stream` is split into lines, of which at most [`MAX_LINE`] bytes are kept (a longer
//! line is skipped), and a `data:` line is parsed only when it carries a `usage` object or the
//! model is not known yet. Whatever the upstream sends, a meter holds at most one of those buffers.

use http::HeaderValue;
use memchr::memmem;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The largest JSON body whose usage is read.
pub const MAX_JSON: usize = 1 << 20;
/// The longest event-stream line kept for parsing.
pub const MAX_LINE: usize = 64 << 10;
/// A model name is cut to this many characters (it names metrics and ledger lines).
const MAX_MODEL: usize = 128;

/// Token counts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Tokens {
    /// From a `usage` object: `prompt_tokens`/`completion_tokens` (chat, completions,
    /// embeddings) or `input_tokens`/`output_tokens` (responses), and `total_tokens` (else their
    /// sum). `None` when it is not an object, names no count, or a count is not a whole
    /// non-negative number: such a response is unaccounted, never guessed.
    fn from_usage(usage: &RawValue) -> Option<Tokens> {
        #[derive(Deserialize)]
        struct Counts {
            prompt_tokens: Option<u64>,
            input_tokens: Option<u64>,
            completion_tokens: Option<u64>,
            output_tokens: Option<u64>,
            total_tokens: Option<u64>,
        }
        // serde would also read a struct from an array, by position.
        if !usage.get().starts_with('{') {
            return None;
        }
        let c: Counts = serde_json::from_str(usage.get()).ok()?;
        let prompt = c.prompt_tokens.or(c.input_tokens);
        let completion = c.completion_tokens.or(c.output_tokens);
        if prompt.is_none() && completion.is_none() && c.total_tokens.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        Some(Tokens {
            prompt,
            completion,
            total: c.total_tokens.unwrap_or(prompt.saturating_add(completion)),
        })
    }
}

/// What a response said about itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub tokens: Option<Tokens>,
    pub model: Option<String>,
}

/// Watches one response body.
#[derive(Debug)]
pub struct Meter {
    kind: Kind,
    read: Read,
}

#[derive(Debug)]
enum Kind {
    /// The body so far; `None` once it is over [`MAX_JSON`].
    Json(Option<Vec<u8>>),
    /// The current line's start, when it did not end in the frame that carried it; `skipping`
    /// while the rest of a line over [`MAX_LINE`] goes by.
    Sse { line: Vec<u8>, skipping: bool },
}

/// The fields of a JSON body or event that are read, borrowed unparsed (a `usage` of the wrong
/// shape must not lose the model); the rest is skipped.
#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    /// The Responses API's events carry the response here.
    #[serde(borrow)]
    response: Option<Inner<'a>>,
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
}

impl Meter {
    /// A meter for a response of this content type and announced length; `None` when its usage
    /// cannot be read (another type, or JSON over [`MAX_JSON`]).
    pub fn new(content_type: Option<&HeaderValue>, length: Option<u64>) -> Option<Meter> {
        let essence = content_type?.as_bytes();
        let kind = if starts_with_ignore_case(essence, b"application/json") {
            if length.is_some_and(|n| n > MAX_JSON as u64) {
                return None;
            }
            Kind::Json(Some(Vec::with_capacity(length.unwrap_or(1024) as usize)))
        } else if starts_with_ignore_case(essence, b"text/event-stream") {
            Kind::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else {
            return None;
        };
        Some(Meter {
            kind,
            read: Read::default(),
        })
    }

    /// One frame of the body, as it passes.
    pub fn feed(&mut self, data: &[u8]) {
        match &mut self.kind {
            Kind::Json(buf) => {
                if let Some(b) = buf {
                    if b.len() + data.len() > MAX_JSON {
                        *buf = None;
                    } else {
                        b.extend_from_slice(data);
                    }
                }
            }
            Kind::Sse { line, skipping } => {
                let mut rest = data;
                while let Some(end) = memchr::memchr(b'\n', rest) {
                    let (head, tail) = (&rest[..end], &rest[end + 1..]);
                    if *skipping {
                        *skipping = false;
                    } else if line.is_empty() {
                        // Over MAX_LINE it is skipped here too, not only when it spans frames.
                        if head.len() <= MAX_LINE {
                            sse_line(&mut self.read, head);
                        }
                    } else if line.len() + head.len() <= MAX_LINE {
                        line.extend_from_slice(head);
                        sse_line(&mut self.read, line);
                    }
                    line.clear();
                    rest = tail;
                }
                if !*skipping && !rest.is_empty() {
                    if line.len() + rest.len() > MAX_LINE {
                        line.clear();
                        line.shrink_to_fit();
                        *skipping = true;
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
        }
    }

    /// What the body said, once it has ended (or broken off: a cut JSON body or event says
    /// nothing).
    pub fn finish(mut self) -> Read {
        match &mut self.kind {
            Kind::Json(Some(body)) => read_json(&mut self.read, body),
            Kind::Json(None) => {}
            Kind::Sse { line, skipping } => {
                if !*skipping && !line.is_empty() {
                    let line = std::mem::take(line);
                    sse_line(&mut self.read, &line);
                }
            }
        }
        self.read
    }
}

/// One event-stream line: a `data:` line is read when it carries a `usage` object, or names the
/// model while none is known.
fn sse_line(read: &mut Read, line: &[u8]) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let wanted = has_usage_object(data)
        || (read.model.is_none() && memmem::find(data, b"\"model\"").is_some());
    if wanted {
        read_json(read, data);
    }
}

/// `"usage"` followed by `:` and `{`: only then is an event worth parsing (chat streams with
/// `include_usage` send `"usage":null` in every other chunk).
fn has_usage_object(data: &[u8]) -> bool {
    let finder = memmem::Finder::new(b"\"usage\"");
    finder.find_iter(data).any(|at| {
        let mut rest = data[at + 7..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace());
        rest.next() == Some(&b':') && rest.find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
    })
}

/// Takes the model and the usage from a JSON body or event; anything unparsable is ignored.
fn read_json(read: &mut Read, json: &[u8]) {
    let Ok(shape) = serde_json::from_slice::<Shape>(json) else {
        return;
    };
    let (model, usage) = match shape.response {
        Some(inner) => (inner.model.or(shape.model), inner.usage.or(shape.usage)),
        None => (shape.model, shape.usage),
    };
    if read.model.is_none()
        && let Some(Ok(name)) = model.map(|m| serde_json::from_str::<Cow<str>>(m.get()))
    {
        read.model = Some(model_name(&name));
    }
    if let Some(tokens) = usage.and_then(Tokens::from_usage) {
        read.tokens = Some(tokens);
    }
}

/// A model name fit for a metric label and a ledger line: printable, with no invisible character
/// (zero-width, a line separator) and no bidirectional override that would show it (or the rest
/// of a terminal line) reversed, at most [`MAX_MODEL`] characters.
pub fn model_name(raw: &str) -> String {
    raw.chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(c, '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
        })
        .take(MAX_MODEL)
        .collect()
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(ct: &'static str) -> Meter {
        Meter::new(Some(&HeaderValue::from_static(ct)), None).unwrap()
    }

    fn read_all(ct: &'static str, frames: &[&[u8]]) -> Read {
        let mut m = meter(ct);
        for f in frames {
            m.feed(f);
        }
        m.finish()
    }

    const CHAT: &[u8] = br#"{"id":"x","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;

    #[test]
    fn a_json_body_is_read_at_its_end_in_any_framing() {
        let want = Read {
            tokens: Some(Tokens {
                prompt: 12,
                completion: 30,
                total: 42,
            }),
            model: Some("gpt-4o".into()),
        };
        assert_eq!(read_all("application/json", &[CHAT]), want);
        let frames: Vec<&[u8]> = CHAT.chunks(3).collect();
        assert_eq!(read_all("application/json; charset=utf-8", &frames), want);
    }

    #[test]
    fn embeddings_and_responses_usage_are_read() {
        let r = read_all(
            "application/json",
            &[br#"{"model":"e","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#],
        );
        assert_eq!(
            r.tokens,
            Some(Tokens {
                prompt: 8,
                completion: 0,
                total: 8
            })
        );
        let r = read_all(
            "application/json",
            &[br#"{"model":"r","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}"#],
        );
        assert_eq!(
            r.tokens,
            Some(Tokens {
                prompt: 5,
                completion: 7,
                total: 12
            })
        );
    }

    #[test]
    fn detail_objects_are_skipped_and_an_odd_model_loses_no_usage() {
        let r = read_all(
            "application/json",
            &[br#"{"model":7,"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":0},"total_tokens":10}}"#],
        );
        assert_eq!(r.model, None);
        assert_eq!(
            r.tokens,
            Some(Tokens {
                prompt: 9,
                completion: 1,
                total: 10
            })
        );
        let r = read_all(
            "application/json",
            &[br#"{"model":"caf\u00e9","usage":{"total_tokens":3}}"#],
        );
        assert_eq!(r.model.as_deref(), Some("café"));
    }

    #[test]
    fn a_chat_stream_is_read_from_the_chunk_that_carries_usage() {
        let stream = concat!(
            "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"usage\\\": {\"}}],\"usage\":null}\n\n",
            "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\r\n\r\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for size in [1, 7, stream.len()] {
            let frames: Vec<&[u8]> = stream.chunks(size).collect();
            let r = read_all("text/event-stream", &frames);
            assert_eq!(r.model.as_deref(), Some("gpt-4o"), "{size}");
            assert_eq!(
                r.tokens,
                Some(Tokens {
                    prompt: 3,
                    completion: 4,
                    total: 7
                }),
                "{size}"
            );
        }
    }

    #[test]
    fn the_responses_api_completed_event_is_read() {
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"model\":\"o4\",\"usage\":null}}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"model\":\"o4\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1,\"total_tokens\":10}}}\n\n",
        );
        let r = read_all("text/event-stream", &[stream.as_bytes()]);
        assert_eq!(r.model.as_deref(), Some("o4"));
        assert_eq!(r.tokens.map(|t| t.total), Some(10));
    }

    #[test]
    fn bad_usage_is_unaccounted_never_guessed() {
        for usage in [
            r#""12""#,
            r#"{"prompt_tokens":"12","total_tokens":12}"#,
            r#"{"prompt_tokens":-1,"total_tokens":12}"#,
            r#"{"prompt_tokens":1.5}"#,
            r#"{}"#,
            r#"[1,2]"#,
        ] {
            let body = format!(r#"{{"model":"m","usage":{usage}}}"#);
            let r = read_all("application/json", &[body.as_bytes()]);
            assert_eq!(r.tokens, None, "{usage}");
            assert_eq!(r.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_truncated_body_or_stream_says_nothing() {
        assert_eq!(
            read_all("application/json", &[&CHAT[..CHAT.len() - 5]]).tokens,
            None
        );
        let r = read_all(
            "text/event-stream",
            &[b"data: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":3,"],
        );
        assert_eq!(r.tokens, None);
    }

    #[test]
    fn memory_stays_bounded_whatever_the_upstream_sends() {
        // JSON over the cap: dropped, not grown.
        let mut m = meter("application/json");
        let chunk = vec![b' '; 64 << 10];
        for _ in 0..(MAX_JSON / chunk.len() + 4) {
            m.feed(&chunk);
        }
        assert!(matches!(m.kind, Kind::Json(None)));
        assert_eq!(m.finish().tokens, None);
        // An announced length over the cap: no meter at all.
        assert!(
            Meter::new(
                Some(&HeaderValue::from_static("application/json")),
                Some(50 << 20)
            )
            .is_none()
        );
        // A 10 MB line without a newline: skipped, the buffer never over MAX_LINE; the next
        // line is read.
        let mut m = meter("text/event-stream");
        let mut fed = 0;
        while fed < 10 << 20 {
            m.feed(&chunk);
            fed += chunk.len();
            let Kind::Sse { line, .. } = &m.kind else {
                unreachable!()
            };
            assert!(line.capacity() <= 2 * MAX_LINE);
        }
        m.feed(b"\ndata: {\"model\":\"m\",\"usage\":{\"total_tokens\":5}}\n");
        assert_eq!(m.finish().tokens.map(|t| t.total), Some(5));
        // A line over MAX_LINE is skipped however the frames cut it, also when one frame holds
        // it whole.
        let pad = "y".repeat(MAX_LINE);
        let long = format!("data: {{\"c\":\"{pad}\",\"usage\":{{\"total_tokens\":5}}}}\n\n");
        assert_eq!(
            read_all("text/event-stream", &[long.as_bytes()]).tokens,
            None
        );
        let (a, b) = long.as_bytes().split_at(100);
        assert_eq!(read_all("text/event-stream", &[a, b]).tokens, None);
    }

    #[test]
    fn other_content_types_are_not_metered() {
        assert!(Meter::new(Some(&HeaderValue::from_static("text/plain")), None).is_none());
        assert!(Meter::new(None, None).is_none());
    }

    #[test]
    fn model_names_are_cut_and_printable() {
        assert_eq!(model_name("a\nb"), "ab");
        // A right-to-left override would show `evil` as `live` on a terminal.
        assert_eq!(model_name("\u{202e}live\u{2066}"), "live");
        assert_eq!(model_name("gpt\u{200b}-4\u{feff}\u{2028}"), "gpt-4");
        assert_eq!(model_name(&"x".repeat(500)).len(), MAX_MODEL);
    }
}
