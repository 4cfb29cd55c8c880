"""Times an MQTT persistent session's move when its node dies (README, "Cluster failover").
Used by scripts/bench-failover.sh.

    python3 scripts/failover-session.py PUBLISH_PORT SESSION_PORT RESUME_PORT SESSION_PID

A paho-mqtt publisher on PUBLISH_PORT sends a QoS 1 message every 20 ms to
`failover/session` (its payload a sequence number). A paho-mqtt subscriber (MQTT 5, client
id `failover-session`, Clean Start 0, session expiry 1 h) reads it on SESSION_PORT. Once
messages flow, the node there (SESSION_PID) is killed with SIGKILL; the subscriber connects
again at once, to RESUME_PORT, with the same session. Printed, in seconds from the kill:

    connack     the new node's CONNACK (with its Session Present flag)
    resumed     a message published after the kill was received
    caught_up   every message the publisher had acknowledged before the kill was received
                (0: all were before the kill)

and how many were acknowledged, received, lost (acknowledged, never received) and received
more than once.
"""
import os
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TOPIC = "failover/session"
publish_port, session_port, resume_port = (int(p) for p in sys.argv[1:4])
session_pid = int(sys.argv[4])

lock = threading.Lock()
acked = set()
sent_at = {}  # sequence -> when it was published
pending = {}  # mid -> sequence
received = []
received_at = {}  # sequence -> when first received
killed_at = [float("inf")]
connack = []  # (seconds from the kill, session present)
stop = threading.Event()


def on_publish(client, userdata, mid, reason_code=None, properties=None):
    with lock:
        seq = pending.pop(mid, None)
        if seq is not None:
            acked.add(seq)


def publisher():
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="failover-publisher")
    client.on_publish = on_publish
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", publish_port)
    client.loop_start()
    seq = 0
    while not stop.is_set():
        with lock:
            info = client.publish(TOPIC, str(seq), qos=1)
            pending[info.mid] = seq
            sent_at[seq] = time.monotonic()
        seq += 1
        time.sleep(0.02)
    time.sleep(2)
    client.loop_stop()
    client.disconnect()


def on_message(client, userdata, msg):
    seq = int(msg.payload)
    now = time.monotonic()
    with lock:
        received.append(seq)
        received_at.setdefault(seq, now)


def on_connect(client, userdata, flags, reason_code, properties):
    with lock:
        connack.append((time.monotonic() - killed_at[0], flags.session_present))
    client.subscribe(TOPIC, qos=1)


def subscriber(port):
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="failover-session",
        protocol=mqtt.MQTTv5,
    )
    client.on_message = on_message
    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props, keepalive=30)
    client.loop_start()
    return client


threading.Thread(target=publisher, daemon=True).start()
first = subscriber(session_port)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    with lock:
        if len(received) >= 100:
            break
    time.sleep(0.1)
else:
    sys.exit("no messages flow to the session")

os.kill(session_pid, signal.SIGKILL)
killed_at[0] = time.monotonic()
with lock:
    connack.clear()
    acked_by_kill = set(acked)
first.loop_stop()
second = subscriber(resume_port)

# Resumed: a message published after the kill was received.
resumed = None
deadline = time.monotonic() + 60
while time.monotonic() < deadline and resumed is None:
    with lock:
        after = [received_at[s] for s in received_at if sent_at.get(s, 0) > killed_at[0]]
    if after:
        resumed = min(after) - killed_at[0]
    time.sleep(0.05)
time.sleep(3)
stop.set()
time.sleep(3)
with lock:
    goal = set(acked)
caught_up = None
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    with lock:
        missing = goal - set(received)
        if not missing:
            last = max(received_at[s] for s in acked_by_kill)
            caught_up = max(0.0, last - killed_at[0])
            break
    time.sleep(0.1)
second.loop_stop()
with lock:
    lost = len(goal - set(received))
    doubled = len(received) - len(set(received))
    seen_connack = connack[0] if connack else None


def secs(v):
    return "none" if v is None else f"{v:.2f}"


print(
    f"connack {secs(seen_connack[0] if seen_connack else None)}"
    f" (session present {seen_connack[1] if seen_connack else '-'})"
    f"  resumed {secs(resumed)}  caught_up {secs(caught_up)}"
    f"  acknowledged {len(goal)} received {len(set(received))} lost {lost} doubled {doubled}"
)
