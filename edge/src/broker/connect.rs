//! The life of a connection and its session: CONNECT, keep alive, the end of a connection
//! (lost, closed by us, or DISCONNECT), wills, and session expiry.

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::mqtt::{ConnAck, Connect, Disconnect, Packet, ProtocolVersion, ReasonCode};

use super::publish::forwarded_properties;
use super::session::Session;
use super::{Action, Broker, Conn, ConnId, Downstream, Message, SessionEvent, StoreOp, Timer};
use crate::auth;

/// Keep alive (MQTT-3.1.2-22): a client may be silent for 1.5 times its interval, in
/// thousandths, before it is closed.
const KEEPALIVE_GRACE_PERMILLE: u64 = 1500;

impl Broker {
    pub(super) fn connect(
        &mut self,
        conn: ConnId,
        connect: Connect,
        credit: usize,
        identity_verified: bool,
        now: Instant,
    ) {
        let v5 = connect.protocol == ProtocolVersion::V5;
        let refuse = |this: &mut Self, code: ReasonCode| {
            this.out.push(Action::Send(
                conn,
                Packet::ConnAck(ConnAck::new(code, false)),
            ));
            this.out.push(Action::Close(conn));
        };
        if connect.properties.authentication_method.is_some() {
            // Enhanced authentication is not supported (MQTT-4.12.0-1 allows refusing it).
            return refuse(self, ReasonCode::BadAuthenticationMethod);
        }
        let username = connect.username.as_deref();
        if !identity_verified {
            if let Err(code) = self
                .auth
                .authenticate(username, connect.password.as_deref())
            {
                return refuse(self, code);
            }
        }
        let mut assigned = None;
        let chosen = !connect.client_id.is_empty();
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // MQTT-3.1.3-8: a 3.1.1 client without an id must ask for a clean session.
                return refuse(self, ReasonCode::ClientIdentifierNotValid);
            }
            // Never the id of a session there is (one assigned before a restart lives on).
            let mut id = String::new();
            while id.is_empty() || self.sessions.contains_key(id.as_str()) {
                id = format!("{}{}", super::ASSIGNED_ID_PREFIX, self.next_assigned_id);
                self.next_assigned_id += 1;
            }
            if v5 {
                assigned = Some(id.clone());
            }
            id.into()
        } else {
            connect.client_id.as_str().into()
        };

        if let Some(will) = &connect.will {
            let allowed = self.auth.allows(
                username,
                &client_id,
                auth::Action::Publish,
                will.topic.as_str(),
            );
            if !allowed {
                return refuse(self, ReasonCode::NotAuthorized);
            }
        }

        if self.must_fetch(&connect, &client_id, chosen) {
            return self.park(conn, client_id, connect, credit);
        }
        self.accept(conn, connect, client_id, assigned, chosen, credit, now);
    }

    /// A parked CONNECT ([`Broker::park`]) goes on, now that the cluster answered: with the
    /// session it finds here, if any.
    pub(super) fn connect_fetched(
        &mut self,
        conn: ConnId,
        connect: Connect,
        credit: usize,
        now: Instant,
    ) {
        let client_id: Arc<str> = connect.client_id.as_str().into();
        self.accept(conn, connect, client_id, None, true, credit, now);
    }

    /// The rest of CONNECT, once the client is authenticated and its id known: takeover,
    /// the session, the keep alive, CONNACK.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        conn: ConnId,
        connect: Connect,
        client_id: Arc<str>,
        assigned: Option<String>,
        chosen: bool,
        credit: usize,
        now: Instant,
    ) {
        let v5 = connect.protocol == ProtocolVersion::V5;
        // Session takeover (MQTT-3.1.4-3): the older connection is closed.
        if let Some(old_conn) = self.sessions.get(&client_id).and_then(|s| s.conn) {
            if let Some(old) = self.conns.get(&old_conn) {
                if old.version == ProtocolVersion::V5 {
                    self.out.push(Action::Send(
                        old_conn,
                        Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver)),
                    ));
                }
            }
            self.out.push(Action::Close(old_conn));
            self.lost(old_conn, now);
        }

        let expiry_secs = if v5 {
            connect.properties.session_expiry_interval_secs.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        }
        .min(self.config.max_session_expiry_secs);

        // A session whose expiry ran out before its timer was handled is gone, not resumed.
        self.tick_session(&client_id, now);
        if connect.clean_start {
            self.end_session(&client_id, now);
        }
        let session_present = self.sessions.contains_key(&client_id);
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Session::new(client_id.clone()));
        session.conn = Some(conn);
        session.username = connect.username.as_deref().map(Arc::from);
        session.expiry_secs = expiry_secs;
        session.disconnected_at = None;
        // A pending will of an earlier connection is not sent once the session resumes.
        session.will_due = None;
        session.will = connect.will;
        for inflight in &mut session.inflight {
            inflight.sent = false;
        }
        self.timers.cancel(&Timer::Session(client_id.clone()));
        self.persist_session(&client_id);

        // The keep alive in force: the Server Keep Alive (below) for a v5 client that asked
        // for none or for more, the client's own otherwise.
        let max_ka = self.config.max_keepalive_secs;
        let keepalive_secs = match connect.keep_alive_secs {
            ka if v5 && max_ka > 0 && (ka == 0 || ka > max_ka) => max_ka,
            ka => ka,
        };
        let keepalive_limit = (keepalive_secs > 0)
            .then(|| Duration::from_millis(u64::from(keepalive_secs) * KEEPALIVE_GRACE_PERMILLE));
        if let Some(limit) = keepalive_limit {
            self.timers.set(Timer::KeepAlive(conn), now + limit);
        }

        let client_window = connect
            .properties
            .receive_maximum
            .map_or(u16::MAX, NonZeroU16::get);
        self.conns.insert(
            conn,
            Conn {
                client_id: client_id.clone(),
                version: connect.protocol,
                credit,
                send_window: client_window.min(self.config.max_inflight_messages).max(1),
                max_packet_bytes: connect
                    .properties
                    .maximum_packet_size
                    .map_or(u32::MAX, NonZeroU32::get),
                alias_max_out: connect.properties.topic_alias_maximum.unwrap_or(0),
                aliases_out: HashMap::new(),
                aliases_in: HashMap::new(),
                held: VecDeque::new(),
                closing: false,
                will_suppressed: false,
                keepalive_limit,
                last_seen: now,
            },
        );

        let mut ack = ConnAck::new(ReasonCode::Success, session_present);
        if v5 {
            let p = &mut ack.properties;
            p.receive_maximum = NonZeroU16::new(self.config.max_inflight_messages);
            p.maximum_packet_size = NonZeroU32::new(self.config.max_packet_size_bytes);
            p.topic_alias_maximum = Some(self.config.max_topic_alias);
            p.assigned_client_identifier = assigned;
            if !self.config.retain_available {
                p.retain_available = Some(false);
            }
            if connect
                .properties
                .session_expiry_interval_secs
                .is_some_and(|s| s != expiry_secs)
            {
                p.session_expiry_interval_secs = Some(expiry_secs);
            }
            if keepalive_secs != connect.keep_alive_secs {
                p.server_keep_alive_secs = Some(keepalive_secs);
            }
        }
        self.out.push(Action::Send(conn, Packet::ConnAck(ack)));
        if chosen && self.session_events.is_some() {
            self.session_event(SessionEvent::Connected(client_id.clone()));
            let will = self.sessions.get(&client_id).and_then(|s| s.will.as_ref());
            let will = will.map(|w| {
                let delay = w.properties.will_delay_interval_secs.unwrap_or(0);
                (Arc::new(will_message(client_id.clone(), w, None)), delay)
            });
            self.session_event(SessionEvent::Will(client_id.clone(), will));
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.credit = c.credit.saturating_sub(1);
        }
        self.pump(&client_id, now);
    }

    pub(super) fn disconnect(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        d: Disconnect,
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if let Some(expiry) = d.properties.session_expiry_interval_secs {
            if session.expiry_secs == 0 && expiry != 0 {
                // MQTT-3.14.2-2: cannot turn a session that ends into one that persists.
                return self.protocol_error(conn, ReasonCode::ProtocolError, now);
            }
            session.expiry_secs = expiry.min(self.config.max_session_expiry_secs);
            self.persist_session(client_id);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.will_suppressed = d.reason != ReasonCode::DisconnectWithWillMessage;
        }
        self.out.push(Action::Close(conn));
        self.lost(conn, now);
    }

    /// Sends DISCONNECT with `code` (v5) and closes; the will applies.
    pub(super) fn protocol_error(&mut self, conn: ConnId, code: ReasonCode, now: Instant) {
        self.close_with(conn, Disconnect::new(code), now);
    }

    pub(super) fn close_with(&mut self, conn: ConnId, disconnect: Disconnect, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closing = true;
        c.held.clear();
        if c.version == ProtocolVersion::V5 {
            self.out
                .push(Action::Send(conn, Packet::Disconnect(disconnect)));
        }
        self.out.push(Action::Close(conn));
        self.lost(conn, now);
    }

    /// [`Input::Drain`]: closes every connection, each v5 client told where to go (the
    /// references in turn, by connection id) or that the server is shutting down.
    pub(super) fn drain(&mut self, references: &[String], now: Instant) {
        // A connection still waiting for the cluster is refused (no session was started).
        for (conn, _) in std::mem::take(&mut self.parked) {
            self.out.push(Action::Send(
                conn,
                Packet::ConnAck(ConnAck::new(ReasonCode::ServerUnavailable, false)),
            ));
            self.out.push(Action::Close(conn));
        }
        let mut conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(id, _)| *id)
            .collect();
        conns.sort_unstable();
        for (i, conn) in conns.into_iter().enumerate() {
            let disconnect = match references.get(i % references.len().max(1)) {
                Some(reference) => {
                    let mut d = Disconnect::new(ReasonCode::UseAnotherServer);
                    d.properties.server_reference = Some(reference.clone());
                    d
                }
                None => Disconnect::new(ReasonCode::ServerShuttingDown),
            };
            self.close_with(conn, disconnect, now);
        }
    }

    /// The connection ended without DISCONNECT, or after one: detach it from its session,
    /// start the will and the session expiry.
    pub(super) fn lost(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.timers.cancel(&Timer::KeepAlive(conn));
        // Held messages of a paused publisher were never acknowledged: the client resends.
        let Some(session) = self.sessions.get_mut(&c.client_id) else {
            return;
        };
        if session.conn != Some(conn) {
            return;
        }
        session.conn = None;
        session.disconnected_at = Some(now);
        if c.will_suppressed && session.will.take().is_some() {
            self.session_event(SessionEvent::Will(c.client_id.clone(), None));
        }
        let Some(session) = self.sessions.get_mut(&c.client_id) else {
            return;
        };
        if let Some(will) = &session.will {
            let delay = will.properties.will_delay_interval_secs.unwrap_or(0);
            let delay = delay.min(session.expiry_secs);
            session.will_due = Some(now + Duration::from_secs(delay.into()));
        }
        let client_id = c.client_id.clone();
        self.tick_session(&client_id, now);
        self.retry_held(now);
    }

    /// [`Input::Timeout`](super::Input::Timeout): does what is due at `now`: closes the
    /// connections whose keep alive ran out, sends due wills, ends expired sessions,
    /// publishes `$SYS`.
    pub(super) fn timeout(&mut self, now: Instant) {
        for timer in self.timers.take_due(now) {
            match timer {
                Timer::Sys => {
                    let started = *self.started_at.get_or_insert(now);
                    let interval = Duration::from_secs(self.config.sys_interval_secs.into());
                    if !interval.is_zero() {
                        self.timers.set(Timer::Sys, now + interval);
                        self.publish_sys(now, now.duration_since(started));
                    }
                }
                Timer::KeepAlive(conn) => self.check_keepalive(conn, now),
                Timer::Session(client_id) => self.tick_session(&client_id, now),
            }
        }
    }

    /// MQTT-3.1.2-22: a client that sent nothing for 1.5 times its keep alive is closed as
    /// if the network had failed (no DISCONNECT; its will applies). A connection the broker
    /// paused is not read from, so its client cannot be heard: its keep alive counts again
    /// from when reading resumes.
    fn check_keepalive(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(limit) = c.keepalive_limit else {
            return;
        };
        let paused = !c.held.is_empty() || self.paced.contains(&conn);
        let due = c.last_seen + limit;
        if paused {
            self.timers.set(Timer::KeepAlive(conn), now + limit);
        } else if due > now {
            self.timers.set(Timer::KeepAlive(conn), due);
        } else {
            self.out.push(Action::Close(conn));
            self.lost(conn, now);
        }
    }

    /// Resumes reading from a paused connection; its keep alive counts from now.
    pub(super) fn resume_reads(&mut self, conn: ConnId, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_seen = now;
        }
        self.out.push(Action::ResumeReads(conn));
    }

    /// Sends the session's will if it is due, ends the session if it expired, and arms its
    /// timer for what comes next.
    fn tick_session(&mut self, client_id: &Arc<str>, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.will_due.is_some_and(|due| due <= now) {
            session.will_due = None;
            if let Some(will) = session.will.take() {
                self.publish_will(client_id.clone(), will, now);
            }
        }
        let Some(session) = self.sessions.get(client_id) else {
            return;
        };
        let expired = session.conn.is_none()
            && session.expiry_secs != u32::MAX
            && session
                .disconnected_at
                .is_some_and(|at| now >= at + Duration::from_secs(session.expiry_secs.into()));
        if expired {
            // A will still pending goes out when its session ends (MQTT-3.1.3-9).
            if let Some(will) = self.sessions.get_mut(client_id).and_then(|s| s.will.take()) {
                if self
                    .sessions
                    .get(client_id)
                    .is_some_and(|s| s.will_due.is_some())
                {
                    self.publish_will(client_id.clone(), will, now);
                }
            }
            self.end_session(client_id, now);
            return;
        }
        self.arm_session(client_id);
    }

    /// Arms an offline session's timer at its will delay or its expiry, whichever comes
    /// first; disarms it if it has neither, or is connected.
    pub(super) fn arm_session(&mut self, client_id: &Arc<str>) {
        let timer = Timer::Session(client_id.clone());
        let Some(session) = self.sessions.get(client_id).filter(|s| s.conn.is_none()) else {
            return self.timers.cancel(&timer);
        };
        let expires_at = (session.expiry_secs != u32::MAX)
            .then_some(session.disconnected_at)
            .flatten()
            .and_then(|at| at.checked_add(Duration::from_secs(session.expiry_secs.into())));
        let next = match (session.will_due, expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            Some(at) => self.timers.set(timer, at),
            None => self.timers.cancel(&timer),
        }
    }

    fn publish_will(
        &mut self,
        client_id: Arc<str>,
        will: ferry_protocol::mqtt::Will,
        now: Instant,
    ) {
        self.session_event(SessionEvent::Will(client_id.clone(), None));
        let msg = Arc::new(will_message(client_id, &will, Some(now)));
        if let Downstream::Log(appends) = &mut self.downstream {
            appends.push(msg);
            return;
        }
        if msg.retain {
            self.retain(&msg);
        }
        // A will has no publisher left to pause; what does not fit is dropped and counted.
        let _ = self.route(msg, now, true);
    }

    /// [`Input::TakenElsewhere`](super::Input::TakenElsewhere): closes the session's
    /// connection (0x8E) and ends the session, dropping a will still waiting for its delay.
    pub(super) fn taken_elsewhere(&mut self, client_id: &str, now: Instant) {
        let Some((id, session)) = self.sessions.get_key_value(client_id) else {
            return;
        };
        let (id, conn) = (id.clone(), session.conn);
        if let Some(conn) = conn {
            // As a takeover here: a will without a delay goes out as the connection closes.
            self.close_with(conn, Disconnect::new(ReasonCode::SessionTakenOver), now);
        }
        self.end_session(&id, now);
    }

    /// Removes a session and everything it holds.
    fn end_session(&mut self, client_id: &Arc<str>, _now: Instant) {
        let Some(session) = self.sessions.remove(client_id) else {
            return;
        };
        self.session_event(SessionEvent::Ended(client_id.clone()));
        self.timers.cancel(&Timer::Session(client_id.clone()));
        for (filter, _, _) in session.subscriptions.values() {
            self.subscriptions.remove(filter, client_id);
        }
        self.queued_bytes -= session.held_bytes();
        if session.is_persistent() {
            self.store_ops.push(StoreOp::SessionDelete {
                client_id: client_id.clone(),
            });
        }
    }
}

/// The message `will` publishes: its expiry counts from `now`, or without `now` stays a
/// property (Message Expiry Interval) for whoever publishes it later.
fn will_message(
    client_id: Arc<str>,
    will: &ferry_protocol::mqtt::Will,
    now: Option<Instant>,
) -> Message {
    let expiry = will.properties.message_expiry_interval_secs;
    let mut properties = forwarded_properties(&will.properties);
    if now.is_none() {
        properties.message_expiry_interval_secs = expiry;
    }
    Message {
        expires_at: now.and_then(|now| expiry.map(|s| now + Duration::from_secs(s.into()))),
        properties,
        topic: will.topic.clone(),
        payload: will.payload.clone(),
        qos: will.qos,
        retain: will.retain,
        publisher: Some(client_id),
        position: None,
    }
}
