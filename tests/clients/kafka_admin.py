"""confluent-kafka's AdminClient against ferry-cloud's Kafka front: CreateTopics (with a
setting), DescribeConfigs, a refused setting, the new topic's partitions in Metadata;
DeleteTopics (records and commits gone; made again it is empty), refused for a stream an MQTT
route writes to (ROUTED) and for one that does not exist; a topic made with no partition
count gets the node's default (DEFAULT_PARTITIONS, its [log.streams] partitions).

Usage: python3 kafka_admin.py BOOTSTRAP ROUTED DEFAULT_PARTITIONS
Prints one line per check, "OK" at the end. Used by tests/tests/cloud_kafka.rs.
"""
import sys

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

admin = AdminClient({"bootstrap.servers": sys.argv[1]})
futures = admin.create_topics([NewTopic("made", 4, 1, config={"retention.ms": "3600000"})])
futures["made"].result(10)
print("created")
bad = admin.create_topics([NewTopic("bad", 1, 1, config={"compression.type": "zstd"})])
try:
    bad["bad"].result(10)
    print("a setting Ferry does not have was taken")
    sys.exit(1)
except Exception as e:  # KafkaException(INVALID_CONFIG)
    print("refused:", e.args[0].name())
again = admin.create_topics([NewTopic("made", 4, 1)])
try:
    again["made"].result(10)
    sys.exit(1)
except Exception as e:
    print("again:", e.args[0].name())
resource = ConfigResource("topic", "made")
configs = admin.describe_configs([resource])[resource].result(10)
print("retention.ms", configs["retention.ms"].value)
assert configs["retention.ms"].value == "3600000"
topics = admin.list_topics(timeout=10).topics
print("partitions", len(topics["made"].partitions))
assert len(topics["made"].partitions) == 4
assert "bad" not in topics


def error_name(future):
    try:
        future.result(10)
        return "NO_ERROR"
    except Exception as e:  # KafkaException
        return e.args[0].name()


bootstrap, routed = sys.argv[1], sys.argv[2]
producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
for i in range(100):
    producer.produce("made", key=f"k{i}", value=f"v{i}")
producer.flush(10)
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "gone"})
consumer.commit(offsets=[TopicPartition("made", 0, 5)], asynchronous=False)
consumer.close()

print("delete:", error_name(admin.delete_topics(["made"])["made"]))
topics = admin.list_topics(timeout=10).topics
assert "made" not in topics, "deleted"
print("delete again:", error_name(admin.delete_topics(["made"])["made"]))
print("delete routed:", error_name(admin.delete_topics([routed])[routed]))
assert routed in admin.list_topics(timeout=10).topics, "a routed stream stays"

# Made again: no records, no commits.
admin.create_topics([NewTopic("made", 1, 1)])["made"].result(10)
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "gone"})
committed = consumer.committed([TopicPartition("made", 0)], timeout=10)
low, high = consumer.get_watermark_offsets(TopicPartition("made", 0), timeout=10)
consumer.close()
print("made again: committed", committed[0].offset, "watermarks", low, high)
assert committed[0].offset < 0 and (low, high) == (0, 0)

# No partition count: the node's default ([log.streams] partitions).
admin.create_topics([NewTopic("defaulted")])["defaulted"].result(10)
defaulted = len(admin.list_topics(timeout=10).topics["defaulted"].partitions)
print("defaulted:", defaulted, "partitions")
assert defaulted == int(sys.argv[3]), f"{defaulted} partitions, the node's default is {sys.argv[3]}"
print("OK")
