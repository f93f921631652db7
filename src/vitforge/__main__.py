"""`python -m vitforge` (what `torchrun ... -m vitforge train ...` runs)."""

from vitforge.commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
