"""confluent-kafka (librdkafka) producers with acks=0 and acks=1 against ferry-cloud's Kafka
front.

Usage: python3 kafka_produce_acks.py BOOTSTRAP TOPIC COUNT
Produces COUNT records to partition 0 of TOPIC with acks=0 (librdkafka then expects no
response: it confirms each record as sent, with no offset), then COUNT more with acks=1
(each confirmed with its offset, in order, after the acks=0 records). Then consumes the
partition from the beginning with an assigned consumer: all 2 x COUNT records are there, once
each, in the order produced. Prints one line per check, "OK" at the end. Used by
tests/tests/cloud_kafka_api.rs.
"""
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])


def produce(acks, start):
    """Produces records start..start+count with `acks`; their delivery reports' offsets."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": acks, "linger.ms": 5})
    offsets = []

    def on_delivery(err, msg):
        if err is not None:
            print(f"acks={acks}: delivery failed: {err}")
            sys.exit(1)
        offsets.append(msg.offset())

    for i in range(start, start + count):
        producer.produce(topic, key=f"k{i}", value=f"v{i}", partition=0,
                         on_delivery=on_delivery)
    left = producer.flush(30)
    assert left == 0, f"acks={acks}: {left} records not delivered"
    return offsets


unconfirmed = produce(0, 0)
print("acks=0 sent", len(unconfirmed), "offsets known", sum(o is not None and o >= 0 for o in unconfirmed))
assert len(unconfirmed) == count
# With acks=0 librdkafka reads no response, so it cannot know an offset.
assert all(o is None or o < 0 for o in unconfirmed), "acks=0: no offsets"

# The acks=0 requests went out on the producer's own connection; wait until the node has
# appended them all before the acks=1 producer, on another connection, adds its records.
watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
deadline = time.time() + 20
high = 0
while high < count and time.time() < deadline:
    high = watcher.get_watermark_offsets(TopicPartition(topic, 0), 5)[1]
    time.sleep(0.05)
watcher.close()
print("acks=0 landed", high)
assert high == count, "acks=0: every record appended"

confirmed = produce(1, count)
print("acks=1 confirmed", len(confirmed), "from offset", confirmed[0])
assert confirmed == list(range(count, 2 * count)), "acks=1: offsets in order, after acks=0's"

consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused",
                     "enable.auto.commit": False, "enable.partition.eof": True})
consumer.assign([TopicPartition(topic, 0, 0)])
got = []
while True:
    msg = consumer.poll(10)
    if msg is None:
        print("timed out after", len(got))
        sys.exit(1)
    if msg.error():
        if msg.error().code() == -191:  # _PARTITION_EOF
            break
        print("consume error:", msg.error())
        sys.exit(1)
    got.append((msg.offset(), msg.key().decode(), msg.value().decode()))
consumer.close()
print("consumed", len(got))
assert got == [(i, f"k{i}", f"v{i}") for i in range(2 * count)], \
    "every record once, in order, acks=0's first"
print("OK")
