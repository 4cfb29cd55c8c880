//! Who may use the admin listener, without I/O: users of a Mosquitto password file, each
//! with a role (`admins` may act, `viewers` may only look), sessions with expiry and a
//! CSRF token each, HTTP Basic for scripts, and a brake on guessing passwords.
//!
//! Without users in either list, authentication is off: everyone who reaches the listener
//! may look and no one may act (the actions need the admin role, which needs a login); such
//! a listener must be on loopback (checked at start).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferry_edge::auth::Auth;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Look: every `GET`.
    Viewer,
    /// Look and act: the `POST` actions too.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// None with authentication off.
    pub user: Option<String>,
    pub role: Option<Role>,
    /// Through a session (a browser): its CSRF token, which a `POST` must carry.
    pub csrf: Option<String>,
}

impl Principal {
    /// Whether it may look.
    pub fn may_view(&self) -> bool {
        self.role.is_some()
    }
}

/// A session made by a login.
#[derive(Debug, Clone)]
struct Session {
    user: String,
    role: Role,
    csrf: String,
    expires_ms: u64,
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("authentication is off on this listener")]
    Off,
    #[error("wrong user name or password")]
    Wrong,
    #[error("too many failed logins for this user; wait a minute")]
    Throttled,
}

/// The admin listener's users, roles and sessions.
#[derive(Debug)]
pub struct Sessions {
    /// None: authentication off.
    passwords: Option<Auth>,
    admins: HashSet<String>,
    viewers: HashSet<String>,
    lifetime: Duration,
    sessions: HashMap<String, Session>,
    /// Per user: failed logins in the current minute, and when that minute began.
    failures: HashMap<String, (u32, u64)>,
}

/// At most this many sessions live at once; past it the one closest to expiry goes.
pub const MAX_SESSIONS: usize = 1024;
/// Failed logins of one user within a minute before the next are refused until it ends.
pub const MAX_FAILURES_PER_MINUTE: u32 = 5;

impl Sessions {
    /// Authentication off.
    pub fn off() -> Self {
        Self::with(None, HashSet::new(), HashSet::new(), Duration::ZERO)
    }

    /// Users of `passwords` in `admins` or `viewers` (a user in both is an admin); a
    /// session lasts `lifetime`.
    pub fn new(
        passwords: Auth,
        admins: impl IntoIterator<Item = String>,
        viewers: impl IntoIterator<Item = String>,
        lifetime: Duration,
    ) -> Self {
        Self::with(
            Some(passwords),
            admins.into_iter().collect(),
            viewers.into_iter().collect(),
            lifetime,
        )
    }

    fn with(
        passwords: Option<Auth>,
        admins: HashSet<String>,
        viewers: HashSet<String>,
        lifetime: Duration,
    ) -> Self {
        Self {
            passwords,
            admins,
            viewers,
            lifetime,
            sessions: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    /// Whether users must log in.
    pub fn is_on(&self) -> bool {
        self.passwords.is_some()
    }

    fn role_of(&self, user: &str) -> Option<Role> {
        if self.admins.contains(user) {
            Some(Role::Admin)
        } else if self.viewers.contains(user) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// Checks `user`'s password (and that it has a role). The brake counts failures
    /// whether or not the user exists, so that it tells nothing of who does.
    fn verify(&mut self, user: &str, password: &str, now_ms: u64) -> Result<Role, LoginError> {
        let role = self.role_of(user);
        let Some(passwords) = &self.passwords else {
            return Err(LoginError::Off);
        };
        // Guesses at many user names do not grow it past a minute's worth.
        if self.failures.len() >= MAX_SESSIONS {
            self.failures
                .retain(|_, (_, since)| now_ms < *since + 60_000);
        }
        let failures = self.failures.entry(user.to_owned()).or_insert((0, now_ms));
        if now_ms >= failures.1 + 60_000 {
            *failures = (0, now_ms);
        }
        if failures.0 >= MAX_FAILURES_PER_MINUTE {
            return Err(LoginError::Throttled);
        }
        let good = passwords
            .authenticate(Some(user), Some(password.as_bytes()))
            .is_ok();
        match role.filter(|_| good) {
            Some(role) => {
                self.failures.remove(user);
                Ok(role)
            }
            None => {
                failures.0 += 1;
                Err(LoginError::Wrong)
            }
        }
    }

    /// A login: a new session (its token and CSRF token come from `random`, 32 bytes).
    pub fn login(
        &mut self,
        user: &str,
        password: &str,
        now_ms: u64,
        random: impl Fn() -> String,
    ) -> Result<(String, Principal), LoginError> {
        let role = self.verify(user, password, now_ms)?;
        self.sessions.retain(|_, s| s.expires_ms > now_ms);
        if self.sessions.len() >= MAX_SESSIONS {
            let soonest = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                self.sessions.remove(&k);
            }
        }
        let token = random();
        let session = Session {
            user: user.to_owned(),
            role,
            csrf: random(),
            expires_ms: now_ms + self.lifetime.as_millis() as u64,
        };
        let principal = Principal {
            user: Some(session.user.clone()),
            role: Some(role),
            csrf: Some(session.csrf.clone()),
        };
        self.sessions.insert(token.clone(), session);
        Ok((token, principal))
    }

    /// Ends a session.
    pub fn logout(&mut self, token: &str) {
        self.sessions.remove(token);
    }

    /// Who a request is from: its session (cookie token), or its HTTP Basic credentials;
    /// with authentication off, an anonymous viewer. A role of None: it may do nothing.
    pub fn principal(
        &mut self,
        token: Option<&str>,
        basic: Option<(&str, &str)>,
        now_ms: u64,
    ) -> Principal {
        let nobody = Principal {
            user: None,
            role: None,
            csrf: None,
        };
        if !self.is_on() {
            return Principal {
                role: Some(Role::Viewer),
                ..nobody
            };
        }
        if let Some(s) = token.and_then(|t| self.sessions.get(t)) {
            if s.expires_ms > now_ms {
                // The role as the configuration says now (a SIGHUP may have changed it).
                return Principal {
                    user: Some(s.user.clone()),
                    role: self.role_of(&s.user).map(|r| r.min_with(s.role)),
                    csrf: Some(s.csrf.clone()),
                };
            }
        }
        if let Some((user, password)) = basic {
            if let Ok(role) = self.verify(user, password, now_ms) {
                return Principal {
                    user: Some(user.to_owned()),
                    role: Some(role),
                    csrf: None,
                };
            }
        }
        nobody
    }
}

impl Role {
    /// The lesser of two roles.
    fn min_with(self, other: Role) -> Role {
        if self == Role::Admin && other == Role::Admin {
            Role::Admin
        } else {
            Role::Viewer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// `alice` (admin) and `bob` (viewer) with password `secret`, `carol` with no role
    /// (hashes made by mosquitto_passwd: PBKDF2-SHA512).
    fn sessions(test: &str) -> Sessions {
        let dir = std::env::temp_dir().join(format!("ferry-admin-sessions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(test);
        let line = |user: &str| format!("{user}:{}\n", HASH_OF_SECRET);
        std::fs::write(&file, line("alice") + &line("bob") + &line("carol")).expect("write");
        let auth = Auth::load(Some(&file), None, false).expect("load");
        let _ = std::fs::remove_file(&file);
        Sessions::new(
            auth,
            ["alice".to_owned()],
            ["bob".to_owned(), "alice".to_owned()],
            Duration::from_secs(60),
        )
    }

    /// `mosquitto_passwd -b` of "secret".
    const HASH_OF_SECRET: &str = "$7$101$8rRyPEbNHb6yr7Nv$owFzv3VwcaQKyAK0rqRNSVM5gNU5yrERun97zobitXCNGZ1emRDVS0VVJfkQ8d3vciKXIXL4zRwbaq3dja85Sw==";

    fn counter() -> impl Fn() -> String {
        let n = Cell::new(0);
        move || {
            n.set(n.get() + 1);
            format!("t{}", n.get())
        }
    }

    #[test]
    fn roles_come_from_the_lists_and_sessions_expire() {
        let mut s = sessions("roles");
        let random = counter();
        let (token, p) = s.login("alice", "secret", 0, &random).expect("alice");
        assert_eq!(p.role, Some(Role::Admin));
        assert_eq!(p.csrf.as_deref(), Some("t2"));
        let (bob, p) = s.login("bob", "secret", 0, &random).expect("bob");
        assert_eq!(p.role, Some(Role::Viewer));
        assert_eq!(
            s.login("carol", "secret", 0, &random),
            Err(LoginError::Wrong)
        );
        assert_eq!(s.login("alice", "nope", 0, &random), Err(LoginError::Wrong));
        let got = s.principal(Some(&token), None, 59_999);
        assert_eq!(
            (got.user.as_deref(), got.role),
            (Some("alice"), Some(Role::Admin))
        );
        assert_eq!(
            s.principal(Some(&token), None, 60_000).role,
            None,
            "expired"
        );
        assert_eq!(s.principal(Some("forged"), None, 0).role, None);
        s.logout(&bob);
        assert_eq!(s.principal(Some(&bob), None, 1).role, None, "logged out");
        // Scripts: HTTP Basic, no session, no CSRF token.
        let p = s.principal(None, Some(("bob", "secret")), 1);
        assert_eq!((p.role, p.csrf), (Some(Role::Viewer), None));
        assert_eq!(s.principal(None, Some(("bob", "x")), 1).role, None);
    }

    #[test]
    fn guessing_is_braked_per_user_for_a_minute_and_off_lets_everyone_look_not_act() {
        let mut s = sessions("brake");
        let random = counter();
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(s.login("bob", "guess", 0, &random), Err(LoginError::Wrong));
        }
        assert_eq!(
            s.login("bob", "secret", 1_000, &random),
            Err(LoginError::Throttled),
            "even the right password, until the minute is over"
        );
        assert!(
            s.login("alice", "secret", 1_000, &random).is_ok(),
            "others are not braked"
        );
        assert!(s.login("bob", "secret", 60_000, &random).is_ok());

        let mut off = Sessions::off();
        assert!(!off.is_on());
        let p = off.principal(None, None, 0);
        assert_eq!((p.role, p.user), (Some(Role::Viewer), None));
        assert_eq!(
            off.login("alice", "secret", 0, &random),
            Err(LoginError::Off)
        );
    }

    #[test]
    fn sessions_are_bounded() {
        let mut s = sessions("bound");
        let random = counter();
        let (first, _) = s.login("bob", "secret", 0, &random).expect("login");
        for i in 1..=MAX_SESSIONS as u64 {
            s.login("bob", "secret", i, &random).expect("login");
        }
        assert_eq!(s.sessions.len(), MAX_SESSIONS);
        assert_eq!(
            s.principal(Some(&first), None, 10).role,
            None,
            "the oldest went"
        );
    }
}
