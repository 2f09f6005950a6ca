"""Create an API key and print it once (only its sha256 is stored).

python scripts/create_api_key.py --name ci --scopes read,train,generate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import get_settings  # noqa: E402
from app.db import make_engine, make_sessionmaker, upgrade_to_head  # noqa: E402
from app.keys import SCOPES, create_api_key  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="Who or what uses the key.")
    parser.add_argument("--scopes", default="read", help=f"Comma separated, from: {', '.join(SCOPES)}.")
    args = parser.parse_args(argv)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    settings = get_settings()
    upgrade_to_head(settings)
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as session:
            key, secret = create_api_key(session, args.name, scopes)
    except ValueError as err:
        print(f"error: --scopes: {err}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(
        f"created key {key.id} ({key.name}, scopes {key.scopes}); it is shown only this once:",
        file=sys.stderr,
    )
    print(secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
