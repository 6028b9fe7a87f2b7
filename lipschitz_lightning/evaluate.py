"""``python -m lipschitz_lightning.evaluate``: the command lives in ``lipschitz_lightning.commands.evaluate``; its
settings are checked before that module (and torch) is imported."""


def main() -> None:
    """The ``lipschitz-evaluate`` console script."""
    from lipschitz_lightning.commands.cli import command_main

    command_main("evaluate")


if __name__ == "__main__":
    main()
