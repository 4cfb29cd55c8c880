"""confluent-kafka (librdkafka) against ferry-cloud's Kafka front.

Usage: python3 kafka_roundtrip.py BOOTSTRAP TOPIC COUNT [idempotent]
Produces COUNT records (acks=all; with "idempotent", enable.idempotence=true: the producer
gets a producer id from InitProducerId and numbers its batches) with keys k<i> and values
v<i>, each delivery confirmed;
then consumes the topic from the beginning with an assigned partition (no consumer group);
then seeks by timestamp to the middle record. Prints one line per check, "OK" at the end.
Used by tests/tests/cloud_kafka.rs.
"""
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
idempotent = len(sys.argv) > 4 and sys.argv[4] == "idempotent"
producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                     "enable.idempotence": idempotent})
delivered = []
base_ts = int(time.time() * 1000) - 60_000


def on_delivery(err, msg):
    if err is not None:
        print("delivery failed:", err)
        sys.exit(1)
    delivered.append(msg.offset())


for i in range(count):
    # Timestamps one second apart, so that seeking by time has something to find.
    producer.produce(topic, key=f"k{i}", value=f"v{i}", timestamp=base_ts + i * 1000,
                     on_delivery=on_delivery)
producer.flush(30)
print("delivered", len(delivered))
assert delivered == list(range(delivered[0], delivered[0] + count)), "offsets in order"

consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused",
                     "enable.auto.commit": False, "enable.partition.eof": True})
consumer.assign([TopicPartition(topic, 0, delivered[0])])
got = []
while True:
    msg = consumer.poll(10)
    if msg is None:
        print("timed out")
        sys.exit(1)
    if msg.error():
        if msg.error().code() == -191:  # _PARTITION_EOF
            break
        print("consume error:", msg.error())
        sys.exit(1)
    got.append((msg.key().decode(), msg.value().decode()))
print("consumed", len(got))
assert got == [(f"k{i}", f"v{i}") for i in range(count)], "every record, in order"

middle = count // 2
found = consumer.offsets_for_times([TopicPartition(topic, 0, base_ts + middle * 1000)], 10)
print("offset for time", found[0].offset)
assert found[0].offset == delivered[0] + middle, "seek by timestamp"
consumer.close()
print("OK")
