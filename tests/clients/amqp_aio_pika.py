"""aio-pika (asyncio RabbitMQ client) against ferry-cloud's AMQP front: a topic exchange,
a durable queue bound to it, confirmed publishes, an async consumer acking in order.

Usage: amqp_aio_pika.py PORT. Prints OK as its last line when every check passed.
"""

import asyncio
import sys

import aio_pika

PORT = int(sys.argv[1])


async def main():
    conn = await aio_pika.connect_robust(f"amqp://guest:guest@127.0.0.1:{PORT}/")
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        await ch.set_qos(prefetch_count=20)
        ex = await ch.declare_exchange("aio-events", aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue("aio-orders", durable=True)
        await q.bind(ex, routing_key="orders.*")
        for i in range(100):
            key = "orders.created" if i % 2 == 0 else "invoices.created"
            await ex.publish(aio_pika.Message(body=f"e{i}".encode(),
                                              delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                              headers={"i": i}),
                             routing_key=key)
        got = []
        async with q.iterator() as it:
            async for message in it:
                async with message.process():
                    got.append((message.body.decode(), message.headers["i"], message.routing_key))
                if len(got) == 50:
                    break
        assert [g[0] for g in got] == [f"e{i}" for i in range(0, 100, 2)], got[:5]
        assert all(g[1] == int(g[0][1:]) and g[2] == "orders.created" for g in got), got[:3]


asyncio.run(asyncio.wait_for(main(), 30))
print("OK")
