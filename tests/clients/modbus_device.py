"""A Modbus device for the field tests: pymodbus's server, on TCP or on a serial line (RTU),
with registers holding values the test chose, encoded here with Python's struct (not with
Ferry's code), and every write it takes printed as a line.

    modbus_device.py --tcp PORT [--count N] --points JSON
    modbus_device.py --rtu PATH --units 1,2 --points JSON

JSON is a list of [table, address, type, byte_order, word_order, value], table one of coil,
discrete_input, holding_register, input_register; type as in Ferry's map (bool, u16, i16,
u32, i32, u64, i64, f32, f64, string:<registers>). Every unit of --units holds the same
values, plus its unit id in holding register 999 and input register 999. Prints "READY" once
it serves, then "WRITE <unit> <function> <address> <values>" for each write. With --count N
there are N devices, on ports PORT to PORT+N-1 (scripts/bench-field.sh polls 100 of them).
"""

import argparse
import asyncio
import json
import struct
import sys

from pymodbus.server import ModbusTcpServer, StartAsyncSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

FORMATS = {
    "u16": ">H",
    "i16": ">h",
    "u32": ">I",
    "i32": ">i",
    "u64": ">Q",
    "i64": ">q",
    "f32": ">f",
    "f64": ">d",
}
TABLES = ["coil", "discrete_input", "holding_register", "input_register"]
SIZE = 1000


def words(kind, byte_order, word_order, value):
    """The registers of a value: big-endian bytes, then the orders applied."""
    if kind.startswith("string:"):
        length = int(kind.split(":")[1])
        raw = value.encode().ljust(2 * length, b"\0")
    else:
        raw = struct.pack(FORMATS[kind], value)
    pairs = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order == "little" and not kind.startswith("string:"):
        pairs.reverse()
    if byte_order == "little":
        pairs = [p[::-1] for p in pairs]
    return [int.from_bytes(p, "big") for p in pairs]


def tables(points, unit):
    """Four lists of SIZE values each: bits for coils and discrete inputs, registers else."""
    bits = {t: [False] * SIZE for t in TABLES[:2]}
    regs = {t: [0] * SIZE for t in TABLES[2:]}
    for table, address, kind, byte_order, word_order, value in points:
        if table in bits:
            bits[table][address] = bool(value)
        else:
            for i, w in enumerate(words(kind, byte_order, word_order, value)):
                regs[table][address + i] = w
    regs["holding_register"][999] = unit
    regs["input_register"][999] = unit
    return (
        [SimData(0, values=bits["coil"], datatype=DataType.BITS)],
        [SimData(0, values=bits["discrete_input"], datatype=DataType.BITS)],
        [SimData(0, values=regs["holding_register"], datatype=DataType.REGISTERS)],
        [SimData(0, values=regs["input_register"], datatype=DataType.REGISTERS)],
    )


def device(unit, points):
    async def action(function, _start, address, _count, _registers, set_values):
        if set_values is not None:
            values = [int(v) for v in set_values]
            print(f"WRITE {unit} {function} {address} {values}", flush=True)
        return None

    return SimDevice(unit, simdata=tables(points, unit), action=action)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--rtu")
    parser.add_argument("--units", default="1")
    parser.add_argument("--points", required=True)
    args = parser.parse_args()
    points = json.loads(args.points)
    units = [int(u) for u in args.units.split(",")]
    devices = [device(u, points) for u in units]
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, lambda: print("READY", flush=True))
    if args.tcp:
        servers = [
            ModbusTcpServer(devices, address=("127.0.0.1", args.tcp + i))
            for i in range(args.count)
        ]
        await asyncio.gather(*(s.serve_forever() for s in servers))
    else:
        await StartAsyncSerialServer(devices, port=args.rtu, baudrate=19200, parity="N")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
