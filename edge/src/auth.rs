//! Who may connect, publish and subscribe: Mosquitto's password file and ACL file, read as
//! they are, so that moving from Mosquitto is one step.
//!
//! - Password file (`mosquitto_passwd`): `user:$7$<iterations>$<salt>$<hash>` (PBKDF2-HMAC-
//!   SHA512, base64) or the older `user:$6$<salt>$<hash>` (SHA-512 of password and salt).
//!   Plain-text passwords are refused: run `mosquitto_passwd -U` on such a file.
//! - ACL file: `topic [read|write|readwrite|deny] FILTER` lines (before any `user` line they
//!   apply to anonymous clients), `user NAME` starting a user's section, and `pattern
//!   [access] FILTER` lines for every client, where `%c` is the client id and `%u` the
//!   username (a pattern with `%u` never applies to an anonymous client). Without an ACL file
//!   everything is allowed; with one, what no line allows is denied, and a matching `deny` line
//!   wins over any allowing line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use ferry_protocol::mqtt::ReasonCode;
use ferry_protocol::topic::matches;
use sha2::{Digest, Sha512};

/// Why a password or ACL file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Parse {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

/// The loaded password and ACL files, and whether anonymous clients are let in.
#[derive(Debug, Default)]
pub struct Auth {
    /// `None`: no password file; a username, if any, is taken as given.
    passwords: Option<HashMap<String, PasswordHash>>,
    acl: Option<Acl>,
    allow_anonymous: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PasswordHash {
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

#[derive(Debug, Default)]
struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    /// Subscribing with a filter.
    Subscribe,
    /// Receiving a message on a topic it subscribed to.
    Receive,
}

impl Auth {
    /// Everyone in, everything allowed: the default on loopback listeners without a password
    /// file.
    pub fn open() -> Self {
        Self {
            passwords: None,
            acl: None,
            allow_anonymous: true,
        }
    }

    /// Reads the files. `allow_anonymous` lets clients in without a username.
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        allow_anonymous: bool,
    ) -> Result<Self, AuthError> {
        let passwords = password_file.map(parse_password_file).transpose()?;
        let acl = acl_file.map(parse_acl_file).transpose()?;
        Ok(Self {
            passwords,
            acl,
            allow_anonymous,
        })
    }

    /// Checks a CONNECT's credentials; the error is the CONNACK reason code.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), ReasonCode> {
        let Some(username) = username else {
            return if self.allow_anonymous {
                Ok(())
            } else {
                Err(ReasonCode::NotAuthorized)
            };
        };
        let Some(passwords) = &self.passwords else {
            return if self.allow_anonymous {
                Ok(())
            } else {
                Err(ReasonCode::BadUserNameOrPassword)
            };
        };
        match (passwords.get(username), password) {
            (Some(hash), Some(password)) if hash.verify(password) => Ok(()),
            _ => Err(ReasonCode::BadUserNameOrPassword),
        }
    }

    /// Whether `username` (None: anonymous) with `client_id` may do `action` on `topic` (a
    /// topic name, or a filter for [`Action::Subscribe`]).
    pub fn allows(
        &self,
        username: Option<&str>,
        client_id: &str,
        action: Action,
        topic: &str,
    ) -> bool {
        let Some(acl) = &self.acl else {
            return true;
        };
        let own = match username {
            Some(u) => acl.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &acl.anonymous,
        };
        let patterns = acl.patterns.iter().filter_map(|rule| {
            if rule.filter.contains("%u") && username.is_none() {
                return None;
            }
            let filter = rule
                .filter
                .replace("%c", client_id)
                .replace("%u", username.unwrap_or_default());
            Some(Rule {
                access: rule.access,
                filter,
            })
        });
        let rules: Vec<Rule> = own.iter().cloned().chain(patterns).collect();
        let applies = |rule: &Rule| match action {
            Action::Subscribe => filter_covers(&rule.filter, topic),
            Action::Publish | Action::Receive => matches(&rule.filter, topic),
        };
        if rules.iter().any(|r| r.access == Access::Deny && applies(r)) {
            return false;
        }
        rules.iter().any(|r| {
            let grants = match action {
                Action::Publish => matches!(r.access, Access::Write | Access::ReadWrite),
                Action::Subscribe | Action::Receive => {
                    matches!(r.access, Access::Read | Access::ReadWrite)
                }
            };
            grants && applies(r)
        })
    }

    /// True when no ACL applies, so per-message checks can be skipped.
    pub fn allows_everything(&self) -> bool {
        self.acl.is_none()
    }
}

impl PasswordHash {
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
            PasswordHash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                constant_time_eq(&h.finalize(), hash)
            }
        }
    }
}

/// Compares without stopping at the first difference, so timing says nothing about where.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether every topic that subscription filter `sub` can match is matched by ACL filter
/// `acl` (so a subscription never reaches beyond what the ACL grants).
fn filter_covers(acl: &str, sub: &str) -> bool {
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A line of a Mosquitto-style file that says something, and where it is, for errors.
struct Line<'a> {
    path: &'a Path,
    number: usize,
    text: String,
}

impl Line<'_> {
    fn err(&self, what: &str) -> AuthError {
        AuthError::Parse {
            path: self.path.to_owned(),
            line: self.number,
            what: what.to_owned(),
        }
    }
}

/// The lines that are neither blank nor `#` comments.
fn meaningful_lines(path: &Path) -> Result<Vec<Line<'_>>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, line)| (i, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(i, line)| Line {
            path,
            number: i + 1,
            text: line.to_owned(),
        })
        .collect())
}

fn parse_password_file(path: &Path) -> Result<HashMap<String, PasswordHash>, AuthError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut users = HashMap::new();
    for l in meaningful_lines(path)? {
        let err = |what: &str| l.err(what);
        let line = l.text.as_str();
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| err("expected user:hash"))?;
        let parts: Vec<&str> = hash.split('$').collect();
        let decode = |s: &str| b64.decode(s).map_err(|_| err("bad base64"));
        let parsed = match parts.as_slice() {
            ["", "7", iterations, salt, hash] => PasswordHash::Pbkdf2Sha512 {
                iterations: iterations.parse().map_err(|_| err("bad iteration count"))?,
                salt: decode(salt)?,
                hash: decode(hash)?,
            },
            ["", "6", salt, hash] => PasswordHash::Sha512 {
                salt: decode(salt)?,
                hash: decode(hash)?,
            },
            _ => return Err(err(
                "not a $6$ or $7$ hash (plain-text passwords are refused; run mosquitto_passwd -U)",
            )),
        };
        users.insert(user.to_owned(), parsed);
    }
    Ok(users)
}

fn parse_acl_file(path: &Path) -> Result<Acl, AuthError> {
    let mut acl = Acl::default();
    let mut user: Option<String> = None;
    for l in meaningful_lines(path)? {
        let err = |what: &str| l.err(what);
        let line = l.text.as_str();
        let (keyword, rest) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| err("expected a keyword and a value"))?;
        let rest = rest.trim();
        match keyword {
            "user" => user = Some(rest.to_owned()),
            "topic" | "pattern" => {
                let (access, filter) = match rest.split_once(char::is_whitespace) {
                    Some((a @ ("read" | "write" | "readwrite" | "deny"), f)) => (a, f.trim()),
                    _ => ("readwrite", rest),
                };
                let access = match access {
                    "read" => Access::Read,
                    "write" => Access::Write,
                    "deny" => Access::Deny,
                    _ => Access::ReadWrite,
                };
                let rule = Rule {
                    access,
                    filter: filter.to_owned(),
                };
                match (keyword, &user) {
                    ("pattern", _) => acl.patterns.push(rule),
                    (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                    (_, None) => acl.anonymous.push(rule),
                }
            }
            other => return Err(err(&format!("unknown keyword {other:?}"))),
        }
    }
    Ok(acl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ferry-auth-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write test file");
        path
    }

    /// Lines made by Mosquitto 2.0.11's own tool, not by our formula:
    /// `mosquitto_passwd -c -b pw alice s3cret` (PBKDF2-SHA512, `$7$`, its default) and
    /// `mosquitto_passwd -H sha512 -b pw bob old-secret` (salted SHA-512, `$6$`, Mosquitto
    /// 1.6 and earlier).
    const MOSQUITTO_PASSWD_LINES: &str = "\
alice:$7$101$gOEJ0ejUdXkha4/3$yIFSl+dXHX2zukviujMqKoSgFi9ZLP4D2XLEKuK+O5d9vGMTSEtwvwgeer8lHF3yYFEmOAfWe09/6csh5AnjRA==
bob:$6$8V1aFukHeg0BXkcm$E/iwxQF1SctpghZCRU+ziXhJtctIMfqFAlYCXQ0JoIm/i/kgbVRTAWSEpnmKdKyphxpfj1tZ0oH6I3zWv92lXg==
";

    #[test]
    fn passwords_are_checked_against_both_hash_formats() {
        let path = file("pw", &format!("# users\n{MOSQUITTO_PASSWD_LINES}"));
        let auth = Auth::load(Some(&path), None, false).expect("loads");
        assert_eq!(auth.authenticate(Some("alice"), Some(b"s3cret")), Ok(()));
        assert_eq!(
            auth.authenticate(Some("alice"), Some(b"wrong")),
            Err(ReasonCode::BadUserNameOrPassword)
        );
        assert_eq!(auth.authenticate(Some("bob"), Some(b"old-secret")), Ok(()));
        assert_eq!(
            auth.authenticate(Some("bob"), Some(b"old-secreT")),
            Err(ReasonCode::BadUserNameOrPassword)
        );
        assert_eq!(
            auth.authenticate(Some("carol"), Some(b"x")),
            Err(ReasonCode::BadUserNameOrPassword)
        );
        assert_eq!(
            auth.authenticate(Some("alice"), None),
            Err(ReasonCode::BadUserNameOrPassword)
        );
        assert_eq!(
            auth.authenticate(None, None),
            Err(ReasonCode::NotAuthorized)
        );
    }

    #[test]
    fn plain_text_password_files_are_refused() {
        let path = file("plain", "alice:s3cret\n");
        let err = Auth::load(Some(&path), None, false).expect_err("plain text");
        assert!(err.to_string().contains(":1:"), "{err}");
    }

    #[test]
    fn acl_follows_mosquitto_rules() {
        let path = file(
            "acl",
            "topic read public/#\n\
             user alice\n\
             topic readwrite sensors/#\n\
             topic deny sensors/secret\n\
             topic write cmd/+\n\
             pattern readwrite devices/%c/#\n\
             pattern read users/%u/inbox\n",
        );
        let auth = Auth::load(None, Some(&path), true).expect("loads");
        let alice = Some("alice");
        use Action::*;
        assert!(auth.allows(alice, "c1", Publish, "sensors/t1"));
        assert!(
            !auth.allows(alice, "c1", Publish, "sensors/secret"),
            "deny wins"
        );
        assert!(auth.allows(alice, "c1", Publish, "cmd/reboot"));
        assert!(
            !auth.allows(alice, "c1", Receive, "cmd/reboot"),
            "write only"
        );
        assert!(auth.allows(alice, "c1", Subscribe, "sensors/+/temp"));
        assert!(
            !auth.allows(alice, "c1", Subscribe, "#"),
            "a filter wider than the grant"
        );
        assert!(auth.allows(alice, "c1", Publish, "devices/c1/state"), "%c");
        assert!(!auth.allows(alice, "c1", Publish, "devices/c2/state"));
        assert!(auth.allows(alice, "c1", Receive, "users/alice/inbox"), "%u");
        assert!(
            !auth.allows(alice, "c1", Receive, "public/news"),
            "anonymous lines are not alice's"
        );
        // Anonymous: the lines before any `user`, and patterns without %u.
        assert!(auth.allows(None, "c9", Receive, "public/news"));
        assert!(!auth.allows(None, "c9", Publish, "public/news"));
        assert!(auth.allows(None, "c9", Publish, "devices/c9/x"));
        assert!(!auth.allows(None, "c9", Receive, "users//inbox"));
        assert!(Auth::open().allows(None, "x", Publish, "anything"));
    }

    #[test]
    fn filter_coverage() {
        assert!(filter_covers("a/#", "a/b/+"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/+/c", "a/+/#"));
    }
}
