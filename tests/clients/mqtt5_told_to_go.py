"""paho-mqtt (MQTT 5): connects, says READY, and reports the DISCONNECT the server sends.

Usage: python3 mqtt5_told_to_go.py PORT [CLIENT_ID WILL_TOPIC]
Prints READY once connected, then, when the server disconnects it (within 60 s), a line
"DISCONNECT <reason code value> <server reference or ->" and OK. With CLIENT_ID, it connects
under that id with a persistent session (clean start 0, session expiry 1 h) and a will
("gone", QoS 1) on WILL_TOPIC. Used by tests/tests/shutdown.rs and
tests/tests/cloud_backends.rs (a node draining on SIGTERM, a session taken over).
"""
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port = int(sys.argv[1])
client_id = sys.argv[2] if len(sys.argv) > 2 else "told-to-go"
connected = threading.Event()
gone = threading.Event()
told = []


def on_connect(client, userdata, flags, reason_code, properties):
    if not reason_code.is_failure:
        connected.set()


def on_disconnect(client, userdata, flags, reason_code, properties):
    reference = getattr(properties, "ServerReference", None) if properties else None
    told.append((reason_code.value, reference or "-"))
    gone.set()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_disconnect = on_disconnect
client.reconnect_delay_set(min_delay=60, max_delay=60)
if len(sys.argv) > 3:
    client.will_set(sys.argv[3], "gone", qos=1)
    persistent = Properties(PacketTypes.CONNECT)
    persistent.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=persistent)
else:
    client.connect("127.0.0.1", port, keepalive=30)
client.loop_start()
if not connected.wait(30):
    print("NOT CONNECTED")
    sys.exit(1)
print("READY", flush=True)
if not gone.wait(60):
    print("NOT DISCONNECTED")
    sys.exit(1)
client.loop_stop()
code, reference = told[0]
print("DISCONNECT %d %s" % (code, reference))
print("OK")
