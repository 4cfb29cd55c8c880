"""An OPC UA server for the field tests: asyncua's, on opc.tcp://127.0.0.1:PORT/ferry/, with
variables in its namespace (ns=2): Temperature (Double, 0.5 higher every 200 ms, each value
with its source timestamp), Running (Boolean), Label (String), and the writable Setpoint
(Double) and Count (Int32).

    opcua_server.py PORT [--user NAME:PASSWORD] [--secure DIR]

--user: only that user may connect (no anonymous sessions). --secure: the endpoint takes
Basic256Sha256 with Sign and SignAndEncrypt only, with a self-signed server certificate made
in DIR. Prints "READY" once it serves, then "WRITE <name> <value>" each time a client's write
changed a writable variable.
"""

import argparse
import asyncio
import datetime
import logging
import os
import sys
from pathlib import Path

from asyncua import Server, ua
from asyncua.server.user_managers import UserManager
from asyncua.crypto.permission_rules import User, UserRole


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name, self.password = name, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User)
        return None


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--user")
    parser.add_argument("--secure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    users = None
    if args.user:
        name, password = args.user.split(":", 1)
        users = OneUser(name, password)
    server = Server(user_manager=users) if users else Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{args.port}/ferry/")
    server.set_server_name("ferry test server")
    # The URI its certificate names: a client checks they agree.
    await server.set_application_uri("urn:ferry:test:server")
    if args.secure:
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        os.makedirs(args.secure, exist_ok=True)
        cert = Path(args.secure) / "server.der"
        key = Path(args.secure) / "server.pem"
        await setup_self_signed_certificate(
            key,
            cert,
            "urn:ferry:test:server",
            "127.0.0.1",
            [ExtendedKeyUsageOID.SERVER_AUTH],
            {"countryName": "DE", "organizationName": "ferry tests"},
        )
        await server.load_certificate(cert)
        await server.load_private_key(key)
        server.set_security_policy(
            [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        )
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if users:
        server.set_security_IDs(["Username"])
    idx = await server.register_namespace("urn:ferry:test")
    plant = await server.nodes.objects.add_object(idx, "Plant")

    async def variable(name, value, kind):
        node = await plant.add_variable(
            ua.NodeId(name, idx), name, ua.Variant(value, kind)
        )
        return node

    temperature = await variable("Temperature", 21.5, ua.VariantType.Double)
    await variable("Running", True, ua.VariantType.Boolean)
    await variable("Label", "line 1", ua.VariantType.String)
    writable = {
        "Setpoint": await variable("Setpoint", 40.0, ua.VariantType.Double),
        "Count": await variable("Count", 7, ua.VariantType.Int32),
    }
    for node in writable.values():
        await node.set_writable()
    seen = {name: await node.read_value() for name, node in writable.items()}

    async with server:
        print("READY", flush=True)
        t = 21.5
        while True:
            await asyncio.sleep(0.2)
            t += 0.5
            now = datetime.datetime.now(datetime.timezone.utc)
            await temperature.write_value(
                ua.DataValue(
                    ua.Variant(t, ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
            )
            for name, node in writable.items():
                value = await node.read_value()
                if value != seen[name]:
                    seen[name] = value
                    print(f"WRITE {name} {value}", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
