"""pika against ferry-cloud's AMQP front with a Mosquitto password file and ACL file: a
wrong password is refused (ACCESS_REFUSED), and a user consumes and publishes only where the
ACL allows (amqp/queue/<name> for reading a queue, amqp/exchange/<name> for publishing to
an exchange, the MQTT topic for amq.topic).

Usage: amqp_auth.py PORT. Prints OK as its last line when every check passed.
"""

import sys

import pika

PORT = int(sys.argv[1])


def connect(user, password):
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", PORT, credentials=pika.PlainCredentials(user, password),
        connection_attempts=1))


try:
    connect("alice", "wrong")
    raise AssertionError("a wrong password gets in")
except pika.exceptions.ProbableAuthenticationError:
    pass
except pika.exceptions.AMQPConnectionError as e:
    assert "ACCESS_REFUSED" in repr(e) or "403" in repr(e), repr(e)

conn = connect("alice", "secret")
ch = conn.channel()
ch.queue_declare("allowed")
ch.queue_declare("denied")
ch.queue_bind("allowed", "amq.direct", routing_key="k")
ch.confirm_delivery()
ch.basic_publish("amq.direct", "k", b"fine")
ch.basic_publish("amq.topic", "alice.data", b"mqtt topic alice/data: allowed")
method = None
for _ in range(200):
    method, _, body = ch.basic_get("allowed", auto_ack=True)
    if method is not None:
        break
    conn.sleep(0.02)
assert method is not None and body == b"fine"
try:
    ch.basic_get("denied")
    raise AssertionError("reading a queue the ACL does not grant")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403, e
ch = conn.channel()
ch.confirm_delivery()
try:
    ch.basic_publish("amq.fanout", "", b"not allowed")
    raise AssertionError("publishing to an exchange the ACL does not grant")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403, e
ch = conn.channel()
ch.confirm_delivery()
try:
    ch.basic_publish("amq.topic", "bob.data", b"mqtt topic bob/data: not granted")
    raise AssertionError("publishing to an MQTT topic the ACL does not grant")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403, e
conn.close()
print("OK")
