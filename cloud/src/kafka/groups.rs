//! Kafka consumer groups on one node: the classic group protocol (JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup) as a coordinator in memory, with committed offsets durable in the
//! node's metadata (cursors named after the group).
//!
//! A rebalance starts when a member joins, leaves or misses its session timeout. Every
//! member must join again within its rebalance timeout (the first rebalance of an empty
//! group waits [`INITIAL_REBALANCE_DELAY`] for the others); members that do not are dropped.
//! Then the generation moves on, the first member (or the previous leader) leads, and the
//! leader's assignment is handed out by SyncGroup. A request of an old generation gets
//! ILLEGAL_GENERATION, one during a rebalance REBALANCE_IN_PROGRESS, one of a member the
//! group does not know UNKNOWN_MEMBER_ID.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::code;

/// How long the first rebalance of an empty group waits for more members (Kafka's
/// `group.initial.rebalance.delay.ms` is 3 s).
pub const INITIAL_REBALANCE_DELAY: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    /// Waiting for members to join, until everyone did or `deadline`; the first rebalance of
    /// an empty group (`initial`) waits until `deadline` for more members whatever happens.
    Joining {
        deadline: Instant,
        initial: bool,
    },
    /// The generation is set; waiting for the leader's SyncGroup.
    AwaitingSync,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::Joining { .. } => "PreparingRebalance",
            State::AwaitingSync => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    client_id: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    last_seen: Instant,
    /// Joined the rebalance under way.
    joined: bool,
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: i32,
    protocol_type: String,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    assignments: HashMap<String, Bytes>,
}

impl Group {
    fn new(protocol_type: String) -> Self {
        Self {
            state: State::Empty,
            generation: 0,
            protocol_type,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            assignments: HashMap::new(),
        }
    }

    /// Starts a rebalance (or extends the one under way to `now + wait`).
    fn rebalance(&mut self, now: Instant, wait: Duration) {
        if !matches!(self.state, State::Joining { .. }) {
            for m in self.members.values_mut() {
                m.joined = false;
            }
            self.assignments.clear();
        }
        let initial = match self.state {
            State::Empty => true,
            State::Joining { initial, .. } => initial,
            _ => false,
        };
        self.state = if self.members.is_empty() {
            State::Empty
        } else if initial {
            // Later joins do not push the initial delay further.
            let deadline = match self.state {
                State::Joining { deadline, .. } => deadline,
                _ => now + INITIAL_REBALANCE_DELAY,
            };
            State::Joining {
                deadline,
                initial: true,
            }
        } else {
            State::Joining {
                deadline: now + wait,
                initial: false,
            }
        };
    }

    /// Ends the join phase if everyone joined or the deadline passed: drops who did not
    /// join, moves the generation on, picks the protocol and the leader.
    fn maybe_complete_join(&mut self, now: Instant) -> bool {
        let State::Joining { deadline, initial } = self.state else {
            return false;
        };
        let all = self.members.values().all(|m| m.joined);
        if now < deadline && (initial || !all) {
            return false;
        }
        self.members.retain(|_, m| m.joined);
        if self.members.is_empty() {
            self.state = State::Empty;
            return true;
        }
        self.generation += 1;
        let first = self.members.values().next().expect("a member");
        self.protocol = first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned();
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = State::AwaitingSync;
        true
    }
}

/// The answer to a JoinGroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joined {
    pub error_code: i16,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// For the leader: every member and its metadata for the chosen protocol.
    pub members: Vec<(String, Bytes)>,
}

/// What DescribeGroups shows of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    /// (member id, client id, assignment).
    pub members: Vec<(String, String, Bytes)>,
}

/// Every group of the node.
#[derive(Debug, Default)]
pub struct Groups {
    groups: Mutex<HashMap<String, Group>>,
    changed: Notify,
    next_member: std::sync::atomic::AtomicU64,
}

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// JoinGroup. `require_member_id`: the request version asks a new member to come back
    /// with the id it is given (v4+).
    #[allow(clippy::too_many_arguments)]
    pub async fn join(
        &self,
        group_id: &str,
        member_id: &str,
        client_id: &str,
        protocol_type: &str,
        protocols: Vec<(String, Bytes)>,
        session_timeout: Duration,
        rebalance_timeout: Duration,
        require_member_id: bool,
    ) -> Joined {
        let now = Instant::now();
        let member_id = {
            let mut groups = self.lock();
            let group = groups
                .entry(group_id.to_owned())
                .or_insert_with(|| Group::new(protocol_type.to_owned()));
            if !group.members.is_empty() && group.protocol_type != protocol_type {
                return Joined {
                    error_code: code::INCONSISTENT_GROUP_PROTOCOL,
                    generation: -1,
                    ..Joined::default()
                };
            }
            group.protocol_type = protocol_type.to_owned();
            let member_id = if member_id.is_empty() {
                let n = self
                    .next_member
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("{client_id}-{n}-{}", now.elapsed().as_nanos() ^ 0x5eed);
                if require_member_id {
                    return Joined {
                        error_code: code::MEMBER_ID_REQUIRED,
                        generation: -1,
                        member_id: id,
                        ..Joined::default()
                    };
                }
                id
            } else {
                member_id.to_owned()
            };
            let wait = rebalance_timeout;
            let known = group.members.get(&member_id).map(|m| m.protocols.clone());
            let changed = known.as_ref() != Some(&protocols);
            group.members.insert(
                member_id.clone(),
                Member {
                    client_id: client_id.to_owned(),
                    session_timeout,
                    rebalance_timeout,
                    protocols,
                    last_seen: now,
                    joined: true,
                },
            );
            // A new member, new metadata, or a (re)join outside a rebalance starts one; a
            // join during one just counts.
            if changed || !matches!(group.state, State::Joining { .. }) {
                group.rebalance(now, wait);
                if let Some(me) = group.members.get_mut(&member_id) {
                    me.joined = true;
                }
            }
            if group.maybe_complete_join(now) {
                self.changed.notify_waiters();
            }
            member_id
        };
        // Wait for the join phase to end (everyone joined, or the deadline).
        loop {
            let notified = self.changed.notified();
            {
                let mut groups = self.lock();
                let Some(group) = groups.get_mut(group_id) else {
                    return unknown_member(member_id);
                };
                if group.maybe_complete_join(Instant::now()) {
                    self.changed.notify_waiters();
                }
                if !matches!(group.state, State::Joining { .. }) {
                    let Some(me) = group.members.get(&member_id) else {
                        return unknown_member(member_id);
                    };
                    let _ = me;
                    let leader = group.leader.clone().unwrap_or_default();
                    let protocol = group.protocol.clone();
                    let members = if leader == member_id {
                        group
                            .members
                            .iter()
                            .map(|(id, m)| {
                                let metadata = m
                                    .protocols
                                    .iter()
                                    .find(|(n, _)| Some(n) == protocol.as_ref())
                                    .map(|(_, md)| md.clone())
                                    .unwrap_or_default();
                                (id.clone(), metadata)
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    return Joined {
                        error_code: code::NONE,
                        generation: group.generation,
                        protocol_type: group.protocol_type.clone(),
                        protocol,
                        leader,
                        member_id,
                        members,
                    };
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// SyncGroup: the leader hands out the assignment; everyone gets its own part.
    pub async fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
    ) -> (i16, Bytes) {
        {
            let mut groups = self.lock();
            let Some(group) = groups.get_mut(group_id) else {
                return (code::UNKNOWN_MEMBER_ID, Bytes::new());
            };
            let Some(me) = group.members.get_mut(member_id) else {
                return (code::UNKNOWN_MEMBER_ID, Bytes::new());
            };
            me.last_seen = Instant::now();
            if generation != group.generation {
                return (code::ILLEGAL_GENERATION, Bytes::new());
            }
            if matches!(group.state, State::Joining { .. }) {
                return (code::REBALANCE_IN_PROGRESS, Bytes::new());
            }
            if group.leader.as_deref() == Some(member_id) && group.state == State::AwaitingSync {
                group.assignments = assignments.into_iter().collect();
                group.state = State::Stable;
                self.changed.notify_waiters();
            }
        }
        loop {
            let notified = self.changed.notified();
            {
                let groups = self.lock();
                let Some(group) = groups.get(group_id) else {
                    return (code::UNKNOWN_MEMBER_ID, Bytes::new());
                };
                if !group.members.contains_key(member_id) {
                    return (code::UNKNOWN_MEMBER_ID, Bytes::new());
                }
                if group.generation != generation || matches!(group.state, State::Joining { .. }) {
                    return (code::REBALANCE_IN_PROGRESS, Bytes::new());
                }
                if group.state == State::Stable {
                    let mine = group
                        .assignments
                        .get(member_id)
                        .cloned()
                        .unwrap_or_default();
                    return (code::NONE, mine);
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// Heartbeat: keeps the member's session; tells it when to rejoin.
    pub fn heartbeat(&self, group_id: &str, generation: i32, member_id: &str) -> i16 {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        let state = group.state;
        let current = group.generation;
        let Some(me) = group.members.get_mut(member_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        me.last_seen = Instant::now();
        if matches!(state, State::Joining { .. }) {
            return code::REBALANCE_IN_PROGRESS;
        }
        if generation != current {
            return code::ILLEGAL_GENERATION;
        }
        code::NONE
    }

    /// LeaveGroup: each member named leaves; the others rebalance.
    pub fn leave(&self, group_id: &str, member_ids: &[String]) -> Vec<i16> {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return vec![code::UNKNOWN_MEMBER_ID; member_ids.len()];
        };
        let codes: Vec<i16> = member_ids
            .iter()
            .map(|id| {
                if group.members.remove(id).is_some() {
                    code::NONE
                } else {
                    code::UNKNOWN_MEMBER_ID
                }
            })
            .collect();
        if codes.contains(&code::NONE) {
            let wait = max_rebalance_timeout(group);
            group.rebalance(Instant::now(), wait);
            self.changed.notify_waiters();
        }
        codes
    }

    /// Whether `member_id` of `generation` may commit offsets for the group. A commit
    /// outside any group (generation -1, as kcat or an assigning consumer does) may.
    pub fn may_commit(&self, group_id: &str, generation: i32, member_id: &str) -> i16 {
        if generation < 0 {
            return code::NONE;
        }
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return code::ILLEGAL_GENERATION;
        };
        if !group.members.contains_key(member_id) {
            return code::UNKNOWN_MEMBER_ID;
        }
        if group.generation != generation {
            return code::ILLEGAL_GENERATION;
        }
        code::NONE
    }

    /// Drops members whose session ran out, and rebalances their groups. Call it often.
    pub fn expire(&self, now: Instant) {
        let mut groups = self.lock();
        let mut any = false;
        for group in groups.values_mut() {
            let before = group.members.len();
            group
                .members
                .retain(|_, m| now.duration_since(m.last_seen) <= m.session_timeout);
            if group.members.len() != before {
                let wait = max_rebalance_timeout(group);
                group.rebalance(now, wait);
                any = true;
            }
            if group.maybe_complete_join(now) {
                any = true;
            }
        }
        if any {
            self.changed.notify_waiters();
        }
    }

    /// Every group id and its protocol type.
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        let groups = self.lock();
        let mut out: Vec<_> = groups
            .iter()
            .map(|(id, g)| (id.clone(), g.protocol_type.clone(), g.state.name()))
            .collect();
        out.sort();
        out
    }

    /// One group, for DescribeGroups.
    pub fn describe(&self, group_id: &str) -> Option<GroupInfo> {
        let groups = self.lock();
        let g = groups.get(group_id)?;
        Some(GroupInfo {
            state: g.state.name(),
            protocol_type: g.protocol_type.clone(),
            protocol: g.protocol.clone().unwrap_or_default(),
            members: g
                .members
                .iter()
                .map(|(id, m)| {
                    (
                        id.clone(),
                        m.client_id.clone(),
                        g.assignments.get(id).cloned().unwrap_or_default(),
                    )
                })
                .collect(),
        })
    }
}

fn max_rebalance_timeout(group: &Group) -> Duration {
    group
        .members
        .values()
        .map(|m| m.rebalance_timeout)
        .max()
        .unwrap_or_default()
}

fn unknown_member(member_id: String) -> Joined {
    Joined {
        error_code: code::UNKNOWN_MEMBER_ID,
        generation: -1,
        member_id,
        ..Joined::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protocols() -> Vec<(String, Bytes)> {
        vec![("range".into(), Bytes::from_static(b"meta"))]
    }

    #[tokio::test]
    async fn two_members_join_one_generation_and_the_leader_assigns() {
        let groups = std::sync::Arc::new(Groups::default());
        let s = Duration::from_secs(10);
        // v4+: a new member is given an id first.
        let first = groups
            .join("g", "", "c1", "consumer", protocols(), s, s, true)
            .await;
        assert_eq!(first.error_code, code::MEMBER_ID_REQUIRED);
        let (g1, g2) = (groups.clone(), groups.clone());
        let id1 = first.member_id.clone();
        let a = tokio::spawn(async move {
            g1.join("g", &id1, "c1", "consumer", protocols(), s, s, true)
                .await
        });
        let b = tokio::spawn(async move {
            g2.join("g", "", "c2", "consumer", protocols(), s, s, false)
                .await
        });
        let (a, b) = (a.await.expect("join"), b.await.expect("join"));
        assert_eq!((a.error_code, b.error_code), (code::NONE, code::NONE));
        assert_eq!(a.generation, b.generation);
        assert_eq!(a.leader, b.leader);
        let (leader, follower) = if a.leader == a.member_id {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(leader.members.len(), 2);
        assert!(follower.members.is_empty());
        assert_eq!(leader.protocol.as_deref(), Some("range"));
        let gen = leader.generation;
        let assignments = vec![
            (leader.member_id.clone(), Bytes::from_static(b"p0")),
            (follower.member_id.clone(), Bytes::from_static(b"p1")),
        ];
        let g3 = groups.clone();
        let fid = follower.member_id.clone();
        let f = tokio::spawn(async move { g3.sync("g", gen, &fid, Vec::new()).await });
        let l = groups.sync("g", gen, &leader.member_id, assignments).await;
        assert_eq!(l, (code::NONE, Bytes::from_static(b"p0")));
        assert_eq!(
            f.await.expect("sync"),
            (code::NONE, Bytes::from_static(b"p1"))
        );
        assert_eq!(groups.heartbeat("g", gen, &follower.member_id), code::NONE);
        assert_eq!(
            groups.heartbeat("g", gen - 1, &follower.member_id),
            code::ILLEGAL_GENERATION
        );
        // The follower leaves: the leader is told to rejoin, and a new generation follows.
        assert_eq!(
            groups.leave("g", std::slice::from_ref(&follower.member_id)),
            vec![code::NONE]
        );
        assert_eq!(
            groups.heartbeat("g", gen, &leader.member_id),
            code::REBALANCE_IN_PROGRESS
        );
        let again = groups
            .join(
                "g",
                &leader.member_id,
                "c1",
                "consumer",
                protocols(),
                s,
                s,
                true,
            )
            .await;
        assert_eq!(again.generation, gen + 1);
        assert_eq!(again.members.len(), 1);
        assert_eq!(
            groups.may_commit("g", gen, &leader.member_id),
            code::ILLEGAL_GENERATION
        );
        assert_eq!(groups.may_commit("g", -1, ""), code::NONE);
    }

    #[tokio::test]
    async fn a_member_whose_session_runs_out_is_dropped() {
        let groups = Groups::default();
        let short = Duration::from_millis(200);
        let j = groups
            .join(
                "g",
                "m1",
                "c1",
                "consumer",
                protocols(),
                short,
                short,
                false,
            )
            .await;
        assert_eq!(j.error_code, code::NONE);
        groups.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            groups.heartbeat("g", j.generation, "m1"),
            code::UNKNOWN_MEMBER_ID
        );
        assert_eq!(groups.describe("g").map(|g| g.state), Some("Empty"));
    }
}
