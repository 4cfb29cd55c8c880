"""confluent-kafka's AdminClient (librdkafka) lists and describes a live consumer group of
ferry-cloud's Kafka front: ListGroups and DescribeGroups.

Usage: python3 kafka_groups_admin.py BOOTSTRAP TOPIC PARTITIONS
Two consumers of group "live" (client ids m1, m2) subscribe to TOPIC (of PARTITIONS
partitions) and poll until they share every partition. Then ListGroups has "live", Stable,
a consumer group; DescribeGroups gives Stable, the "range" assignor, both members with
their client ids and the partitions each one holds, disjoint and together all of TOPIC's.
When m1 closes, m2 is the only member and holds every partition; when m2 closes too the
group is Empty. Prints
one line per check, "OK" at the end. Used by tests/tests/cloud_kafka_api.rs.
"""
import sys
import time

from confluent_kafka import ConsumerGroupState, Consumer
from confluent_kafka.admin import AdminClient

bootstrap, topic, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3])
admin = AdminClient({"bootstrap.servers": bootstrap})


def member(name):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "live", "client.id": name,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                  "heartbeat.interval.ms": 500, "partition.assignment.strategy": "range"})
    c.subscribe([topic])
    return c


def poll_until(members, held, within=30):
    """Polls `members` until each holds the partitions `held` says (a set per member)."""
    deadline = time.time() + within
    while time.time() < deadline:
        for c in members.values():
            c.poll(0.1)
        now = {n: {p.partition for p in c.assignment()} for n, c in members.items()}
        if all(held(n, got) for n, got in now.items()):
            return now
    print("assignments never settled:", now)
    sys.exit(1)


def describe(group):
    return admin.describe_consumer_groups([group], request_timeout=10)[group].result(10)


def listed():
    result = admin.list_consumer_groups(request_timeout=10).result(10)
    assert not result.errors, result.errors
    return {g.group_id: g for g in result.valid}


everything = set(range(partitions))
members = {"m1": member("m1"), "m2": member("m2")}
held = poll_until(members, lambda n, got: len(got) > 0)
assert held["m1"] | held["m2"] == everything and not held["m1"] & held["m2"], held
print("held", held)

groups = listed()
print("listed", {g: (l.state, l.is_simple_consumer_group) for g, l in groups.items()})
assert groups["live"].state == ConsumerGroupState.STABLE, "listed as Stable"
assert not groups["live"].is_simple_consumer_group, "a consumer group"

d = describe("live")
print("described", d.state, d.partition_assignor, d.coordinator.id, len(d.members))
assert d.state == ConsumerGroupState.STABLE, "described as Stable"
assert d.partition_assignor == "range", "the protocol the members chose"
assert not d.is_simple_consumer_group
by_client = {m.client_id: m for m in d.members}
assert sorted(by_client) == ["m1", "m2"], "both members, by client id"
assert len({m.member_id for m in d.members}) == 2, "two member ids"
for name, m in by_client.items():
    assigned = {(tp.topic, tp.partition) for tp in m.assignment.topic_partitions}
    print("member", name, sorted(assigned))
    assert assigned == {(topic, p) for p in held[name]}, "the assignment the member holds"

members.pop("m1").close()
m2 = members["m2"]
poll_until(members, lambda n, got: got == everything)
d = describe("live")
print("after m1 left", d.state, [(m.client_id, len(m.assignment.topic_partitions))
                                 for m in d.members])
assert d.state == ConsumerGroupState.STABLE
assert [m.client_id for m in d.members] == ["m2"], "m1 is gone"
assert {tp.partition for tp in d.members[0].assignment.topic_partitions} == everything

m2.close()
d = describe("live")
print("after m2 left", d.state, len(d.members))
assert d.state == ConsumerGroupState.EMPTY and not d.members, "Empty once everyone left"
assert listed()["live"].state == ConsumerGroupState.EMPTY, "listed as Empty"
print("OK")
