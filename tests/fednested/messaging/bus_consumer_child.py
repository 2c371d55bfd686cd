"""Child process for the at-least-once contract test: commits the first message it polls, polls a second one,
reports it on stdout and then waits, uncommitted, to be killed.

Usage: python bus_consumer_child.py SETTINGS_JSON GROUP TOPIC
"""

import sys
import time

from pydantic import TypeAdapter

from fednested.messaging import BusSettings, make_bus


def main() -> None:
    settings = TypeAdapter(BusSettings).validate_json(sys.argv[1])
    group, topic = sys.argv[2], sys.argv[3]
    with make_bus(settings) as bus, bus.consumer(group, [topic]) as consumer:
        polled = []
        deadline = time.monotonic() + 60
        while len(polled) < 2 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            polled.append(message)
            if len(polled) == 1:
                consumer.commit(message)
        if len(polled) < 2:
            print("TIMEOUT", flush=True)
            sys.exit(1)
        first, second = polled
        print(f"COMMITTED {first.key} {first.offset}", flush=True)
        print(f"POLLED {second.key} {second.offset}", flush=True)
        time.sleep(120)  # the parent kills us here, before any commit of the second message


if __name__ == "__main__":
    main()
