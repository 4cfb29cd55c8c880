"""Publishes one persistent message with pika, with publisher confirms.

Usage: amqp_publish.py PORT EXCHANGE ROUTING_KEY BODY. Prints OK once it is confirmed.
"""

import sys

import pika

port, exchange, key, body = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_publish(exchange, key, body.encode(), pika.BasicProperties(delivery_mode=2))
conn.close()
print("OK")
