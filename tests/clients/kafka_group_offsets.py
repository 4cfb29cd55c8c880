"""Committed offsets of two consumer groups of ferry-cloud's Kafka front, written by
confluent-kafka consumers (OffsetCommit) and read back with the AdminClient
(OffsetFetch), one group per request, which is all librdkafka asks for.

Usage: python3 kafka_group_offsets.py BOOTSTRAP TOPIC
Group "ga" commits TOPIC's partition 0 at 5 and 1 at 7; group "gb" commits partition 0 at
2 and 2 at 9 (TOPIC has at least three partitions and 10 records are produced to each).
Each group's list_consumer_group_offsets gives its own offsets and nothing of the other's.
Prints one line per check, "OK" at the end. Used by tests/tests/cloud_kafka_api.rs, which
then asks for both groups in one OffsetFetch v8.
"""
import sys

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

bootstrap, topic = sys.argv[1], sys.argv[2]
COMMITS = {"ga": {0: 5, 1: 7}, "gb": {0: 2, 2: 9}}

producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
for p in range(3):
    for i in range(10):
        producer.produce(topic, value=f"p{p}-{i}", partition=p)
assert producer.flush(30) == 0, "every record delivered"

for group, offsets in COMMITS.items():
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
             asynchronous=False)
    c.close()
    print("committed", group, offsets)

admin = AdminClient({"bootstrap.servers": bootstrap})
for group, offsets in COMMITS.items():
    request = [ConsumerGroupTopicPartitions(group)]  # None: every partition it committed
    result = admin.list_consumer_group_offsets(request, request_timeout=10)[group].result(10)
    got = {tp.partition: tp.offset for tp in result.topic_partitions if tp.topic == topic}
    print("fetched", group, got)
    assert got == offsets, f"{group}: its own offsets"
    asked = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(3)])]
    result = admin.list_consumer_group_offsets(asked, request_timeout=10)[group].result(10)
    got = {tp.partition: tp.offset for tp in result.topic_partitions}
    print("fetched by partition", group, got)
    assert got == {p: offsets.get(p, -1001) for p in range(3)}, \
        f"{group}: its offsets, none (-1001) where it committed none"
print("OK")
