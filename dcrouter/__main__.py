"""``python -m dcrouter``: the offline commands (check-config, migrate-config, run)."""

from dcrouter.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
