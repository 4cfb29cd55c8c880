"""paho-mqtt over WebSocket: subscribe, publish to itself, print what arrives.

Usage: python3 paho_ws_roundtrip.py PORT TOPIC PAYLOAD [CA_FILE]
With CA_FILE, over wss:// (TLS, the server's certificate checked against CA_FILE).
Prints the payload received, or TIMEOUT. Used by tests/tests/edge_broker.rs.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt

port, topic, payload = int(sys.argv[1]), sys.argv[2], sys.argv[3]
received = []
arrived = threading.Event()
subscribed = threading.Event()


def on_message(client, userdata, message):
    received.append(message.payload.decode())
    arrived.set()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets", protocol=mqtt.MQTTv5)
if len(sys.argv) > 4:
    client.tls_set(ca_certs=sys.argv[4])
client.on_message = on_message
client.on_subscribe = on_subscribe
client.connect("127.0.0.1", port)
client.loop_start()
client.subscribe(topic.split("/")[0] + "/#", qos=1)
if not subscribed.wait(10):
    print("TIMEOUT")
    sys.exit(1)
client.publish(topic, payload, qos=1).wait_for_publish(10)
print(received[0] if arrived.wait(10) else "TIMEOUT")
client.disconnect()
client.loop_stop()
