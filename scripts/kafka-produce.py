"""Produces 1,000,000 x 100 B records (FERRY_RECORDS sets how many) with confluent-kafka
(librdkafka), acks=all, to topic "produced", and prints records/s once every delivery is
confirmed. Used by the bench scripts.

    python3 scripts/kafka-produce.py BOOTSTRAP [key=value librdkafka settings...]
"""
import os
import sys
import time

from confluent_kafka import Producer

conf = {"bootstrap.servers": sys.argv[1], "acks": "all", "linger.ms": 5,
        "batch.num.messages": 10000, "queue.buffering.max.messages": 1000000}
extra = dict(a.split("=", 1) for a in sys.argv[2:])
conf.update(extra)
p = Producer(conf)
n, done = int(os.environ.get("FERRY_RECORDS", "1000000")), [0]


def ok(err, msg):
    if err is None:
        done[0] += 1


payload = b"x" * 100
start = time.time()
for i in range(n):
    while True:
        try:
            p.produce("produced", value=payload, key=b"k%d" % (i % 1000), on_delivery=ok)
            break
        except BufferError:
            p.poll(0.01)
    if i % 10000 == 0:
        p.poll(0)
p.flush(120)
t = time.time() - start
settings = "".join(f", {k} {v}" for k, v in extra.items())
print(f"produce (confluent-kafka, acks=all{settings}): {done[0]} of {n} records confirmed "
      f"in {t:.2f} s: {done[0] / t:.0f} records/s")
