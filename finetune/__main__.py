"""`python -m finetune ...`: see finetune.cli."""

from finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
