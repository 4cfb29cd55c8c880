"""Consumes COUNT records of TOPIC in consumer group GROUP with confluent-kafka (librdkafka),
commits their offsets synchronously and leaves the group.

Usage: python3 kafka_consume.py BOOTSTRAP TOPIC GROUP COUNT
Prints the offsets read, one per line, then "OK". Used by tests/tests/console.rs.
"""
import sys
import time

from confluent_kafka import Consumer

bootstrap, topic, group, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
              "auto.offset.reset": "earliest", "enable.auto.commit": False})
c.subscribe([topic])
got = []
deadline = time.time() + 60
while len(got) < count and time.time() < deadline:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    got.append(m.offset())
c.commit(asynchronous=False)
c.close()
for o in got:
    print(o)
if len(got) < count:
    sys.exit(f"only {len(got)} of {count} records")
print("OK")
