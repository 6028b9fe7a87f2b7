"""``python -m lipschitz_lightning.sample``: the command lives in ``lipschitz_lightning.commands.sample``; its
settings are checked before that module (and torch) is imported."""


def main() -> None:
    """The ``lipschitz-sample`` console script."""
    from lipschitz_lightning.commands.cli import command_main

    command_main("sample")


if __name__ == "__main__":
    main()
