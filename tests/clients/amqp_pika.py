"""pika (the Python RabbitMQ client) against ferry-cloud's AMQP front: publisher confirms,
manual acks with prefetch, reject and requeue, dead-lettering (reject, TTL, max-length) with
x-death, TTL, max-length, exclusive queues, basic.get, consumer cancel on queue delete.

Usage: amqp_pika.py PORT. Prints OK as its last line when every check passed.
"""

import sys
import time

import pika

PORT = int(sys.argv[1])


def connect():
    params = pika.ConnectionParameters("127.0.0.1", PORT, heartbeat=30)
    return pika.BlockingConnection(params)


def get_all(ch, queue, want, within=10.0):
    """basic.get until `want` messages came (no ack) or `within` seconds passed."""
    got = []
    deadline = time.time() + within
    while len(got) < want and time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        got.append((method, props, body))
    return got


def confirms_and_prefetch():
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("pika-work", durable=True)
    ch.confirm_delivery()
    for i in range(200):
        # With confirms, basic_publish returns once the broker acked (raises on nack).
        ch.basic_publish("", "pika-work", f"w{i}".encode(),
                         pika.BasicProperties(delivery_mode=2, message_id=f"id-{i}"))
    declared = ch.queue_declare("pika-work", passive=True)
    assert declared.method.message_count == 200, declared.method.message_count
    ch.basic_qos(prefetch_count=10)
    seen = []
    unacked_peak = [0]
    pending = []

    def on_message(channel, method, props, body):
        pending.append(method.delivery_tag)
        unacked_peak[0] = max(unacked_peak[0], len(pending))
        seen.append((body.decode(), props.message_id))
        if len(pending) == 10 or len(seen) == 200:
            # Ack all of them at once, with multiple.
            channel.basic_ack(pending[-1], multiple=True)
            pending.clear()
        if len(seen) == 200:
            channel.stop_consuming()

    ch.basic_consume("pika-work", on_message)
    conn.call_later(20, ch.stop_consuming)
    ch.start_consuming()
    assert [b for b, _ in seen] == [f"w{i}" for i in range(200)], seen[:5]
    assert all(m == f"id-{b[1:]}" for b, m in seen)
    assert unacked_peak[0] == 10, f"prefetch 10 held: {unacked_peak[0]}"
    conn.close()


def reject_requeue_and_dead_letter():
    conn = connect()
    ch = conn.channel()
    ch.exchange_declare("pika-dlx", exchange_type="fanout")
    ch.queue_declare("pika-dead")
    ch.queue_bind("pika-dead", "pika-dlx")
    ch.queue_declare("pika-src", arguments={"x-dead-letter-exchange": "pika-dlx"})
    ch.confirm_delivery()
    ch.basic_publish("", "pika-src", b"first")
    ch.basic_publish("", "pika-src", b"second")
    method, _, body = ch.basic_get("pika-src")
    assert body == b"first" and not method.redelivered
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = ch.basic_get("pika-src")
    assert body == b"first" and method.redelivered, (body, method.redelivered)
    ch.basic_reject(method.delivery_tag, requeue=False)
    dead = get_all(ch, "pika-dead", 1)
    assert len(dead) == 1 and dead[0][2] == b"first", dead
    death = dead[0][1].headers["x-death"][0]
    assert death["queue"] == "pika-src" and death["reason"] == "rejected", death
    conn.close()


def ttl_and_max_length():
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("pika-expired")
    ch.queue_declare("pika-ttl", arguments={
        "x-message-ttl": 200,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "pika-expired",
    })
    ch.queue_declare("pika-max", arguments={"x-max-length": 3})
    ch.queue_declare("pika-reject", arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", "pika-ttl", b"short-lived")
    for i in range(5):
        ch.basic_publish("", "pika-max", f"m{i}".encode())
    ch.basic_publish("", "pika-reject", b"r0")
    ch.basic_publish("", "pika-reject", b"r1")
    # Let the queues see what reached them, then the third is refused with a nack.
    for _ in range(100):
        if ch.queue_declare("pika-reject", passive=True).method.message_count == 2:
            break
        time.sleep(0.02)
    try:
        ch.basic_publish("", "pika-reject", b"r2")
        raise AssertionError("a publish to a full reject-publish queue is nacked")
    except pika.exceptions.NackError:
        pass
    kept = get_all(ch, "pika-max", 3)
    assert [b for _, _, b in kept] == [b"m2", b"m3", b"m4"], kept
    time.sleep(0.5)
    assert ch.basic_get("pika-ttl", auto_ack=True)[0] is None, "expired"
    expired = get_all(ch, "pika-expired", 1)
    assert len(expired) == 1 and expired[0][2] == b"short-lived", expired
    assert expired[0][1].headers["x-death"][0]["reason"] == "expired"
    conn.close()


def exclusive_and_cancel_on_delete():
    owner = connect()
    och = owner.channel()
    och.queue_declare("pika-excl", exclusive=True)
    other = connect()
    xch = other.channel()
    try:
        xch.queue_declare("pika-excl", passive=True)
        raise AssertionError("another connection may not use an exclusive queue")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 405, e
    owner.close()
    # The exclusive queue went with its connection.
    ch = other.channel()
    try:
        ch.queue_declare("pika-excl", passive=True)
        raise AssertionError("the exclusive queue is gone")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
    # Deleting a queue cancels its consumers (consumer_cancel_notify).
    ch = other.channel()
    ch.queue_declare("pika-doomed")
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume("pika-doomed", lambda *a: None)
    ch2 = other.channel()
    ch2.queue_delete("pika-doomed")
    other.process_data_events(time_limit=1)
    assert cancelled == [tag], cancelled
    other.close()


def server_named_and_properties():
    conn = connect()
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    assert q.startswith("amq.gen-"), q
    ch.queue_bind(q, "amq.direct", routing_key="rk")
    ch.confirm_delivery()
    props = pika.BasicProperties(
        content_type="text/plain", content_encoding="utf-8", headers={"a": "b", "n": 7},
        delivery_mode=2, priority=4, correlation_id="c", reply_to="r", expiration="60000",
        message_id="m", timestamp=1700000000, type="t", app_id="app")
    ch.basic_publish("amq.direct", "rk", b"props", props)
    got = get_all(ch, q, 1)
    assert len(got) == 1
    p = got[0][1]
    for field in ["content_type", "content_encoding", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                  "type", "app_id"]:
        assert getattr(p, field) == getattr(props, field), (field, getattr(p, field))
    assert p.headers == {"a": "b", "n": 7}, p.headers
    try:
        ch.basic_publish("amq.direct", "nowhere", b"x", mandatory=True)
        raise AssertionError("an unroutable mandatory publish is returned")
    except pika.exceptions.UnroutableError:
        pass
    conn.close()


def direct_reply_to():
    server = connect()
    sch = server.channel()
    sch.queue_declare("pika-rpc")
    client = connect()
    cch = client.channel()
    replies = []
    cch.basic_consume("amq.rabbitmq.reply-to",
                      lambda ch, m, p, body: replies.append((p.correlation_id, body)),
                      auto_ack=True)
    cch.basic_publish("", "pika-rpc", b"2+2", pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id="q-1"))
    method = None
    deadline = time.time() + 10
    while method is None and time.time() < deadline:
        method, props, body = sch.basic_get("pika-rpc", auto_ack=True)
        if method is None:
            time.sleep(0.02)
    assert method is not None and body == b"2+2"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to."), props.reply_to
    sch.basic_publish("", props.reply_to, b"4",
                      pika.BasicProperties(correlation_id=props.correlation_id))
    deadline = time.time() + 10
    while not replies and time.time() < deadline:
        client.process_data_events(time_limit=0.1)
    assert replies == [("q-1", b"4")], replies
    server.close()
    client.close()


def silent_peer_is_closed():
    # A 1 s heartbeat, then silence (no process_data_events): the server closes the
    # connection after two intervals.
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", PORT, heartbeat=1))
    conn.channel()
    time.sleep(4)
    try:
        conn.process_data_events(time_limit=1)
        conn.channel()
        raise AssertionError("a peer silent for two heartbeats is closed")
    except (pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosed,
            pika.exceptions.AMQPConnectionError):
        pass


confirms_and_prefetch()
silent_peer_is_closed()
direct_reply_to()
reject_requeue_and_dead_letter()
ttl_and_max_length()
exclusive_and_cancel_on_delete()
server_named_and_properties()
print("OK")
