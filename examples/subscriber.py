"""Follow corral's events from another process and print them.

Run: ``.venv/bin/python -m examples.subscriber 'state.changed.*' --url redis://127.0.0.1:6379/0``
(add ``--from-offset 0`` to replay every state change kept in the durable stream first).
"""

from __future__ import annotations

import argparse

import corral


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pattern", nargs="?", default="*")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="corral")
    parser.add_argument("--from-offset", type=int, default=None)
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args(argv)
    seen = 0
    with (
        corral.connect(args.url, namespace=args.namespace) as client,
        client.subscribe(args.pattern, from_offset=args.from_offset) as events,
    ):
        print(f"following {args.pattern!r}", flush=True)
        for delivery in events:
            print(delivery.topic, delivery.message, flush=True)
            seen += 1
            if seen == args.count:
                break


if __name__ == "__main__":
    main()
