"""MQTT 5 features of ferry-edge, checked with paho-mqtt (2.x) over real sockets.

Usage: python3 mqtt5_features.py FEATURE PORT
FEATURE is one of the names in FEATURES below. Prints one line per check, "OK" last; on the
first failure prints "FAIL <feature>: <what>" and exits 1. Used by tests/tests/mqtt5_features.rs,
which starts the broker (for max_packet_size with `[mqtt] max_packet_size_bytes = 1024`).

Every "does not arrive" is bounded by a later message that must arrive on the same
connection: the broker keeps one queue per session in order, so a message it sent would have
come before the marker. Nothing waits on a bare sleep.
"""
import sys
import threading
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT_SECS = 20
HOST = "127.0.0.1"

# The broker's `[mqtt] max_packet_size_bytes` for the max_packet_size feature; the Rust test
# writes the same number into the broker's configuration.
BROKER_MAX_PACKET = 1024

PORT = 0


class Failure(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failure(what)


@dataclass
class Received:
    topic: str | None  # resolved through the topic aliases; None if the alias was unknown
    raw_topic: str  # as on the wire: empty when only an alias came
    payload: bytes
    retain: bool
    qos: int
    alias: int | None
    sub_ids: list = field(default_factory=list)


class Peer:
    """One paho client with everything it saw, behind one condition variable.

    paho hands topic aliases through unresolved (message.topic is "" and the TopicAlias
    property is set), so Peer keeps the alias table itself, as MQTT 5.0 §3.3.2.3.4 asks of
    a receiver.
    """

    def __init__(self, client_id, connect_props=None):
        self.client_id = client_id
        self.cond = threading.Condition()
        self.messages = []
        self.connacks = []  # (reason code value, CONNACK properties)
        self.disconnects = []  # (reason code value, sent by the server)
        self.subacks = {}  # mid -> [reason code values]
        self.unsubacks = set()
        self.pubacks = {}  # mid -> reason code value
        self.aliases = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish
        c.connect(HOST, PORT, properties=connect_props)
        c.loop_start()
        self.wait(lambda: self.connacks, f"{client_id} gets a CONNACK")

    # ---- callbacks (paho's network thread) ----

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connacks.append((reason_code.value, properties))
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnects.append((reason_code.value, flags.is_disconnect_packet_from_server))
            self.cond.notify_all()

    def _on_message(self, client, userdata, message):
        props = message.properties
        alias = getattr(props, "TopicAlias", None)
        raw = message.topic
        topic = raw
        with self.cond:
            if alias is not None:
                if raw:
                    self.aliases[alias] = raw
                else:
                    topic = self.aliases.get(alias)
            self.messages.append(
                Received(
                    topic=topic,
                    raw_topic=raw,
                    payload=message.payload,
                    retain=bool(message.retain),
                    qos=message.qos,
                    alias=alias,
                    sub_ids=list(getattr(props, "SubscriptionIdentifier", [])),
                )
            )
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = [r.value for r in reason_codes]
            self.cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.unsubacks.add(mid)
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.pubacks[mid] = reason_code.value
            self.cond.notify_all()

    # ---- used by the checks ----

    def wait(self, predicate, what, timeout=WAIT_SECS):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise Failure(f"timed out after {timeout} s waiting until {what}")

    def connack(self):
        return self.connacks[0]

    def subscribe(self, topic, qos=1, sub_id=None, **options):
        props = None
        if sub_id is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
        rc, mid = self.client.subscribe(
            (topic, SubscribeOptions(qos=qos, **options)), properties=props
        )
        check(rc == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id} sends SUBSCRIBE {topic}: rc {rc}")
        self.wait(lambda: mid in self.subacks, f"{self.client_id} gets a SUBACK for {topic}")
        codes = self.subacks[mid]
        check(codes == [qos], f"{self.client_id}'s SUBACK for {topic} grants QoS {qos}: {codes}")

    def unsubscribe(self, topic):
        rc, mid = self.client.unsubscribe(topic)
        check(rc == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id} sends UNSUBSCRIBE {topic}")
        self.wait(lambda: mid in self.unsubacks, f"{self.client_id} gets an UNSUBACK for {topic}")

    def publish(self, topic, payload, qos=1, retain=False, alias=None):
        """Publishes and, at QoS 1, waits for a successful PUBACK."""
        props = None
        if alias is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.TopicAlias = alias
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        check(info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id} sends PUBLISH: rc {info.rc}")
        if qos > 0:
            self.wait(
                lambda: info.mid in self.pubacks or self.disconnects,
                f"{self.client_id} gets a PUBACK for {topic!r}",
            )
            check(
                not self.disconnects,
                f"{self.client_id} is still connected after publishing to {topic!r}: "
                f"disconnected with {self.disconnects}",
            )
            code = self.pubacks[info.mid]
            check(code in (0x00, 0x10), f"PUBACK for {topic!r} is a success: 0x{code:02x}")
        return info

    def wait_payload(self, payload):
        """Waits until `payload` arrives and returns everything received up to and with it."""
        self.wait(
            lambda: any(m.payload == payload for m in self.messages),
            f"{self.client_id} receives {payload!r}",
        )
        with self.cond:
            at = next(i for i, m in enumerate(self.messages) if m.payload == payload)
            return list(self.messages[: at + 1])

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def say(line):
    print(line, flush=True)


# ---- the features ----


def topic_alias():
    plain = Peer("ta-plain")  # announces no Topic Alias Maximum: must never get an alias
    plain.subscribe("alias/#")
    plain.subscribe("aliasout/#")

    # Client → broker: an alias set with a topic, then used alone, then bound to another topic.
    pub = Peer("ta-pub")
    broker_max = getattr(pub.connack()[1], "TopicAliasMaximum", 0)
    check(broker_max >= 1, f"CONNACK announces Topic Alias Maximum >= 1: {broker_max}")
    pub.publish("alias/in/one", b"in-1", alias=1)
    pub.publish("", b"in-2", alias=1)
    pub.publish("alias/in/two", b"in-3", alias=1)
    pub.publish("", b"in-4", alias=1)
    got = [(m.topic, m.payload) for m in plain.wait_payload(b"in-4")]
    want = [
        ("alias/in/one", b"in-1"),
        ("alias/in/one", b"in-2"),
        ("alias/in/two", b"in-3"),
        ("alias/in/two", b"in-4"),
    ]
    check(got == want, f"aliases from the client resolve to their topics: got {got}")
    say("alias from client: set, used alone, rebound, used alone: each routed to its topic")

    # Broker → client: the client accepts 5 aliases; the broker's second PUBLISH on a topic
    # carries only the alias (what ferry-edge's to_publish does; §3.3.2.3.4 allows it).
    five = Peer("ta-five", topic_alias_max(5))
    five.subscribe("aliasout/#")
    one = Peer("ta-one", topic_alias_max(1))
    one.subscribe("aliasout/#")
    sent = [("aliasout/a", b"a-1"), ("aliasout/a", b"a-2"), ("aliasout/b", b"b-1"),
            ("aliasout/a", b"a-3"), ("aliasout/b", b"b-2")]
    for topic, payload in sent:
        pub.publish(topic, payload)
    for peer, most in ((five, 5), (one, 1)):
        got = peer.wait_payload(b"b-2")
        resolved = [(m.topic, m.payload) for m in got]
        check(resolved == sent, f"{peer.client_id}: every delivery resolves to its topic: "
                                f"{[(m.raw_topic, m.alias, m.payload) for m in got]}")
        over = [m.alias for m in got if m.alias is not None and not 1 <= m.alias <= most]
        check(not over, f"{peer.client_id}: no alias outside 1..{most} (MQTT-3.3.2-11): {over}")
    a1, a2 = five.messages[0], five.messages[1]
    check(a1.raw_topic == "aliasout/a" and a1.alias is not None,
          f"first delivery of aliasout/a sets an alias with the topic: {a1}")
    check(a2.raw_topic == "" and a2.alias == a1.alias,
          f"second delivery of aliasout/a carries only alias {a1.alias}: {a2}")
    b1 = five.messages[2]
    check(b1.alias is not None and b1.alias != a1.alias,
          f"aliasout/b gets an alias of its own: {b1}")
    say(f"alias to client: second delivery of a topic is alias {a1.alias} with an empty topic")
    say("alias to client: with Topic Alias Maximum 1 every delivery still resolves")

    got = plain.wait_payload(b"b-2")
    aliased = [m for m in got if m.alias is not None or not m.raw_topic]
    check(not aliased,
          f"a client without Topic Alias Maximum gets no alias (MQTT-3.1.2-27): {aliased}")
    say("alias to client: none for a client that announced no Topic Alias Maximum")
    for peer in (plain, pub, five, one):
        check(not peer.disconnects, f"{peer.client_id} stayed connected: {peer.disconnects}")
        peer.close()


def topic_alias_max(n):
    props = Properties(PacketTypes.CONNECT)
    props.TopicAliasMaximum = n
    return props


def subscription_ids():
    sub = Peer("sid-sub")
    sub.subscribe("sid/+/x", sub_id=11)
    sub.subscribe("sid/#", sub_id=22)
    sub.subscribe("sid/none/#")  # no identifier
    other = Peer("sid-other")
    other.subscribe("sid/#", sub_id=33)
    pub = Peer("sid-pub")

    # A message matching several subscriptions of one session: one PUBLISH with all of their
    # identifiers (MQTT-3.3.4-4), or one per subscription, each with its own (MQTT-3.3.4-5).
    expect = {
        b"both": ("sid/a/x", {11, 22}),
        b"hash-only": ("sid/a/y", {22}),
        b"with-unnamed": ("sid/none/x", {11, 22}),
    }
    for payload, (topic, _) in expect.items():
        pub.publish(topic, payload)
    pub.publish("sid/end", b"end")
    got = sub.wait_payload(b"end")
    for payload, (topic, ids) in expect.items():
        copies = [m for m in got if m.payload == payload]
        check(copies, f"{payload!r} on {topic} arrives")
        union = set()
        for m in copies:
            check(len(m.sub_ids) == len(set(m.sub_ids)) and set(m.sub_ids) <= ids,
                  f"{payload!r} on {topic}: identifiers {m.sub_ids} are among {sorted(ids)}")
            union |= set(m.sub_ids)
        check(union == ids, f"{payload!r} on {topic} carries {sorted(ids)}: "
                            f"{[m.sub_ids for m in copies]}")
        if len(copies) == 1:
            check(set(copies[0].sub_ids) == ids, f"one copy of {payload!r} holds all ids")
    # sid/none/# matched "with-unnamed" too but has no identifier: nothing of its own added.
    check([m.sub_ids for m in got if m.payload == b"end"] == [[22]],
          f"sid/end carries only 22: {[m.sub_ids for m in got if m.payload == b'end']}")
    say("subscription ids: each delivery carries the ids of every matching subscription")

    got = other.wait_payload(b"end")
    check(all(m.sub_ids == [33] for m in got), f"another session gets its own id 33: "
                                               f"{[(m.payload, m.sub_ids) for m in got]}")
    say("subscription ids: another session's subscription carries its own id")

    # Subscribing again to the same filter replaces the identifier (§3.8.4).
    sub.subscribe("sid/#", sub_id=44)
    pub.publish("sid/again", b"again")
    got = [m for m in sub.wait_payload(b"again") if m.payload == b"again"]
    check([m.sub_ids for m in got] == [[44]],
          f"after resubscribing sid/# with id 44, a delivery carries 44: {got}")
    say("subscription ids: resubscribing replaces the identifier")
    for peer in (sub, other, pub):
        peer.close()


def no_local():
    local = Peer("nl-local")
    local.subscribe("nl/t", noLocal=True)
    control = Peer("nl-control")
    control.subscribe("nl/t", noLocal=False)
    other = Peer("nl-other")

    local.publish("nl/t", b"own")
    control.publish("nl/t", b"control-own")
    other.publish("nl/t", b"from-other")
    # The control, subscribed without no_local, gets its own message back: this window would
    # have caught one.
    got = control.wait_payload(b"from-other")
    check([m.payload for m in got] == [b"own", b"control-own", b"from-other"],
          f"without no_local a client gets its own messages: {[m.payload for m in got]}")
    got = local.wait_payload(b"from-other")
    check([m.payload for m in got] == [b"control-own", b"from-other"],
          f"with no_local the own message does not come back: {[m.payload for m in got]}")
    say("no-local: own publish not delivered, another client's is (control without no_local "
        "gets its own)")
    for peer in (local, control, other):
        peer.close()


def retain_handling():
    pub = Peer("rh-pub")
    pub.publish("rh/t", b"kept", retain=True)
    markers = iter(range(1000))

    def subscribe_and_count(peer, rh):
        """Subscribes with Retain Handling `rh`; how many copies of the retained message came
        before a marker published after the SUBACK."""
        peer.subscribe("rh/t", retainHandling=rh)
        marker = f"marker-{next(markers)}".encode()
        pub.publish("rh/t", marker)
        got = peer.wait_payload(marker)
        check(all(m.retain for m in got if m.payload == b"kept"),
              "a retained message sent at subscribe has the retain flag (§3.3.1.3)")
        check(all(not m.retain for m in got if m.payload != b"kept"),
              "live messages have no retain flag (no retain-as-published)")
        return sum(m.payload == b"kept" for m in got)

    zero = Peer("rh-0")
    check(subscribe_and_count(zero, 0) == 1, "rh 0: retained sent at the first subscribe")
    check(subscribe_and_count(zero, 0) == 2, "rh 0: retained sent again at a repeat subscribe")
    say("retain handling 0: retained message sent at every subscribe")

    one = Peer("rh-1")
    check(subscribe_and_count(one, 1) == 1, "rh 1: retained sent for a new subscription")
    check(subscribe_and_count(one, 1) == 1, "rh 1: not sent again for an existing subscription")
    one.unsubscribe("rh/t")
    check(subscribe_and_count(one, 1) == 2, "rh 1: sent again once the subscription is new")
    say("retain handling 1: retained message sent only when the subscription is new")

    two = Peer("rh-2")
    check(subscribe_and_count(two, 2) == 0, "rh 2: retained not sent at a new subscribe")
    check(subscribe_and_count(two, 2) == 0, "rh 2: retained not sent at a repeat subscribe")
    say("retain handling 2: retained message never sent")
    for peer in (pub, zero, one, two):
        peer.close()


def retain_as_published():
    rap = Peer("rap-on")
    rap.subscribe("rap/t", retainAsPublished=True)
    plain = Peer("rap-off")
    plain.subscribe("rap/t", retainAsPublished=False)
    pub = Peer("rap-pub")
    # Subscribed before anything is retained: these are forwarded live, not sent at subscribe.
    pub.publish("rap/t", b"retained", retain=True)
    pub.publish("rap/t", b"plain", retain=False)
    want_on = [(b"retained", True), (b"plain", False)]
    want_off = [(b"retained", False), (b"plain", False)]
    got = [(m.payload, m.retain) for m in rap.wait_payload(b"plain")]
    check(got == want_on, f"with retain-as-published the flag is kept: {got}")
    got = [(m.payload, m.retain) for m in plain.wait_payload(b"plain")]
    check(got == want_off, f"without retain-as-published the flag is cleared: {got}")
    say("retain-as-published: retain flag kept when set, cleared otherwise")
    for peer in (rap, plain, pub):
        peer.close()


def publish_size(topic, payload_len, qos):
    """Bytes of a PUBLISH without properties, fixed header included (MQTT 5.0 §3.3)."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + payload_len
    varint = 1 if rest < 128 else 2 if rest < 16384 else 3
    return 1 + varint + rest


def payload_for(topic, size, qos):
    """The payload length that makes a PUBLISH on `topic` exactly `size` bytes."""
    n = next(n for n in range(size) if publish_size(topic, n, qos) >= size)
    check(publish_size(topic, n, qos) == size, f"a PUBLISH on {topic} can be {size} bytes")
    return n


def max_packet_size():
    # The client's Maximum Packet Size: the broker must not send it anything bigger
    # (MQTT-3.1.2-24) and ferry-edge drops such a message for that client.
    client_max = 200
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = client_max
    small = Peer("mps-small", props)
    small.subscribe("mps/out", qos=0)  # delivered at QoS 0: no packet id
    big = Peer("mps-big")
    big.subscribe("mps/out", qos=0)
    pub = Peer("mps-pub")
    fits = payload_for("mps/out", client_max, 0)
    pub.publish("mps/out", b"f" * fits)
    pub.publish("mps/out", b"o" * (fits + 1))
    pub.publish("mps/out", b"end")
    got = [len(m.payload) for m in big.wait_payload(b"end")]
    check(got == [fits, fits + 1, 3], f"a client without a limit gets all three: {got}")
    got = [len(m.payload) for m in small.wait_payload(b"end")]
    check(got == [fits, 3], f"a client with Maximum Packet Size {client_max} gets the "
                            f"{client_max}-byte PUBLISH, not the {client_max + 1}-byte one: {got}")
    check(not small.disconnects, f"the small client stays connected: {small.disconnects}")
    say(f"max packet size to client: {client_max} bytes delivered, {client_max + 1} not")

    # The broker's Maximum Packet Size: a bigger PUBLISH gets DISCONNECT 0x95 (MQTT-3.2.2-15).
    sender = Peer("mps-sender")
    announced = getattr(sender.connack()[1], "MaximumPacketSize", None)
    check(announced == BROKER_MAX_PACKET,
          f"CONNACK announces Maximum Packet Size {BROKER_MAX_PACKET}: {announced}")
    fits = payload_for("mps/in", BROKER_MAX_PACKET, 1)
    big.subscribe("mps/in")
    sender.publish("mps/in", b"f" * fits)  # exactly the maximum: accepted
    info = sender.client.publish("mps/in", b"o" * (fits + 1), qos=1)
    sender.wait(lambda: sender.disconnects, "the broker disconnects the sender")
    code, from_server = sender.disconnects[0]
    check(from_server and code == 0x95,
          f"DISCONNECT with 0x95 Packet too large from the server: code 0x{code:02x}, "
          f"DISCONNECT packet from server: {from_server}")
    check(info.mid not in sender.pubacks, "the oversize PUBLISH was not acknowledged")
    sender.client.loop_stop()  # no reconnect
    pub.publish("mps/in", b"end-in")
    got = [len(m.payload) for m in big.wait_payload(b"end-in") if m.raw_topic == "mps/in"]
    check(got == [fits, 6], f"only the PUBLISH within the limit was routed: {got}")
    say(f"max packet size from client: {BROKER_MAX_PACKET} bytes accepted, "
        f"{BROKER_MAX_PACKET + 1} get DISCONNECT 0x95")
    for peer in (small, big, pub):
        peer.close()


def max_packet_size_alias():
    """A message dropped for the client's Maximum Packet Size must not use up a topic alias:
    the next delivery on that topic has to resolve (§3.3.2.3.4: a zero-length topic is read
    through a mapping the receiver was sent; MQTT-3.1.2-25: a message too large is discarded
    without sending it). ferry-edge failed this until the alias was bound only for what is
    sent."""
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = 200
    props.TopicAliasMaximum = 5
    sub = Peer("mpa-sub", props)
    sub.subscribe("mpa/t", qos=0)
    pub = Peer("mpa-pub")
    pub.publish("mpa/t", b"o" * 400)
    pub.publish("mpa/t", b"end")
    got = sub.wait_payload(b"end")
    check([m.payload for m in got] == [b"end"], f"only the small message arrives: {got}")
    check(got[0].topic == "mpa/t",
          f"the small message resolves to mpa/t: topic {got[0].raw_topic!r} alias "
          f"{got[0].alias}, an alias never bound on this connection")
    say("max packet size and aliases: a dropped message binds no alias")
    sub.close()
    pub.close()


def auth_method():
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "FERRY-NO-SUCH-METHOD"
    props.AuthenticationData = b"x"
    refused = Peer("auth-unknown", props)
    code = refused.connack()[0]
    check(code == 0x8C, f"CONNACK with 0x8C Bad authentication method: 0x{code:02x}")
    refused.wait(lambda: refused.disconnects, "the broker closes the refused connection")
    refused.client.loop_stop()
    # The same client without a method is accepted: the refusal was about the method.
    accepted = Peer("auth-unknown")
    code = accepted.connack()[0]
    check(code == 0x00, f"the same client without a method connects: 0x{code:02x}")
    say("auth: unknown authentication method refused with CONNACK 0x8C, connection closed")
    accepted.close()


FEATURES = {
    "topic_alias": topic_alias,
    "subscription_ids": subscription_ids,
    "no_local": no_local,
    "retain_handling": retain_handling,
    "retain_as_published": retain_as_published,
    "max_packet_size": max_packet_size,
    "max_packet_size_alias": max_packet_size_alias,
    "auth_method": auth_method,
}


def main():
    global PORT
    if len(sys.argv) != 3 or sys.argv[1] not in FEATURES:
        print(f"usage: {sys.argv[0]} {{{'|'.join(FEATURES)}}} PORT", file=sys.stderr)
        sys.exit(2)
    feature, PORT = sys.argv[1], int(sys.argv[2])
    try:
        FEATURES[feature]()
    except Failure as e:
        print(f"FAIL {feature}: {e}", flush=True)
        sys.exit(1)
    print("OK", flush=True)


if __name__ == "__main__":
    main()
