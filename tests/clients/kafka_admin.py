"""confluent-kafka's AdminClient against ferry-cloud's Kafka front: CreateTopics (with a
setting), DescribeConfigs, a refused setting, and the new topic's partitions in Metadata.

Usage: python3 kafka_admin.py BOOTSTRAP
Prints one line per check, "OK" at the end. Used by tests/tests/cloud_kafka.rs.
"""
import sys

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
print("OK")
