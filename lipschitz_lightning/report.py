"""``python -m lipschitz_lightning.report``: the command lives in ``lipschitz_lightning.commands.report``."""

if __name__ == "__main__":
    from lipschitz_lightning.commands.report import main

    raise SystemExit(main())
