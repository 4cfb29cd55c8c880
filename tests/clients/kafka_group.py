"""A confluent-kafka (librdkafka) consumer group against ferry-cloud's Kafka front.

Usage: python3 kafka_group.py BOOTSTRAP TOPIC COUNT
TOPIC has several partitions. Produces COUNT records; three consumers of one group subscribe:
one leaves (close) after the first records, one dies (stops polling, its session runs out);
the group rebalances and every record is consumed at least once. Offsets are committed; a
new consumer of the group resumes after them and gets only records produced later.
Prints one line per check, "OK" at the end. Used by tests/tests/cloud_kafka.rs.
"""
import sys
import time

from confluent_kafka import Consumer, Producer

bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])


def produce(start, n):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(start, start + n):
        p.produce(topic, key=f"k{i}", value=f"v{i}")
    p.flush(30)


def consumer(name):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g1", "client.id": name,
                  "auto.offset.reset": "earliest", "enable.auto.commit": True,
                  "auto.commit.interval.ms": 200, "session.timeout.ms": 6000,
                  "heartbeat.interval.ms": 500})
    c.subscribe([topic])
    return c


produce(0, count)
consumers = [consumer(f"c{i}") for i in range(3)]
seen = set()
deadline = time.time() + 60
left = died = False
while len(seen) < count and time.time() < deadline:
    for i, c in enumerate(consumers):
        if c is None:
            continue
        msg = c.poll(0.2)
        if msg is None or msg.error():
            continue
        seen.add(msg.value().decode())
        if not left and len(seen) > count // 4 and i == 0:
            c.close()  # leaves the group
            consumers[0] = None
            left = True
            print("c0 left")
    if left and not died and len(seen) > count // 2:
        consumers[1] = None  # dies: no more polls, no LeaveGroup; its session runs out
        died = True
        print("c1 died")
print("consumed", len(seen), "distinct of", count)
assert len(seen) == count, "every record at least once"
assert left and died, "a member left and one died"
time.sleep(1)  # a last auto-commit
for c in consumers:
    if c is not None:
        c.close()

produce(count, 10)
late = consumer("late")
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
