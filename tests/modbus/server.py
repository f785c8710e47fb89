"""A Modbus device for ferry's tests: pymodbus's server (3.x, SimDevice API) over TCP or RTU.

Usage: server.py --map MAP.json (--tcp PORT | --rtu DEVICE [--baud N --parity N|E|O
       --bytesize N --stopbits N])

MAP.json: {"UNIT": {"coil"|"discrete": [[ADDRESS, [true, ...]], ...],
                    "holding"|"input": [[ADDRESS, [WORD, ...]], ...]}, ...}
Addresses are the 0-based protocol addresses ferry's config uses. Addresses not in the map
answer with exception 2 (illegal data address).

Every request the server receives is printed on stdout, one line each, flushed:
`request unit=U fc=F address=A count=C`; `listening` is printed once the server accepts.
"""

import argparse
import asyncio
import functools
import json
import sys

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


async def log_request(unit, function_code, _start, address, count, _registers, _set):
    print(f"request unit={unit} fc={function_code} address={address} count={count}", flush=True)
    return None


def device(unit, spec):
    blocks = []
    for kind in ("coil", "discrete", "holding", "input"):
        datatype = DataType.BITS if kind in ("coil", "discrete") else DataType.REGISTERS
        entries = [
            SimData(address, values=list(values), datatype=datatype)
            for address, values in spec.get(kind, [])
        ]
        if not entries:
            # pymodbus wants every block to hold something: the last address.
            entries = [SimData(65535, values=[0], datatype=datatype)]
        blocks.append(entries)
    return SimDevice(
        id=unit,
        simdata=tuple(blocks),
        action=functools.partial(log_request, unit),
    )


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--map", required=True)
    p.add_argument("--tcp", type=int)
    p.add_argument("--rtu")
    p.add_argument("--baud", type=int, default=19200)
    p.add_argument("--parity", default="N")
    p.add_argument("--bytesize", type=int, default=8)
    p.add_argument("--stopbits", type=int, default=1)
    args = p.parse_args()
    with open(args.map, encoding="utf-8") as f:
        units = json.load(f)
    devices = [device(int(unit), spec) for unit, spec in units.items()]
    if args.tcp is not None:
        server = ModbusTcpServer(devices, address=("127.0.0.1", args.tcp))
    else:
        server = ModbusSerialServer(
            devices,
            port=args.rtu,
            baudrate=args.baud,
            parity=args.parity,
            bytesize=args.bytesize,
            stopbits=args.stopbits,
        )
    await server.serve_forever(background=True)
    print("listening", flush=True)
    await server.serving


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
