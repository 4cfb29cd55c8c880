"""pika over TLS against ferry-cloud's [amqp.tls] listener: the server's certificate is
verified against the CA (host name localhost); a confirmed publish and a get go through.

Usage: amqp_tls.py PORT CA_FILE. Prints OK as its last line when every check passed.
"""

import ssl
import sys

import pika

PORT = int(sys.argv[1])
CA = sys.argv[2]

context = ssl.create_default_context(cafile=CA)
params = pika.ConnectionParameters(
    "127.0.0.1", PORT, ssl_options=pika.SSLOptions(context, server_hostname="localhost"))
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.queue_declare("tls-q")
ch.confirm_delivery()
ch.basic_publish("", "tls-q", b"over tls")
body = None
for _ in range(200):
    method, _, body = ch.basic_get("tls-q", auto_ack=True)
    if method is not None:
        break
    conn.sleep(0.02)
assert body == b"over tls", body
conn.close()

# A client that does not trust the server's CA is refused in the handshake.
try:
    pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", PORT, ssl_options=pika.SSLOptions(ssl.create_default_context(),
                                                        server_hostname="localhost"),
        connection_attempts=1))
    raise AssertionError("a client without the CA connected")
except (pika.exceptions.AMQPConnectionError, ssl.SSLError):
    pass
print("OK")
