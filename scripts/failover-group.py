"""Times a Kafka consumer group's recovery when its coordinator node dies (README, "Cluster
failover"). Used by scripts/bench-failover.sh.

    python3 scripts/failover-group.py BOOTSTRAP TOPIC ADMIN_URLS NODE=PID...

An idempotent confluent-kafka producer sends a record every 20 ms to each partition in turn
(its value the time it was sent); two consumers of group "failover" read the topic. Once both have partitions and
records flow, the node holding the group's lease (`kafka-group` on `/api/cluster` of any of
ADMIN_URLS, comma-separated) is killed with SIGKILL. Printed, in seconds from the kill:

    rebalanced  the group has every partition assigned again after a rebalance ("none": the
                group kept its assignment)
    resumed     of every partition, a record sent after the kill was consumed
    caught_up   every record the producer had acknowledged by then was consumed

and how many records were acknowledged, consumed and lost (acknowledged, never consumed).
"""
import json
import os
import signal
import sys
import threading
import time
import urllib.request

from confluent_kafka import Consumer, Producer

bootstrap, topic, admins = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
pids = dict(a.split("=", 1) for a in sys.argv[4:])
stop = threading.Event()
stop_producing = threading.Event()
lock = threading.Lock()
acked = set()
consumed = set()
assigned = {}
events = []  # (time, "assign" or "revoke")
killed_at = [float("inf")]
resumed_at = {}  # partition -> when a record sent after the kill was first consumed


def produce():
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 1, "message.timeout.ms": 120000})

    def done(err, msg):
        if err is None:
            with lock:
                acked.add(msg.value().decode())

    n = 0
    while not stop_producing.is_set():
        p.produce(topic, value=repr(time.time()).encode(), partition=n % 3, on_delivery=done)
        n += 1
        p.poll(0)
        time.sleep(0.02)
    p.flush(60)


def consume(name):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "failover",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 10000,
                  "heartbeat.interval.ms": 1000, "client.id": name})

    def on_assign(consumer, partitions):
        with lock:
            assigned[name] = {p.partition for p in partitions}
            events.append((time.time(), "assign"))

    def on_revoke(consumer, partitions):
        with lock:
            assigned[name] = set()
            events.append((time.time(), "revoke"))

    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    while not stop.is_set():
        m = c.poll(0.1)
        if m is None or m.error():
            continue
        with lock:
            consumed.add(m.value().decode())
            sent = float(m.value().decode())
            if sent > killed_at[0] and m.partition() not in resumed_at:
                resumed_at[m.partition()] = time.time()
    c.close()


def coordinator():
    for url in admins:
        try:
            with urllib.request.urlopen(url + "/api/cluster", timeout=2) as r:
                cluster = json.load(r)
        except OSError:
            continue
        for lease in cluster.get("leases", []):
            if lease["kind"] == "kafka-group" and lease["key"] == "failover":
                return lease["owner"]
    return None


threads = [threading.Thread(target=produce)] + [
    threading.Thread(target=consume, args=(n,)) for n in ("c1", "c2")]
for t in threads:
    t.start()
partitions = None
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(0.5)
    with lock:
        parts = [assigned.get(n, set()) for n in ("c1", "c2")]
        flowing = len(consumed) > 20
    if all(parts) and flowing and coordinator():
        partitions = set().union(*parts)
        break
if partitions is None:
    stop_producing.set()
    stop.set()
    sys.exit("the group did not settle within 60 s")
time.sleep(2)
victim = coordinator()
killed_at[0] = time.time()
os.kill(int(pids[victim]), signal.SIGKILL)
killed = killed_at[0]
print("killed %s, the group's coordinator" % victim, flush=True)

rebalanced = resumed = caught_up = None
wanted = None
deadline = killed + 120
while time.time() < deadline and (caught_up is None or rebalanced is None):
    time.sleep(0.05)
    with lock:
        revoked = any(w == "revoke" for t, w in events if t > killed)
        if rebalanced is None and revoked and set().union(*assigned.values()) == partitions:
            rebalanced = max(t for t, w in events if w == "assign") - killed
        if resumed is None and set(resumed_at) == partitions:
            resumed = max(resumed_at.values()) - killed
            wanted = set(acked)
        if resumed is not None and caught_up is None and wanted <= consumed:
            caught_up = time.time() - killed
        if caught_up is not None and not revoked and time.time() > killed + 30:
            break  # no rebalance came: the group kept its members and assignment
# Every acknowledged record is to be consumed (within 60 s of the producer's last).
stop_producing.set()
threads[0].join()
deadline = time.time() + 60
while time.time() < deadline:
    with lock:
        if acked <= consumed:
            break
    time.sleep(0.1)
stop.set()
for t in threads[1:]:
    t.join()
lost = acked - consumed
fmt = lambda x: "%.1f" % x if x is not None else "none"
print("rebalanced %s resumed %s caught_up %s" % (fmt(rebalanced), fmt(resumed), fmt(caught_up)))
print("acknowledged %d consumed %d lost %d" % (len(acked), len(consumed), len(lost)))
