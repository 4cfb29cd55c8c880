"""A confluent-kafka (librdkafka) consumer group against ferry-cloud's Kafka front.

Usage: python3 kafka_group.py BOOTSTRAP TOPIC COUNT
TOPIC has three partitions. Produces COUNT records; three consumers of one group subscribe:
one leaves (close) after the first records; one, a process of its own (this script run as
`kafka_group.py member BOOTSTRAP TOPIC NAME`, which reads slowly and prints each record), is
killed with SIGKILL once it has joined and read some records, while its partition still has
records it has not read: no LeaveGroup, so the group notices only when its session runs out.
The group rebalances, the dead member's partition is taken over, and every record is
consumed at least once. Offsets are committed; a new consumer of the group resumes after
them and gets only records produced later.
Prints one line per check, "OK" at the end. Used by tests/tests/cloud_kafka.rs.
"""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from confluent_kafka import Consumer, Producer

GROUP_SETTINGS = {"group.id": "g1", "auto.offset.reset": "earliest",
                  "enable.auto.commit": True, "auto.commit.interval.ms": 200,
                  "session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def consumer(bootstrap, topic, name):
    c = Consumer({"bootstrap.servers": bootstrap, "client.id": name, **GROUP_SETTINGS})
    c.subscribe([topic])
    return c


def member(bootstrap, topic, name):
    """The member that dies: prints "PARTITION VALUE" per record, 10 ms apart, so that it
    is killed with records of its partition still unread; runs until killed."""
    c = consumer(bootstrap, topic, name)
    while True:
        msg = c.poll(0.2)
        if msg is None or msg.error():
            continue
        print(msg.partition(), msg.value().decode(), flush=True)
        time.sleep(0.01)


if sys.argv[1] == "member":
    member(*sys.argv[2:5])
    sys.exit(0)

bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])


def produce(start, n):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(start, start + n):
        p.produce(topic, key=f"k{i}", value=f"v{i}")
    p.flush(30)


def start_member(name):
    """The member process, a queue of the (partition, value) it read, and the thread that
    fills the queue (it ends when the process's output does)."""
    proc = subprocess.Popen([sys.executable, __file__, "member", bootstrap, topic, name],
                            stdout=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            partition, value = line.split()
            lines.put((int(partition), value))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


produce(0, count)
consumers = [consumer(bootstrap, topic, "c0"), None, consumer(bootstrap, topic, "c2")]
dying, dying_lines, dying_reader = start_member("c1")
seen = set()
dying_read = []  # (partition, value) the member process read
taken_over = set()  # values of the dead member's partitions read by the others after it died
its = set()  # the dead member's partitions
deadline = time.time() + 60
left = died = False
try:
    while len(seen) < count and time.time() < deadline:
        for i, c in enumerate(consumers):
            if c is None:
                continue
            msg = c.poll(0.1)
            if msg is None or msg.error():
                continue
            seen.add(msg.value().decode())
            if msg.partition() in its:
                taken_over.add(msg.value().decode())
            if not left and len(seen) > count // 4 and i == 0:
                c.close()  # leaves the group
                consumers[0] = None
                left = True
                print("c0 left")
        while not died:
            try:
                partition, value = dying_lines.get_nowait()
            except queue.Empty:
                break
            dying_read.append((partition, value))
            seen.add(value)
        if left and not died and len(seen) > count // 2 and len(dying_read) >= 20:
            # Dies: SIGKILL, so no LeaveGroup and no last commit; its session runs out.
            os.kill(dying.pid, signal.SIGKILL)
            dying.wait()
            dying_reader.join(10)
            while not dying_lines.empty():
                dying_read.append(dying_lines.get_nowait())
                seen.add(dying_read[-1][1])
            died = True
            # The partition it was reading when it died (it had records of it left).
            its = {dying_read[-1][0]}
            print("c1 died after reading", len(dying_read), "reading partition", sorted(its))
finally:
    if not died:
        os.kill(dying.pid, signal.SIGKILL)
        dying.wait()
print("consumed", len(seen), "distinct of", count)
assert len(seen) == count, "every record at least once"
assert left and died, "a member left and one died"
# Its partitions went on only once the group dropped it (session timeout) and handed them
# to a survivor, which read on from its last commit: records it never read among them.
taken_over -= {v for _, v in dying_read}
print("read by the others from its partitions, never read by it:", len(taken_over))
assert taken_over, "the dead member's partition was taken over"
time.sleep(1)  # a last auto-commit
for c in consumers:
    if c is not None:
        c.close()

produce(count, 10)
late = consumer(bootstrap, topic, "late")
got = []
deadline = time.time() + 30
while len(got) < 10 and time.time() < deadline:
    msg = late.poll(0.5)
    if msg is None or msg.error():
        continue
    got.append(msg.value().decode())
late.close()
print("after resume", len(got), sorted(got)[:3])
assert sorted(got) == sorted(f"v{i}" for i in range(count, count + 10)), "resumed after the commits"
print("OK")
