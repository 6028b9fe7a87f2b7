"""``python -m lipschitz_lightning.benchmark``: the command lives in ``lipschitz_lightning.commands.benchmark``."""

if __name__ == "__main__":
    from lipschitz_lightning.commands.benchmark import main

    main()
